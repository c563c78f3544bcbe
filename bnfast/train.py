"""A training-loop helper: `Trainer` and `fit`, with a tqdm progress bar and per-epoch
metrics, evaluating in eval mode.

Data-parallel training over MPI: wrap the model in
:class:`bnfast.distributed.DistributedDataParallel` and run the same script on every rank
(``mpiexec -n 4 python train.py``); `fit` then gives each rank its part of every global
mini-batch, shows progress on rank 0 only, and reports metrics over all ranks.

Devices: the data stay where they are (NumPy arrays, usually), and `fit`, `evaluate` and
`predict` move each batch to the model's device, the device of its first parameter (or
buffer): a model moved with ``model.to("cuda")`` trains on NumPy data unchanged.

>>> import numpy as np
>>> from bnfast import nn, optim
>>> from bnfast.train import fit
>>> rng = np.random.default_rng(0)
>>> X = rng.standard_normal((512, 10), dtype=np.float32)
>>> y = (X[:, 0] + X[:, 1] > 0).astype(np.int64)
>>> net = nn.Sequential(nn.Linear(10, 16, rng=rng), nn.BatchNorm1d(16), nn.ReLU(),
...                     nn.Linear(16, 2, rng=rng))
>>> hist = fit(net, nn.CrossEntropyLoss(), optim.SGD(net.parameters(), lr=0.1, momentum=0.9),
...            (X, y), epochs=3, batch_size=32, val_data=(X, y), progress=False, rng=0)
>>> sorted(hist)
['accuracy', 'epoch', 'loss', 'lr', 'time', 'val_accuracy', 'val_loss']
>>> hist["val_accuracy"][-1] > 0.9
True
"""
import time

import numpy as np

from . import _xp
from .nn.loss import CrossEntropyLoss
from .nn.module import Module, _as_rng

__all__ = ["Trainer", "fit", "iterate_minibatches", "accuracy"]


def _limit_blas(n):
    """A context limiting NumPy's BLAS to `n` threads (threadpoolctl); a no-op for None or
    without threadpoolctl."""
    import contextlib

    if n is None:
        return contextlib.nullcontext()
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"blas_threads must be a positive integer or None, got {n!r}")
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(limits=int(n), user_api="blas")


def accuracy(output, target):
    """Fraction of rows whose arg-max equals the class index (or the target's arg-max).

    Parameters
    ----------
    output : array_like, shape (N, C)
        Scores (logits or probabilities) per class (NumPy or CuPy).
    target : array_like, shape (N,) or (N, C)
        Class indices, or class probabilities / one-hot rows (their arg-max is the class),
        on the device of `output` or on the CPU.

    Returns
    -------
    float
        The fraction of correct rows, in [0, 1] (NaN for an empty batch).

    Examples
    --------
    >>> import numpy as np
    >>> from bnfast.train import accuracy
    >>> scores = np.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]])
    >>> round(accuracy(scores, np.array([1, 0, 0])), 4)
    0.6667
    >>> accuracy(scores[:2], np.array([[0.0, 1.0], [0.0, 1.0]]))
    0.5
    """
    out = _xp.asarray(output)
    xp = _xp.array_module(out)
    t = _xp.asarray(target)
    t = _xp.to_device(t, _xp.device_of(out)) if xp is not np else _xp.asnumpy(t)
    if t.ndim == 2:
        t = t.argmax(axis=1)
    return float(xp.mean(out.argmax(axis=1) == t))


def iterate_minibatches(X, y=None, batch_size=32, *, shuffle=False, rng=None, drop_last=False,
                        shard=None):
    """Yield ``(x_batch, y_batch)`` (or ``x_batch`` if `y` is None) slices of arrays.

    Parameters
    ----------
    X : ndarray
        Inputs, batch axis first (NumPy, or CuPy: the batches are then on its GPU).
    y : ndarray, optional
        Targets with the same first dimension.
    batch_size : int, default 32
        Number of examples per batch (the last one may be smaller unless `drop_last`).
    shuffle : bool, default False
        Visit the examples in a random order (a fresh permutation per call).
    rng : None, int or numpy.random.Generator
        Source of the shuffling order with `shuffle`: None for fresh entropy, an int seed,
        or a Generator.
    drop_last : bool, default False
        Skip a final batch smaller than `batch_size`.
    shard : (rank, size), optional
        Yield only part `rank` of each batch cut into `size` parts, as
        ``numpy.array_split`` cuts it (parts differ by at most one example and may be
        empty): the examples of one rank of a data-parallel job whose global batch is
        `batch_size`.  Every rank must use the same `rng` state.

    Yields
    ------
    (x_batch, y_batch) : tuple of ndarray, or x_batch : ndarray
        Consecutive slices (views) of `X` and `y`, or, with `shuffle`, copies gathered in
        the permuted order; the last batch may be smaller unless `drop_last`.

    Raises
    ------
    ValueError
        If `X` and `y` differ in length, `batch_size` is less than 1, or `shard` is not a
        pair ``0 <= rank < size`` (raised when the iteration starts, as this is a
        generator).

    Examples
    --------
    >>> import numpy as np
    >>> from bnfast.train import iterate_minibatches
    >>> X, y = np.arange(10).reshape(5, 2), np.arange(5)
    >>> for xb, yb in iterate_minibatches(X, y, batch_size=2):
    ...     print(xb.tolist(), yb.tolist())
    [[0, 1], [2, 3]] [0, 1]
    [[4, 5], [6, 7]] [2, 3]
    [[8, 9]] [4]
    >>> [b.tolist() for b in iterate_minibatches(y, batch_size=2, drop_last=True)]
    [[0, 1], [2, 3]]
    >>> sorted(i for b in iterate_minibatches(y, batch_size=2, shuffle=True, rng=0)
    ...        for i in b.tolist())
    [0, 1, 2, 3, 4]
    >>> [b.tolist() for b in iterate_minibatches(y, batch_size=3, shard=(1, 2))]
    [[2], [4]]
    """
    n = len(X)
    if y is not None and len(y) != n:
        raise ValueError(f"X has {n} examples but y has {len(y)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if shard is not None:
        rank, size = _check_shard(shard)
    order = _as_rng(rng).permutation(n) if shuffle else None
    if order is not None and _xp.is_cupy(X):    # the same order, as an index on X's GPU
        order = _xp.to_device(order, _xp.device_of(X))
    stop = n - n % batch_size if drop_last else n
    for s in range(0, stop, batch_size):
        e = min(s + batch_size, n)
        if shard is not None:       # numpy.array_split's cut of [s, e) into `size` parts
            q, r = divmod(e - s, size)
            s, e = s + rank * q + min(rank, r), s + (rank + 1) * q + min(rank + 1, r)
        sl = slice(s, e) if order is None else order[s:e]
        yield X[sl] if y is None else (X[sl], y[sl])


def _model_device(model):
    """The device of `model`'s first parameter, else of its first buffer, else "cpu"."""
    for p in model.parameters():
        return _xp.device_of(p.data)
    for b in model.buffers():
        return _xp.device_of(b)
    return "cpu"


def _to_model_device(batch, device):
    """A batch (an array or a tuple of arrays) on `device`."""
    if isinstance(batch, tuple):
        return tuple(_to_model_device(b, device) for b in batch)
    return _xp.to_device(batch, device) if _xp.is_array(batch) else batch


def _array_pair(data):
    """Whether `data` is an ``(X, y)`` pair of arrays (rather than batches)."""
    return isinstance(data, tuple) and len(data) == 2 and _xp.is_array(data[0])


def _check_shard(shard):
    try:
        rank, size = (int(v) for v in shard)
    except (TypeError, ValueError):
        raise ValueError(f"shard must be a pair (rank, size), got {shard!r}") from None
    if not 0 <= rank < size:
        raise ValueError(f"shard must be (rank, size) with 0 <= rank < size, got {shard!r}")
    return rank, size


class Trainer:
    """Trains a model with a loss and an optimizer.

    Parameters
    ----------
    model : Module
        The network to train, a :class:`bnfast.nn.Module` (or a
        :class:`bnfast.distributed.DistributedDataParallel` wrapping one).
    loss_fn : loss module
        Called as ``loss_fn(output, target)`` returning a float, with ``backward()``.
    optimizer : bnfast.optim.Optimizer
        Holds the parameters of `model`; stepped once per batch.
    scheduler : bnfast.optim.LRScheduler, optional
        Stepped once per epoch.
    metrics : dict of str to callable, optional
        ``name -> f(output, target) -> float``, averaged over batches (weighted by batch
        size).  Default ``{"accuracy": accuracy}`` with a cross-entropy loss, else none.

    Notes
    -----
    Devices: the data stay where they are; every batch of :meth:`fit`, :meth:`evaluate`
    and :meth:`predict` (inputs and targets) is moved to the model's device, that of its
    first parameter or buffer (no copy when it is there already: NumPy data for a model on
    the CPU are used as they are).  A model moved with ``model.to("cuda")`` trains on
    NumPy data unchanged; build the optimizer after moving the model.

    Data-parallel training: when `model` has a ``comm`` attribute (an mpi4py
    communicator, as :class:`bnfast.distributed.DistributedDataParallel` has), every rank
    runs the same calls and

    - arrays ``(X, y)`` given to :meth:`fit` and :meth:`evaluate` are the full data on
      every rank: each global batch of `batch_size` is cut into one part per rank
      (``iterate_minibatches(..., shard=(rank, size))``), so training follows the same
      global batches as one process would (the shuffling `rng` must be the same on every
      rank: an int seed, or None for a seed drawn on rank 0); other data (iterables,
      callables) must already be this rank's part, with the same number of batches on
      every rank;
    - losses and metrics are averaged over all ranks' examples, so every rank returns the
      same history; only rank 0 shows a progress bar.

    Raises
    ------
    TypeError
        If `model` is not a :class:`bnfast.nn.Module`.
    ValueError
        From :meth:`fit`, if the training data yields no batch; from :meth:`evaluate`, if
        `data` is empty.

    Examples
    --------
    >>> import numpy as np
    >>> from bnfast import nn, optim
    >>> from bnfast.train import Trainer
    >>> rng = np.random.default_rng(0)
    >>> X = rng.standard_normal((128, 4), dtype=np.float32)
    >>> y = (X[:, 0] > 0).astype(np.int64)
    >>> net = nn.Sequential(nn.Linear(4, 8, rng=rng), nn.BatchNorm1d(8), nn.ReLU(),
    ...                     nn.Linear(8, 2, rng=rng))
    >>> opt = optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    >>> trainer = Trainer(net, nn.CrossEntropyLoss(), opt,
    ...                   scheduler=optim.StepLR(opt, step_size=2))
    >>> hist = trainer.fit((X, y), epochs=3, batch_size=32, progress=False, rng=0)
    >>> sorted(hist), hist["epoch"]
    (['accuracy', 'epoch', 'loss', 'lr', 'time'], [1, 2, 3])
    >>> [round(lr, 6) for lr in hist["lr"]]
    [0.1, 0.1, 0.01]
    >>> sorted(trainer.evaluate((X, y)))
    ['accuracy', 'loss']
    >>> trainer.predict(X).shape
    (128, 2)
    """

    def __init__(self, model, loss_fn, optimizer, scheduler=None, metrics=None):
        if not isinstance(model, Module):
            raise TypeError(f"model must be a bnfast.nn.Module, got {type(model).__name__}")
        self.model = model
        self.loss_fn = loss_fn
        self.optimizer = optimizer
        self.scheduler = scheduler
        if metrics is None:
            metrics = {"accuracy": accuracy} if isinstance(loss_fn, CrossEntropyLoss) else {}
        self.metrics = dict(metrics)
        self.history = {}
        self.comm = getattr(model, "comm", None)

    @property
    def rank(self):
        """This process's rank (0 without a communicator)."""
        return 0 if self.comm is None else self.comm.Get_rank()

    def _shard(self):
        return None if self.comm is None else (self.comm.Get_rank(), self.comm.Get_size())

    def _total(self, sums, n):
        """Sums and count over every rank (in rank order), or these alone."""
        if self.comm is None:
            return sums, n
        total, count = {}, 0
        for s, k in self.comm.allgather((sums, n)):
            for name, v in s.items():
                total[name] = total.get(name, 0.0) + v
            count += k
        return total, count

    def _shared_rng(self, rng):
        """The shuffling generator, the same on every rank."""
        if self.comm is None:
            return _as_rng(rng)
        if rng is None:
            seed = int(np.random.default_rng().integers(2**63)) if self.rank == 0 else None
            return np.random.default_rng(self.comm.bcast(seed, root=0))
        rng = _as_rng(rng)
        states = self.comm.allgather(repr(rng.bit_generator.state))
        if any(st != states[0] for st in states):
            raise ValueError("fit: the shuffling rng differs between ranks; give the same "
                             "int seed on every rank (or None for one drawn on rank 0)")
        return rng

    def train_step(self, x, y):
        """One step: forward, loss, backward, optimizer update.  Returns (loss, output)."""
        self.optimizer.zero_grad()
        out = self.model.forward(x)
        loss = self.loss_fn(out, y)
        self.model.backward(self.loss_fn.backward())
        self.optimizer.step()
        return loss, out

    def _batches(self, data, batch_size, shuffle, rng):
        if _array_pair(data):
            return iterate_minibatches(data[0], data[1], batch_size, shuffle=shuffle, rng=rng,
                                       shard=self._shard())
        if callable(data):
            return data()
        return iter(data)

    @staticmethod
    def _n_batches(data, batch_size):
        if _array_pair(data):
            return -(-len(data[0]) // batch_size)
        try:
            return len(data)
        except TypeError:
            return None

    def evaluate(self, data, batch_size=256):
        """Loss and metrics over `data`, in eval mode (modes are restored afterwards).

        Parameters
        ----------
        data : (X, y) arrays, or an iterable of (x, y) batches
            The evaluation data: a pair of arrays (cut into batches of `batch_size`), or
            batches of inputs and targets.
        batch_size : int, default 256
            Used when `data` is a pair of arrays.

        Returns
        -------
        dict
            ``{"loss": ..., <metric>: ...}``, averages weighted by batch size (over every
            rank's examples, with a communicator).

        Raises
        ------
        ValueError
            If `data` is empty.
        """
        modes = [(m, m.training) for m in self.model.modules()]
        self.model.eval()
        device = _model_device(self.model)
        try:
            sums, n = {}, 0
            for batch in self._batches(data, batch_size, False, None):
                xb, yb = _to_model_device(tuple(batch), device)
                k = len(xb)
                if k == 0:
                    continue
                out = self.model.forward(xb)
                vals = {"loss": self.loss_fn(out, yb)}
                vals.update({name: f(out, yb) for name, f in self.metrics.items()})
                for name, v in vals.items():
                    sums[name] = sums.get(name, 0.0) + v * k
                n += k
        finally:
            for m, t in modes:
                m.training = t
        sums, n = self._total(sums, n)
        if n == 0:
            raise ValueError("evaluate: no data")
        return {name: s / n for name, s in sums.items()}

    def predict(self, X, batch_size=256):
        """Model outputs for `X` in eval mode, concatenated (modes restored)."""
        modes = [(m, m.training) for m in self.model.modules()]
        self.model.eval()
        device = _model_device(self.model)
        try:
            outs = [self.model.forward(_xp.to_device(xb, device))
                    for xb in iterate_minibatches(X, None, batch_size)]
        finally:
            for m, t in modes:
                m.training = t
        return _xp.array_module(*outs[:1]).concatenate(outs)

    def fit(self, train_data, epochs=1, *, batch_size=32, shuffle=True, val_data=None,
            rng=None, progress=True, callback=None, blas_threads=1):
        """Train for `epochs` epochs; return the history (also kept as ``self.history``).

        Parameters
        ----------
        train_data : (X, y) arrays, an iterable of (x, y) batches, or a callable
            The training data: a pair of arrays (cut into batches of `batch_size`,
            reshuffled every epoch with `shuffle`), batches of inputs and targets, or a
            callable returning a fresh iterable of batches each epoch.  Each batch is
            moved to the model's device (see the class's Notes).
        epochs : int, default 1
            Number of passes over `train_data`.
        batch_size : int, default 32
            Used when `train_data` is a pair of arrays.
        shuffle : bool, default True
            Reshuffle (X, y) every epoch.
        val_data : like `train_data`, optional
            Evaluated in eval mode after every epoch.
        rng : None, int or numpy.random.Generator
            Shuffling order.
        progress : bool, default True
            Show a tqdm progress bar per epoch (running loss and metrics; on rank 0 only
            with a communicator).
        callback : callable, optional
            ``callback(epoch, record)`` after each epoch with that epoch's metrics (on
            every rank).
        blas_threads : int or None, default 1
            Threads of NumPy's BLAS (the matrix products of ``Linear`` and ``Conv2d``)
            during training, restored afterwards; needs threadpoolctl (without it the
            BLAS keeps its setting).  One thread is fastest for the small products of a
            mini-batch and does not collapse when another process keeps a core busy (a
            multi-threaded BLAS then spins waiting for its threads: 5 to 30 times
            slower); None leaves the BLAS alone (for large layers on an idle machine).
            See the "Threads" page of the user guide.

        Returns
        -------
        history : dict of lists
            ``epoch``, ``loss``, the metrics, ``val_loss`` and ``val_<metric>`` (with
            `val_data`), ``lr`` (first group's rate during the epoch) and ``time`` (s).

        Raises
        ------
        ValueError
            If the training data yields no batch, or (with a communicator) `rng` differs
            between ranks.
        """
        with _limit_blas(blas_threads):
            return self._fit_epochs(train_data, epochs, batch_size, shuffle, val_data, rng,
                                    progress, callback)

    def _fit_epochs(self, train_data, epochs, batch_size, shuffle, val_data, rng, progress,
                    callback):
        """The epochs of :meth:`fit`."""
        rng = self._shared_rng(rng)
        progress = progress and self.rank == 0
        hist = self.history
        for epoch in range(1, epochs + 1):
            t0 = time.perf_counter()
            lr = self.optimizer.param_groups[0]["lr"]
            self.model.train()
            batches = self._batches(train_data, batch_size, shuffle, rng)
            bar = None
            if progress:
                from tqdm.auto import tqdm
                bar = tqdm(batches, total=self._n_batches(train_data, batch_size),
                           desc=f"epoch {epoch}/{epochs}", leave=True)
                batches = bar
            sums, n = {}, 0
            device = _model_device(self.model)
            for batch in batches:
                xb, yb = _to_model_device(tuple(batch), device)
                loss, out = self.train_step(xb, yb)
                k = len(xb)
                if k == 0:              # a rank's empty part of a global batch
                    continue
                vals = {"loss": loss}
                vals.update({name: f(out, yb) for name, f in self.metrics.items()})
                for name, v in vals.items():
                    sums[name] = sums.get(name, 0.0) + v * k
                n += k
                if bar is not None:
                    bar.set_postfix({name: f"{s / n:.4f}" for name, s in sums.items()},
                                    refresh=False)
            sums, n = self._total(sums, n)
            if n == 0:
                raise ValueError("fit: the training data yielded no batches")
            record = {"epoch": epoch}
            record.update({name: s / n for name, s in sums.items()})
            if val_data is not None:
                record.update({f"val_{k}": v for k, v in self.evaluate(val_data).items()})
            record["lr"] = lr
            if self.scheduler is not None:
                self.scheduler.step()
            record["time"] = time.perf_counter() - t0
            if bar is not None:
                bar.set_postfix({k: f"{v:.4f}" for k, v in record.items()
                                 if k not in ("epoch", "time")})
                bar.close()
            for k, v in record.items():
                hist.setdefault(k, []).append(v)
            if callback is not None:
                callback(epoch, record)
        return hist


def fit(model, loss_fn, optimizer, train_data, epochs=1, *, batch_size=32, shuffle=True,
        val_data=None, scheduler=None, metrics=None, rng=None, progress=True, callback=None,
        blas_threads=1):
    """Train `model`; shorthand for ``Trainer(...).fit(...)``.

    See :class:`Trainer` and :meth:`Trainer.fit` for details.

    Parameters
    ----------
    model : Module
        The network to train.
    loss_fn : loss module
        Called as ``loss_fn(output, target)`` returning a float, with ``backward()``.
    optimizer : bnfast.optim.Optimizer
        Holds the parameters of `model`; stepped once per batch.
    train_data : (X, y) arrays, an iterable of (x, y) batches, or a callable
        The training data: a pair of arrays (cut into batches of `batch_size`, reshuffled
        every epoch with `shuffle`), batches of inputs and targets, or a callable
        returning a fresh iterable of batches each epoch.
    epochs : int, default 1
        Number of passes over `train_data`.
    batch_size : int, default 32
        Used when `train_data` or `val_data` is a pair of arrays.
    shuffle : bool, default True
        Reshuffle (X, y) every epoch.
    val_data : like `train_data`, optional
        Evaluated in eval mode after every epoch.
    scheduler : bnfast.optim.LRScheduler, optional
        Stepped once per epoch.
    metrics : dict of str to callable, optional
        ``name -> f(output, target) -> float``; default ``{"accuracy": accuracy}`` with a
        cross-entropy loss, else none.
    rng : None, int or numpy.random.Generator
        Shuffling order.
    progress : bool, default True
        Show a tqdm progress bar per epoch (on rank 0 only, for a data-parallel model).
    callback : callable, optional
        ``callback(epoch, record)`` after each epoch with that epoch's metrics.
    blas_threads : int or None, default 1
        Threads of NumPy's BLAS during training (see :meth:`Trainer.fit`); None leaves
        the BLAS's setting.

    Returns
    -------
    history : dict of lists
        As returned by :meth:`Trainer.fit`.

    Raises
    ------
    TypeError
        If `model` is not a :class:`bnfast.nn.Module`.
    ValueError
        If the training data yields no batch, or the shuffling `rng` differs between
        ranks (data-parallel training; see :class:`Trainer`).

    Examples
    --------
    >>> import numpy as np
    >>> from bnfast import nn, optim
    >>> from bnfast.train import fit
    >>> rng = np.random.default_rng(0)
    >>> X = rng.standard_normal((64, 3), dtype=np.float32)
    >>> y = X @ np.array([[1.0], [-2.0], [0.5]], np.float32)
    >>> net = nn.Linear(3, 1, rng=rng)
    >>> epochs = []
    >>> hist = fit(net, nn.MSELoss(), optim.SGD(net.parameters(), lr=0.1), (X, y),
    ...            epochs=20, batch_size=16, progress=False, rng=0,
    ...            callback=lambda epoch, record: epochs.append(epoch))
    >>> sorted(hist), epochs[-1]
    (['epoch', 'loss', 'lr', 'time'], 20)
    >>> hist["loss"][-1] < 1e-3 < hist["loss"][0]
    True
    """
    trainer = Trainer(model, loss_fn, optimizer, scheduler=scheduler, metrics=metrics)
    return trainer.fit(train_data, epochs, batch_size=batch_size, shuffle=shuffle,
                       val_data=val_data, rng=rng, progress=progress, callback=callback,
                       blas_threads=blas_threads)


from .plotting import plot_history  # noqa: E402  (matplotlib is imported only when plotting)
__all__.append("plot_history")
