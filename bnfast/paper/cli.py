"""Command line of the paper reproductions: ``python -m bnfast.paper mnist|accelerate``.

``main(argv)`` is also what ``python -m bnfast paper ...`` calls.
"""
import argparse
import sys

__all__ = ["main", "build_parser"]


def _add_common(p, out_default):
    p.add_argument("--data-dir", default=None,
                   help="folder with the MNIST IDX files (.gz or raw); default: "
                        "BNFAST_DATA_DIR, ../shared/data/mnist beside the checkout, or the "
                        "cache (downloading when online)")
    p.add_argument("--out", default=out_default,
                   help=f"folder for the CSV/JSON/PNG results (default: {out_default})")
    p.add_argument("--seed", type=int, default=0, help="seed of weights and batch order")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG (no matplotlib)")
    p.add_argument("--threads", type=int, default=1,
                   help="threads for bnfast's kernels and NumPy's BLAS (default 1: fastest "
                        "for these small networks; 0 keeps the process's settings)")


def build_parser(prog="python -m bnfast.paper"):
    """The argument parser: sub-commands ``mnist`` and ``accelerate``, and their options.

    Parameters
    ----------
    prog : str, default "python -m bnfast.paper"
        The program name shown in the usage and help.

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
    """
    from . import accelerate, mnist_fig1

    parser = argparse.ArgumentParser(
        prog=prog, description="Reproduce experiments of Ioffe & Szegedy (2015) with bnfast.nn.")
    sub = parser.add_subparsers(dest="experiment", required=True)

    d = mnist_fig1.DEFAULTS
    m = sub.add_parser("mnist", help="Figure 1: MNIST MLP with and without batch norm",
                       description=mnist_fig1.__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    m.add_argument("--steps", type=int, default=d["steps"],
                   help=f"training steps per network (default {d['steps']})")
    m.add_argument("--eval-every", type=int, default=d["eval_every"],
                   help=f"evaluate every N steps (default {d['eval_every']})")
    m.add_argument("--batch-size", type=int, default=d["batch_size"])
    m.add_argument("--optimizer", choices=["sgd", "nesterov", "adam"], default=d["optimizer"])
    m.add_argument("--lr", type=float, default=d["lr"],
                   help=f"learning rate (default {d['lr']})")
    m.add_argument("--momentum", type=float, default=d["momentum"])
    m.add_argument("--init-std", type=float, default=d["init_std"],
                   help=f"std of the Gaussian initial weights (default {d['init_std']})")
    m.add_argument("--eps", type=float, default=d["eps"], help="batch-norm epsilon")
    m.add_argument("--unit", type=int, default=d["unit"],
                   help="unit of the last hidden layer whose input is recorded")
    m.add_argument("--pop-batches", type=int, default=d["pop_batches"],
                   help="training mini-batches for the population statistics")
    _add_common(m, "paper-results")

    a = sub.add_parser("accelerate", help="Figure 3: accelerating BN networks (conv net)",
                       description=accelerate.__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    a.add_argument("--quick", action="store_true",
                   help="a few minutes: fewer steps and a 2,000-image test subset")
    a.add_argument("--steps", type=int, default=None,
                   help="baseline training steps (default 6000; 1200 with --quick)")
    a.add_argument("--eval-every", type=int, default=None,
                   help="evaluate every N steps (default 100)")
    a.add_argument("--lr", type=float, default=None,
                   help="the Baseline's learning rate (default %s); the xN variants use N "
                        "times it" % accelerate.DEFAULTS["lr"])
    a.add_argument("--variants", default=None,
                   help="comma-separated subset of " + ",".join(accelerate.VARIANTS))
    _add_common(a, "paper-results")
    return parser


def main(argv=None):
    """Run one experiment; returns 0 (the results are written to ``--out``).

    Parameters
    ----------
    argv : list of str, optional
        The arguments (see :func:`build_parser`); default ``sys.argv[1:]``.

    Returns
    -------
    int
        0.

    Raises
    ------
    SystemExit
        For ``--help`` and for invalid arguments (from :mod:`argparse`).

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
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.experiment == "mnist":
        from . import mnist_fig1

        mnist_fig1.main_run(args)
    else:
        from . import accelerate

        accelerate.main_run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
