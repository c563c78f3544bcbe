"""bnfast: fast, exact and deterministic batch normalization on the CPU.

The functional API works on NumPy arrays of float32 or float64 with the channel axis given by
``axis`` (1 for channels-first, -1 for channels-last):

>>> import numpy as np, bnfast
>>> x = np.random.default_rng(0).standard_normal((8, 3, 4, 4)).astype(np.float32)
>>> y, mean, invstd = bnfast.batch_norm_train(x)
>>> bool(abs(y.mean(axis=(0, 2, 3))).max() < 1e-6)
True

See :func:`show_config` for the kernel variant and thread count in use.

The framework on top of the kernels, :mod:`bnfast.nn` and :mod:`bnfast.optim`, is loaded
on first use (``bnfast.nn``, ``from bnfast import nn``): ``import bnfast`` loads the kernel
layer only.
"""
from ._version import __version__  # noqa: F401  (written once, in bnfast/_version.py)
from . import _openmp_env  # noqa: F401  (GOMP_SPINCOUNT, before _core loads libgomp)

try:
    from . import _core  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised only without a build
    raise ImportError(
        "bnfast's compiled extension (bnfast._core) could not be imported: "
        f"{exc}.\nbnfast must be built before use. From a source checkout run\n"
        "    pip install .          (install), or\n"
        "    pip install -e .       (editable install for development), or\n"
        "    python setup.py build_ext --inplace\n"
        "which needs a C compiler (and Cython>=3 after an edit of bnfast/_core.pyx). If "
        "you are inside the source directory of an installed bnfast, change to another "
        "directory first."
    ) from exc

from . import _plan  # noqa: E402
_plan.force_from_environment()   # BNFAST_FORCE_STRATEGY (tests, CI): before any call

from ._config import (  # noqa: E402
    available_isas,
    get_config,
    get_isa,
    set_isa,
    show_config,
    use_isa,
)
from ._threads import MAX_THREADS, get_num_threads, num_threads, set_num_threads  # noqa: E402
from ._api import (  # noqa: E402
    batch_norm,
    batch_norm_backward,
    batch_norm_infer,
    batch_norm_train,
    explain,
    moments,
)
from . import reference  # noqa: E402,F401

# Submodules loaded on first access, not by `import bnfast` (PEP 562).
_LAZY_SUBMODULES = ("nn", "optim")


def __getattr__(name):
    if name in _LAZY_SUBMODULES:
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY_SUBMODULES))


__all__ = [
    "__version__",
    "available_isas",
    "batch_norm",
    "batch_norm_backward",
    "batch_norm_infer",
    "batch_norm_train",
    "explain",
    "get_config",
    "get_isa",
    "get_num_threads",
    "moments",
    "nn",
    "num_threads",
    "optim",
    "reference",
    "set_isa",
    "set_num_threads",
    "show_config",
    "use_isa",
]
