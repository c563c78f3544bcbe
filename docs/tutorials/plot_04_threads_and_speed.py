"""
Tuning threads and checking speed
=================================

How many threads should bnfast use, and how fast is it on *this* machine?  This tutorial
prints the configuration, times the training forward pass with one thread and with all of
them against a plain NumPy implementation and against a memory copy (the floor for a
memory-bound operation), checks that the thread count does not change the results, and
shows the controls.

The timings on this page were measured while the documentation was built, on whatever
machine built it; run the script yourself for your numbers, and ``python -m bnfast bench``
for the full benchmark (see :doc:`/user_guide/performance`).
"""

# %%
# The configuration
# -----------------
# :func:`bnfast.show_config` prints the kernel variant in use, the OpenMP runtime and the
# default thread count.
import os
import time

import matplotlib.pyplot as plt
import numpy as np

import bnfast

bnfast.show_config()
all_threads = bnfast.get_num_threads()

# %%
# A small timing helper
# ---------------------
# The median of several repeats, each long enough to be measured reliably.


def bench(fn, repeat=5, min_time=0.02):
    fn()
    t0 = time.perf_counter()
    fn()
    inner = max(1, int(min_time / max(time.perf_counter() - t0, 1e-7)))
    samples = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        samples.append((time.perf_counter() - t0) / inner)
    return float(np.median(samples)) * 1e3    # ms


def numpy_train(x, w, b, eps=1e-5):
    axes = (0, 2, 3) if x.ndim == 4 else (0,)
    shape = (1, -1, 1, 1) if x.ndim == 4 else (1, -1)
    mean = x.mean(axis=axes, keepdims=True)
    var = x.var(axis=axes, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * w.reshape(shape) + b.reshape(shape)


# %%
# Timing
# ------
# float32, the training forward pass (statistics and normalisation) writing into a
# preallocated output, for a fully connected batch and two convolutional shapes.
rng = np.random.default_rng(0)
shapes = [(256, 1024), (32, 64, 28, 28), (16, 128, 56, 56)]
thread_counts = sorted({1, all_threads})
rows = []
for shape in shapes:
    x = rng.standard_normal(shape, dtype=np.float32)
    C = shape[1]
    w, b = np.ones(C, np.float32), np.zeros(C, np.float32)
    out, copy_out = np.empty_like(x), np.empty_like(x)
    t_numpy = bench(lambda: numpy_train(x, w, b))
    t_copy = bench(lambda: np.copyto(copy_out, x))
    for t in thread_counts:
        with bnfast.num_threads(t):
            t_bn = bench(lambda: bnfast.batch_norm_train(x, w, b, out=out))
        rows.append((shape, t, t_bn, t_numpy, t_copy))
        print(f"{str(shape):<18} {t} thread(s): bnfast {t_bn:7.3f} ms   NumPy {t_numpy:7.3f} ms"
              f"   copy {t_copy:6.3f} ms   speed-up over NumPy {t_numpy / t_bn:5.1f}x")

# %%
# The same numbers as a plot: time relative to a memory copy of the input (1 means as
# fast as reading and writing the tensor once).
fig, ax = plt.subplots(figsize=(7, 3.4))
labels = [f"{'x'.join(map(str, s))}\n{t} thr" for s, t, *_ in rows]
pos = np.arange(len(rows))
ax.bar(pos - 0.2, [r[2] / r[4] for r in rows], 0.4, label="bnfast")
ax.bar(pos + 0.2, [r[3] / r[4] for r in rows], 0.4, label="NumPy")
ax.axhline(1.0, color="k", lw=0.8)
ax.set_xticks(pos)
ax.set_xticklabels(labels, fontsize=8)
ax.set_ylabel("time / copy time")
ax.set_yscale("log")
ax.legend()
fig.tight_layout()

# %%
# Results do not depend on the thread count or the kernel variant
# ---------------------------------------------------------------
# Every reduction is blocked by the data's shape only, so any thread count -- and every
# instruction-set variant -- gives bit-identical results.
x = rng.standard_normal((16, 128, 56, 56), dtype=np.float32)
results = {}
for isa in bnfast.available_isas():
    for t in thread_counts:
        with bnfast.use_isa(isa), bnfast.num_threads(t):
            results[(isa, t)] = bnfast.batch_norm_train(x)
first = next(iter(results.values()))
for key, (y, mean, invstd) in results.items():
    identical = (np.array_equal(y, first[0]) and np.array_equal(mean, first[1])
                 and np.array_equal(invstd, first[2]))
    print(f"variant {key[0]:<8} threads {key[1]}: bit-identical to the first: {identical}")

# %%
# The controls
# ------------
# - ``bnfast.set_num_threads(n)`` / ``with bnfast.num_threads(n):`` -- bnfast only;
# - ``OMP_NUM_THREADS`` in the environment, or threadpoolctl's
#   ``threadpool_limits(n, user_api="openmp")`` -- every OpenMP library in the process;
# - ``OMP_WAIT_POLICY=passive`` or ``GOMP_SPINCOUNT`` -- how long idle OpenMP threads spin
#   (bnfast sets a short spin by default, reported by ``show_config()`` as "idle threads").
#
# Memory-bound kernels stop scaling once the memory bandwidth is used up, often at a few
# threads; in a training loop that alternates bnfast with NumPy's BLAS, two thread pools
# share the cores (see :doc:`/user_guide/threads`).  Measure before choosing.
print("threads by default:", bnfast.get_num_threads(), "| CPUs:", os.cpu_count())
with bnfast.num_threads(1):
    print("inside num_threads(1):", bnfast.get_num_threads())
print("after the block:", bnfast.get_num_threads())
