"""Benchmark harness shared by ``python -m bnfast``, ``python -m bnfast bench`` and
``benchmarks/``.

Compares, in one process and with the same thread count, bnfast against a plain NumPy
implementation and PyTorch's CPU batch norm (``torch.nn.functional.batch_norm`` and autograd;
skipped with a note when torch is absent), and against the memory-bandwidth floor: the faster
of NumPy's copy and a multithreaded copy of the same tensor into a preallocated buffer
(written with non-temporal stores above ``BNFAST_STREAM_MIN_BYTES``, as the kernels write
large outputs).  Times are medians (and minima) of repeated runs.
"""
import json
import math
import os
import time

import numpy as np

from . import _api, _core
from ._threads import get_num_threads, num_threads

OPS = ("train", "infer", "backward", "train_relu")

FULL_F32 = [(64, 128), (256, 1024), (4096, 4096), (8, 32, 32, 32), (32, 64, 56, 56),
            (64, 256, 28, 28), (16, 512, 14, 14), (128, 64, 112, 112)]
FULL_F64 = [(256, 1024), (32, 64, 56, 56), (16, 512, 14, 14)]
QUICK_F32 = [(64, 128), (256, 1024), (32, 64, 56, 56)]


def timeit_many(fns, *, repeat=7, min_time=0.02, max_time=3.0):
    """Median and minimum seconds per call of each function in `fns`, sampled in turn.

    Each sample runs a function enough times to last at least `min_time`.  The functions
    take turns, one sample each per round, so that a burst of load on a shared machine
    hits all of them alike and their ratios stay meaningful.  `repeat` rounds are run (at
    least 3, fewer if the total would exceed `max_time` per function).  Returns a list of
    ``(median, min)`` pairs, one per function.
    """
    inner = []
    for fn in fns:
        fn()  # warm up (page faults, lazy initialisation)
        t0 = time.perf_counter()
        fn()
        one = max(time.perf_counter() - t0, 1e-7)
        inner.append(max(1, int(min_time / one)))
    samples = [[] for _ in fns]
    start = time.perf_counter()
    for _ in range(repeat):
        for k, fn in enumerate(fns):
            t0 = time.perf_counter()
            for _ in range(inner[k]):
                fn()
            samples[k].append((time.perf_counter() - t0) / inner[k])
        if time.perf_counter() - start > max_time * len(fns) and len(samples[0]) >= 3:
            break
    return [(float(np.median(v)), float(np.min(v))) for v in samples]


def timeit(fn, *, repeat=7, min_time=0.02, max_time=3.0):
    """Median and minimum seconds per call of ``fn()`` (see :func:`timeit_many`)."""
    return timeit_many([fn], repeat=repeat, min_time=min_time, max_time=max_time)[0]


# ------------------------------------------------------------------ NumPy baseline

def _axes(x, axis):
    axis = axis % x.ndim
    return tuple(i for i in range(x.ndim) if i != axis), axis


def _bshape(x, axis):
    s = [1] * x.ndim
    s[axis] = x.shape[axis]
    return s


def numpy_train(x, w, b, axis, eps=1e-5, rm=None, rv=None, momentum=0.1):
    """Batch-norm training forward written the usual way in NumPy (x's dtype)."""
    axes, axis = _axes(x, axis)
    mean = x.mean(axis=axes, keepdims=True)
    var = x.var(axis=axes, keepdims=True)
    invstd = 1.0 / np.sqrt(var + eps)
    shp = _bshape(x, axis)
    if rm is not None:
        n = x.size // x.shape[axis]
        rm *= 1 - momentum
        rm += momentum * mean.reshape(-1)
        rv *= 1 - momentum
        rv += momentum * n / (n - 1) * var.reshape(-1)
    return (x - mean) * (invstd * w.reshape(shp)) + b.reshape(shp), mean, invstd


def numpy_infer(x, mean, var, w, b, axis, eps=1e-5):
    _, axis = _axes(x, axis)
    shp = _bshape(x, axis)
    scale = w / np.sqrt(var + eps)
    return x * scale.reshape(shp) + (b - mean * scale).reshape(shp)


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


def _torch():
    try:
        import torch
    except Exception:
        return None
    return torch


# ------------------------------------------------------------------ one case

def run_case(shape, layout="cf", dtype=np.float32, threads=None, *, ops=OPS, repeat=7,
             include_torch=True, include_numpy=True, seed=0):
    """Time every op on one case; return a list of result dicts (times in ms).

    `shape` is the logical channels-first shape (N, C, ...).  With ``layout='cl'`` the data
    is stored channels-last (N, ..., C) and bnfast is called with ``axis=-1``; PyTorch gets
    the same memory as a ``channels_last`` tensor.
    """
    threads = threads or get_num_threads()
    dtype = np.dtype(dtype)
    rng = np.random.default_rng(seed)
    nd = len(shape)
    cl = layout == "cl" and nd > 2
    store = (shape[0],) + tuple(shape[2:]) + (shape[1],) if cl else tuple(shape)
    axis = -1 if cl else 1
    x = rng.standard_normal(store, dtype=np.float32).astype(dtype)
    dy = rng.standard_normal(store, dtype=np.float32).astype(dtype)
    C = shape[1]
    w = (1.0 + 0.1 * rng.standard_normal(C)).astype(dtype)
    b = (0.1 * rng.standard_normal(C)).astype(dtype)
    rm, rv = np.zeros(C, dtype), np.ones(C, dtype)
    y_out, dx_out, copy_out = np.empty_like(x), np.empty_like(x), np.empty_like(x)
    _, mean, invstd = _api.batch_norm_train(x, w, b, axis=axis)
    bmean, bvar = _api.moments(x, axis=axis)
    np_mean, np_invstd = numpy_train(x, w, b, axis)[1:]
    torch = _torch() if include_torch else None
    results = []
    with num_threads(threads):
        copy_np, copy_mt = timeit_many([lambda: np.copyto(copy_out, x),
                                        lambda: _core.copy(x, copy_out, threads)],
                                       repeat=repeat)
        copy_ms = min(copy_np[0], copy_mt[0]) * 1e3
        if torch is not None:
            torch.set_num_threads(threads)
            F = torch.nn.functional
            perm = (0, nd - 1) + tuple(range(1, nd - 1)) if cl else None
            tx = torch.from_numpy(x).permute(*perm) if cl else torch.from_numpy(x)
            tdy = torch.from_numpy(dy).permute(*perm) if cl else torch.from_numpy(dy)
            tw, tb = torch.from_numpy(w), torch.from_numpy(b)
            trm, trv = torch.from_numpy(rm.copy()), torch.from_numpy(rv.copy())
            txg = tx.detach().clone().requires_grad_(True)  # clone keeps the memory format
            twg, tbg = tw.clone().requires_grad_(True), tb.clone().requires_grad_(True)
            yg = F.batch_norm(txg, None, None, twg, tbg, training=True)
        for op in ops:
            if op in ("train", "train_relu"):
                relu = op == "train_relu"
                f_bn = lambda: _api.batch_norm_train(  # noqa: E731
                    x, w, b, axis=axis, running_mean=rm, running_var=rv, out=y_out, relu=relu)
                f_fresh = lambda: _api.batch_norm_train(  # noqa: E731
                    x, w, b, axis=axis, running_mean=rm, running_var=rv, relu=relu)

                def f_np():
                    y = numpy_train(x, w, b, axis, rm=rm.copy(), rv=rv.copy())[0]
                    return np.maximum(y, 0) if relu else y

                if torch is not None:
                    def f_t():
                        y = F.batch_norm(tx, trm, trv, tw, tb, training=True)
                        return F.relu(y) if relu else y
                else:
                    f_t = None
            elif op == "infer":
                f_bn = lambda: _api.batch_norm_infer(  # noqa: E731
                    x, bmean, bvar, w, b, axis=axis, out=y_out)
                f_fresh = lambda: _api.batch_norm_infer(x, bmean, bvar, w, b, axis=axis)  # noqa
                f_np = lambda: numpy_infer(x, bmean, bvar, w, b, axis)  # noqa: E731
                f_t = (lambda: F.batch_norm(tx, trm, trv, tw, tb, training=False)) \
                    if torch is not None else None
            elif op == "backward":
                f_bn = lambda: _api.batch_norm_backward(  # noqa: E731
                    dy, x, mean, invstd, w, axis=axis, out=dx_out)
                f_fresh = lambda: _api.batch_norm_backward(dy, x, mean, invstd, w, axis=axis)  # noqa
                f_np = lambda: numpy_backward(dy, x, np_mean, np_invstd, w, axis)  # noqa: E731
                f_t = (lambda: torch.autograd.grad(yg, (txg, twg, tbg), tdy,  # noqa: E731
                                                   retain_graph=True)) \
                    if torch is not None else None
            else:
                raise ValueError(f"unknown op {op!r}")
            # All implementations take turns sample by sample (see timeit_many).
            fns = [f_bn, f_fresh] + ([f_np] if include_numpy else []) + \
                ([f_t] if torch is not None else [])
            grad_off = torch is not None and op != "backward"
            with torch.no_grad() if grad_off else _nullcontext():
                times = timeit_many(fns, repeat=repeat)
            t_bn, t_fr = times[0], times[1]
            t_np = times[2] if include_numpy else (math.nan, math.nan)
            t_t = times[-1] if torch is not None else (math.nan, math.nan)
            results.append({
                "op": op, "shape": list(shape), "layout": "cl" if cl else "cf",
                "dtype": dtype.name, "threads": threads, "bytes": int(x.nbytes),
                "bnfast_ms": t_bn[0] * 1e3, "bnfast_min_ms": t_bn[1] * 1e3,
                "bnfast_fresh_ms": t_fr[0] * 1e3, "bnfast_fresh_min_ms": t_fr[1] * 1e3,
                "numpy_ms": t_np[0] * 1e3, "numpy_min_ms": t_np[1] * 1e3,
                "torch_ms": t_t[0] * 1e3, "torch_min_ms": t_t[1] * 1e3,
                "copy_ms": copy_ms, "copy_numpy_ms": copy_np[0] * 1e3,
                "copy_threads_ms": copy_mt[0] * 1e3,
            })
    return results


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# ------------------------------------------------------------------ suites and reports

def _fits(shape, dtype, factor=12):
    need = factor * math.prod(shape) * np.dtype(dtype).itemsize
    try:
        avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return True
    return need < avail


def suite(quick=False, threads_list=None):
    """The list of (shape, layout, dtype, threads) cases of the full or quick benchmark."""
    allt = get_num_threads()
    if threads_list is None:
        threads_list = [allt] if quick else sorted({1, allt})
    cases = []
    groups = [(QUICK_F32, np.float32)] if quick else [(FULL_F32, np.float32),
                                                       (FULL_F64, np.float64)]
    for shapes, dt in groups:
        for shape in shapes:
            if not _fits(shape, dt):
                continue
            for layout in (["cf"] if len(shape) == 2 else ["cf", "cl"]):
                for t in threads_list:
                    cases.append((tuple(shape), layout, dt, t))
    return cases


def format_table(rows, torch=None):
    """The results as a text table.

    `torch` says why there are no PyTorch times when none of `rows` has one ('not
    installed', 'skipped (--no-torch)'): the PyTorch columns are then left out and a
    line says so, rather than columns of nan.
    """
    has_torch = any(r["torch_ms"] == r["torch_ms"] for r in rows)
    head = (f"{'op':<10} {'shape':<19} {'lay':<3} {'dtype':<7} {'thr':>3} {'bnfast':>9} "
            f"{'fresh':>9} {'numpy':>9} " + (f"{'torch':>9} " if has_torch else "")
            + f"{'copy':>8} " + (f"{'vs torch':>8} " if has_torch else "")
            + f"{'vs np':>7} {'x copy':>6}")
    lines = [head, "-" * len(head)]

    def ms(v, width):
        return f"{v:>{width}.3f}" if v == v else f"{'-':>{width}}"

    for r in rows:
        vt = r["torch_ms"] / r["bnfast_ms"]
        vn = r["numpy_ms"] / r["bnfast_ms"]
        lines.append(
            f"{r['op']:<10} {str(tuple(r['shape'])):<19} {r['layout']:<3} {r['dtype']:<7} "
            f"{r['threads']:>3} {ms(r['bnfast_ms'], 9)} {ms(r['bnfast_fresh_ms'], 9)} "
            f"{ms(r['numpy_ms'], 9)} " + (f"{ms(r['torch_ms'], 9)} " if has_torch else "")
            + f"{ms(r['copy_ms'], 8)} "
            + ((f"{vt:>7.2f}x " if vt == vt else f"{'-':>8} ") if has_torch else "")
            + (f"{vn:>6.1f}x" if vn == vn else f"{'-':>7}")
            + f" {r['bnfast_ms'] / r['copy_ms']:>6.2f}")
    lines.append("times: median ms; fresh = bnfast allocating its outputs; "
                 + ("vs torch/np = their time / bnfast's" if has_torch
                    else "vs np = NumPy's time / bnfast's")
                 + "; x copy = bnfast / copy floor")
    if not has_torch:
        why = torch or "not installed"
        hint = " (pip install torch)" if why == "not installed" else ""
        lines.append(f"PyTorch: {why}{hint}; its columns are left out")
    return "\n".join(lines)


def summarize(rows):
    """Geometric-mean and median speed-ups against PyTorch, per op."""
    out = {}
    for op in OPS:
        r = [x["torch_ms"] / x["bnfast_ms"] for x in rows
             if x["op"] == op and x["torch_ms"] == x["torch_ms"]]
        if r:
            out[op] = {"median": float(np.median(r)), "min": float(np.min(r)),
                       "geomean": float(np.exp(np.mean(np.log(r)))), "cases": len(r)}
    return out


def plot(rows, path):
    """Save a PNG: speed-up over PyTorch per case, and time as a multiple of the copy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['op']} {'x'.join(map(str, r['shape']))} {r['layout']} "
              f"{r['dtype'][-2:]} t{r['threads']}" for r in rows]
    vt = [r["torch_ms"] / r["bnfast_ms"] for r in rows]
    xc = [r["bnfast_ms"] / r["copy_ms"] for r in rows]
    n = len(rows)
    fig, axes = plt.subplots(1, 2, figsize=(14, max(4, 0.22 * n + 1.5)), sharey=True)
    ypos = np.arange(n)
    colors = {"train": "C0", "infer": "C1", "backward": "C2", "train_relu": "C3"}
    col = [colors[r["op"]] for r in rows]
    axes[0].barh(ypos, vt, color=col)
    axes[0].axvline(1.0, color="k", lw=0.8)
    axes[0].set_xscale("log")
    axes[0].set_xlabel("speed-up over PyTorch (torch time / bnfast time)")
    axes[1].barh(ypos, xc, color=col)
    axes[1].axvline(1.0, color="k", lw=0.8)
    axes[1].set_xlabel("bnfast time / copy time (memory floor = 1)")
    axes[0].set_yticks(ypos)
    axes[0].set_yticklabels(labels, fontsize=7)
    axes[0].invert_yaxis()
    fig.suptitle("bnfast vs PyTorch CPU batch norm (median times, same run)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _write_json(out_dir, stem, torch, t0, summ, rows, interrupted=False):
    from ._config import get_config

    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, stem + ".json")
    blob = {"config": get_config(), "torch": getattr(torch, "__version__", None),
            "seconds": time.perf_counter() - t0, "summary": summ, "results": rows}
    if interrupted:
        blob["interrupted"] = True
    with open(path, "w") as f:
        json.dump(blob, f, indent=1)
    return path


def run(quick=False, out_dir="results", threads_list=None, repeat=None, log=print):
    """Run the benchmark suite; print a table; write JSON (and PNG if matplotlib exists)."""
    torch = _torch()
    if torch is None:
        log("note: PyTorch is not installed; its columns are left out (pip install torch)")
    cases = suite(quick, threads_list)
    rows = []
    t0 = time.perf_counter()
    stem = "bench_quick" if quick else "bench"
    try:
        for shape, layout, dt, t in cases:
            big = math.prod(shape) * np.dtype(dt).itemsize > 256e6
            rep = repeat or (3 if big else (5 if quick else 7))
            rows += run_case(shape, layout, dt, t, repeat=rep)
            r = rows[-1]
            log(f"  {r['shape']} {layout} {r['dtype']} t{t}: done "
                f"({time.perf_counter() - t0:.0f} s)")
    except KeyboardInterrupt:
        if out_dir and rows:
            path = _write_json(out_dir, stem, torch, t0, summarize(rows), rows,
                               interrupted=True)
            log(f"\ninterrupted after {len(rows)} rows; wrote them to {path}")
        raise
    log("")
    log(format_table(rows, torch=None if torch is not None else "not installed"))
    summ = summarize(rows)
    for op, s in summ.items():
        log(f"speed-up over PyTorch, {op}: median {s['median']:.2f}x, "
            f"min {s['min']:.2f}x, geomean {s['geomean']:.2f}x over {s['cases']} cases")
    if out_dir:
        _write_json(out_dir, stem, torch, t0, summ, rows)
        try:
            plot(rows, os.path.join(out_dir, stem + ".png"))
        except ImportError:
            log("note: matplotlib is not installed; no plot written (pip install matplotlib)")
        log(f"wrote {os.path.join(out_dir, stem)}.json/.png")
    return rows
