"""Command line of the paper reproductions: ``bnfast paper mnist|accelerate``.

``main(argv)`` is what ``bnfast paper ...`` (and ``python -m bnfast paper ...`` or
``python -m bnfast.paper ...``) calls.  Exit status: 0 on success, 1 when the data cannot
be found or the run fails (one message on stderr, no traceback), 2 for invalid arguments
(argparse's usage line and message), 130 after Ctrl-C (the results gathered so far are
written first; ``--resume`` continues from the last evaluation point).
"""
import argparse
import math
import os
import re
import sys

__all__ = ["main", "build_parser"]

#: Where the help texts send the reader (the docs are not installed with the package).
DOCS_HINT = ("More: the 'Reproducing the paper' page of bnfast's documentation, and "
             "python -m pydoc bnfast.paper.mnist_fig1 (or .accelerate) for the details.")
#: The same for the main command.
DOCS_HINT_MAIN = ("More: bnfast's documentation (user guide, API reference, 'Reproducing the "
                  "paper'), and python -m pydoc bnfast.")


# ---------------------------------------------------------------------------- arg types

def int_at_least(lo, expected=None):
    """argparse type: an integer >= `lo` (`expected` names it in the error)."""
    expected = expected or f"an integer >= {lo}"

    def check(s):
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {s!r}") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"must be >= {lo}, got {v}")
        return v
    check.__name__ = f"integer >= {lo}"
    return check


positive_int = int_at_least(1, "a positive integer")
nonnegative_int = int_at_least(0)


def thread_count(s):
    """argparse type: 0 (keep the process's settings) up to bnfast.MAX_THREADS."""
    from .._threads import MAX_THREADS

    v = nonnegative_int(s)
    if v > MAX_THREADS:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_THREADS}, got {v}")
    return v


def positive_thread_count(s):
    """argparse type: 1 up to bnfast.MAX_THREADS."""
    v = thread_count(s)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def float_range(lo=None, hi=None, *, lo_open=False, hi_open=False):
    """argparse type: a finite float in the given (half-)open or closed range."""
    def check(s):
        try:
            v = float(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {s!r}") from None
        if not math.isfinite(v):
            raise argparse.ArgumentTypeError(f"must be finite, got {s}")
        bad = (lo is not None and (v < lo or (lo_open and v == lo))) or \
              (hi is not None and (v > hi or (hi_open and v == hi)))
        if bad:
            left = "(" if lo_open else "["
            right = ")" if hi_open else "]"
            raise argparse.ArgumentTypeError(
                f"must be in {left}{'-inf' if lo is None else lo}, "
                f"{'inf' if hi is None else hi}{right}, got {v:g}")
        return v
    check.__name__ = "number"
    return check


positive_float = float_range(0, None, lo_open=True)


def existing_dir(s):
    """argparse type: a folder that exists (``~`` expanded); returned as given."""
    p = os.path.expanduser(s)
    if not os.path.exists(p):
        raise argparse.ArgumentTypeError(f"folder {s!r} does not exist")
    if not os.path.isdir(p):
        raise argparse.ArgumentTypeError(f"{s!r} is not a folder")
    return p


def output_dir(s):
    """argparse type: a folder to write into (created later); not an existing file."""
    if not s:
        raise argparse.ArgumentTypeError("expected a folder name, got ''")
    p = os.path.expanduser(s)
    if os.path.exists(p) and not os.path.isdir(p):
        raise argparse.ArgumentTypeError(f"{s!r} exists and is not a folder")
    return p


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions kept as written; every option's default shown: ``(default: X)`` is
    added unless the help already says ``default:`` (options whose default depends on
    other options) or the option is a flag."""

    def _get_help_string(self, action):
        text = action.help or ""
        if ("default:" in text or "%(default)" in text or action.default is None
                or action.default is argparse.SUPPRESS or action.nargs == 0):
            return text
        return text + " (default: %(default)s)"


def plain(doc):
    """A docstring as plain text for --help: RST roles, backticks and ``::`` removed."""
    doc = re.sub(r":(?:func|mod|class|data|meth|attr):`~?([^`]+)`", r"\1", doc or "")
    doc = doc.replace("``", "").replace("::\n", ":\n")
    return re.sub(r"`([^`]+)`", r"\1", doc)


# ---------------------------------------------------------------------------- parser

def _add_common(p, out_default):
    p.add_argument("--data-dir", type=existing_dir, default=None, metavar="DIR",
                   help="existing folder with the four MNIST IDX files (.gz or raw) "
                        "(default: BNFAST_DATA_DIR if set, else ../shared/data/mnist beside "
                        "a source checkout, else the cache folder, downloading when online)")
    p.add_argument("--out", type=output_dir, default=out_default, metavar="DIR",
                   help="folder for the CSV/JSON/PNG results and the checkpoint (created)")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run from the checkpoint in --out (its last "
                        "evaluation point), with the same options")
    p.add_argument("--seed", type=nonnegative_int, default=0,
                   help="seed of weights and batch order")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG (no matplotlib)")
    p.add_argument("--threads", type=thread_count, default=1,
                   help="threads for bnfast's kernels and NumPy's BLAS (1 is fastest for "
                        "these small networks; 0 keeps the process's settings)")


def build_parser(prog="python -m bnfast.paper"):
    """The argument parser: sub-commands ``mnist`` and ``accelerate``, and their options.

    Every option is checked here (positive counts, ranges, choices, existing folders), so
    a bad value is a usage error (exit status 2), never a traceback.

    Parameters
    ----------
    prog : str, default "python -m bnfast.paper"
        The program name shown in the usage and help (``bnfast paper`` from the
        ``bnfast`` command).

    Returns
    -------
    argparse.ArgumentParser
        ``args.experiment`` is ``"mnist"`` or ``"accelerate"``; options left out take
        :data:`bnfast.paper.mnist_fig1.DEFAULTS` (or None, for :mod:`~bnfast.paper.accelerate`'s
        own defaults).

    Examples
    --------
    >>> args = build_parser().parse_args(["mnist", "--steps", "100", "--no-plot"])
    >>> args.experiment, args.steps, args.lr, args.no_plot, args.threads
    ('mnist', 100, 0.01, True, 1)
    >>> args = build_parser().parse_args(["accelerate", "--quick"])
    >>> args.quick, args.steps, args.out
    (True, None, 'paper-results')
    >>> build_parser(prog="bnfast paper").parse_args(["accelerate", "--variants", "BN-x5"]
    ...                                              ).variants
    ['BN-x5']
    """
    from . import accelerate, mnist_fig1

    parser = argparse.ArgumentParser(
        prog=prog, formatter_class=HelpFormatter, epilog=DOCS_HINT,
        description="Reproduce experiments of Ioffe & Szegedy (2015) with bnfast.nn.")
    sub = parser.add_subparsers(dest="experiment", required=True, metavar="{mnist,accelerate}")

    d = mnist_fig1.DEFAULTS
    m = sub.add_parser("mnist", help="Figure 1: MNIST MLP with and without batch norm",
                       description=plain(mnist_fig1.__doc__), epilog=DOCS_HINT,
                       formatter_class=HelpFormatter)
    m.add_argument("--steps", type=positive_int, default=d["steps"],
                   help="training steps per network")
    m.add_argument("--eval-every", type=positive_int, default=d["eval_every"], metavar="N",
                   help="evaluate (and checkpoint) every N steps")
    m.add_argument("--batch-size", type=int_at_least(2), default=d["batch_size"],
                   help="mini-batch size (at least 2 for batch norm)")
    m.add_argument("--optimizer", choices=["sgd", "nesterov", "adam"], default=d["optimizer"],
                   help="the optimizer")
    m.add_argument("--lr", type=positive_float, default=d["lr"], help="learning rate")
    m.add_argument("--momentum", type=float_range(0, 1, hi_open=True), default=d["momentum"],
                   help="SGD momentum, in [0, 1)")
    m.add_argument("--init-std", type=positive_float, default=d["init_std"],
                   help="std of the Gaussian initial weights")
    m.add_argument("--eps", type=positive_float, default=d["eps"], help="batch-norm epsilon")
    m.add_argument("--unit", type=unit_index(d["hidden"][-1]), default=d["unit"],
                   help=f"unit (0..{d['hidden'][-1] - 1}) of the last hidden layer whose "
                        f"input is recorded")
    m.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="where to train: cpu (NumPy) or cuda (CuPy arrays on the GPU; "
                        "evaluation runs on a CPU copy of the model)")
    m.add_argument("--pop-batches", type=positive_int, default=d["pop_batches"],
                   help="training mini-batches for the population statistics")
    _add_common(m, "paper-results")

    a = sub.add_parser("accelerate", help="Figure 3: accelerating BN networks (conv net)",
                       description=plain(accelerate.__doc__), epilog=DOCS_HINT,
                       formatter_class=HelpFormatter)
    q = accelerate.QUICK
    a.add_argument("--quick", action="store_true",
                   help=f"a few minutes: {q['steps']} steps and a {q['eval_size']:,}-image "
                        f"test subset")
    a.add_argument("--steps", type=positive_int, default=None,
                   help=f"training steps of every variant (default: "
                        f"{accelerate.DEFAULTS['steps']}; {q['steps']} with --quick)")
    a.add_argument("--eval-every", type=positive_int, default=None, metavar="N",
                   help=f"evaluate (and checkpoint) every N steps (default: "
                        f"{accelerate.DEFAULTS['eval_every']})")
    a.add_argument("--lr", type=positive_float, default=None,
                   help=f"the Baseline's learning rate (default: {accelerate.DEFAULTS['lr']}); "
                        f"the xN variants use N times it")
    a.add_argument("--variants", type=variant_list, default=None, metavar="A,B,...",
                   help="comma-separated subset of " + ",".join(accelerate.VARIANTS)
                        + " (Baseline always runs; default: all)")
    _add_common(a, "paper-results")
    return parser


def unit_index(width):
    """argparse type: a unit index 0..width-1."""
    def check(s):
        v = nonnegative_int(s)
        if v >= width:
            raise argparse.ArgumentTypeError(f"must be in 0..{width - 1}, got {v}")
        return v
    check.__name__ = "unit"
    return check


def variant_list(s):
    """argparse type: comma-separated names of accelerate.VARIANTS; returns a list."""
    from .accelerate import VARIANTS

    names = [v.strip() for v in s.split(",") if v.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"expected names from {','.join(VARIANTS)}, got {s!r}")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown variant{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; "
            f"choose from {','.join(VARIANTS)}")
    return names


def error_exit(prog, message, status=1):
    """Print ``prog: error: message`` on stderr and return `status` (no traceback)."""
    print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
    return status


def main(argv=None, prog="python -m bnfast.paper"):
    """Run one experiment; returns the exit status (the results are written to ``--out``).

    Parameters
    ----------
    argv : list of str, optional
        The arguments (see :func:`build_parser`); default ``sys.argv[1:]``.
    prog : str, default "python -m bnfast.paper"
        The command's name in the usage line and messages.

    Returns
    -------
    int
        0 on success; 1 when MNIST cannot be found or read, the training diverges or the
        checkpoint does not fit (one message on stderr); 130 after Ctrl-C (the results so
        far are written first, and the message says where).

    Raises
    ------
    SystemExit
        For ``--help`` and for invalid arguments (from :mod:`argparse`, status 2).

    Examples
    --------
    Two steps of Figure 1's networks on home-made 28x28 IDX files (checksums switched off
    for them), the printed tables discarded:

    >>> import contextlib, io, struct, tempfile
    >>> from pathlib import Path
    >>> from unittest import mock
    >>> from bnfast import datasets
    >>> def idx(dims, values):
    ...     head = struct.pack(">BBBB", 0, 0, 0x08, len(dims))
    ...     return head + struct.pack(f">{len(dims)}I", *dims) + bytes(values)
    >>> tmp = tempfile.TemporaryDirectory()
    >>> folder = Path(tmp.name)
    >>> files = {"train_images": idx((20, 28, 28), [i % 256 for i in range(20 * 784)]),
    ...          "train_labels": idx((20,), [i % 10 for i in range(20)]),
    ...          "test_images": idx((10, 28, 28), [i % 251 for i in range(10 * 784)]),
    ...          "test_labels": idx((10,), list(range(10)))}
    >>> for role, blob in files.items():
    ...     _ = (folder / datasets.MNIST_FILES[role]).write_bytes(blob)
    >>> argv = ["mnist", "--data-dir", str(folder), "--out", str(folder / "out"),
    ...         "--steps", "2", "--batch-size", "4", "--pop-batches", "2", "--no-progress",
    ...         "--no-plot"]
    >>> with mock.patch.dict(datasets.MNIST_SHA256, clear=True), \\
    ...         contextlib.redirect_stdout(io.StringIO()):
    ...     status = main(argv)
    >>> status
    0
    >>> sorted(p.name for p in (folder / "out").iterdir())
    ['mnist_fig1.csv', 'mnist_fig1.json', 'mnist_fig1_table.md']
    >>> tmp.cleanup()
    """
    from ..datasets import DatasetError
    from . import common

    parser = build_parser(prog)
    args = parser.parse_args(argv)
    name = f"{prog} {args.experiment}"
    if getattr(args, "device", "cpu") == "cuda":
        from ..cuda import why_unavailable

        reason = why_unavailable()
        if reason is not None:
            return error_exit(name, f"--device cuda: the GPU backend is unavailable: {reason}",
                              status=2)
    try:
        if args.experiment == "mnist":
            from . import mnist_fig1

            mnist_fig1.main_run(args)
        else:
            from . import accelerate

            accelerate.main_run(args)
    except common.Interrupted as exc:
        print(file=sys.stderr)
        what = (f"wrote the results so far to {', '.join(str(p) for p in exc.paths)}"
                if exc.paths else "no evaluation point reached yet, nothing written")
        ck = (f"; continue with the same command and --resume (checkpoint {exc.checkpoint})"
              if exc.checkpoint else "")
        print(f"{name}: interrupted; {what}{ck}", file=sys.stderr, flush=True)
        return 130
    except KeyboardInterrupt:
        print(f"\n{name}: interrupted", file=sys.stderr, flush=True)
        return 130
    except DatasetError as exc:
        return error_exit(name, str(exc))
    except (FloatingPointError, common.CheckpointError) as exc:
        return error_exit(name, str(exc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
