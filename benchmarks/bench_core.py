"""Benchmark bnfast's core kernels against NumPy and PyTorch in one run.

Usage::

    python benchmarks/bench_core.py                 # the closing-note table (2 threads)
    python benchmarks/bench_core.py --threads 1 --dtype float64 --json results/core.json

For each case it prints the median time in ms of bnfast (preallocated outputs), a plain NumPy
implementation, and torch.nn.functional.batch_norm / autograd (same thread count), and the
speed ratios.  Medians of repeated runs; the minima are in the JSON.
"""
import argparse
import json
import os
import sys

import numpy as np

import bnfast
from bnfast._bench import compare, format_table

DEFAULT_SHAPES = [(256, 1024), (32, 64, 56, 56)]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--repeat", type=int, default=9)
    ap.add_argument("--shape", action="append", default=None,
                    help="a shape like 32,64,56,56 (repeatable)")
    ap.add_argument("--json", default=None, help="write the results to this JSON file")
    args = ap.parse_args(argv)
    shapes = ([tuple(int(s) for s in sh.split(",")) for sh in args.shape]
              if args.shape else DEFAULT_SHAPES)
    threads = args.threads or bnfast.get_num_threads()
    bnfast.show_config()
    rows = []
    with bnfast.num_threads(threads):
        for shape in shapes:
            for axis in ([1] if len(shape) == 2 else [1, -1]):
                rows += compare(shape, axis, np.dtype(args.dtype), repeat=args.repeat)
    print()
    print(format_table(rows))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"config": bnfast.get_config(), "results": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
