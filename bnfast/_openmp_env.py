"""OpenMP settings that must be in the environment before the extension loads libgomp.

GNU OpenMP's idle threads spin for about 300,000 iterations after every parallel region
unless told otherwise.  Between bnfast kernels that steals the cores from NumPy's BLAS
threads (a small conv net's training step in bnfast.nn ran 3.5x slower on 2 cores).  A
short spin keeps the threads responsive for back-to-back kernels without that.  An explicit
OMP_WAIT_POLICY or GOMP_SPINCOUNT wins.  ``bnfast/__init__.py`` imports this module before
``bnfast._core``; ``show_config`` reports whether the value is bnfast's.

libgomp reads its settings once, when it is loaded: if another library (PyTorch, for one)
loaded it before bnfast was imported, a value set here would not apply, so none is set and
``show_config`` says so.
"""
import os


def _libgomp_loaded():
    """Whether GNU OpenMP is already mapped into this process (Linux; False elsewhere)."""
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as f:
            return any("libgomp" in line for line in f)
    except OSError:
        return False


LIBGOMP_LOADED_BEFORE = _libgomp_loaded()
if ("OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ
        and not LIBGOMP_LOADED_BEFORE):
    os.environ["GOMP_SPINCOUNT"] = "10000"
    SPINCOUNT_SET_BY_BNFAST = True
else:
    SPINCOUNT_SET_BY_BNFAST = False
