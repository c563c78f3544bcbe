"""OpenMP settings that must be in the environment before the extension loads libgomp.

GNU OpenMP's idle threads spin for about 300,000 iterations after every parallel region
unless told otherwise.  Between bnfast kernels that steals the cores from NumPy's BLAS
threads (a small conv net's training step in bnfast.nn ran 3.5x slower on 2 cores).  A
short spin keeps the threads responsive for back-to-back kernels without that.  An explicit
OMP_WAIT_POLICY or GOMP_SPINCOUNT wins.  ``bnfast/__init__.py`` imports this module before
``bnfast._core``; ``show_config`` reports whether the value is bnfast's.
"""
import os

if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
    os.environ["GOMP_SPINCOUNT"] = "10000"
    SPINCOUNT_SET_BY_BNFAST = True
else:
    SPINCOUNT_SET_BY_BNFAST = False
