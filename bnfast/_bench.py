"""Small timing harness shared by ``python -m bnfast`` and ``benchmarks/``.

Compares, in one process and with the same thread count, bnfast against a plain NumPy
implementation and (when installed) PyTorch's CPU batch norm.  Reports medians and minima
of repeated runs in milliseconds.
"""
import math
import time

import numpy as np

from . import _api
from ._threads import get_num_threads


def timeit(fn, *, repeat=7, min_time=0.02, max_time=2.0):
    """Median and minimum seconds per call of ``fn()``.

    Each sample runs ``fn`` enough times to last at least `min_time`; `repeat` samples are
    taken (fewer if the total would exceed `max_time`).
    """
    fn()  # warm up (page faults, lazy init)
    t0 = time.perf_counter()
    fn()
    one = max(time.perf_counter() - t0, 1e-7)
    inner = max(1, int(min_time / one))
    samples = []
    start = time.perf_counter()
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        samples.append((time.perf_counter() - t0) / inner)
        if time.perf_counter() - start > max_time and len(samples) >= 3:
            break
    return float(np.median(samples)), float(np.min(samples))


# ------------------------------------------------------------------ NumPy baseline

def _axes(x, axis):
    axis = axis % x.ndim
    return tuple(i for i in range(x.ndim) if i != axis), axis


def _bshape(x, axis):
    s = [1] * x.ndim
    s[axis] = x.shape[axis]
    return s


def numpy_train(x, w, b, axis, eps=1e-5):
    """Batch-norm training forward written the usual way in NumPy (x's dtype)."""
    axes, axis = _axes(x, axis)
    mean = x.mean(axis=axes, keepdims=True)
    var = x.var(axis=axes, keepdims=True)
    invstd = 1.0 / np.sqrt(var + eps)
    shp = _bshape(x, axis)
    return (x - mean) * (invstd * w.reshape(shp)) + b.reshape(shp), mean, invstd


def numpy_infer(x, mean, var, w, b, axis, eps=1e-5):
    _, axis = _axes(x, axis)
    shp = _bshape(x, axis)
    scale = (w / np.sqrt(var + eps)).reshape(shp)
    return x * scale + (b - mean * w / np.sqrt(var + eps)).reshape(shp)


def numpy_backward(dy, x, mean, invstd, w, axis):
    axes, axis = _axes(x, axis)
    shp = _bshape(x, axis)
    m = x.size // x.shape[axis]
    xhat = (x - mean) * invstd
    dbias = dy.sum(axis=axes)
    dweight = (dy * xhat).sum(axis=axes)
    dx = (w.reshape(shp) * invstd / m) * (m * dy - dbias.reshape(shp)
                                           - xhat * dweight.reshape(shp))
    return dx, dweight, dbias


# ------------------------------------------------------------------ comparison

def _torch():
    try:
        import torch
    except Exception:
        return None
    return torch


def compare(shape, axis=1, dtype=np.float32, *, repeat=7, ops=("train", "infer", "backward"),
            include_torch=True, seed=0):
    """Time bnfast, NumPy and PyTorch on one case; return a list of result dicts."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    C = shape[axis]
    w = (1.0 + 0.1 * rng.standard_normal(C)).astype(dtype)
    b = (0.1 * rng.standard_normal(C)).astype(dtype)
    rm, rv = np.zeros(C, dtype), np.ones(C, dtype)
    y_out = np.empty_like(x)
    dx_out = np.empty_like(x)
    _, mean, invstd = _api.batch_norm_train(x, w, b, axis=axis)
    rmean, rvar = _api.moments(x, axis=axis)
    np_y, np_mean, np_invstd = numpy_train(x, w, b, axis)
    torch = _torch() if include_torch else None
    if torch is not None:
        torch.set_num_threads(get_num_threads())
        if axis % len(shape) == 1 or len(shape) == 2:
            tx = torch.from_numpy(x)
            tperm = None
        else:  # channels-last: torch's channels_last memory format, same logical NCHW
            perm = (0, len(shape) - 1) + tuple(range(1, len(shape) - 1))
            tx = torch.from_numpy(x).permute(*perm)
            tperm = perm
        tw, tb = torch.from_numpy(w), torch.from_numpy(b)
        trm, trv = torch.from_numpy(rm.copy()), torch.from_numpy(rv.copy())
        tdy = torch.from_numpy(dy).permute(*tperm) if tperm else torch.from_numpy(dy)
        txg = tx.detach().clone().requires_grad_(True)
        if tperm:
            txg = tx.detach().contiguous(memory_format=torch.channels_last
                                         if len(shape) == 4 else torch.contiguous_format)
            txg.requires_grad_(True)
        twg = tw.clone().requires_grad_(True)
        tbg = tb.clone().requires_grad_(True)
        F = torch.nn.functional

    cases = []
    for op in ops:
        if op == "train":
            f_bn = lambda: _api.batch_norm_train(x, w, b, axis=axis, running_mean=rm,  # noqa
                                                 running_var=rv, out=y_out)
            f_np = lambda: numpy_train(x, w, b, axis)  # noqa: E731
            if torch is not None:
                def f_t():
                    with torch.no_grad():
                        return F.batch_norm(tx, trm, trv, tw, tb, training=True)
        elif op == "infer":
            f_bn = lambda: _api.batch_norm_infer(x, rmean, rvar, w, b, axis=axis,  # noqa
                                                 out=y_out)
            f_np = lambda: numpy_infer(x, rmean, rvar, w, b, axis)  # noqa: E731
            if torch is not None:
                def f_t():
                    with torch.no_grad():
                        return F.batch_norm(tx, trm, trv, tw, tb, training=False)
        elif op == "backward":
            f_bn = lambda: _api.batch_norm_backward(dy, x, mean, invstd, w, axis=axis,  # noqa
                                                    out=dx_out)
            f_np = lambda: numpy_backward(dy, x, np_mean, np_invstd, w, axis)  # noqa: E731
            if torch is not None:
                yg = F.batch_norm(txg, None, None, twg, tbg, training=True)

                def f_t():
                    return torch.autograd.grad(yg, (txg, twg, tbg), tdy, retain_graph=True)
        else:
            raise ValueError(op)
        t_bn = timeit(f_bn, repeat=repeat)
        t_np = timeit(f_np, repeat=repeat)
        t_t = timeit(f_t, repeat=repeat) if torch is not None else (math.nan, math.nan)
        cases.append({
            "op": op, "shape": tuple(shape), "axis": axis, "dtype": np.dtype(dtype).name,
            "threads": get_num_threads(),
            "bnfast_ms": t_bn[0] * 1e3, "bnfast_min_ms": t_bn[1] * 1e3,
            "numpy_ms": t_np[0] * 1e3, "numpy_min_ms": t_np[1] * 1e3,
            "torch_ms": t_t[0] * 1e3, "torch_min_ms": t_t[1] * 1e3,
        })
    return cases


def format_table(rows):
    head = (f"{'op':<9} {'shape':<18} {'layout':<6} {'dtype':<7} {'thr':>3} "
            f"{'bnfast ms':>10} {'numpy ms':>10} {'torch ms':>10} {'vs numpy':>9} "
            f"{'vs torch':>9}")
    lines = [head, "-" * len(head)]
    for r in rows:
        layout = "cl" if (r["axis"] % len(r["shape"]) != 1 and len(r["shape"]) > 2) else "cf"
        vt = r["torch_ms"] / r["bnfast_ms"] if r["torch_ms"] == r["torch_ms"] else math.nan
        lines.append(
            f"{r['op']:<9} {str(r['shape']):<18} {layout:<6} {r['dtype']:<7} "
            f"{r['threads']:>3} {r['bnfast_ms']:>10.3f} {r['numpy_ms']:>10.3f} "
            f"{r['torch_ms']:>10.3f} {r['numpy_ms'] / r['bnfast_ms']:>8.1f}x "
            + (f"{vt:>8.2f}x" if vt == vt else f"{'n/a':>9}"))
    return "\n".join(lines)
