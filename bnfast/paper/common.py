"""Pieces shared by the paper's experiments: data, evaluation with a probe, the percentile
recorder, the training step, progress bars and result files."""
import contextlib
import csv
import json
import os
import pickle
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from .. import nn
from ..datasets import as_float, load_mnist

__all__ = ["PercentileRecorder", "MnistArrays", "load_mnist_arrays", "forward_probe",
           "evaluate", "population_copy", "Batches", "train_step", "progress_bar",
           "write_csv", "write_json", "machine_info", "Timer", "limit_threads"]
# Interrupted, CheckpointError, save_checkpoint and load_checkpoint serve the command line
# (Ctrl-C, --resume); not listed in __all__ (nor in docs/api/paper.rst) for now.


# ---------------------------------------------------------------------------- data

class MnistArrays:
    """MNIST as float32 arrays in [0, 1] and int64 labels.

    Parameters
    ----------
    X_train, y_train : ndarray
        Training inputs (float32, shape ``(N, 784)``, or images for the conv net) and
        their int64 labels.
    X_test, y_test : ndarray
        Test inputs and labels, as for the training set.
    source : str, default ""
        Where the data came from (the folder of the IDX files).

    Attributes
    ----------
    X_train, X_test : ndarray, float32, shape (N, 784) (or images, for the conv net)
    y_train, y_test : ndarray, int64
    source : str

    Examples
    --------
    A tiny synthetic stand-in for MNIST (what the examples of this package train on):

    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> data = MnistArrays(rng.random((6, 784), dtype=np.float32), np.arange(6) % 10,
    ...                    rng.random((2, 784), dtype=np.float32), np.array([3, 7]),
    ...                    source="synthetic")
    >>> data.X_train.shape, data.y_test.tolist(), data.source
    ((6, 784), [3, 7], 'synthetic')
    """

    def __init__(self, X_train, y_train, X_test, y_test, source=""):
        self.X_train, self.y_train = X_train, y_train
        self.X_test, self.y_test = X_test, y_test
        self.source = source


def load_mnist_arrays(data_dir=None):
    """Load MNIST (see :func:`bnfast.datasets.load_mnist`) as flat float32 arrays.

    Parameters
    ----------
    data_dir : str or os.PathLike, optional
        Folder holding the four IDX files; default: as :func:`bnfast.datasets.load_mnist`
        (which downloads missing files when it may).

    Returns
    -------
    MnistArrays
        Images flattened to ``(N, 784)`` float32 in [0, 1], labels int64, and the folder
        read from as `source`.

    Raises
    ------
    bnfast.datasets.DatasetError
        From :func:`bnfast.datasets.load_mnist`: a file is missing (and could not be
        downloaded), corrupt, or fails its checksum.

    Examples
    --------
    Three home-made 28x28 images in IDX files (checksums switched off for them):

    >>> import struct, tempfile
    >>> from pathlib import Path
    >>> from unittest import mock
    >>> from bnfast import datasets
    >>> def idx(dims, values):
    ...     head = struct.pack(">BBBB", 0, 0, 0x08, len(dims))
    ...     return head + struct.pack(f">{len(dims)}I", *dims) + bytes(values)
    >>> tmp = tempfile.TemporaryDirectory()
    >>> folder = Path(tmp.name)
    >>> files = {"train_images": idx((2, 28, 28), [255] * 1568),
    ...          "train_labels": idx((2,), [3, 5]),
    ...          "test_images": idx((1, 28, 28), [0] * 784), "test_labels": idx((1,), [7])}
    >>> for role, blob in files.items():
    ...     _ = (folder / datasets.MNIST_FILES[role]).write_bytes(blob)
    >>> with mock.patch.dict(datasets.MNIST_SHA256, clear=True):
    ...     data = load_mnist_arrays(folder)
    >>> data.X_train.shape, data.X_train.dtype, float(data.X_train.max())
    ((2, 784), dtype('float32'), 1.0)
    >>> data.y_train.tolist(), data.y_test.dtype
    ([3, 5], dtype('int64'))
    >>> tmp.cleanup()
    """
    m = load_mnist(data_dir)
    return MnistArrays(as_float(m.train_images, flatten=True), m.train_labels.astype(np.int64),
                       as_float(m.test_images, flatten=True), m.test_labels.astype(np.int64),
                       m.source)


class Batches:
    """Endless mini-batches: a fresh random permutation of the training set every epoch.

    Parameters
    ----------
    n : int
        Number of training examples.
    batch_size : int
        Examples per batch; the remainder of an epoch that does not fill a batch is skipped.
    seed : int
        The same seed gives the same sequence of batches (both networks of a comparison
        see the same data in the same order).

    Examples
    --------
    >>> b = Batches(10, 4, seed=0)
    >>> first, second, third = b.next(), b.next(), b.next()    # third: a new epoch
    >>> len(first), len(set(first.tolist()) | set(second.tolist()))
    (4, 8)
    >>> bool((Batches(10, 4, seed=0).next() == first).all())   # same seed, same batches
    True
    """

    def __init__(self, n, batch_size, seed):
        self.n, self.batch_size = int(n), int(batch_size)
        self._rng = np.random.default_rng(seed)
        self._order = self._rng.permutation(self.n)
        self._pos = 0

    def next(self):
        b = self.batch_size
        if self._pos + b > self.n:              # drop the epoch's remainder, reshuffle
            self._order = self._rng.permutation(self.n)
            self._pos = 0
        idx = self._order[self._pos:self._pos + b]
        self._pos += b
        return idx


# ---------------------------------------------------------------------------- recorder

class PercentileRecorder:
    """Records chosen percentiles of a set of values (e.g. one unit's input over the test
    set) at each evaluation point.

    Parameters
    ----------
    percentiles : sequence of float, default (15, 50, 85)
        The percentiles to record, each in [0, 100].

    Raises
    ------
    ValueError
        No percentiles, or one outside [0, 100].

    Examples
    --------
    >>> import numpy as np
    >>> rec = PercentileRecorder()
    >>> rec.record(0, np.arange(101.0))
    >>> rec.as_dict()
    {'step': [0], 'p15': [15.0], 'p50': [50.0], 'p85': [85.0]}
    >>> PercentileRecorder((50, 150))
    Traceback (most recent call last):
        ...
    ValueError: percentiles must be in [0, 100], got (50, 150)
    """

    def __init__(self, percentiles=(15, 50, 85)):
        self.percentiles = tuple(float(p) for p in percentiles)
        if not self.percentiles or any(not 0 <= p <= 100 for p in self.percentiles):
            raise ValueError(f"percentiles must be in [0, 100], got {percentiles!r}")
        self.steps = []
        self.values = []

    @staticmethod
    def key(p):
        return f"p{p:g}"

    def record(self, step, values):
        """Add the percentiles of `values` (any shape, flattened) at `step`."""
        v = np.asarray(values, dtype=np.float64).ravel()
        if v.size == 0:
            raise ValueError("PercentileRecorder.record: no values")
        if not np.isfinite(v).all():
            raise ValueError("PercentileRecorder.record: values are not all finite")
        self.steps.append(int(step))
        self.values.append(np.percentile(v, self.percentiles))

    def __len__(self):
        return len(self.steps)

    def as_dict(self):
        """``{"step": [...], "p15": [...], ...}`` as plain lists of floats."""
        out = {"step": list(self.steps)}
        arr = np.asarray(self.values, dtype=np.float64).reshape(len(self.steps), -1)
        for j, p in enumerate(self.percentiles):
            out[self.key(p)] = [float(v) for v in arr[:, j]]
        return out


# ---------------------------------------------------------------------------- evaluation

def forward_probe(model, x, probe=None):
    """Forward `x` through a `Sequential`; also return the output of layer `probe`.

    Parameters
    ----------
    model : bnfast.nn.Sequential
        The network; its layers' ``forward`` is called in its current mode.
    x : ndarray
        The input batch.
    probe : (layer_index, unit) or None
        Return ``out[:, unit]`` of layer `layer_index` (for a 4-d output, the channel
        `unit` over every position).

    Returns
    -------
    logits, probed : ndarray, ndarray or None
        The model's output, and the probed values as float64 (None without `probe`).

    Examples
    --------
    >>> import numpy as np
    >>> from bnfast import nn
    >>> rng = np.random.default_rng(0)
    >>> model = nn.Sequential(nn.Linear(4, 3, rng=rng), nn.Sigmoid(), nn.Linear(3, 2, rng=rng))
    >>> x = rng.random((5, 4), dtype=np.float32)
    >>> logits, probed = forward_probe(model, x, probe=(0, 1))   # unit 1 of the first Linear
    >>> logits.shape, probed.shape, probed.dtype
    ((5, 2), (5,), dtype('float64'))
    >>> forward_probe(model, x)[1] is None
    True
    """
    if probe is None:
        return model.forward(x), None
    index, unit = probe
    h, probed = x, None
    for i, layer in enumerate(model):
        h = layer.forward(h)
        if i == index:
            probed = np.array(h[:, unit], dtype=np.float64)
    return h, probed


def evaluate(model, X, y, *, probe=None, batch_size=2000):
    """Test accuracy in eval mode (training flags restored), plus the probed values.

    Parameters
    ----------
    model : bnfast.nn.Sequential
        The network, run in eval mode.
    X : ndarray
        Inputs, evaluated in slices of `batch_size`.
    y : ndarray of int
        Labels; a prediction is the argmax of the model's output.
    probe : (layer_index, unit) or None
        See :func:`forward_probe`.
    batch_size : int, default 2000
        Number of examples per forward pass.

    Returns
    -------
    accuracy : float
        The fraction of examples whose prediction equals the label.
    probed : ndarray or None
        Concatenated over the batches (see :func:`forward_probe`).

    Examples
    --------
    >>> import numpy as np
    >>> from bnfast import nn
    >>> rng = np.random.default_rng(0)
    >>> model = nn.Sequential(nn.Linear(4, 8, bias=False, rng=rng), nn.BatchNorm1d(8),
    ...                       nn.Sigmoid(), nn.Linear(8, 3, rng=rng))
    >>> X = rng.random((10, 4), dtype=np.float32)
    >>> y = model.eval().forward(X).argmax(axis=1)      # labels the model gets right
    >>> _ = model.train()
    >>> acc, probed = evaluate(model, X, y, probe=(1, 0), batch_size=4)
    >>> acc, probed.shape, model[1].training             # training flag restored
    (1.0, (10,), True)
    """
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    correct, probed = 0, []
    try:
        for s in range(0, len(X), batch_size):
            out, p = forward_probe(model, X[s:s + batch_size], probe)
            correct += int(np.count_nonzero(out.argmax(axis=1) == y[s:s + batch_size]))
            if p is not None:
                probed.append(p.ravel())
    finally:
        for m, t in modes:
            m.training = t
    return correct / len(X), (np.concatenate(probed) if probed else None)


def population_copy(model, X_train, batch_index):
    """A copy of `model` whose batch-norm layers hold population statistics (Algorithm 2),
    computed over the training mini-batches ``X_train[i]`` for ``i`` in `batch_index`;
    `model` and its running averages are left alone.

    Parameters
    ----------
    model : bnfast.nn.Sequential
        The trained network; copied, not changed.
    X_train : ndarray
        Training inputs.
    batch_index : iterable of index arrays
        One array of row indices of `X_train` per mini-batch.

    Returns
    -------
    bnfast.nn.Sequential
        The copy, with population statistics (see :func:`bnfast.nn.compute_population_stats`).

    Examples
    --------
    >>> import numpy as np
    >>> from bnfast import nn
    >>> rng = np.random.default_rng(0)
    >>> model = nn.Sequential(nn.Linear(4, 3, bias=False, rng=rng), nn.BatchNorm1d(3))
    >>> X = rng.random((12, 4), dtype=np.float32) + 1
    >>> before = model[1].running_mean.copy()
    >>> twin = population_copy(model, X, [np.arange(0, 6), np.arange(6, 12)])
    >>> bool(np.array_equal(model[1].running_mean, before))       # model untouched
    True
    >>> bool(np.allclose(twin[1].running_mean, (X @ model[0].weight.data.T).mean(axis=0),
    ...                  atol=1e-5))
    True
    """
    twin = model.copy()
    nn.compute_population_stats(twin, (X_train[i] for i in batch_index))
    return twin


def train_step(model, loss_fn, opt, xb, yb):
    """One SGD step; returns the loss.

    Parameters
    ----------
    model : bnfast.nn.Sequential
        The network, in the mode it is in (usually training).
    loss_fn : bnfast.nn.CrossEntropyLoss
        Or another loss with ``loss_fn(output, target)`` and ``loss_fn.backward()``.
    opt : bnfast.optim.Optimizer
        Holds `model`'s parameters; its gradients are zeroed before the step.
    xb, yb : ndarray
        The mini-batch: inputs and labels.

    Returns
    -------
    float
        The loss of the mini-batch before the step.

    Examples
    --------
    >>> import numpy as np
    >>> from bnfast import nn, optim
    >>> rng = np.random.default_rng(0)
    >>> model = nn.Sequential(nn.Linear(4, 3, rng=rng))
    >>> opt = optim.SGD(model.parameters(), lr=0.5)
    >>> loss_fn = nn.CrossEntropyLoss()
    >>> xb, yb = rng.random((8, 4), dtype=np.float32), np.arange(8) % 3
    >>> first = train_step(model, loss_fn, opt, xb, yb)
    >>> later = [train_step(model, loss_fn, opt, xb, yb) for _ in range(20)][-1]
    >>> bool(later < first)
    True
    """
    opt.zero_grad()
    loss = loss_fn(model.forward(xb), yb)
    model.backward(loss_fn.backward())
    opt.step()
    return loss


# ---------------------------------------------------------------------------- threads

@contextlib.contextmanager
def limit_threads(n):
    """Use `n` threads in bnfast's kernels and in NumPy's BLAS inside the block.

    The paper's networks multiply small matrices (60 x 784 x 100): one thread is fastest,
    and a multi-threaded BLAS that spins while another process holds a core can be 10x
    slower.  The BLAS limit needs threadpoolctl; without it only bnfast's threads are set
    (set ``OPENBLAS_NUM_THREADS`` / ``OMP_NUM_THREADS`` before starting Python instead).
    `n` None leaves both alone.

    Parameters
    ----------
    n : int or None
        Number of threads inside the block; the previous settings are restored after it.

    Examples
    --------
    >>> import bnfast
    >>> before = bnfast.get_num_threads()
    >>> with limit_threads(1):
    ...     bnfast.get_num_threads()
    1
    >>> bnfast.get_num_threads() == before
    True
    """
    if n is None:
        yield
        return
    from .. import num_threads

    with contextlib.ExitStack() as stack:
        stack.enter_context(num_threads(n))
        try:
            from threadpoolctl import threadpool_limits
        except ImportError:
            pass
        else:
            stack.enter_context(threadpool_limits(limits=n, user_api="blas"))
        yield


def blas_threads():
    """NumPy's BLAS thread count as threadpoolctl sees it, or None."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return None
    n = [i["num_threads"] for i in threadpool_info() if i.get("user_api") == "blas"]
    return n[0] if n else None


# ---------------------------------------------------------------------------- output

def progress_bar(total, desc, enabled=True):
    """A tqdm bar over `total` steps (a no-op object when disabled).

    Parameters
    ----------
    total : int
        Number of steps.
    desc : str
        Label in front of the bar.
    enabled : bool, default True
        False: the bar shows nothing (its methods still work).

    Returns
    -------
    tqdm.tqdm
        Use it as a context manager; ``bar.update(1)`` per step.

    Examples
    --------
    >>> with progress_bar(3, "demo", enabled=False) as bar:   # prints nothing
    ...     for _ in range(3):
    ...         _ = bar.update(1)
    >>> bar.total, bar.disable
    (3, True)
    """
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="step", disable=not enabled, leave=True,
                dynamic_ncols=True, mininterval=0.5)


class Timer:
    """Accumulating wall-clock timer: ``with t: ...``; ``t.seconds``.

    Examples
    --------
    >>> t = Timer()
    >>> with t:
    ...     _ = sum(range(1000))
    >>> with t:                      # the time of every block is added
    ...     _ = sum(range(1000))
    >>> t.seconds > 0
    True
    """

    def __init__(self):
        self.seconds = 0.0
        self._t0 = None

    def __enter__(self):
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds += time.perf_counter() - self._t0
        return False


def write_csv(path, rows, fieldnames):
    """Write `rows` (dicts) to a CSV file with a header; floats as ``%.6g``, None empty.

    Parameters
    ----------
    path : str or os.PathLike
        The file; missing parent folders are created.
    rows : iterable of dict
        One dict per row; keys not in `fieldnames` are ignored, missing ones left empty.
    fieldnames : list of str
        The columns, in order.

    Returns
    -------
    pathlib.Path
        `path`.

    Examples
    --------
    >>> import tempfile
    >>> from pathlib import Path
    >>> tmp = tempfile.TemporaryDirectory()
    >>> path = write_csv(Path(tmp.name) / "sub" / "r.csv",
    ...                  [{"step": 0, "acc": 0.1234567, "extra": 1}, {"step": 5, "acc": None}],
    ...                  ["step", "acc"])
    >>> print(path.read_text(), end="")
    step,acc
    0,0.123457
    5,
    >>> tmp.cleanup()
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fieldnames, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else
                            (f"{r[k]:.6g}" if isinstance(r[k], float) else r[k]))
                        for k in fieldnames})
    return path


def _jsonable(o):
    if isinstance(o, dict):
        return {str(k): _jsonable(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_jsonable(v) for v in o]
    if isinstance(o, np.ndarray):
        return _jsonable(o.tolist())
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, float):
        return round(o, 7)
    return o


def write_json(path, obj):
    """Write `obj` as indented JSON; NumPy arrays and scalars become lists and numbers,
    floats are rounded to 7 decimals.

    Parameters
    ----------
    path : str or os.PathLike
        The file; missing parent folders are created.
    obj : dict, list or scalar
        Nested dicts, lists, tuples, NumPy arrays and scalars.

    Returns
    -------
    pathlib.Path
        `path`.

    Examples
    --------
    >>> import json, tempfile
    >>> import numpy as np
    >>> from pathlib import Path
    >>> tmp = tempfile.TemporaryDirectory()
    >>> path = write_json(Path(tmp.name) / "r.json",
    ...                   {"acc": np.array([0.5, 1 / 3]), "n": np.int64(3), 1: (1, 2)})
    >>> json.loads(path.read_text())
    {'acc': [0.5, 0.3333333], 'n': 3, '1': [1, 2]}
    >>> tmp.cleanup()
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        json.dump(_jsonable(obj), f, indent=1)
        f.write("\n")
    return path


def machine_info():
    """A few facts about where a run happened (for the result files).

    Returns
    -------
    dict
        Versions of bnfast, NumPy and Python, the machine type, CPU count, bnfast's and
        the BLAS's thread counts (None without threadpoolctl), and the OpenMP spin
        environment variables (None when unset).

    Examples
    --------
    >>> import bnfast
    >>> info = machine_info()
    >>> sorted(info)                                      # doctest: +NORMALIZE_WHITESPACE
    ['GOMP_SPINCOUNT', 'OMP_WAIT_POLICY', 'blas_threads', 'bnfast', 'bnfast_threads',
     'cpus', 'machine', 'numpy', 'python']
    >>> info["bnfast"] == bnfast.__version__
    True
    """
    from .. import __version__, get_num_threads

    return {"bnfast": __version__, "numpy": np.__version__, "python": platform.python_version(),
            "machine": platform.machine(), "cpus": os.cpu_count(),
            "bnfast_threads": get_num_threads(), "blas_threads": blas_threads(),
            "GOMP_SPINCOUNT": os.environ.get("GOMP_SPINCOUNT"),
            "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY")}


# ---------------------------------------------------------------------------- interrupts

class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a paper run, after the partial results were written.

    Parameters
    ----------
    paths : list of pathlib.Path
        The result files written with what was gathered so far (empty if none).
    checkpoint : pathlib.Path or None
        The checkpoint ``--resume`` continues from (None if none was written yet).
    results : dict or None
        The partial results (as the experiment's ``run`` returns them, with the curves
        up to the last evaluation point), when raised by ``run``.
    """

    def __init__(self, paths=(), checkpoint=None, results=None):
        super().__init__("interrupted")
        self.paths = list(paths)
        self.checkpoint = checkpoint
        self.results = results


class CheckpointError(ValueError):
    """A checkpoint cannot be read, or was written by a run with other options."""


_CKPT_FORMAT = "bnfast-paper-checkpoint-1"


def save_checkpoint(path, config, state):
    """Write `state` (a picklable dict: models, optimizers, batch order, curves) with the
    run's `config` to `path`, atomically (a temporary file renamed into place), so an
    interrupt while writing leaves the previous checkpoint intact.

    Parameters
    ----------
    path : str or os.PathLike
        The file; missing parent folders are created.
    config : dict
        The options of the run; :func:`load_checkpoint` refuses a different one.
    state : dict
        Everything needed to continue.

    Returns
    -------
    pathlib.Path
        `path`.

    Examples
    --------
    >>> import tempfile
    >>> from pathlib import Path
    >>> tmp = tempfile.TemporaryDirectory()
    >>> path = save_checkpoint(Path(tmp.name) / "run.ckpt", {"steps": 4}, {"step": 2})
    >>> load_checkpoint(path, {"steps": 4})
    {'step': 2}
    >>> load_checkpoint(path, {"steps": 8})
    Traceback (most recent call last):
        ...
    bnfast.paper.common.CheckpointError: ...run.ckpt was written by a run with other options (steps: 4 there, 8 now); ...
    >>> tmp.cleanup()
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".part", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            pickle.dump({"format": _CKPT_FORMAT, "config": _jsonable(config), "state": state},
                        f, protocol=pickle.HIGHEST_PROTOCOL)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def load_checkpoint(path, config):
    """The state saved by :func:`save_checkpoint`, or None if `path` does not exist.

    The checkpoint is a pickle: load only checkpoints your own runs wrote.

    Parameters
    ----------
    path : str or os.PathLike
        The checkpoint file.
    config : dict
        The options of the run that wants to continue; they must equal those saved.

    Returns
    -------
    dict or None
        The `state` given to :func:`save_checkpoint`; None when there is no file.

    Raises
    ------
    CheckpointError
        The file is not a checkpoint, or its run had a different `config` (the message
        names the first differing option).

    Examples
    --------
    >>> import tempfile
    >>> from pathlib import Path
    >>> tmp = tempfile.TemporaryDirectory()
    >>> load_checkpoint(Path(tmp.name) / "none.ckpt", {}) is None
    True
    >>> _ = (Path(tmp.name) / "junk.ckpt").write_bytes(b"junk")
    >>> load_checkpoint(Path(tmp.name) / "junk.ckpt", {})
    Traceback (most recent call last):
        ...
    bnfast.paper.common.CheckpointError: ...junk.ckpt: not a readable checkpoint ...
    >>> tmp.cleanup()
    """
    path = Path(path)
    if not path.exists():
        return None
    try:
        with open(path, "rb") as f:
            blob = pickle.load(f)
    except Exception as exc:
        raise CheckpointError(f"{path}: not a readable checkpoint ({exc}); delete it or run "
                              f"without --resume") from None
    if not isinstance(blob, dict) or blob.get("format") != _CKPT_FORMAT:
        raise CheckpointError(f"{path}: not a bnfast paper checkpoint; delete it or run "
                              f"without --resume")
    want = _jsonable(config)
    if blob["config"] != want:
        have = blob["config"]
        diff = [k for k in sorted(set(have) | set(want)) if have.get(k) != want.get(k)]
        k = diff[0] if diff else "?"
        raise CheckpointError(
            f"{path} was written by a run with other options ({k}: {have.get(k)} there, "
            f"{want.get(k)} now); rerun with the same options, or without --resume to start "
            f"over")
    return blob["state"]
