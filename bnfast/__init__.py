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
# The one place the version is written: pyproject.toml reads it from here
# ([tool.setuptools.dynamic]), and the installed metadata follows.
__version__ = "0.1.0"

import os as _os

# GNU OpenMP's idle threads spin for about 300,000 iterations after every parallel region
# unless told otherwise.  Between bnfast kernels that steals the cores from NumPy's BLAS
# threads (a small conv net's training step in bnfast.nn ran 3.5x slower on 2 cores).  A
# short spin keeps the threads responsive for back-to-back kernels without that.  Set
# before the extension loads libgomp; an explicit OMP_WAIT_POLICY or GOMP_SPINCOUNT wins.
if "OMP_WAIT_POLICY" not in _os.environ and "GOMP_SPINCOUNT" not in _os.environ:
    _os.environ["GOMP_SPINCOUNT"] = "10000"
    _SPINCOUNT_SET_BY_BNFAST = True
else:
    _SPINCOUNT_SET_BY_BNFAST = False

try:
    from . import _core  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised only without a build
    raise ImportError(
        "bnfast's compiled extension (bnfast._core) could not be imported: "
        f"{exc}.\nbnfast must be built before use. From a source checkout run\n"
        "    pip install .          (install), or\n"
        "    pip install -e .       (editable install for development), or\n"
        "    python setup.py build_ext --inplace\n"
        "which needs a C compiler, Cython>=3 and NumPy. If you are inside the source "
        "directory of an installed bnfast, change to another directory first."
    ) from exc

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
