"""bnfast's command line: bnfast [config|quick|bench|paper] (also python -m bnfast).

With no command (or quick), prints the configuration and a short speed comparison of
bnfast against NumPy (and PyTorch, when installed) on two common shapes.  bench runs the
full benchmark (--quick for a subset; --isa NAME|all for the kernel variants: one
table per variant) and writes JSON, Markdown tables and PNG plots.  paper runs the
paper's experiments (bnfast paper mnist, bnfast paper accelerate; bnfast paper --help).

Exit status: 0 on success, 1 when a run fails (one message, no traceback), 2 for invalid
arguments, 130 after Ctrl-C.
"""
import argparse
import sys

PROG = "bnfast"


def _torch_status(args):
    """'installed', 'not installed' or 'skipped (--no-torch)'."""
    if args.no_torch:
        return "skipped (--no-torch)"
    from ._bench import _torch

    return "installed" if _torch() is not None else "not installed"


def _quick(args):
    from . import show_config
    from ._bench import format_table, run_case
    from ._threads import get_num_threads

    show_config()
    threads = args.threads or get_num_threads()
    torch = _torch_status(args)
    print(f"\nSpeed, float32, {threads} thread(s); median of repeated runs "
          "(ratios > 1 mean bnfast is faster):\n")
    rows = []
    for shape, layouts in [((256, 1024), ["cf"]), ((32, 64, 56, 56), ["cf", "cl"])]:
        for layout in layouts:
            rows += run_case(shape, layout, "float32", threads, repeat=args.repeat,
                             ops=("train", "infer", "backward"),
                             include_torch=torch == "installed")
    print(format_table(rows, torch=torch))
    print(f"\ncf = channels-first (axis=1), cl = channels-last (axis=-1); bnfast writes into "
          f"preallocated outputs.\nFull benchmark: {PROG} bench")
    return 0


def _existing_file(s):
    """argparse type: a file that exists."""
    import os

    if not os.path.isfile(os.path.expanduser(s)):
        raise argparse.ArgumentTypeError(f"{s!r} is not a file")
    return os.path.expanduser(s)


def _isa_choice(s):
    """argparse type of bench --isa: a variant name this CPU supports, or all."""
    from ._bench import ALL
    from ._config import ISA_NAMES, available_isas

    choices = list(ISA_NAMES) + [ALL]
    if s not in choices:
        raise argparse.ArgumentTypeError(
            f"invalid choice: {s!r} (choose from {', '.join(choices)})")
    if s != ALL and s not in available_isas():
        raise argparse.ArgumentTypeError(
            f"variant {s!r} is not supported by this CPU or build; available: "
            f"{', '.join(available_isas())}, all")
    return s


def _bench(args):
    if args.device == "cuda":              # the GPU benchmark: bnfast.cuda._bench
        from .cuda._bench import main as cuda_main

        return cuda_main(args)
    from . import show_config
    from ._bench import resolve_isas, run

    isas, skipped = resolve_isas(args.isa, args.quick)
    show_config()
    for name in skipped:
        print(f"note: variant {name} is not supported by this CPU or build; not run")
    threads = [args.threads] if args.threads else None
    run(quick=args.quick, out_dir=args.out, threads_list=threads, repeat=args.repeat,
        isas=isas, reference=args.compare)
    return 0


def _config(args):
    if args.json:
        import json

        from . import get_config

        print(json.dumps(get_config(), indent=1, sort_keys=True, default=str))
    else:
        from . import show_config

        show_config()
    return 0


def build_parser():
    """The parser of the ``bnfast`` command (``paper`` is handed to bnfast.paper.cli)."""
    from . import __version__
    from ._config import ISA_NAMES
    from .paper.cli import DOCS_HINT_MAIN, HelpFormatter, output_dir, positive_int, \
        positive_thread_count

    parser = argparse.ArgumentParser(prog=PROG, description=__doc__, epilog=DOCS_HINT_MAIN,
                                     formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=f"bnfast {__version__}")
    sub = parser.add_subparsers(dest="cmd", metavar="{config,quick,bench,paper}")
    c = sub.add_parser("config", help="print the build and run-time configuration",
                       description="Print bnfast's build and run-time configuration.",
                       formatter_class=HelpFormatter)
    c.add_argument("--json", action="store_true",
                   help="machine-readable: bnfast.get_config() as JSON")
    q = sub.add_parser("quick", help="configuration and a short speed comparison (default)",
                       description="The configuration and a short speed comparison against "
                                   "NumPy and PyTorch.", formatter_class=HelpFormatter)
    b = sub.add_parser("bench", help="the full benchmark: tables, JSON and PNGs per variant",
                       description="The full benchmark against PyTorch, oneDNN and the memory "
                                   "copy floor (--quick: NumPy too), one table per kernel "
                                   "variant; writes JSON, Markdown tables and PNG plots.",
                       formatter_class=HelpFormatter)
    sub.add_parser("paper", help="the paper's experiments: paper mnist | paper accelerate "
                                 f"(see {PROG} paper --help)", add_help=False)
    b.add_argument("--quick", action="store_true", help="a subset that runs in under a minute")
    b.add_argument("--out", type=output_dir, default="results", metavar="DIR",
                   help="folder for the JSON, Markdown and PNG files (created)")
    b.add_argument("--threads", type=positive_thread_count, default=None,
                   help="thread count of bnfast and PyTorch (default: all cores)")
    b.add_argument("--repeat", type=positive_int, default=None,
                   help="timing samples per case (default: 3 to 7, by size)")
    b.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cpu: the CPU kernels; cuda: the GPU backend against PyTorch CUDA and "
                        "a device copy (exit status 2 without a GPU)")
    b.add_argument("--isa", type=_isa_choice, default=None,
                   metavar="{" + ",".join(list(ISA_NAMES) + ["all"]) + "}",
                   help="kernel variant(s) to time, one table each; all = every variant "
                        "this CPU supports (default: all; with --quick: the variant in "
                        "use, BNFAST_ISA or the best)")
    b.add_argument("--compare", type=_existing_file, default=None, metavar="JSON",
                   help="an earlier run's JSON: compare the avx512 variant's times with it "
                        "(default: none)")
    for p in (parser, q):
        p.add_argument("--threads", type=positive_thread_count, default=None,
                       help="thread count (default: all cores)")
        p.add_argument("--repeat", type=positive_int, default=5, help="timing samples per case")
        p.add_argument("--no-torch", action="store_true", help="skip PyTorch even if present")
    return parser


def main(argv=None):
    """Run the ``bnfast`` command; returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["paper"]:
        from .paper.cli import main as paper_main

        return paper_main(argv[1:], prog=f"{PROG} paper")
    args = build_parser().parse_args(argv)
    try:
        if args.cmd == "config":
            return _config(args)
        if args.cmd == "bench":
            return _bench(args)
        return _quick(args)
    except KeyboardInterrupt:
        print(f"\n{PROG}: interrupted", file=sys.stderr, flush=True)
        return 130


if __name__ == "__main__":
    sys.exit(main())
