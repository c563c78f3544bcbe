"""Command line: ``python -m bnfast [config|quick]``.

With no argument (or ``quick``), prints the configuration and a short speed comparison of
bnfast against NumPy (and PyTorch, when installed) on two common shapes.
"""
import argparse
import sys


def _quick(args):
    import numpy as np

    from . import show_config
    from ._bench import compare, format_table
    from ._threads import num_threads, get_num_threads

    show_config()
    threads = args.threads or get_num_threads()
    print(f"\nSpeed, float32, {threads} thread(s); median of repeated runs "
          "(ratios > 1 mean bnfast is faster):\n")
    rows = []
    with num_threads(threads):
        for shape in [(256, 1024), (32, 64, 56, 56)]:
            for axis in ([1] if len(shape) == 2 else [1, -1]):
                rows += compare(shape, axis, np.float32, repeat=args.repeat,
                                include_torch=not args.no_torch)
    print(format_table(rows))
    print("\ncf = channels-first (axis=1), cl = channels-last (axis=-1); bnfast writes into "
          "preallocated outputs.\nFull benchmark: python benchmarks/bench_core.py")
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bnfast", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd")
    sub.add_parser("config", help="print the build and run-time configuration")
    q = sub.add_parser("quick", help="configuration and a short speed comparison (default)")
    for p in (parser, q):
        p.add_argument("--threads", type=int, default=None, help="thread count (default: all)")
        p.add_argument("--repeat", type=int, default=5, help="timing samples per case")
        p.add_argument("--no-torch", action="store_true", help="skip PyTorch even if present")
    args = parser.parse_args(argv)
    if args.cmd == "config":
        from . import show_config

        show_config()
        return 0
    return _quick(args)


if __name__ == "__main__":
    sys.exit(main())
