"""
The functional API on NumPy arrays
==================================

bnfast's functions take and return plain NumPy arrays.  This tutorial normalises a batch,
tracks running statistics over many batches, runs inference and the backward pass, checks
the results against the slow float64 twin :mod:`bnfast.reference`, and shows why the
statistics are accumulated in float64.
"""

# %%
# A batch with very different channels
# ------------------------------------
# Four channels of 2-d feature maps, ``(N, C, H, W)``, each with its own mean and spread.
import matplotlib.pyplot as plt
import numpy as np

import bnfast

rng = np.random.default_rng(0)
true_mean = np.array([-3.0, 0.0, 2.0, 10.0])
true_std = np.array([0.5, 1.0, 3.0, 0.1])
N, C, H, W = 64, 4, 8, 8


def batch():
    z = rng.standard_normal((N, C, H, W))
    return (true_mean[None, :, None, None] + true_std[None, :, None, None] * z).astype(
        np.float32)


x = batch()

# %%
# Training mode: normalise with the batch's statistics
# ----------------------------------------------------
# :func:`bnfast.batch_norm_train` returns the output and, in float64, the batch mean and
# ``invstd = 1 / sqrt(var + eps)`` that the backward pass needs.  With ``gamma = 1`` and
# ``beta = 0`` every channel of the output has mean 0 and variance 1.
gamma = np.ones(C, np.float32)
beta = np.zeros(C, np.float32)
y, mean, invstd = bnfast.batch_norm_train(x, gamma, beta)

print("batch mean      :", np.round(mean, 3))
print("batch std       :", np.round(np.sqrt(1 / invstd**2 - 1e-5), 3))
print("output mean     :", np.round(y.mean(axis=(0, 2, 3)), 6))
print("output variance :", np.round(y.var(axis=(0, 2, 3)), 5))

fig, axes = plt.subplots(1, 2, figsize=(9, 3.2), sharey=True)
for c in range(C):
    axes[0].hist(x[:, c].ravel(), bins=60, histtype="step", label=f"channel {c}")
    axes[1].hist(y[:, c].ravel(), bins=60, histtype="step")
axes[0].set_title("input x")
axes[1].set_title("batch_norm_train(x)")
axes[0].legend(fontsize=8)
fig.tight_layout()

# %%
# Running statistics
# ------------------
# Passing ``running_mean`` and ``running_var`` updates them in place, with PyTorch's
# convention: ``momentum`` is the weight of the new batch, and the running variance is
# updated with the *unbiased* batch variance.  Over many batches they approach the true
# statistics of the data.
running_mean = np.zeros(C, np.float32)
running_var = np.ones(C, np.float32)
history = []
for step in range(60):
    bnfast.batch_norm_train(batch(), gamma, beta, running_mean=running_mean,
                            running_var=running_var, momentum=0.1)
    history.append((running_mean.copy(), running_var.copy()))
hm = np.array([h[0] for h in history])
hv = np.array([h[1] for h in history])

fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
for c in range(C):
    axes[0].plot(hm[:, c], label=f"channel {c}")
    axes[0].axhline(true_mean[c], color=f"C{c}", ls=":", lw=0.8)
    axes[1].semilogy(hv[:, c])
    axes[1].axhline(true_std[c] ** 2, color=f"C{c}", ls=":", lw=0.8)
axes[0].set_title("running_mean (dotted: true mean)")
axes[1].set_title("running_var (dotted: true variance)")
axes[0].set_xlabel("batch")
axes[1].set_xlabel("batch")
axes[0].legend(fontsize=8)
fig.tight_layout()

# %%
# Inference with the running statistics
# -------------------------------------
# :func:`bnfast.batch_norm_infer` applies the per-channel affine map with given statistics;
# :func:`bnfast.batch_norm` does the same with ``torch.nn.functional.batch_norm``'s
# signature.
x_test = batch()
y_test = bnfast.batch_norm_infer(x_test, running_mean, running_var, gamma, beta)
same = bnfast.batch_norm(x_test, running_mean, running_var, gamma, beta, training=False)
print("inference output mean per channel:", np.round(y_test.mean(axis=(0, 2, 3)), 3))
print("batch_norm(training=False) is the same:", np.array_equal(y_test, same))

# %%
# The backward pass, checked against the reference
# ------------------------------------------------
# :func:`bnfast.batch_norm_backward` takes the upstream gradient, the forward input and the
# ``mean``/``invstd`` of the forward pass.  :mod:`bnfast.reference` computes the same
# quantities straight from the paper's formulas in float64 NumPy.
gamma = rng.uniform(0.5, 1.5, C).astype(np.float32)
beta = rng.uniform(-0.5, 0.5, C).astype(np.float32)
y, mean, invstd = bnfast.batch_norm_train(x, gamma, beta)
dy = rng.standard_normal(x.shape).astype(np.float32)
dx, dgamma, dbeta = bnfast.batch_norm_backward(dy, x, mean, invstd, gamma)

y_ref, mean_ref, invstd_ref = bnfast.reference.batch_norm_train(x, gamma, beta)
dx_ref, dgamma_ref, dbeta_ref = bnfast.reference.batch_norm_backward(
    dy, x, mean_ref, invstd_ref, gamma)
for name, a, b in [("y", y, y_ref), ("dx", dx, dx_ref), ("dgamma", dgamma, dgamma_ref),
                   ("dbeta", dbeta, dbeta_ref)]:
    err = np.abs(a - b).max() / np.abs(b).max()
    print(f"{name:<7} max relative error vs float64 reference: {err:.1e}")

# %%
# Fused ReLU, in-place output and channels-last data
# --------------------------------------------------
# ``relu=True`` applies ReLU in the same pass (and masks the gradient in the backward);
# ``out=`` writes into a preallocated array, which may be the input itself; ``axis=-1``
# takes channels-last data.  A transposed view is read without a copy, and the output has
# the same memory layout as the input.
x_nhwc = x.transpose(0, 2, 3, 1)                       # a view, logically (N, H, W, C)
y_nhwc, _, _ = bnfast.batch_norm_train(x_nhwc, gamma, beta, axis=-1, relu=True)
y_nchw, _, _ = bnfast.batch_norm_train(x, gamma, beta, relu=True)
print("channels-last result equals channels-first:",
      np.array_equal(y_nhwc, y_nchw.transpose(0, 2, 3, 1)))
print("all outputs >= 0 with relu=True:", bool((y_nhwc >= 0).all()))

buf = x.copy()
bnfast.batch_norm_train(buf, gamma, beta, out=buf)     # in place
print("in-place result is the same:", np.array_equal(buf, y))

# %%
# Why float64 statistics
# ----------------------
# The textbook one-pass formula ``var = E[x²] − E[x]²`` loses every digit when the mean is
# large compared to the spread.  Here channels of float32 data have standard deviation 1 and
# a growing offset; NumPy's float32 variance (two-pass but accumulated in float32) and the
# one-pass formula drift away, while :func:`bnfast.moments` (float64, blocked two-pass with
# Chan's pairwise update) stays exact.
offsets = 10.0 ** np.arange(0, 8)
rows = []
for off in offsets:
    data = (off + rng.standard_normal((4096, 1))).astype(np.float32)
    exact = np.var(data.astype(np.float64), axis=0)[0]
    naive = (np.mean(data * data, axis=0) - np.mean(data, axis=0) ** 2)[0]
    rows.append([abs(bnfast.moments(data)[1][0] - exact) / exact,
                 abs(np.var(data, axis=0)[0] - exact) / exact,
                 abs(naive - exact) / exact])
rows = np.maximum(np.array(rows), 1e-17)

fig, ax = plt.subplots(figsize=(6, 3.4))
for j, label in enumerate(["bnfast.moments", "np.var (float32)", "E[x²] − E[x]² (float32)"]):
    ax.loglog(offsets, rows[:, j], "o-", label=label)
ax.set_xlabel("channel mean (standard deviation 1)")
ax.set_ylabel("relative error of the variance")
ax.legend(fontsize=8)
fig.tight_layout()
