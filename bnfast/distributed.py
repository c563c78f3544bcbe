"""Synchronized batch norm and data-parallel training over MPI (through mpi4py).

Every process ("rank") holds part of the global batch.  Batch norm then needs the
statistics of the whole batch:

- forward: each rank computes per-channel ``(count, mean, M2)`` of its part with the
  kernels (:func:`bnfast.moments`); one ``Allgather`` of ``2C + 6`` doubles exchanges them
  and every rank merges them **in rank order** with Chan et al.'s pairwise formula.  Uneven
  parts, including a rank with no samples, give the statistics of the concatenated batch
  (to float64 rounding), bit-identical on every rank and from run to run;
- backward: the per-channel ``sum(dy)`` and ``sum(dy * xhat)`` (``xhat = (x - mean) *
  invstd``, with the global mean and invstd) are exchanged and summed the same way;
- running statistics are updated with the global count (unbiased variance ``M2 / (n - 1)``
  over the whole batch).

Every exchanged row starts with (operation, channel count, dtype, layout), compared after
the exchange, so ranks that disagree get a ``ValueError`` on every rank instead of wrong
numbers.  Ranks with different channel counts would not fit one collective: with
``check=True`` (the functions' default) a small ``Allgather`` of those 5 integers comes
first.  The layers make that check on their first synchronized call only (a layer's
channel count is fixed), so each of their passes is one collective.

:class:`SyncBatchNorm1d` / :class:`SyncBatchNorm2d` are the layers (PyTorch's
``SyncBatchNorm``), :func:`convert_sync_batchnorm` swaps them into a model,
:class:`DistributedDataParallel` broadcasts the parameters from rank 0 and sums the
gradients after ``backward`` (bucketed, one ``Allreduce`` per bucket), and
:class:`DistributedSampler` shards every global mini-batch across the ranks.
:func:`bnfast.train.fit` trains a ``DistributedDataParallel`` model under ``mpiexec``.

Communicators are mpi4py's (``comm=None``: ``MPI.COMM_WORLD``).  Without mpi4py the module
still imports and runs as a single process (a one-rank stand-in communicator), unless an
MPI launcher started several processes, which is then an error.

>>> import numpy as np
>>> from bnfast import distributed as dist
>>> x = np.arange(12.0).reshape(6, 2)          # this rank's part of the batch
>>> y, mean, invstd = dist.sync_batch_norm_train(x)
>>> mean.tolist()                               # one process: the local statistics
[5.0, 6.0]
"""
import copy
import numbers
import os
import sys
import time
import traceback

import numpy as np

from . import _api
from ._api import batch_norm_infer, moments
from .nn.batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d
from .nn.module import Module
from .train import iterate_minibatches

__all__ = ["get_comm", "launched_size", "abort_on_exception", "sync_moments", "sync_batch_norm_train",
           "sync_batch_norm_backward", "SyncBatchNorm1d", "SyncBatchNorm2d", "SyncBatchNorm3d",
           "convert_sync_batchnorm", "DistributedDataParallel", "DistributedSampler"]

_F64 = np.dtype(np.float64)

# operation codes in the agreement header (a forward on one rank meeting a backward on
# another is a program error that would otherwise exchange garbage)
_OP_MOMENTS, _OP_BACKWARD = 1, 2
_OP_NAMES = {_OP_MOMENTS: "forward statistics", _OP_BACKWARD: "backward sums"}

# environment variables by which MPI launchers announce the number of processes
_LAUNCHER_SIZE_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE", "MV2_COMM_WORLD_SIZE")


# ---------------------------------------------------------------------------- communicators

class _SelfComm:
    """The one-rank communicator used when mpi4py is not installed.

    It implements the few methods of ``mpi4py.MPI.Comm`` that this module uses, for one
    process: gathers copy, reductions are the identity.
    """

    def Get_rank(self):
        return 0

    def Get_size(self):
        return 1

    def Allgather(self, sendbuf, recvbuf):
        np.copyto(recvbuf.reshape(np.shape(sendbuf)), sendbuf)

    def Allreduce(self, sendbuf, recvbuf, op=None):
        if sendbuf is not _IN_PLACE:
            np.copyto(recvbuf, sendbuf)

    def Bcast(self, buf, root=0):
        pass

    def allgather(self, obj):
        return [obj]

    def bcast(self, obj, root=0):
        return obj

    def Abort(self, errorcode=1):
        os._exit(errorcode)

    def __repr__(self):
        return "<bnfast.distributed single-process communicator>"

    def __deepcopy__(self, memo):
        return self


_IN_PLACE = object()
_SELF = _SelfComm()


def _mpi():
    """The ``mpi4py.MPI`` module, or None when mpi4py is not installed."""
    try:
        from mpi4py import MPI
    except ImportError:
        return None
    return MPI


def launched_size():
    """The number of processes an MPI launcher says it started (1 when none says so).

    Read from the environment that launchers set (MPICH/Hydra and Intel MPI ``PMI_SIZE``,
    Open MPI ``OMPI_COMM_WORLD_SIZE``, PMIx ``PMIX_SIZE``, MVAPICH ``MV2_COMM_WORLD_SIZE``),
    without initialising MPI: a program can use it to decide whether to run distributed.
    ``srun`` under Slurm sets ``PMI_SIZE`` or ``PMIX_SIZE`` depending on its ``--mpi``
    plugin.

    Returns
    -------
    int
        At least 1.

    Examples
    --------
    >>> from bnfast import distributed as dist
    >>> dist.launched_size() >= 1
    True
    """
    for var in _LAUNCHER_SIZE_VARS:
        v = os.environ.get(var, "")
        if v.isdigit() and int(v) > 1:
            return int(v)
    return 1


def get_comm(comm=None):
    """Return the communicator to use: `comm`, or the world communicator.

    Every function and class of this module resolves its `comm` here; with several ranks
    this also installs :func:`abort_on_exception` (once), so that a rank that raises ends
    the job instead of leaving the others waiting.

    Parameters
    ----------
    comm : mpi4py.MPI.Comm, optional
        Returned as is (after a type check).  None: ``mpi4py.MPI.COMM_WORLD``; without
        mpi4py, a one-process stand-in with the same methods (rank 0 of 1).

    Returns
    -------
    comm : mpi4py.MPI.Comm or the one-process stand-in
        The communicator every collective of this module uses.

    Raises
    ------
    TypeError
        If `comm` is not an mpi4py communicator.
    ImportError
        If mpi4py is not installed but an MPI launcher started several processes
        (``PMI_SIZE``, ``OMPI_COMM_WORLD_SIZE``, ... greater than 1): each would otherwise
        train alone.

    Examples
    --------
    >>> from bnfast import distributed as dist
    >>> comm = dist.get_comm()
    >>> comm.Get_rank(), comm.Get_size()       # run as a single process
    (0, 1)
    """
    comm = _resolve(comm)
    if not _hooked and comm.Get_size() > 1:
        abort_on_exception(comm)
    return comm


def _resolve(comm):
    MPI = _mpi()
    if comm is None:
        if MPI is not None:
            return MPI.COMM_WORLD
        if launched_size() > 1:
            raise ImportError(
                f"bnfast.distributed: an MPI launcher started {launched_size()} processes "
                f"but mpi4py is not installed, so each would train alone; "
                f"pip install \"bnfast[mpi]\" (or mpi4py built against your cluster's MPI)")
        return _SELF
    if comm is _SELF or (MPI is not None and isinstance(comm, MPI.Comm)):
        return comm
    raise TypeError(f"comm must be an mpi4py.MPI.Comm (or None), got {type(comm).__name__}")


def _in_place(comm):
    MPI = _mpi()
    return _IN_PLACE if comm is _SELF else MPI.IN_PLACE


def _sum_op(comm):
    MPI = _mpi()
    return None if comm is _SELF else MPI.SUM


_hooked = []


def abort_on_exception(comm=None):
    """Make an uncaught exception on any rank end the whole job (``MPI_Abort``).

    Without this, a rank that raises exits while the others wait forever in their next
    collective.  Installs a :data:`sys.excepthook` that prints the traceback (prefixed
    with the rank) and calls ``comm.Abort(1)``, which makes the launcher kill every rank
    and exit non-zero.  It does nothing when there is one rank, and is installed once
    (later calls do nothing).  Every function and class of this module calls it (through
    :func:`get_comm`) when there are several ranks.  Running the script as
    ``python -m mpi4py train.py`` does the same for any program.

    Parameters
    ----------
    comm : mpi4py.MPI.Comm, optional
        The communicator to abort; default ``COMM_WORLD``.

    Returns
    -------
    bool
        Whether the hook is installed now.

    Examples
    --------
    >>> from bnfast import distributed as dist
    >>> dist.abort_on_exception()        # a single process: nothing to abort
    False
    """
    comm = _resolve(comm)
    if comm.Get_size() < 2:
        return False
    if _hooked:
        return True
    previous = sys.excepthook
    rank = comm.Get_rank()

    def hook(etype, value, tb):
        try:
            # The summary line first and everything in one write: the launcher may stop
            # forwarding this rank's output as soon as the job is aborted.
            summary = "".join(traceback.format_exception_only(etype, value)).strip()
            sys.stderr.write(f"[bnfast.distributed] rank {rank} raised {summary}; aborting "
                             f"all ranks\n" + "".join(traceback.format_exception(etype, value,
                                                                                 tb)))
            sys.stderr.flush()
            sys.stdout.flush()
            if previous is not sys.__excepthook__:
                previous(etype, value, tb)
            time.sleep(0.2)         # let the launcher forward the output
        finally:
            comm.Abort(1)

    sys.excepthook = hook
    _hooked.append(hook)
    return True


# ---------------------------------------------------------------------------- exchanges

_HEAD = 5          # header of an exchanged row: operation, C, itemsize, ndim, channel axis


def _header(op, C, dtype, ndim, axis):
    return [op, C, np.dtype(dtype).itemsize, ndim, axis]


def _agree(comm, header, who):
    """Check, in a collective of 5 integers, that every rank has the same `header`."""
    mine = np.array(header, dtype=np.int64)
    every = np.empty((comm.Get_size(), mine.size), dtype=np.int64)
    comm.Allgather(mine, every)
    _compare_headers(every, who)


def _compare_headers(every, who):
    """Raise, on every rank alike, if the ranks' headers (rows of `every`) differ."""
    every = np.asarray(every).astype(np.int64)
    if (every == every[0]).all():
        return

    def col(i, fmt=str):
        return ", ".join(f"rank {r}: {fmt(v)}" for r, v in enumerate(every[:, i].tolist()))

    if (every[:, 0] != every[0, 0]).any():
        raise ValueError(f"{who}: the ranks are not in the same operation "
                         f"({col(0, lambda v: _OP_NAMES.get(v, v))})")
    if (every[:, 1] != every[0, 1]).any():
        raise ValueError(f"{who}: the ranks disagree on the number of channels ({col(1)})")
    if (every[:, 2] != every[0, 2]).any():
        raise ValueError(f"{who}: the ranks disagree on the dtype "
                         f"({col(2, lambda v: 'float32' if v == 4 else 'float64')})")
    layouts = ", ".join(f"rank {r}: {n}-d, channel axis {a}"
                        for r, (n, a) in enumerate(every[:, 3:5].tolist()))
    raise ValueError(f"{who}: the ranks disagree on the layout ({layouts})")


def _exchange(comm, header, count, a, b, check, who):
    """Gather every rank's [header, count, a (C), b (C)], checked; return the data rows.

    One ``Allgather`` of ``2C + 6`` doubles (the header rides along, so operation, dtype
    and layout are compared on every call); with `check`, a collective of the header
    alone first, which also guards against ranks with different C (whose rows would not
    fit one collective).  Returns an array (P, 2C + 1): count, a, b per rank, in rank order.
    """
    if check:
        _agree(comm, header, who)
    C = len(a)
    row = np.empty(_HEAD + 1 + 2 * C)
    row[:_HEAD] = header
    row[_HEAD] = count
    row[_HEAD + 1:_HEAD + 1 + C] = a
    row[_HEAD + 1 + C:] = b
    every = np.empty((comm.Get_size(), row.size), dtype=_F64)
    comm.Allgather(row, every)
    _compare_headers(every[:, :_HEAD], who)
    return every[:, _HEAD:]


def _check_flag(check):
    if not isinstance(check, (bool, np.bool_)):
        raise TypeError(f"check must be a bool, got {check!r}")
    return bool(check)


# Argument checks made here, before any communication, so that bad input on one rank
# raises there instead of leaving the other ranks in a collective.  The kernels' own
# functions check everything again.

def _data_layout(x, axis, who):
    """Validate `x` and `axis`; return (x as a float array, C, normalised axis)."""
    if not isinstance(x, np.ndarray):
        x = np.asarray(x)
    if x.dtype.kind != "f" or x.dtype.itemsize not in (4, 8):
        raise TypeError(f"{who}: x must have dtype float32 or float64, got {x.dtype}")
    if x.ndim < 2:
        raise ValueError(
            f"{who}: x must have at least 2 dimensions (batch, channels, ...), got shape "
            f"{x.shape}")
    if isinstance(axis, (bool, np.bool_)) or not isinstance(axis, numbers.Integral):
        raise TypeError(f"{who}: axis must be an integer, got {axis!r}")
    if not -x.ndim <= axis < x.ndim:
        raise ValueError(f"{who}: axis {axis} is out of bounds for an array of dimension "
                         f"{x.ndim}")
    ax = int(axis) % x.ndim
    return x, x.shape[ax], ax


def _real(v, name, lo, hi):
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {v!r}")
    if not lo <= float(v) <= hi or not np.isfinite(float(v)):
        raise ValueError(f"{name} must be finite and in [{lo}, {hi}], got {v!r}")
    return float(v)


def _vec(v, C, name, required=False):
    """A per-channel vector as float64 (None stays None unless `required`)."""
    if v is None:
        if required:
            raise ValueError(f"{name} is required")
        return None
    a = np.asarray(v)
    if a.dtype.kind not in "fiu":
        raise TypeError(f"{name} must be a real numeric array, got dtype {a.dtype}")
    if a.shape != (C,):
        raise ValueError(f"{name} must have shape ({C},) to match the {C} channels of x, "
                         f"got {a.shape}")
    return a.astype(_F64)


def _running_pair(rm, rv, C):
    if rm is None and rv is None:
        return None, None
    if rm is None or rv is None:
        raise ValueError("running_mean and running_var must both be given or both be None")
    for a, name in ((rm, "running_mean"), (rv, "running_var")):
        if not isinstance(a, np.ndarray):
            raise TypeError(f"{name} must be a numpy.ndarray (it is updated in place), got "
                            f"{type(a).__name__}")
        if a.dtype not in (np.float32, np.float64):
            raise TypeError(f"{name} must have dtype float32 or float64, got {a.dtype}")
        if a.shape != (C,):
            raise ValueError(f"{name} must have shape ({C},) to match the {C} channels of "
                             f"x, got {a.shape}")
        if not a.flags.writeable:
            raise ValueError(f"{name} is read-only; it must be writeable to be updated")
    if np.may_share_memory(rm, rv):
        raise ValueError("running_mean and running_var must not share memory")
    return rm, rv


def _out_like(out, x, name="out"):
    if out is None:
        return
    if not isinstance(out, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray, got {type(out).__name__}")
    if out.dtype != x.dtype or out.shape != x.shape:
        raise ValueError(f"{name} must have the shape and dtype of x, {x.shape} {x.dtype}; "
                         f"got {out.shape} {out.dtype}")
    if not out.flags.writeable:
        raise ValueError(f"{name} is read-only")


def _local_moments(x, C, ax):
    """(count, mean, M2) of this rank's part: float64, zeros for an empty part."""
    n = x.size // C if C else 0
    if n == 0:
        return 0, np.zeros(C), np.zeros(C)
    mean, var = moments(x, axis=ax)
    return n, mean, var * float(n)


def _merge(rows, C):
    """Chan et al.'s merge of per-rank rows [count, mean (C), M2 (C)], in rank order."""
    n = 0.0
    mean = np.zeros(C)
    m2 = np.zeros(C)
    for row in rows:
        nb = row[0]
        if nb == 0:
            continue
        mb, m2b = row[1:C + 1], row[C + 1:]
        if n == 0:
            n, mean, m2 = nb, mb.copy(), m2b.copy()
            continue
        nab = n + nb
        delta = mb - mean
        mean = mean + delta * (nb / nab)
        m2 = m2 + m2b + (delta * delta) * (n * nb / nab)
        n = nab
    return n, mean, m2


def _global_moments(comm, x, C, ax, check, who):
    n, mean, m2 = _local_moments(x, C, ax)
    rows = _exchange(comm, _header(_OP_MOMENTS, C, x.dtype, x.ndim, ax), n, mean, m2, check,
                     who)
    return _merge(rows, C)


# ---------------------------------------------------------------------------- functional

def sync_moments(x, *, comm=None, axis=1, check=True):
    """Per-channel mean, biased variance and count of the batch spread over all ranks.

    A collective call: every rank of `comm` must call it, each with its own part of the
    batch (parts may differ in size; a part may be empty).

    Parameters
    ----------
    x : array_like of float32 or float64, ndim >= 2
        This rank's part of the batch.
    comm : mpi4py.MPI.Comm, optional
        Default ``COMM_WORLD`` (see :func:`get_comm`).
    axis : int, default 1
        The channel axis (1 channels-first, -1 channels-last).
    check : bool, default True
        Before the exchange, compare every rank's channel count (with the operation, dtype
        and layout) in an ``Allgather`` of 5 integers, so that ranks with different channel
        counts get a ValueError on every rank.  Without it such ranks are an MPI error;
        disagreements in dtype, layout or operation are caught either way (they travel
        with the exchanged rows).

    Returns
    -------
    mean, var : ndarray of shape (C,), float64
        The statistics of the concatenated batch (the ranks' parts in rank order),
        bit-identical on every rank.
    count : float
        The number of values per channel over all ranks.

    Raises
    ------
    TypeError
        If `x` is not float32 or float64, `axis` is not an integer, or `comm` is not a
        communicator.
    ValueError
        If `x` has fewer than 2 dimensions, `axis` is out of range, the ranks disagree
        (with `check`), or the whole batch is empty.

    Examples
    --------
    >>> import numpy as np
    >>> from bnfast import distributed as dist
    >>> mean, var, count = dist.sync_moments(np.array([[1.0, 10.0], [3.0, 30.0]]))
    >>> mean.tolist(), var.tolist(), count
    ([2.0, 20.0], [1.0, 100.0], 2.0)
    """
    comm = get_comm(comm)
    check = _check_flag(check)
    x, C, ax = _data_layout(x, axis, "sync_moments")
    n, mean, m2 = _global_moments(comm, x, C, ax, check, "sync_moments")
    if n == 0:
        raise ValueError(f"sync_moments: the batch is empty on every rank (x has shape "
                         f"{x.shape} here)")
    return mean, m2 / n, float(n)


def sync_batch_norm_train(x, weight=None, bias=None, *, comm=None, eps=1e-5, axis=1,
                          running_mean=None, running_var=None, momentum=0.1, out=None,
                          relu=False, check=True):
    """Training-mode batch normalization with the statistics of every rank's batch.

    The synchronized :func:`bnfast.batch_norm_train`: the result on each rank is that
    rank's rows of ``batch_norm_train`` applied to the concatenation of all ranks' parts
    (in rank order).  A collective call.

    Parameters
    ----------
    x : array_like of float32 or float64, ndim >= 2
        This rank's part of the batch; may be empty (zero rows).
    weight, bias : array_like of shape (C,), optional
        Per-channel scale and shift; default 1 and 0.
    comm : mpi4py.MPI.Comm, optional
        Default ``COMM_WORLD``.
    eps : float, default 1e-5
        Added to the global variance before the square root (PyTorch's default); >= 0.
    axis : int, default 1
        The channel axis: 1 for channels-first ``(N, C, ...)``, -1 for channels-last
        ``(N, ..., C)``; the same on every rank.
    running_mean, running_var : ndarray of shape (C,), float32 or float64, optional
        Updated in place with the global statistics: the unbiased variance uses the global
        count.  Give both or neither.
    momentum : float, default 0.1
        Weight of the new batch, in [0, 1].
    out : ndarray, optional
        Where to write y; may be `x` itself.
    relu : bool, default False
        Fused ReLU on the output.
    check : bool, default True
        See :func:`sync_moments`.

    Returns
    -------
    y : ndarray
        This rank's normalised rows.
    mean, invstd : ndarray of shape (C,), float64
        The global mean and ``1 / sqrt(var + eps)``, bit-identical on every rank; pass
        them to :func:`sync_batch_norm_backward`.

    Raises
    ------
    TypeError, ValueError
        As for :func:`bnfast.batch_norm_train` (checked on this rank before any
        communication); ValueError also when the ranks disagree (with `check`) or the
        whole batch has one value per channel or none.

    Examples
    --------
    >>> import numpy as np
    >>> from bnfast import distributed as dist
    >>> x = np.array([[1.0, 2.0], [3.0, 6.0]])
    >>> rm, rv = np.zeros(2), np.ones(2)
    >>> y, mean, invstd = dist.sync_batch_norm_train(x, eps=0.0, running_mean=rm,
    ...                                              running_var=rv)
    >>> y.tolist(), rm.tolist()
    ([[-1.0, -1.0], [1.0, 1.0]], [0.2, 0.4])
    """
    comm = get_comm(comm)
    check = _check_flag(check)
    x, C, ax = _data_layout(x, axis, "sync_batch_norm_train")
    eps = _real(eps, "eps", 0.0, np.inf)
    momentum = _real(momentum, "momentum", 0.0, 1.0)
    w = _vec(weight, C, "weight")
    b = _vec(bias, C, "bias")
    rm, rv = _running_pair(running_mean, running_var, C)
    _out_like(out, x)
    n, mean, m2 = _global_moments(comm, x, C, ax, check, "sync_batch_norm_train")
    if n <= 1:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got {int(n)} over all "
            f"ranks (input shape {x.shape} on this rank)")
    var = m2 / n
    invstd = 1.0 / np.sqrt(var + eps)
    y = batch_norm_infer(x, mean, var, w, b, eps=eps, axis=ax, out=out, relu=relu)
    if rm is not None:
        # the kernels' update (bn_update_running), with the global count
        unbiased = var * (n / (n - 1.0))
        rm[...] = (1.0 - momentum) * rm.astype(_F64) + momentum * mean
        rv[...] = (1.0 - momentum) * rv.astype(_F64) + momentum * unbiased
    return y, mean, invstd


def sync_batch_norm_backward(dy, x, mean, invstd, weight=None, *, comm=None, bias=None,
                             relu=False, axis=1, out=None, check=True):
    """Gradients through :func:`sync_batch_norm_train`: dx, and this rank's dweight, dbias.

    The per-channel ``sum(dy)`` and ``sum(dy * xhat)`` of every rank are exchanged (one
    ``Allgather`` of ``2C + 6`` doubles) and summed in rank order, so that::

        dx = weight * invstd * (dy - sum(dy) / n - xhat * sum(dy * xhat) / n)

    with the sums and the count n over all ranks: this rank's rows of the single-process
    gradient of the concatenated batch.  A collective call.

    Parameters
    ----------
    dy : array_like, same shape and dtype as `x`
        Gradient of the loss with respect to this rank's output.  Every rank's `dy` must be
        the gradient of one global loss (for a mean over the global batch, scale each
        rank's mean-loss gradient by its share of the batch, as
        :class:`DistributedDataParallel` does).
    x : array_like of float32 or float64
        This rank's forward input.
    mean, invstd : array_like of shape (C,)
        As returned by :func:`sync_batch_norm_train`.
    weight : array_like of shape (C,), optional
        The forward weight; default 1.
    comm : mpi4py.MPI.Comm, optional
        Default ``COMM_WORLD``.
    bias : array_like of shape (C,), optional
        The forward bias; only used with ``relu=True``.
    relu : bool, default False
        The forward pass had a fused ReLU.
    axis : int, default 1
        The channel axis, as in the forward call.
    out : ndarray, optional
        Where to write dx; may be `dy` itself.
    check : bool, default True
        See :func:`sync_moments`.

    Returns
    -------
    dx : ndarray, shape and dtype of `x`
        The gradient with respect to this rank's `x` (`out` if given).
    dweight, dbias : ndarray of shape (C,), dtype of `x`
        This rank's contributions, the sums over its own rows; their sum over the ranks
        is the gradient of the whole batch (:class:`DistributedDataParallel` adds them up
        with the other parameters' gradients).

    Raises
    ------
    TypeError, ValueError
        As for :func:`bnfast.batch_norm_backward` (checked before any communication);
        ValueError also when the ranks disagree (with `check`) or the whole batch is empty.

    Notes
    -----
    The sums are exchanged in float64 for either dtype, and dx is computed in one pass by
    the training backward's kernel with the global sums, so with one rank the result is
    bit-identical to :func:`bnfast.batch_norm_backward`, and with several it differs from
    the single-process gradient only by the order in which the sums were added.

    Examples
    --------
    >>> import numpy as np
    >>> from bnfast import distributed as dist
    >>> x = np.array([[1.0], [3.0]])
    >>> y, mean, invstd = dist.sync_batch_norm_train(x, eps=0.0)
    >>> dx, dw, db = dist.sync_batch_norm_backward(np.array([[1.0], [1.0]]), x, mean, invstd)
    >>> dx.tolist(), dw.tolist(), db.tolist()
    ([[0.0], [0.0]], [0.0], [2.0])
    """
    comm = get_comm(comm)
    check = _check_flag(check)
    x, C, ax = _data_layout(x, axis, "sync_batch_norm_backward")
    m = _vec(mean, C, "mean", required=True)
    inv = _vec(invstd, C, "invstd", required=True)
    w = _vec(weight, C, "weight")
    # Pass 1 (kernel): this rank's float64 sums sum(g) and sum(g * (x - mean)), g = dy
    # (masked by the ReLU); the ranks exchange and add them in rank order; pass 2
    # (kernel): dx = a * g + k_x * (x - mean) + k_0 with the kernels' coefficients
    # (_core.backward_coefficients) from the global sums and count, in one pass and one rounding: with
    # one rank this is exactly bnfast.batch_norm_backward's dx.
    def combine(s_dy_local, s_xmu_local):
        rows = _exchange(comm, _header(_OP_BACKWARD, C, x.dtype, x.ndim, ax),
                         x.size // C if C else 0, s_dy_local, s_xmu_local, check,
                         "sync_batch_norm_backward")
        n = 0.0
        s_dy = np.zeros(C)
        s_xmu = np.zeros(C)
        for r in rows:
            n += r[0]
            s_dy += r[1:C + 1]
            s_xmu += r[C + 1:]
        if n == 0:
            raise ValueError("sync_batch_norm_backward: the batch is empty on every rank")
        return s_dy, s_xmu, n

    dx, s_dy_local, s_xmu_local = _api._backward_two_step(
        dy, x, m, inv, w, combine, bias=bias, relu=relu, axis=ax, out=out)
    dt = np.asarray(x).dtype
    return dx, (s_xmu_local * inv).astype(dt), s_dy_local.astype(dt)


# ---------------------------------------------------------------------------- layers

class _SharesComm:
    """Deep copies (``Module.copy``) share the communicator instead of copying it."""

    def __deepcopy__(self, memo):
        memo[id(self.comm)] = self.comm
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        for k, v in self.__getstate__().items():
            setattr(new, k, copy.deepcopy(v, memo))
        return new


class _SyncBatchNorm(_SharesComm):
    """What SyncBatchNorm1d/2d add to BatchNorm1d/2d."""

    def _init_sync(self, comm, check):
        self.comm = get_comm(comm)
        self.check = _check_flag(check)
        self._agreed = False        # the ranks' channel counts have been compared

    def _check_now(self):
        # The channel count (fixed per layer) is compared once; operation, dtype and
        # layout travel with every exchange.
        return self.check and not self._agreed

    def _synchronized(self):
        # PyTorch's rule: synchronize in training mode only (eval-mode batch statistics,
        # track_running_stats=False, stay per rank); and while collecting population
        # statistics, which are those of the global batches.
        return self.training or self._population is not None

    def _batch_forward(self, x, w, b, rm, rv, factor):
        if not self._synchronized():
            return super()._batch_forward(x, w, b, rm, rv, factor)
        out = sync_batch_norm_train(x, w, b, comm=self.comm, eps=self.eps, axis=self.axis,
                                    running_mean=rm, running_var=rv, momentum=factor,
                                    relu=self.relu, check=self._check_now())
        self._agreed = True
        return out

    def _batch_backward(self, grad, x, mean, invstd, w, b):
        if not self._synchronized():
            return super()._batch_backward(grad, x, mean, invstd, w, b)
        return sync_batch_norm_backward(grad, x, mean, invstd, w, comm=self.comm, bias=b,
                                        relu=self.relu, axis=self.axis,
                                        check=self._check_now())

    def _accumulate_population(self, x):
        """Add the global batch's mean and unbiased variance to the population sums."""
        mean, var, m = sync_moments(x.astype(np.float64, copy=False), comm=self.comm,
                                    axis=self.axis, check=self._check_now())
        self._agreed = True
        if m < 2:
            raise ValueError(
                f"{type(self).__name__}: a batch with {int(m)} value per channel over all "
                f"ranks has no unbiased variance")
        acc = self._population
        acc[0] += mean
        acc[1] += var * (m / (m - 1))
        acc[2] += 1

    def extra_repr(self):
        return super().extra_repr() + f", ranks={self.comm.Get_size()}"


class SyncBatchNorm1d(_SyncBatchNorm, BatchNorm1d):
    """:class:`bnfast.nn.BatchNorm1d` with statistics over every rank's batch.

    In training mode the forward and backward passes are collective calls
    (:func:`sync_batch_norm_train`, :func:`sync_batch_norm_backward`): every rank of `comm`
    must call them in the same order.  In eval mode (running statistics) nothing is
    exchanged.  Parameters, buffers and ``state_dict`` are those of ``BatchNorm1d``; the
    parameter gradients are this rank's contributions, which
    :class:`DistributedDataParallel` sums over the ranks.

    Parameters
    ----------
    num_features, eps, momentum, affine, track_running_stats, relu, dtype
        As for :class:`bnfast.nn.BatchNorm1d`.
    comm : mpi4py.MPI.Comm, optional
        Default ``COMM_WORLD``.
    check : bool, default True
        Compare the ranks' channel counts on the first synchronized call (one extra small
        collective; see :func:`sync_moments`).  Dtype, layout and operation are compared
        on every call.

    Attributes
    ----------
    comm : mpi4py.MPI.Comm
    check : bool

    Raises
    ------
    ValueError, TypeError
        As for :class:`bnfast.nn.BatchNorm1d`, and from ``forward`` and ``backward`` in
        training mode on every rank if the ranks disagree; TypeError for a `comm` that is
        not a communicator.

    Examples
    --------
    >>> import numpy as np
    >>> from bnfast import distributed as dist
    >>> bn = dist.SyncBatchNorm1d(3)
    >>> y = bn(np.arange(12, dtype=np.float32).reshape(4, 3))
    >>> y[:, 0].round(3)
    array([-1.342, -0.447,  0.447,  1.342], dtype=float32)
    >>> sorted(bn.state_dict())
    ['bias', 'num_batches_tracked', 'running_mean', 'running_var', 'weight']
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, *, relu=False, dtype=np.float32, comm=None,
                 check=True):
        super().__init__(num_features, eps, momentum, affine, track_running_stats,
                         relu=relu, dtype=dtype)
        self._init_sync(comm, check)


class _SyncChannelsLast(_SyncBatchNorm):
    """The constructor of the synchronized layers with a channels_last option (2d, 3d)."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, *, channels_last=False, relu=False,
                 dtype=np.float32, comm=None, check=True):
        super().__init__(num_features, eps, momentum, affine, track_running_stats,
                         channels_last=channels_last, relu=relu, dtype=dtype)
        self._init_sync(comm, check)


class SyncBatchNorm2d(_SyncChannelsLast, BatchNorm2d):
    """:class:`bnfast.nn.BatchNorm2d` with statistics over every rank's batch.

    See :class:`SyncBatchNorm1d`; statistics are over the batch and spatial positions of
    every rank.

    Parameters
    ----------
    num_features, eps, momentum, affine, track_running_stats, channels_last, relu, dtype
        As for :class:`bnfast.nn.BatchNorm2d`.
    comm : mpi4py.MPI.Comm, optional
        Default ``COMM_WORLD``.
    check : bool, default True
        Compare the ranks' channel counts on the first synchronized call (one extra small
        collective; see :func:`sync_moments`).  Dtype, layout and operation are compared
        on every call.

    Attributes
    ----------
    comm : mpi4py.MPI.Comm
    check : bool

    Raises
    ------
    ValueError, TypeError
        As for :class:`SyncBatchNorm1d`.

    Examples
    --------
    >>> import numpy as np
    >>> from bnfast import distributed as dist
    >>> bn = dist.SyncBatchNorm2d(2, channels_last=True)
    >>> y = bn(np.arange(16, dtype=np.float32).reshape(2, 2, 2, 2))
    >>> y.mean(axis=(0, 1, 2)).round(4) + 0.0
    array([0., 0.], dtype=float32)
    """


class SyncBatchNorm3d(_SyncChannelsLast, BatchNorm3d):
    """:class:`bnfast.nn.BatchNorm3d` with statistics over every rank's batch.

    See :class:`SyncBatchNorm1d`; statistics are over the batch and the volume positions
    of every rank.

    Parameters
    ----------
    num_features, eps, momentum, affine, track_running_stats, channels_last, relu, dtype
        As for :class:`bnfast.nn.BatchNorm3d`.
    comm : mpi4py.MPI.Comm, optional
        Default ``COMM_WORLD``.
    check : bool, default True
        As for :class:`SyncBatchNorm2d`.

    Attributes
    ----------
    comm : mpi4py.MPI.Comm
    check : bool

    Raises
    ------
    ValueError, TypeError
        As for :class:`SyncBatchNorm1d`.

    Examples
    --------
    >>> import numpy as np
    >>> from bnfast import distributed as dist
    >>> bn = dist.SyncBatchNorm3d(2)
    >>> y = bn(np.arange(32, dtype=np.float32).reshape(2, 2, 2, 2, 2))
    >>> y.mean(axis=(0, 2, 3, 4)).round(4) + 0.0
    array([0., 0.], dtype=float32)
    """


_SYNC_TWIN = ((BatchNorm3d, SyncBatchNorm3d), (BatchNorm2d, SyncBatchNorm2d),
              (BatchNorm1d, SyncBatchNorm1d))


def convert_sync_batchnorm(module, comm=None, *, check=True):
    """Replace every ``BatchNorm1d``/``2d``/``3d`` in `module` by its synchronized twin.

    As ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``: the new layers share the old
    ones' parameters (the same :class:`~bnfast.nn.Parameter` objects, so an optimizer
    built before still updates them) and buffers, and keep their settings and modes.

    Parameters
    ----------
    module : bnfast.nn.Module
        Changed in place (children are replaced).
    comm : mpi4py.MPI.Comm, optional
        Default ``COMM_WORLD``.
    check : bool, default True
        The new layers' `check`.

    Returns
    -------
    Module
        `module`, or its replacement when `module` itself is a batch-norm layer.

    Raises
    ------
    TypeError
        If `module` is not a :class:`bnfast.nn.Module` or `comm` is not a communicator.

    Examples
    --------
    >>> from bnfast import nn, distributed as dist
    >>> net = nn.Sequential(nn.Linear(4, 3, rng=0), nn.BatchNorm1d(3), nn.ReLU())
    >>> w = net[1].weight
    >>> net = dist.convert_sync_batchnorm(net)
    >>> type(net[1]).__name__, net[1].weight is w
    ('SyncBatchNorm1d', True)
    """
    if not isinstance(module, Module):
        raise TypeError(f"module must be a bnfast.nn.Module, got {type(module).__name__}")
    comm = get_comm(comm)
    check = _check_flag(check)
    return _convert(module, comm, check)


def _convert(module, comm, check):
    cls = next((twin for base, twin in _SYNC_TWIN if isinstance(module, base)), None)
    if cls is not None and not isinstance(module, _SyncBatchNorm):
        new = cls.__new__(cls)
        new.__dict__.update(module.__dict__)
        new._buffer_names = list(module._buffer_names)
        new._init_sync(comm, check)
        return new
    for name, child in list(module.named_children()):
        new = _convert(child, comm, check)
        if new is not child:
            setattr(module, name, new)   # Sequential and ModuleList too, named or numbered
    return module


# ---------------------------------------------------------------------------- data parallel

class DistributedDataParallel(_SharesComm, Module):
    """Data-parallel training: the same model on every rank, gradients summed over ranks.

    On construction the parameters and buffers of rank 0 are broadcast to every rank
    (after checking that every rank has the same names, shapes and dtypes).  ``forward``
    runs the wrapped module on this rank's part of the global batch; ``backward``:

    1. with ``reduction="mean"`` (a loss that is a mean over each rank's rows), scales the
       incoming gradient by this rank's share of the global batch, ``n_rank / n_total``
       (one ``Allgather`` of the row counts), so that every rank back-propagates the
       gradient of the mean loss over the **global** batch, also when the parts are
       uneven (and :class:`SyncBatchNorm1d` mixes the ranks' gradients correctly);
    2. runs the module's backward;
    3. sums every parameter's gradient over the ranks, in float64, in buckets of at most
       `bucket_bytes` (one ``Allreduce`` per bucket), and stores the sum, cast back to the
       parameter's dtype, as its gradient on every rank.

    The optimizer then takes the same step on every rank.  :func:`bnfast.train.fit`
    recognises the wrapper (its ``comm`` attribute) and shards the data, shows progress on
    rank 0 only and averages the metrics over the ranks.  Convert batch-norm layers with
    :func:`convert_sync_batchnorm` first: plain ones keep per-rank running statistics.

    Parameters
    ----------
    module : bnfast.nn.Module
        The model (child ``module``, so ``state_dict`` keys start with ``module.`` as in
        PyTorch).
    comm : mpi4py.MPI.Comm, optional
        Default ``COMM_WORLD``.
    reduction : {'mean', 'sum'}, default 'mean'
        How the loss reduces over a rank's rows: ``'mean'`` scales gradients as above,
        ``'sum'`` only adds them up.
    bucket_bytes : int, default 4 MiB
        Size limit of a gradient bucket (float64); a larger parameter gets its own bucket.
    broadcast : bool, default True
        Copy rank 0's parameters and buffers to every rank now.

    Attributes
    ----------
    module : Module
    comm : mpi4py.MPI.Comm
    rank, size : int
        This process's rank and the number of ranks.

    Raises
    ------
    TypeError
        If `module` is not a Module or `comm` is not a communicator.
    ValueError
        If `reduction` or `bucket_bytes` is invalid, or (on every rank) the ranks' models
        differ in parameter or buffer names, shapes or dtypes.

    Examples
    --------
    >>> import numpy as np
    >>> from bnfast import nn, optim, distributed as dist
    >>> net = dist.convert_sync_batchnorm(
    ...     nn.Sequential(nn.Linear(4, 8, rng=0), nn.BatchNorm1d(8), nn.ReLU(),
    ...                   nn.Linear(8, 2, rng=0)))
    >>> model = dist.DistributedDataParallel(net)
    >>> model.rank, model.size
    (0, 1)
    >>> loss_fn = nn.CrossEntropyLoss()
    >>> opt = optim.SGD(model.parameters(), lr=0.1)
    >>> x, y = np.ones((6, 4), np.float32), np.arange(6) % 2
    >>> loss = loss_fn(model(x), y)
    >>> _ = model.backward(loss_fn.backward())
    >>> opt.step()
    >>> list(model.state_dict())[:2]
    ['module.0.weight', 'module.0.bias']
    """

    def __init__(self, module, comm=None, *, reduction="mean", bucket_bytes=4 << 20,
                 broadcast=True):
        super().__init__()
        if not isinstance(module, Module):
            raise TypeError(f"module must be a bnfast.nn.Module, got {type(module).__name__}")
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        if (isinstance(bucket_bytes, bool) or not isinstance(bucket_bytes, numbers.Integral)
                or bucket_bytes < 8):
            raise ValueError(f"bucket_bytes must be an integer >= 8, got {bucket_bytes!r}")
        self.module = module
        self.comm = get_comm(comm)
        self.reduction = reduction
        self.bucket_bytes = int(bucket_bytes)
        self._n = None
        self._check_same_model()
        if broadcast:
            self.broadcast_state()

    @property
    def rank(self):
        """This process's rank in ``comm``."""
        return self.comm.Get_rank()

    @property
    def size(self):
        """The number of ranks in ``comm``."""
        return self.comm.Get_size()

    def extra_repr(self):
        return f"ranks={self.size}, reduction={self.reduction!r}"

    def _check_same_model(self):
        sig = ([(k, p.shape, str(p.dtype), p.requires_grad)
                for k, p in self.module.named_parameters()]
               + [(k, b.shape, str(b.dtype)) for k, b in self.module.named_buffers()])
        every = self.comm.allgather(sig)
        for r, other in enumerate(every):
            if other != every[0]:
                diff = next((f"{a} on rank 0, {b} on rank {r}" for a, b in zip(every[0], other)
                             if a != b), f"{len(every[0])} entries on rank 0, {len(other)} "
                                         f"on rank {r}")
                raise ValueError(
                    f"DistributedDataParallel: the ranks' models differ (parameters and "
                    f"buffers by name, shape, dtype): {diff}")

    def broadcast_state(self):
        """Copy rank 0's parameters and buffers to every rank (a collective call)."""
        arrays = [p.data for p in self.module.parameters()] + self.module.buffers()
        for a in arrays:
            if a.flags.c_contiguous and a.flags.writeable:
                self.comm.Bcast(a, root=0)
            else:
                tmp = np.ascontiguousarray(a)
                self.comm.Bcast(tmp, root=0)
                a[...] = tmp

    def forward(self, x):
        self._n = len(x)
        return self.module.forward(x)

    def backward(self, grad):
        if self._n is None:
            raise RuntimeError("DistributedDataParallel.backward called before forward")
        if self.reduction == "mean":
            counts = np.empty(self.size, dtype=np.int64)
            self.comm.Allgather(np.array([self._n], dtype=np.int64), counts)
            total = int(counts.sum())
            g = np.asarray(grad)
            if self._n == 0 or total == 0:
                grad = np.zeros_like(g)
            else:
                grad = g * g.dtype.type(self._n / total) if g.dtype.kind == "f" else g
        dx = self.module.backward(grad)
        self.allreduce_gradients()
        return dx

    def _buckets(self):
        params = [p for p in self.module.parameters() if p.requires_grad]
        buckets, cur, size = [], [], 0
        for p in params:
            nbytes = 8 * (p.data.size + 1)        # float64 values and a has-gradient flag
            if cur and size + nbytes > self.bucket_bytes:
                buckets.append(cur)
                cur, size = [], 0
            cur.append(p)
            size += nbytes
        if cur:
            buckets.append(cur)
        return buckets

    def allreduce_gradients(self):
        """Sum every parameter's gradient over the ranks, in place (a collective call).

        A parameter without a gradient on a rank contributes zeros; one without a gradient
        on every rank keeps ``grad = None``.  Called by :meth:`backward`.
        """
        in_place, op = _in_place(self.comm), _sum_op(self.comm)
        for bucket in self._buckets():
            sizes = [p.data.size for p in bucket]
            buf = np.zeros(sum(sizes) + len(bucket))
            pos = 0
            for p, k in zip(bucket, sizes):
                if p.grad is not None:
                    buf[pos:pos + k] = p.grad.ravel()
                    buf[pos + k] = 1.0
                pos += k + 1
            self.comm.Allreduce(in_place, buf, op)
            pos = 0
            for p, k in zip(bucket, sizes):
                if buf[pos + k] > 0:
                    p.grad = buf[pos:pos + k].reshape(p.data.shape).astype(p.data.dtype)
                pos += k + 1


class DistributedSampler:
    """This rank's rows of every global mini-batch, from a seed shared by every rank.

    Each epoch permutes ``range(n)`` with ``numpy.random.default_rng([seed, epoch])``
    (the same on every rank), cuts it into global batches of `batch_size`, and gives this
    rank its part of each: ``numpy.array_split(batch, size)[rank]`` (parts differ by at
    most one row; a rank may get none).  The parts, concatenated in rank order, are the
    global batch, which is what synchronized batch norm normalises.

    Parameters
    ----------
    n : int
        Number of examples.
    batch_size : int
        The **global** batch size.
    comm : mpi4py.MPI.Comm, optional
        Default ``COMM_WORLD``.
    shuffle : bool, default True
        Permute the examples every epoch; otherwise every epoch visits them in order.
    seed : int, default 0
        The same on every rank.
    drop_last : bool, default False
        Skip a last global batch smaller than `batch_size`.

    Attributes
    ----------
    epoch : int
        Set with :meth:`set_epoch` (0 at first).

    Raises
    ------
    ValueError
        If `n` is negative or `batch_size` is below 1.

    Examples
    --------
    >>> from bnfast import distributed as dist
    >>> sampler = dist.DistributedSampler(10, batch_size=4, shuffle=False)
    >>> [idx.tolist() for idx in sampler]          # one rank: whole batches
    [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    >>> len(sampler)
    3
    """

    def __init__(self, n, batch_size, comm=None, *, shuffle=True, seed=0, drop_last=False):
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 0:
            raise ValueError(f"n must be an integer >= 0, got {n!r}")
        if (isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral)
                or batch_size < 1):
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        self.n, self.batch_size = int(n), int(batch_size)
        self.comm = get_comm(comm)
        self.shuffle, self.seed, self.drop_last = bool(shuffle), int(seed), bool(drop_last)
        self.epoch = 0

    def set_epoch(self, epoch):
        """Use the permutation of `epoch` in the next iteration."""
        self.epoch = int(epoch)

    def __len__(self):
        if self.drop_last:
            return self.n // self.batch_size
        return -(-self.n // self.batch_size)

    def __iter__(self):
        rng = np.random.default_rng([self.seed, self.epoch])
        return iterate_minibatches(np.arange(self.n), None, self.batch_size,
                                   shuffle=self.shuffle, rng=rng, drop_last=self.drop_last,
                                   shard=(self.comm.Get_rank(), self.comm.Get_size()))
