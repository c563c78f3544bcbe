"""
Reproducing Figure 1 of the paper
=================================

Ioffe & Szegedy (2015), Section 4.1: a 784-100-100-100-10 network with sigmoid hidden
units, trained on MNIST with mini-batches of 60, with and without batch normalization on
every hidden layer.  Figure 1 shows (a) the test accuracy over training, and (b, c) the
15th, 50th and 85th percentiles of the input to one sigmoid of the last hidden layer:
without batch norm its distribution drifts, with batch norm it stays put.

:mod:`bnfast.paper.mnist_fig1` runs the experiment.  The paper trains for 50,000 steps; to
keep the documentation build short this page runs **5,000 steps** (the paper's first table
point) and then shows the stored results of the full run.  To run it yourself::

    bnfast paper mnist                 # the full 50,000 steps
    bnfast paper mnist --steps 5000    # this page's run

The full run took 68 s on a 2-core AMD EPYC (x86-64, AVX-512).

The choices the paper does not state (optimizer, learning rate, initialisation) are
explained in :doc:`/user_guide/paper`.
"""

# %%
# The data
# --------
# :func:`bnfast.datasets.load_mnist` reads the four MNIST files (checking their SHA-256)
# from ``BNFAST_DATA_DIR``, a ``shared/data/mnist`` folder beside the source checkout, or
# its cache.  ``bnfast paper mnist`` downloads missing files; this page does not
# (``download=False``): without the files it shows the stored results of the full run only.
import os
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from bnfast.datasets import DatasetError, as_float, load_mnist
from bnfast.paper import common, mnist_fig1


# This file's folder (sphinx-gallery runs a tutorial in its folder, without __file__).
HERE = Path(__file__).resolve().parent if "__file__" in globals() else Path.cwd()


def mnist_folder():
    """BNFAST_DATA_DIR, else a shared/data/mnist folder above this file, else the default."""
    if os.environ.get("BNFAST_DATA_DIR"):
        return os.environ["BNFAST_DATA_DIR"]
    for folder in (HERE, *HERE.parents):
        candidate = folder / "shared" / "data" / "mnist"
        if candidate.is_dir():
            return str(candidate)
    return None


try:
    m = load_mnist(mnist_folder(), download=False)
    data = common.MnistArrays(as_float(m.train_images, flatten=True),
                              m.train_labels.astype(np.int64),
                              as_float(m.test_images, flatten=True),
                              m.test_labels.astype(np.int64), m.source)
    print("training set:", data.X_train.shape, data.X_train.dtype,
          "| test set:", data.X_test.shape)
except DatasetError:
    data = None
    print("No MNIST files found: the stored full run is shown instead.")

# %%
# A shortened run: 5,000 steps
# ----------------------------
# The same initial weights and the same mini-batches for both networks; the batch-norm
# network is evaluated with population statistics (the paper's Algorithm 2) and, for
# comparison, with the running averages kept during training.  The test accuracy and the
# percentiles are recorded every 250 steps (on the first 5,000 test images, to save time).
# The paper's numbers are read off its figure.  (Skipped when MNIST is not available.)
if data is not None:
    results = mnist_fig1.run(data, steps=5000, eval_every=250, eval_size=5000, progress=False)
    for key, t in results["timing"].items():
        if isinstance(t, dict):
            print(f"{key:<5} {t['ms_per_step']:.2f} ms per training step")
    print(mnist_fig1.format_table(results))

# %%
# (a) test accuracy; (b, c) the 15th, 50th and 85th percentiles of the input to unit 0 of
# the last hidden sigmoid layer, over the test set.
if data is not None:
    curves = results["curves"]
    fig, ax = plt.subplots(1, 3, figsize=(13, 3.8))
    colors = {"nobn": "tab:blue", "bn": "tab:red"}
    labels = {"nobn": "without BN", "bn": "with BN"}
    for key in ("nobn", "bn"):
        ax[0].plot(curves[key]["step"], curves[key]["acc"], color=colors[key],
                   label=labels[key])
    paper_steps = [s for s in mnist_fig1.PAPER_FIG1 if s <= results["config"]["steps"]]
    for j, key in enumerate(("nobn", "bn")):
        ax[0].plot(paper_steps, [mnist_fig1.PAPER_FIG1[s][j] for s in paper_steps], "os"[j],
                   mfc="none", color=colors[key], label=f"paper, {labels[key]}")
    ax[0].set_ylim(0.7, 1.0)
    ax[0].set_title("(a) test accuracy")
    ax[0].legend(loc="lower right", fontsize=8)
    for a, key, panel in ((ax[1], "nobn", "(b)"), (ax[2], "bn", "(c)")):
        for p, style in (("p15", "--"), ("p50", "-"), ("p85", "--")):
            a.plot(curves[key]["step"], curves[key][p], style, color="k", lw=1.2,
                   label=f"{p[1:]}th percentile")
        a.set_title(f"{panel} {labels[key]}")
        a.set_ylim(-3, 3)
        a.legend(loc="upper right", fontsize=8)
    for a in ax:
        a.set_xlabel("training steps")
        a.grid(alpha=0.3)
    ax[1].set_ylabel("input to the sigmoid")
    fig.tight_layout()

# %%
# The full run: 50,000 steps
# --------------------------
# The paper's 50,000 steps (``bnfast paper mnist --out docs/figures``), stored with the
# documentation: the test accuracy beside the paper's at each of its table points, the
# percentiles at the start, a tenth of the way and the end, and the three panels.
figures = HERE.parent / "figures"
table, image = figures / "mnist_fig1_table.md", figures / "mnist_fig1.png"
if table.exists():
    print(table.read_text(encoding="utf-8").strip())
if image.exists():
    picture = plt.imread(image)
    fig, ax = plt.subplots(figsize=(13, 13 * picture.shape[0] / picture.shape[1]))
    ax.imshow(picture)
    ax.set_axis_off()
    fig.tight_layout(pad=0)
