"""Kernel-variant dispatch and build configuration.

One dispatch table per operation is filled at import from the CPU's capabilities: the best
supported of ``baseline`` (plain C, always present), ``avx2`` (AVX2+FMA) and ``avx512``
(AVX-512 F/VL/DQ/BW).  ``BNFAST_ISA=baseline|avx2|avx512`` forces a variant (``auto`` or
empty means the default choice); forcing one the CPU lacks is an error at import.

The backward's dx pass, when its inputs and output together reach ``BNFAST_STREAM_MIN_BYTES``
bytes (T; default: the last-level cache's size, 16 MiB where it is unknown), and the
normalisation, when its input alone reaches T, write their output with
non-temporal stores in the AVX2 and AVX-512 variants: the data goes straight to memory
instead of first being read into the cache (below that, input and output stay in the cache
between calls, partly or wholly, and ordinary stores are faster; the backward reads its
inputs twice, and streaming its output keeps them cached).  The same threshold tells the column
reductions whether data counts as cache-resident (register strips down the rows) or not
(one stream through memory).  The results are bit-identical either way.
"""
import contextlib
import os
import platform
import sys
import threading

import numpy as np

from . import _core
from ._openmp_env import LIBGOMP_LOADED_BEFORE, SPINCOUNT_SET_BY_BNFAST
from ._version import __version__

ISA_NAMES = _core.ISA_NAMES
ENV_VAR = "BNFAST_ISA"
STREAM_ENV_VAR = "BNFAST_STREAM_MIN_BYTES"
STREAM_MIN_BYTES_DEFAULT = _core.get_stream_min_bytes()  # the C default, before any setting
_lock = threading.Lock()
# use_isa blocks now active, in the order they were entered: (token, variant index), and
# the variant that was in force before the first of them.  The setting is process-wide;
# this bookkeeping makes blocks from several Python threads restore correctly whatever
# order they exit in.
_isa_blocks = []
_isa_base = None


def available_isas():
    """Return the names of the kernel variants this CPU and build support, best last.

    Returns
    -------
    list of str
        A subset of ``['baseline', 'avx2', 'avx512']``, in that order; ``'baseline'`` is
        always there.

    Examples
    --------
    >>> import bnfast
    >>> "baseline" in bnfast.available_isas()
    True
    """
    return [name for i, name in enumerate(ISA_NAMES) if _core.isa_supported(i)]


def _isa_index(name):
    if not isinstance(name, str):
        raise TypeError(f"instruction set must be a string, got {name!r}")
    key = name.strip().lower()
    if key not in ISA_NAMES:
        raise ValueError(
            f"unknown instruction set {name!r}; expected one of {', '.join(ISA_NAMES)}")
    idx = ISA_NAMES.index(key)
    if not _core.isa_supported(idx):
        why = ("this CPU (or operating system) does not support it"
               if _core.isa_compiled(idx) else "it was not compiled into this build")
        raise RuntimeError(
            f"instruction set {key!r} was requested but {why}; "
            f"available: {', '.join(available_isas())}")
    return idx


def _resolve_isa(name):
    """The variant index for a name; 'auto' (or '') is the best the CPU supports."""
    if isinstance(name, str) and name.strip().lower() in ("auto", ""):
        return _core.isa_default()
    return _isa_index(name)


def get_isa():
    """Return the name of the kernel variant in use.

    Returns
    -------
    str
        ``'baseline'``, ``'avx2'`` or ``'avx512'``.

    Examples
    --------
    >>> import bnfast
    >>> bnfast.get_isa() in bnfast.available_isas()
    True
    """
    return ISA_NAMES[_core.get_isa()]


def set_isa(name):
    """Select the kernel variant for all later calls (process-wide).

    Meant for testing and benchmarking; the default choice is the fastest supported one.
    All variants give bit-identical results.

    Parameters
    ----------
    name : {'baseline', 'avx2', 'avx512', 'auto'}
        The variant to use from now on (case-insensitive); ``'auto'`` (or an empty string)
        restores the default choice, the fastest variant this CPU and build support.

    Raises
    ------
    ValueError
        For an unknown name.
    RuntimeError
        If the CPU or the build does not support the variant.

    See Also
    --------
    use_isa : the same inside a ``with`` block.

    Examples
    --------
    >>> import bnfast
    >>> previous = bnfast.get_isa()
    >>> bnfast.set_isa("baseline")
    >>> bnfast.get_isa()
    'baseline'
    >>> bnfast.set_isa(previous)
    """
    idx = _resolve_isa(name)
    with _lock:
        _core.set_isa(idx)


@contextlib.contextmanager
def use_isa(name):
    """Context manager: use a kernel variant inside the block, then restore the previous one.

    The variant is process-wide (all variants give bit-identical results, so another
    Python thread sees only a speed difference).  Blocks may overlap across Python threads
    and exit in any order: while any block is active the most recently entered one's
    variant is in force, and when the last one exits the variant from before the first
    returns.

    Parameters
    ----------
    name : {'baseline', 'avx2', 'avx512', 'auto'}
        The variant to use inside the block.

    Raises
    ------
    ValueError
        For an unknown name.
    RuntimeError
        If the CPU or the build does not support the variant.

    Examples
    --------
    >>> import bnfast
    >>> with bnfast.use_isa("baseline"):
    ...     bnfast.get_isa()
    'baseline'
    """
    idx = _resolve_isa(name)
    token = object()
    global _isa_base
    with _lock:
        if not _isa_blocks:
            _isa_base = _core.get_isa()
        _core.set_isa(idx)
        _isa_blocks.append((token, idx))
    try:
        yield
    finally:
        with _lock:
            for i in range(len(_isa_blocks) - 1, -1, -1):
                if _isa_blocks[i][0] is token:
                    del _isa_blocks[i]
                    break
            # the most recently entered block still active, else the variant in force
            # before the first of the active blocks began
            _core.set_isa(_isa_blocks[-1][1] if _isa_blocks else _isa_base)


def _openmp_runtime():
    ver = _core.openmp_version()
    if not ver:
        return None, None
    path = None
    try:
        from threadpoolctl import threadpool_info

        for info in threadpool_info():
            if info.get("user_api") == "openmp":
                path = info.get("filepath")
                # prefer the runtime our own compiler links
                if "gomp" in os.path.basename(path or "") and "gcc" in _core.compiler():
                    break
    except Exception:  # threadpoolctl is optional
        pass
    if path is None:
        comp = _core.compiler()
        path = ("libgomp" if comp.startswith("gcc") else "libomp" if comp.startswith("clang")
                else "vcomp" if comp.startswith("msvc") else None)
    return ver, path


_OPENMP_SPEC = {201107: "3.1", 201307: "4.0", 201511: "4.5", 201811: "5.0", 202011: "5.1",
                202111: "5.2"}


def _wait_policy():
    if os.environ.get("OMP_WAIT_POLICY"):
        return f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}"
    spin = os.environ.get("GOMP_SPINCOUNT")
    if spin:
        return f"GOMP_SPINCOUNT={spin}" + (" (bnfast's default)" if SPINCOUNT_SET_BY_BNFAST
                                           else "")
    if LIBGOMP_LOADED_BEFORE:
        return ("runtime default (libgomp was loaded before bnfast, so bnfast's short spin, "
                "GOMP_SPINCOUNT=10000, could not apply: set it before Python starts)")
    return "runtime default"


def get_config():
    """Return bnfast's build and run-time configuration as a dict.

    Keys: ``version``, ``isa`` (in use), ``isa_selected_by`` ('auto' or the environment
    variable), ``isas_available``, ``isas_compiled``, ``openmp`` (spec version or None),
    ``openmp_runtime`` (library path when threadpoolctl can tell), ``num_threads``,
    ``omp_num_threads_env``, ``omp_wait`` (how idle OpenMP threads wait),
    ``stream_min_bytes`` (the streaming threshold T: the backward's dx pass writes its
    output with non-temporal stores when it reads and writes at least T bytes, the
    normalisation when its input alone is T), ``stream_min_source`` (where that value
    comes from), ``llc_bytes`` (the last-level cache, 0 if unknown), ``compiler``,
    ``python``, ``numpy``, ``machine``.

    Returns
    -------
    dict
        The keys above; :func:`show_config` prints the same information.

    Examples
    --------
    >>> import bnfast
    >>> cfg = bnfast.get_config()
    >>> cfg["isa"] == bnfast.get_isa(), "baseline" in cfg["isas_available"]
    (True, True)
    """
    from ._threads import get_num_threads

    ver, path = _openmp_runtime()
    forced = os.environ.get(ENV_VAR, "").strip()
    return {
        "version": __version__,
        "isa": get_isa(),
        "isa_selected_by": f"{ENV_VAR}={forced}" if forced and forced != "auto" else "auto",
        "isas_available": available_isas(),
        "isas_compiled": [n for i, n in enumerate(ISA_NAMES) if _core.isa_compiled(i)],
        "openmp": _OPENMP_SPEC.get(ver, str(ver)) if ver else None,
        "openmp_runtime": path,
        "num_threads": get_num_threads(),
        "omp_num_threads_env": os.environ.get("OMP_NUM_THREADS"),
        "omp_wait": _wait_policy(),
        "stream_min_bytes": _core.get_stream_min_bytes(),
        "stream_min_source": _stream_source(),
        "llc_bytes": _core.llc_bytes(),
        "compiler": _core.compiler(),
        "python": sys.version.split()[0],
        "numpy": np.__version__,
        "machine": f"{platform.machine()}, {os.cpu_count()} logical CPUs",
    }


def show_config(file=None):
    """Print bnfast's version, kernel variants, OpenMP runtime, threads, compiler and GPU.

    Parameters
    ----------
    file : file-like, optional
        Where to print (default: ``sys.stdout``).

    Examples
    --------
    >>> import bnfast
    >>> bnfast.show_config()  # doctest: +ELLIPSIS
    bnfast ...
    """
    cfg = get_config()
    out = file or sys.stdout
    marks = []
    for name in ISA_NAMES:
        if name == cfg["isa"]:
            marks.append(f"{name} (in use)")
        elif name in cfg["isas_available"]:
            marks.append(f"{name} (available)")
        elif name in cfg["isas_compiled"]:
            marks.append(f"{name} (not supported by this CPU)")
        else:
            marks.append(f"{name} (not compiled)")
    omp = (f"OpenMP {cfg['openmp']}" + (f", runtime {cfg['openmp_runtime']}"
                                        if cfg["openmp_runtime"] else "")
           if cfg["openmp"] else "not available (serial build)")
    env = cfg["omp_num_threads_env"]
    lines = [
        f"bnfast {cfg['version']}",
        f"  kernel variant : {cfg['isa']} (selected: {cfg['isa_selected_by']})",
        f"  variants       : {', '.join(marks)}",
        f"  OpenMP         : {omp}",
        f"  threads        : {cfg['num_threads']}"
        f" (OMP_NUM_THREADS={env if env is not None else 'unset'})",
        f"  idle threads   : {cfg['omp_wait']}",
        f"  streaming      : backward passes moving >= {_fmt_bytes(cfg['stream_min_bytes'])},"
        f" normalisations of inputs >= that ({cfg['stream_min_source']})",
        f"  compiler       : {cfg['compiler']}",
        f"  python, numpy  : {cfg['python']}, {cfg['numpy']}",
        f"  machine        : {cfg['machine']}",
    ]
    from .cuda import config_line          # imports CuPy (if installed) only now
    lines.append(config_line())
    print("\n".join(lines), file=out)


def _fmt_bytes(n):
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size and n % size == 0:
            return f"{n // size} {unit}"
    return f"{n} bytes"


def _stream_source():
    """Where the streaming threshold in force comes from, in words (show_config)."""
    raw = os.environ.get(STREAM_ENV_VAR, "").strip()
    n = _core.get_stream_min_bytes()
    if raw.isascii() and raw.isdigit() and int(raw) == n:
        return f"{STREAM_ENV_VAR}={raw}"
    if n != STREAM_MIN_BYTES_DEFAULT:
        return "set in this process"
    llc = _core.llc_bytes()
    if llc and llc == n:
        return f"default: the last-level cache, {_fmt_bytes(llc)}; {STREAM_ENV_VAR} unset"
    return f"default: last-level cache size unknown; {STREAM_ENV_VAR} unset"


def _stream_from_environment():
    raw = os.environ.get(STREAM_ENV_VAR, "").strip()
    if not raw:
        return  # the C default stays
    n = int(raw) if raw.isdigit() and raw.isascii() else -1
    if not 0 <= n < 2 ** 64:
        raise RuntimeError(f"{STREAM_ENV_VAR}={raw!r}: expected a non-negative whole number "
                           "of bytes (0 streams whenever the output allows)")
    _core.set_stream_min_bytes(n)


@contextlib.contextmanager
def _stream_min_bytes(n):
    """Temporarily set the streaming-store threshold (tests and benchmarks)."""
    old = _core.get_stream_min_bytes()
    _core.set_stream_min_bytes(n)
    try:
        yield
    finally:
        _core.set_stream_min_bytes(old)


def _select_from_environment():
    forced = os.environ.get(ENV_VAR, "").strip()
    if forced and forced.lower() != "auto":
        try:
            idx = _isa_index(forced)
        except (ValueError, RuntimeError) as exc:
            raise RuntimeError(f"{ENV_VAR}={forced}: {exc}") from None
    else:
        idx = _core.isa_default()
    _core.set_isa(idx)


_select_from_environment()
_stream_from_environment()
