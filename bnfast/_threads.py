"""Thread-count control for bnfast's OpenMP kernels.

By default bnfast uses the OpenMP runtime's own setting (``omp_get_max_threads()``), so
``OMP_NUM_THREADS`` and threadpoolctl's ``threadpool_limits`` are respected.  An explicit
:func:`set_num_threads` overrides that for bnfast only.  Results do not depend on the number
of threads: every reduction uses a blocking fixed by the data's shape.
"""
import contextlib
import numbers
import threading

from . import _core

_lock = threading.Lock()
_override = None


def _validate(n):
    if isinstance(n, bool) or not isinstance(n, numbers.Integral):
        raise TypeError(f"number of threads must be a positive integer, got {n!r}")
    if n < 1:
        raise ValueError(f"number of threads must be >= 1, got {n}")
    return int(n)


def get_num_threads():
    """Return the number of threads bnfast's kernels will use.

    Returns
    -------
    int
        The value set by :func:`set_num_threads`, or else the OpenMP runtime's
        ``omp_get_max_threads()`` (which follows ``OMP_NUM_THREADS`` and threadpoolctl).
        Always 1 in a build without OpenMP.

    Examples
    --------
    >>> import bnfast
    >>> bnfast.get_num_threads() >= 1
    True
    """
    return _core.effective_threads()


def set_num_threads(n):
    """Set the number of threads for bnfast's kernels.

    Parameters
    ----------
    n : int or None
        A positive thread count, or None to go back to the OpenMP runtime's default.

    Raises
    ------
    TypeError
        If `n` is not an integer (or None).
    ValueError
        If `n` < 1.

    Examples
    --------
    >>> import bnfast
    >>> bnfast.set_num_threads(1)
    >>> bnfast.get_num_threads()
    1
    >>> bnfast.set_num_threads(None)
    """
    global _override
    value = None if n is None else _validate(n)
    with _lock:
        _override = value
        _core.set_thread_override(0 if value is None else value)


@contextlib.contextmanager
def num_threads(n):
    """Context manager that sets the thread count and restores the previous setting.

    The setting is process-wide (not per Python thread).

    Parameters
    ----------
    n : int
        A positive thread count.

    Examples
    --------
    >>> import bnfast
    >>> with bnfast.num_threads(1):
    ...     bnfast.get_num_threads()
    1
    """
    global _override
    value = _validate(n)
    with _lock:
        previous = _override
        _override = value
        _core.set_thread_override(value)
    try:
        yield value
    finally:
        with _lock:
            _override = previous
            _core.set_thread_override(0 if previous is None else previous)
