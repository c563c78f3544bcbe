"""
Training a network with batch normalization
===========================================

:mod:`bnfast.nn` is a small NumPy neural-network framework whose batch-norm layers run on
bnfast's kernels.  This tutorial trains the same sigmoid network with and without batch
normalization, compares how fast they learn, then shows the inference-time tools: eval
mode, population statistics (the paper's Algorithm 2), frozen statistics and folding batch
norm into the preceding layer.
"""

# %%
# Data
# ----
# A synthetic 10-class problem in 64 dimensions: each class is a Gaussian cloud around its
# own centre, the clouds overlapping, and the inputs badly shifted and scaled -- a large
# common offset, which is what makes a sigmoid network without normalization slow to
# train.  (The paper's experiment, on MNIST, is :doc:`plot_03_paper_figure1`.)
import time

import matplotlib.pyplot as plt
import numpy as np
from threadpoolctl import threadpool_limits

from bnfast import nn, optim
from bnfast.train import fit

rng = np.random.default_rng(0)
n_classes, dim = 10, 64
centres = rng.standard_normal((n_classes, dim)) * 0.4


def make(n):
    labels = rng.integers(0, n_classes, n)
    x = centres[labels] + rng.standard_normal((n, dim))
    return (4.0 + 3.0 * x).astype(np.float32), labels


X_train, y_train = make(6000)
X_test, y_test = make(2000)

# %%
# Two networks
# ------------
# Three sigmoid hidden layers of 100 units, as in the paper's MNIST experiment, with and
# without a :class:`~bnfast.nn.BatchNorm1d` before every sigmoid.  A layer followed by batch
# norm needs no bias (batch norm's ``beta`` replaces it).  Both start from the same weights.


def network(batch_norm, seed=1):
    r = np.random.default_rng(seed)
    layers, width = [], dim
    for _ in range(3):
        layers.append(nn.Linear(width, 100, bias=not batch_norm, rng=r))
        if batch_norm:
            layers.append(nn.BatchNorm1d(100))
        layers.append(nn.Sigmoid())
        width = 100
    layers.append(nn.Linear(width, n_classes, rng=r))
    return nn.Sequential(*layers)


models = {"without BN": network(False), "with BN": network(True)}
print(models["with BN"])

# %%
# Training
# --------
# :func:`bnfast.train.fit` runs the loop -- forward, loss, backward, SGD step -- and
# evaluates the test set in eval mode after every epoch.  Plain SGD with momentum, the same
# learning rate for both.  The network without batch norm needs several epochs to get out of
# the saturated start; the one with batch norm is near its final accuracy after one.
#
# Networks this small train fastest on one thread: with mini-batches of 60, waking threads
# costs more than it saves.  ``threadpool_limits(1)`` limits both bnfast's OpenMP threads
# and NumPy's BLAS (see :doc:`plot_04_threads_and_speed`).
histories = {}
with threadpool_limits(1):
    for name, model in models.items():
        opt = optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        t0 = time.perf_counter()
        histories[name] = fit(model, nn.CrossEntropyLoss(), opt, (X_train, y_train),
                              epochs=10, batch_size=60, val_data=(X_test, y_test),
                              progress=False, rng=0)
        print(f"{name:<11} test accuracy {histories[name]['val_accuracy'][-1]:.3f} "
              f"({time.perf_counter() - t0:.1f} s)")

fig, axes = plt.subplots(1, 2, figsize=(9, 3.3))
for name, h in histories.items():
    axes[0].plot(h["epoch"], h["loss"], "o-", label=name)
    axes[1].plot(h["epoch"], h["val_accuracy"], "o-", label=name)
axes[0].set_yscale("log")
axes[0].set_title("training loss")
axes[1].set_title("test accuracy (eval mode)")
for ax in axes:
    ax.set_xlabel("epoch")
axes[1].legend()
fig.tight_layout()

# %%
# What batch norm does to the hidden layer
# ----------------------------------------
# The inputs to the last sigmoid layer: without batch norm they sit wherever the weights put
# them (here saturating the sigmoid); with it they are centred and scaled by ``gamma`` and
# ``beta``.  Slicing a :class:`~bnfast.nn.Sequential` gives the network up to a layer.


def pre_activation(model, x, layer_index):
    model.eval()
    return model[:layer_index](x)


fig, ax = plt.subplots(figsize=(6, 3.2))
for name, model in models.items():
    last_sigmoid = max(i for i, m in enumerate(model) if isinstance(m, nn.Sigmoid))
    z = pre_activation(model, X_test, last_sigmoid)
    ax.hist(z.ravel(), bins=80, histtype="step", density=True, label=name)
ax.set_title("input to the last sigmoid layer (test set)")
ax.legend()
fig.tight_layout()

# %%
# Population statistics
# ---------------------
# In eval mode batch norm uses its running statistics, the moving averages gathered during
# training.  The paper's Algorithm 2 uses population statistics instead: averages over the
# training mini-batches with the final weights.  :func:`bnfast.nn.compute_population_stats`
# computes them and stores them as the running statistics.
model = models["with BN"]
bn0 = model[1]
before = bn0.running_mean[:3].copy()
nn.compute_population_stats(model, (X_train[i:i + 60] for i in range(0, len(X_train), 60)))
model.eval()
acc = (model(X_test).argmax(axis=1) == y_test).mean()
print("first running means, moving average :", np.round(before, 4))
print("first running means, population     :", np.round(bn0.running_mean[:3], 4))
print(f"test accuracy with population statistics: {acc:.3f}")

# %%
# Frozen statistics and folding
# -----------------------------
# ``freeze_bn_stats()`` makes every batch-norm layer use its running statistics while the
# model trains (useful for fine-tuning with small batches); the forward pass then equals
# eval mode.  :func:`bnfast.nn.fold_batchnorm` returns an inference copy in which each
# batch norm is folded into the preceding ``Linear`` -- checked on a sample batch.
model.train().freeze_bn_stats()
frozen_out = model(X_test[:256])
model.unfreeze_bn_stats()
model.eval()
print("frozen training forward equals eval forward:",
      np.allclose(frozen_out, model(X_test[:256]), rtol=1e-5, atol=1e-6))

folded = nn.fold_batchnorm(model, sample=X_test[:256])
print(folded)
print("folded model agrees:", np.allclose(folded(X_test), model(X_test), rtol=1e-4,
                                          atol=1e-4))
