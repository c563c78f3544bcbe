"""Pieces shared by the paper's experiments: data, evaluation with a probe, the percentile
recorder, the training step, progress bars and result files."""
import contextlib
import csv
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

from .. import nn
from ..datasets import as_float, load_mnist

__all__ = ["PercentileRecorder", "MnistArrays", "load_mnist_arrays", "forward_probe",
           "evaluate", "population_copy", "Batches", "train_step", "progress_bar",
           "write_csv", "write_json", "machine_info", "Timer", "limit_threads"]


# ---------------------------------------------------------------------------- data

class MnistArrays:
    """MNIST as float32 arrays in [0, 1] and int64 labels.

    Attributes
    ----------
    X_train, X_test : ndarray, float32, shape (N, 784) (or images, for the conv net)
    y_train, y_test : ndarray, int64
    source : str
    """

    def __init__(self, X_train, y_train, X_test, y_test, source=""):
        self.X_train, self.y_train = X_train, y_train
        self.X_test, self.y_test = X_test, y_test
        self.source = source


def load_mnist_arrays(data_dir=None):
    """Load MNIST (see :func:`bnfast.datasets.load_mnist`) as flat float32 arrays."""
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
    seed : int
        The same seed gives the same sequence of batches (both networks of a comparison
        see the same data in the same order).
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

    Examples
    --------
    >>> import numpy as np
    >>> rec = PercentileRecorder()
    >>> rec.record(0, np.arange(101.0))
    >>> rec.as_dict()
    {'step': [0], 'p15': [15.0], 'p50': [50.0], 'p85': [85.0]}
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
    x : ndarray
    probe : (layer_index, unit) or None
        Return ``out[:, unit]`` of layer `layer_index` (for a 4-d output, the channel
        `unit` over every position).

    Returns
    -------
    logits, probed : ndarray, ndarray or None
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

    Returns
    -------
    accuracy : float
    probed : ndarray or None
        Concatenated over the batches (see :func:`forward_probe`).
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
    `model` and its running averages are left alone."""
    twin = model.copy()
    nn.compute_population_stats(twin, (X_train[i] for i in batch_index))
    return twin


def train_step(model, loss_fn, opt, xb, yb):
    """One SGD step; returns the loss."""
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
    """A tqdm bar over `total` steps (a no-op object when disabled)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="step", disable=not enabled, leave=True,
                dynamic_ncols=True, mininterval=0.5)


class Timer:
    """Accumulating wall-clock timer: ``with t: ...``; ``t.seconds``."""

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
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        json.dump(_jsonable(obj), f, indent=1)
        f.write("\n")
    return path


def machine_info():
    """A few facts about where a run happened (for the result files)."""
    from .. import __version__, get_num_threads

    return {"bnfast": __version__, "numpy": np.__version__, "python": platform.python_version(),
            "machine": platform.machine(), "cpus": os.cpu_count(),
            "bnfast_threads": get_num_threads(), "blas_threads": blas_threads(),
            "GOMP_SPINCOUNT": os.environ.get("GOMP_SPINCOUNT"),
            "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY")}
