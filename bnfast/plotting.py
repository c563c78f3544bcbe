"""Plots of training runs: :func:`plot_history` for the history `fit` returns.

matplotlib is optional: it is imported when a plot is made, and its absence raises an
`ImportError` that says how to install it.
"""
from collections.abc import Mapping

import numpy as np

__all__ = ["plot_history"]

# history keys that are not metrics with a training and a validation curve
_NOT_METRICS = ("epoch", "time", "lr")


def _pyplot():
    try:
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError(
            'plot_history needs matplotlib: pip install matplotlib (or pip install '
            '"bnfast[paper]", the extra that includes it)') from exc
    return plt


def _metric_names(history):
    """The metrics of `history` in order, ``val_<name>`` folded into ``<name>``."""
    names = []
    for key in history:
        if key in _NOT_METRICS:
            continue
        name = key[4:] if key.startswith("val_") and len(key) > 4 else key
        if name not in names:
            names.append(name)
    return names


def plot_history(history, metrics=None, *, axes=None, figsize=None):
    """Plot a training history: one panel per metric, training and validation curves.

    Parameters
    ----------
    history : dict of lists
        As returned by :func:`bnfast.train.fit` and :meth:`bnfast.train.Trainer.fit`
        (``epoch``, ``loss``, metrics, ``val_loss``, ``val_<metric>``, ``lr``,
        ``time``), or any dict of equal-length sequences of numbers.  ``epoch`` gives
        the x values (default 1, 2, ...).
    metrics : sequence of str, optional
        The panels, by name: ``"loss"`` draws ``loss`` and ``val_loss`` (whichever
        exist); ``"lr"`` or ``"time"`` draw those.  Default every metric of `history`
        (not ``epoch``, ``lr`` or ``time``), in its order.
    axes : matplotlib Axes or sequence of Axes, optional
        Where to draw, one per panel; default a new figure with the panels side by side.
    figsize : (float, float), optional
        Size in inches of the new figure; default 4 x 3.2 per panel.

    Returns
    -------
    figure : matplotlib.figure.Figure
        The figure drawn on (made with ``matplotlib.pyplot``: ``plt.show()`` shows it,
        ``figure.savefig(path)`` writes it, ``plt.close(figure)`` frees it).

    Raises
    ------
    ImportError
        If matplotlib is not installed (the message says how to install it).
    TypeError
        If `history` is not a dict, or `metrics` is a str rather than a sequence.
    ValueError
        If `history` has no metric to plot, a name in `metrics` is not in `history`,
        the curves differ in length from ``epoch``, or the number of `axes` is not the
        number of panels.

    Examples
    --------
    >>> import matplotlib.pyplot as plt
    >>> from bnfast.train import plot_history
    >>> history = {"epoch": [1, 2, 3], "loss": [0.9, 0.5, 0.4], "accuracy": [0.6, 0.8, 0.9],
    ...            "val_loss": [1.0, 0.6, 0.5], "val_accuracy": [0.5, 0.7, 0.8],
    ...            "lr": [0.1, 0.1, 0.01], "time": [1.2, 1.1, 1.1]}
    >>> fig = plot_history(history)
    >>> [ax.get_title() for ax in fig.axes]
    ['loss', 'accuracy']
    >>> [line.get_label() for line in fig.axes[0].get_lines()]
    ['train', 'validation']
    >>> plt.close(fig)
    >>> fig = plot_history(history, ["loss", "lr"])
    >>> fig.axes[1].get_lines()[0].get_ydata().tolist()
    [0.1, 0.1, 0.01]
    >>> plt.close(fig)
    """
    if not isinstance(history, Mapping):
        raise TypeError(f"plot_history: history must be a dict of lists (as fit returns), "
                        f"got {type(history).__name__}")
    if isinstance(metrics, str):
        raise TypeError(f"plot_history: metrics must be a sequence of names, e.g. "
                        f"[{metrics!r}], not a str")
    names = _metric_names(history) if metrics is None else list(metrics)
    if not names:
        raise ValueError(f"plot_history: nothing to plot; the history has the keys "
                         f"{list(history)}")
    panels = []
    for name in names:
        if name in _NOT_METRICS:
            curves = [(name, name)] if name in history else []
        else:
            curves = [(key, label) for key, label in ((name, "train"),
                                                      (f"val_{name}", "validation"))
                      if key in history]
        if not curves:
            raise ValueError(f"plot_history: {name!r} is not in the history; its keys are "
                             f"{list(history)}")
        panels.append((name, curves))
    n = len(history[panels[0][1][0][0]])
    x = np.asarray(history["epoch"]) if "epoch" in history else np.arange(1, n + 1)
    for _, curves in panels:
        for key, _ in curves:
            if len(history[key]) != len(x):
                raise ValueError(
                    f"plot_history: {key!r} has {len(history[key])} values but there are "
                    f"{len(x)} epochs")
    plt = _pyplot()
    if axes is None:
        size = figsize if figsize is not None else (4.0 * len(panels), 3.2)
        fig, axes = plt.subplots(1, len(panels), figsize=size, squeeze=False,
                                 layout="constrained")
        axes = list(axes.ravel())
    else:
        axes = [axes] if hasattr(axes, "plot") else list(np.ravel(np.asarray(axes,
                                                                             dtype=object)))
        if len(axes) != len(panels):
            raise ValueError(f"plot_history: {len(axes)} axes for {len(panels)} panels "
                             f"({[name for name, _ in panels]})")
        fig = axes[0].figure
    for ax, (name, curves) in zip(axes, panels):
        for key, label in curves:
            ax.plot(x, np.asarray(history[key], dtype=np.float64), marker=".", label=label)
        ax.set_title(name)
        ax.set_xlabel("epoch")
        if len(curves) > 1:
            ax.legend()
        ax.grid(True, alpha=0.3)
    return fig
