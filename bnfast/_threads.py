"""Thread-count control for bnfast's OpenMP kernels.

By default bnfast uses the OpenMP runtime's own setting (``omp_get_max_threads()``), so
``OMP_NUM_THREADS`` and threadpoolctl's ``threadpool_limits`` are respected.  An explicit
:func:`set_num_threads` overrides that for bnfast only (process-wide), and a
:func:`num_threads` block overrides both in the Python thread that entered it.  Every count
is capped at ``bnfast.MAX_THREADS``.  This module is the only place the setting is stored:
the kernels receive the count with every call.  Results do not depend on the number
of threads: every reduction uses a blocking fixed by the data's shape.
"""
import contextlib
import numbers
import os
import threading
import warnings

from . import _core

#: The largest thread count bnfast accepts: 4 per logical CPU, and at least 256.  Far
#: larger counts only oversubscribe the cores, and very large ones (tens of thousands)
#: make the OpenMP runtime fail to create its threads or crash.
MAX_THREADS = max(256, 4 * (os.cpu_count() or 1))

_lock = threading.Lock()
_process = None                 # set_num_threads' value; None: the OpenMP runtime's


class _PerThread(threading.local):
    # this Python thread's active num_threads() blocks, as [(token, n), ...]; the class
    # attribute is the default, so reading it never raises (a missing attribute of a
    # threading.local costs about 0.7 us through the AttributeError)
    stack = ()


_local = _PerThread()
_warned_clamp = False


def _validate(n, what="number of threads"):
    if isinstance(n, bool) or not isinstance(n, numbers.Integral):
        raise TypeError(f"{what} must be a positive integer, got {n!r}")
    n = int(n)
    if n < 1:
        raise ValueError(f"{what} must be >= 1, got {n}")
    if n > MAX_THREADS:
        raise ValueError(
            f"{what} must be at most {MAX_THREADS} (4 per logical CPU, at least 256), "
            f"got {n}")
    return n


def _runtime_default():
    """omp_get_max_threads(), clamped to MAX_THREADS (with a warning, once)."""
    global _warned_clamp
    n = _core.omp_max_threads()
    if n < 1:
        return 1
    if n > MAX_THREADS:
        if not _warned_clamp:
            _warned_clamp = True
            warnings.warn(
                f"the OpenMP runtime asks for {n} threads (OMP_NUM_THREADS?); bnfast uses "
                f"at most {MAX_THREADS}", RuntimeWarning, stacklevel=3)
        return MAX_THREADS
    return n


def get_num_threads():
    """Return the number of threads bnfast's kernels will use in this Python thread.

    Returns
    -------
    int
        The value of the innermost active :func:`num_threads` block of this Python
        thread, else the value set by :func:`set_num_threads`, else the OpenMP runtime's
        ``omp_get_max_threads()`` (which follows ``OMP_NUM_THREADS`` and threadpoolctl),
        capped at ``bnfast.MAX_THREADS``.  Always 1 in a build without OpenMP.

    Examples
    --------
    >>> import bnfast
    >>> bnfast.get_num_threads() >= 1
    True
    """
    stack = _local.stack
    if stack:
        return stack[-1][1]
    value = _process
    if value is not None:
        return value
    return _runtime_default()


def set_num_threads(n):
    """Set the number of threads for bnfast's kernels (process-wide).

    The setting applies to every Python thread except inside a :func:`num_threads`
    block, which takes precedence in the thread that entered it.

    Parameters
    ----------
    n : int or None
        A thread count from 1 to ``bnfast.MAX_THREADS``, or None to go back to the OpenMP
        runtime's default.

    Raises
    ------
    TypeError
        If `n` is not an integer (or None).
    ValueError
        If `n` < 1 or `n` > ``bnfast.MAX_THREADS``.

    Examples
    --------
    >>> import bnfast
    >>> bnfast.set_num_threads(1)
    >>> bnfast.get_num_threads()
    1
    >>> bnfast.set_num_threads(None)
    """
    global _process
    value = None if n is None else _validate(n)
    with _lock:
        _process = value


@contextlib.contextmanager
def num_threads(n):
    """Context manager: use `n` threads in this Python thread inside the block.

    The setting is per Python thread: calls made from other Python threads keep their
    own setting, and blocks entered in several threads may exit in any order.  Blocks
    nest; on exit the setting that was in force before the block returns.

    Parameters
    ----------
    n : int
        A thread count from 1 to ``bnfast.MAX_THREADS``.

    Raises
    ------
    TypeError
        If `n` is not an integer.
    ValueError
        If `n` < 1 or `n` > ``bnfast.MAX_THREADS``.

    Examples
    --------
    >>> import bnfast
    >>> with bnfast.num_threads(1):
    ...     bnfast.get_num_threads()
    1
    """
    value = _validate(n)
    stack = _local.stack
    if not isinstance(stack, list):
        stack = _local.stack = []
    token = object()
    stack.append((token, value))
    try:
        yield value
    finally:
        # Remove this block's own entry (generators may close blocks out of order).
        for i in range(len(stack) - 1, -1, -1):
            if stack[i][0] is token:
                del stack[i]
                break
