"""Command line: ``python -m bnfast [config|quick|bench|paper]``.

With no argument (or ``quick``), prints the configuration and a short speed comparison of
bnfast against NumPy (and PyTorch, when installed) on two common shapes.  ``bench`` runs
the full benchmark (``--quick`` for a subset) and writes JSON and a PNG plot.  ``paper``
runs the paper's experiments (``paper mnist``, ``paper accelerate``; see docs/paper.md).
"""
import argparse
import sys


def _quick(args):
    from . import show_config
    from ._bench import format_table, run_case
    from ._threads import get_num_threads

    show_config()
    threads = args.threads or get_num_threads()
    print(f"\nSpeed, float32, {threads} thread(s); median of repeated runs "
          "(ratios > 1 mean bnfast is faster):\n")
    rows = []
    for shape, layouts in [((256, 1024), ["cf"]), ((32, 64, 56, 56), ["cf", "cl"])]:
        for layout in layouts:
            rows += run_case(shape, layout, "float32", threads, repeat=args.repeat,
                             ops=("train", "infer", "backward"),
                             include_torch=not args.no_torch)
    print(format_table(rows))
    print("\ncf = channels-first (axis=1), cl = channels-last (axis=-1); bnfast writes into "
          "preallocated outputs.\nFull benchmark: python -m bnfast bench")
    return 0


def _bench(args):
    from . import show_config
    from ._bench import run

    show_config()
    threads = [args.threads] if args.threads else None
    run(quick=args.quick, out_dir=args.out, threads_list=threads, repeat=args.repeat)
    return 0


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["paper"]:
        from .paper.cli import main as paper_main

        return paper_main(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m bnfast", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd")
    sub.add_parser("config", help="print the build and run-time configuration")
    q = sub.add_parser("quick", help="configuration and a short speed comparison (default)")
    b = sub.add_parser("bench", help="the full benchmark: table, JSON and PNG")
    sub.add_parser("paper", help="the paper's experiments: paper mnist | paper accelerate "
                                 "(see python -m bnfast paper --help)")
    b.add_argument("--quick", action="store_true", help="a subset that runs in under a minute")
    b.add_argument("--out", default="results", help="folder for JSON and PNG (default results)")
    b.add_argument("--threads", type=int, default=None,
                   help="one thread count (default: 1 and all; --quick: all)")
    b.add_argument("--repeat", type=int, default=None, help="timing samples per case")
    for p in (parser, q):
        p.add_argument("--threads", type=int, default=None, help="thread count (default: all)")
        p.add_argument("--repeat", type=int, default=5, help="timing samples per case")
        p.add_argument("--no-torch", action="store_true", help="skip PyTorch even if present")
    args = parser.parse_args(argv)
    if args.cmd == "config":
        from . import show_config

        show_config()
        return 0
    if args.cmd == "bench":
        return _bench(args)
    return _quick(args)


if __name__ == "__main__":
    sys.exit(main())
