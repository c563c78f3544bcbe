"""Benchmark bnfast's kernels against NumPy, PyTorch and the memory-copy floor.

Same as ``python -m bnfast bench``::

    python benchmarks/bench_core.py            # full suite: float32 + float64, 1 and all threads
    python benchmarks/bench_core.py --quick    # a subset in under a minute
    python benchmarks/bench_core.py --threads 2 --out results

Writes a table to the terminal and ``bench.json`` / ``bench.png`` to the output folder.
See benchmarks/README.md for how to read the figures.
"""
import sys

from bnfast.__main__ import main

if __name__ == "__main__":
    sys.exit(main(["bench"] + sys.argv[1:]))
