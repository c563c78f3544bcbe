"""Benchmark bnfast's kernels against PyTorch, oneDNN and the memory-copy floor.

Same as ``bnfast bench`` (``python -m bnfast bench``)::

    python benchmarks/bench_core.py                 # every variant the CPU supports
    python benchmarks/bench_core.py --isa avx2      # one variant
    python benchmarks/bench_core.py --quick         # a subset, the variant in use
    python benchmarks/bench_core.py --threads 2 --out results

Prints one table and summary per kernel variant and writes ``bench.json``,
``bench_summary.md`` and ``bench_<variant>.md`` / ``.png`` to the output folder.
See benchmarks/README.md for how to read the figures.
"""
import sys

from bnfast.__main__ import main

if __name__ == "__main__":
    sys.exit(main(["bench"] + sys.argv[1:]))
