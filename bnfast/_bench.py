"""Benchmark harness shared by ``bnfast``, ``bnfast bench`` and ``benchmarks/``.

Compares, in one process and with the same thread count, bnfast against PyTorch's CPU
batch norm (``torch.nn.functional.batch_norm`` and autograd; skipped with a note when torch
is absent), oneDNN through PyTorch's mkldnn tensors (4-D float32 training forward and
backward), a plain NumPy implementation (quick runs), and the memory-bandwidth floor: the
faster of NumPy's copy and a multithreaded copy of the same tensor into a preallocated
buffer (written with non-temporal stores where the normalisation would stream: inputs of
``BNFAST_STREAM_MIN_BYTES`` and more).

Every kernel variant asked for (``isas``) is timed in the same process: the variant is
switched with :func:`bnfast.set_isa` before each of its samples, outside the timed region,
and the variants, PyTorch and oneDNN take turns sample by sample, so each variant's table
compares against the same PyTorch measurement.  Times are medians (and minima) of the
samples.
"""
import contextlib
import json
import math
import os
import platform
import time

import numpy as np

from . import _api, _config, _core
from ._threads import get_num_threads, num_threads

OPS = ("train", "infer", "backward", "train_relu")
OP_TITLES = {"train": "training forward", "infer": "inference", "backward": "backward",
             "train_relu": "training forward + ReLU"}
ALL = "all"

# Shape classes of the full benchmark, in the order of its tables and plots.
CLASSES = ("batch-1", "tiny S", "odd C", "2-D", "1-D seq", "3-D vol", "classic", "> LLC")
# (class, logical channels-first shape, ops, dtype); 2-D shapes run channels-first only,
# the others in both layouts.
FULL_CASES = [
    ("batch-1", (1, 512, 7, 7), OPS, "float32"),
    ("batch-1", (1, 64, 112, 112), OPS, "float32"),
    ("batch-1", (1, 2048), ("infer",), "float32"),   # one value per channel: no training
    ("tiny S", (256, 512, 1, 1), OPS, "float32"),
    ("tiny S", (128, 256, 2, 2), OPS, "float32"),
    ("tiny S", (64, 256, 3, 3), OPS, "float32"),
    ("tiny S", (32, 256, 5, 5), OPS, "float32"),
    ("tiny S", (32, 512, 7, 7), OPS, "float32"),
    ("odd C", (32, 3, 112, 112), OPS, "float32"),
    ("odd C", (32, 17, 56, 56), OPS, "float32"),
    ("odd C", (128, 1000), OPS, "float32"),
    ("odd C", (8, 1000, 7, 7), OPS, "float32"),
    ("2-D", (65536, 64), OPS, "float32"),
    ("2-D", (32, 8192), OPS, "float32"),
    ("1-D seq", (32, 128, 256), OPS, "float32"),
    ("1-D seq", (16, 512, 100), OPS, "float32"),
    ("3-D vol", (4, 32, 16, 32, 32), OPS, "float32"),
    ("3-D vol", (2, 64, 8, 28, 28), OPS, "float32"),
    ("classic", (64, 128), OPS, "float32"),
    ("classic", (256, 1024), OPS, "float32"),
    ("classic", (4096, 4096), OPS, "float32"),
    ("classic", (8, 32, 32, 32), OPS, "float32"),
    ("classic", (32, 64, 56, 56), OPS, "float32"),
    ("classic", (64, 256, 28, 28), OPS, "float32"),
    ("classic", (16, 512, 14, 14), OPS, "float32"),
    ("> LLC", (32, 64, 96, 96), OPS, "float32"),        # 72 MiB
    ("> LLC", (128, 64, 112, 112), OPS, "float32"),     # 392 MiB
    # float64 subset
    ("batch-1", (1, 512, 7, 7), OPS, "float64"),
    ("classic", (256, 1024), OPS, "float64"),
    ("classic", (32, 64, 56, 56), OPS, "float64"),
    ("classic", (16, 512, 14, 14), OPS, "float64"),
    ("1-D seq", (32, 128, 256), OPS, "float64"),
]
QUICK_F32 = [(64, 128), (256, 1024), (32, 64, 56, 56)]

# The targets for tensors larger than the last-level cache: bnfast time / copy.
LLC_TARGETS = {("cf", "infer"): 1.05, ("cf", "train"): 1.25, ("cf", "backward"): 1.7,
               ("cl", "infer"): 1.05, ("cl", "train"): 1.6, ("cl", "backward"): 2.6}


def timeit_many(fns, *, repeat=7, min_time=0.02, max_time=3.0, prepare=None, samples=None):
    """Median and minimum seconds per call of each function in `fns`, sampled in turn.

    Each sample runs a function enough times to last at least `min_time`.  The functions
    take turns, one sample each per round, so that a burst of load on a shared machine
    hits all of them alike and their ratios stay meaningful.  `repeat` rounds are run (at
    least 3, fewer if the total would exceed `max_time` per function).  `prepare`, if
    given, is a list of callables (or None) run before each sample of the function at
    the same index (and before its warm-up), outside the timed region: the benchmark
    selects a kernel variant there.  Returns a list of ``(median, min)`` pairs, one per
    function; `samples`, if given, is a list that receives each function's per-round
    seconds per call (one list per function, in round order: ratios of two functions
    taken round by round pair samples measured moments apart).
    """
    prepare = list(prepare) if prepare is not None else [None] * len(fns)
    if len(prepare) != len(fns):
        raise ValueError("prepare must have one entry per function")
    inner = []
    for fn, prep in zip(fns, prepare):
        if prep is not None:
            prep()
        fn()  # warm up (page faults, lazy initialisation)
        t0 = time.perf_counter()
        fn()
        one = max(time.perf_counter() - t0, 1e-7)
        inner.append(max(1, int(min_time / one)))
    per_fn = [[] for _ in fns]
    start = time.perf_counter()
    for _ in range(repeat):
        for k, fn in enumerate(fns):
            if prepare[k] is not None:
                prepare[k]()
            n = inner[k]
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            per_fn[k].append((time.perf_counter() - t0) / n)
        if time.perf_counter() - start > max_time * len(fns) and len(per_fn[0]) >= 3:
            break
    if samples is not None:
        samples.extend(per_fn)
    return [(float(np.median(v)), float(np.min(v))) for v in per_fn]


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


# ------------------------------------------------------------------ one case

def _plan(x, op, axis, relu, isa=None):
    """(plan dict, short strategy string) from bnfast.explain (for variant `isa`, default
    the one in use), or (None, '') without it."""
    explain = getattr(_api, "explain", None)
    if explain is None:
        return None, ""
    try:
        plan = dict(explain(x, op=op, axis=axis, relu=relu, isa=isa))
    except Exception as exc:  # the plan is a label; never let it stop a benchmark
        return {"error": f"{type(exc).__name__}: {exc}"}, "?"
    plan["threads_asked"] = get_num_threads()
    return _jsonable(plan), plan_string(plan)


_WALK_ABBREV = {"register": "reg", "memory": "mem", "period64": "p64", "blocks": "blk"}


def plan_short(strategy, plan=None):
    """The table form of a strategy: 'rows', or 'cols' and the walks abbreviated, plus the
    thread count when the plan uses fewer threads than the run ('rows 1t')."""
    if not strategy:
        return ""
    s = strategy
    if s.startswith("columns:"):
        s = "cols " + "+".join(_WALK_ABBREV.get(w, w) for w in s[8:].split("+"))
    if isinstance(plan, dict) and isinstance(plan.get("threads"), int) \
            and isinstance(plan.get("threads_asked"), int) \
            and plan["threads"] < plan["threads_asked"]:
        s += f" {plan['threads']}t"
    return s


def plan_string(plan):
    """A short one-line form of a plan dict (its 'strategy' entry when it has one)."""
    if not plan:
        return ""
    if isinstance(plan, dict):
        s = plan.get("strategy")
        if isinstance(s, str):
            return s
        passes = plan.get("passes")
        if isinstance(passes, (list, tuple)):
            return "+".join(str(p.get("strategy", p)) if isinstance(p, dict) else str(p)
                            for p in passes)
    return str(plan)


def _jsonable(v):
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (np.floating,)):
        return float(v)
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    return str(v)


def _onednn_blocked(torch, C):
    """A function giving a tensor's oneDNN (mkldnn) copy in oneDNN's blocked layout.

    ``x.to_mkldnn()`` keeps the plain NCHW order (oneDNN format ``abcd``), on which oneDNN
    runs its generic batch norm (``ncsp_bnorm:any`` in ``ONEDNN_VERBOSE=1``).  An identity
    1x1 convolution through PyTorch's mkldnn module gives the same values (exactly) in
    the blocked layout a oneDNN network passes between layers (``aBcd16b``, nChw16c), on
    which batch norm runs the JIT kernel (``bnorm_jit:avx512_core`` here).  Falls back to
    ``to_mkldnn()`` if that fails.
    """
    try:
        import warnings

        with warnings.catch_warnings():      # its import: torch.jit.script_method deprecated
            warnings.simplefilter("ignore", DeprecationWarning)
            import torch.utils.mkldnn as tum
        conv = torch.nn.Conv2d(C, C, 1, bias=False)
        with torch.no_grad():
            conv.weight.copy_(torch.eye(C).reshape(C, C, 1, 1))
        mconv = tum.to_mkldnn(conv)
    except Exception:
        mconv = None

    def blocked(t):
        m = t.to_mkldnn()
        if mconv is None:
            return m
        try:
            with torch.no_grad():
                b = mconv(m)
            if torch.equal(b.to_dense(), t.contiguous()):
                return b
        except Exception:
            pass
        return m

    return blocked


def run_case(shape, layout="cf", dtype=np.float32, threads=None, *, ops=OPS, repeat=7,
             include_torch=True, include_numpy=True, include_fresh=True,
             include_onednn=False, isas=None, shape_class="", seed=0, min_time=0.02,
             copy_each_op=True):
    """Time every op on one case; return a list of result dicts (times in ms).

    `shape` is the logical channels-first shape (N, C, ...).  With ``layout='cl'`` the data
    is stored channels-last (N, ..., C) and bnfast is called with ``axis=-1``; PyTorch gets
    the same memory as a ``channels_last`` tensor.  `isas` lists the kernel variants to
    time (None: the one in use); each gets its own row per op, all timed in turn with the
    same PyTorch and oneDNN samples.  oneDNN (``include_onednn``) runs for 4-D float32
    training forward and backward, on ``x.to_mkldnn()`` (blocked layout; the conversion is
    not timed).  The copy floor (the faster of NumPy's copy and bnfast's streaming copy,
    measured first) is sampled again with each op (``copy_each_op``), in turn with the
    rest.
    """
    threads = threads or get_num_threads()
    dtype = np.dtype(dtype)
    isas = [_config.get_isa()] if isas is None else list(isas)
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
    train_ok = math.prod(shape) // C > 1          # training needs two values per channel
    if train_ok:
        _, mean, invstd = _api.batch_norm_train(x, w, b, axis=axis)
        np_mean, np_invstd = numpy_train(x, w, b, axis)[1:]
    bmean, bvar = (_api.moments(x, axis=axis) if train_ok
                   else (np.zeros(C, dtype), np.ones(C, dtype)))
    torch = _torch() if include_torch else None
    onednn = include_onednn and torch is not None and nd == 4 and dtype == np.float32
    results = []
    orig_isa = _config.get_isa()

    def selector(name):
        def select():
            _config.set_isa(name)
        return select

    try:
        with num_threads(threads):
            # The copy floor is the machine's: measured with the best variant (the
            # streaming copy), whatever variants are benchmarked.
            _config.set_isa("auto")
            copy_np, copy_mt = timeit_many([lambda: np.copyto(copy_out, x),
                                            lambda: _core.copy(x, copy_out, threads)],
                                           repeat=repeat, min_time=min_time)
            # The faster of the two is sampled again with every op, in turn with the
            # implementations, so that "x copy" compares times taken under the same load.
            if copy_np[0] <= copy_mt[0]:
                def f_copy():
                    np.copyto(copy_out, x)
            else:
                def f_copy():
                    _core.copy(x, copy_out, threads)
            if torch is not None:
                torch.set_num_threads(threads)
                F = torch.nn.functional
                perm = (0, nd - 1) + tuple(range(1, nd - 1)) if cl else None
                tx = torch.from_numpy(x).permute(*perm) if cl else torch.from_numpy(x)
                tdy = torch.from_numpy(dy).permute(*perm) if cl else torch.from_numpy(dy)
                tw, tb = torch.from_numpy(w), torch.from_numpy(b)
                trm, trv = torch.from_numpy(rm.copy()), torch.from_numpy(rv.copy())
                if train_ok:
                    txg = tx.detach().clone().requires_grad_(True)  # keeps the memory format
                    twg, tbg = tw.clone().requires_grad_(True), tb.clone().requires_grad_(True)
                    yg = F.batch_norm(txg, None, None, twg, tbg, training=True)
                if onednn:
                    blocked = _onednn_blocked(torch, C)
                    mx, mdy = blocked(tx), blocked(tdy)
                    mrm, mrv = trm.clone(), trv.clone()
                    mxg = mx.detach().clone().requires_grad_(True)
                    mwg, mbg = tw.clone().requires_grad_(True), tb.clone().requires_grad_(True)
                    myg = F.batch_norm(mxg, None, None, mwg, mbg, training=True)
            pending = {}            # op -> the functions to time, their selectors, keys
            for op in ops:
                if op not in OPS:
                    raise ValueError(f"unknown op {op!r}")
                if op != "infer" and not train_ok:
                    continue
                relu = op == "train_relu"
                f_dnn = None
                if op in ("train", "train_relu"):
                    def f_bn(relu=relu):
                        _api.batch_norm_train(x, w, b, axis=axis, running_mean=rm,
                                              running_var=rv, out=y_out, relu=relu)

                    def f_fresh(relu=relu):
                        _api.batch_norm_train(x, w, b, axis=axis, running_mean=rm,
                                              running_var=rv, relu=relu)

                    def f_np(relu=relu):
                        y = numpy_train(x, w, b, axis, rm=rm.copy(), rv=rv.copy())[0]
                        return np.maximum(y, 0) if relu else y

                    if torch is not None:
                        def f_t(relu=relu):
                            y = F.batch_norm(tx, trm, trv, tw, tb, training=True)
                            return F.relu(y) if relu else y
                    if onednn and op == "train":
                        def dnn_train():
                            return F.batch_norm(mx, mrm, mrv, tw, tb, training=True)
                        f_dnn = dnn_train
                elif op == "infer":
                    def f_bn():
                        _api.batch_norm_infer(x, bmean, bvar, w, b, axis=axis, out=y_out)

                    def f_fresh():
                        _api.batch_norm_infer(x, bmean, bvar, w, b, axis=axis)

                    def f_np():
                        return numpy_infer(x, bmean, bvar, w, b, axis)

                    if torch is not None:
                        def f_t():
                            return F.batch_norm(tx, trm, trv, tw, tb, training=False)
                else:  # backward
                    def f_bn():
                        _api.batch_norm_backward(dy, x, mean, invstd, w, axis=axis,
                                                 out=dx_out)

                    def f_fresh():
                        _api.batch_norm_backward(dy, x, mean, invstd, w, axis=axis)

                    def f_np():
                        return numpy_backward(dy, x, np_mean, np_invstd, w, axis)

                    if torch is not None:
                        def f_t():
                            return torch.autograd.grad(yg, (txg, twg, tbg), tdy,
                                                       retain_graph=True)
                    if onednn:
                        def dnn_backward():
                            return torch.autograd.grad(myg, (mxg, mwg, mbg), mdy,
                                                       retain_graph=True)
                        f_dnn = dnn_backward
                # All implementations (and variants) take turns sample by sample.
                fns, prep, keys = [], [], []
                for isa in isas:
                    fns.append(f_bn)
                    prep.append(selector(isa))
                    keys.append(("bnfast", isa))
                    if include_fresh:
                        fns.append(f_fresh)
                        prep.append(selector(isa))
                        keys.append(("fresh", isa))
                if include_numpy:
                    fns.append(f_np)
                    prep.append(None)
                    keys.append(("numpy", None))
                if torch is not None:
                    fns.append(f_t)
                    prep.append(None)
                    keys.append(("torch", None))
                if copy_each_op:
                    fns.append(f_copy)
                    prep.append(selector("auto"))
                    keys.append(("copy", None))
                if f_dnn is not None:
                    fns.append(f_dnn)
                    prep.append(None)
                    keys.append(("onednn", None))
                pending[op] = (fns, prep, keys)
            # Training forward with and without ReLU are sampled in one set, each
            # implementation's two calls one after the other (the ReLU's cost, a figure of
            # merit, is the median of their per-round ratios); the copy is sampled once per
            # set.
            times, relu_cost = {}, {}
            for group in (("train", "train_relu"), ("infer",), ("backward",)):
                fns, prep, keys = [], [], []
                for op in (o for o in group if o in pending):
                    for f, p_, k in zip(*pending[op]):
                        if k[0] == "copy" and ("copy", None) in [kk[1:] for kk in keys]:
                            continue
                        fns.append(f)
                        prep.append(p_)
                        keys.append((op,) + k if k[0] != "copy" else (None,) + k)
                if not fns:
                    continue
                first = {}
                for k in keys:
                    first.setdefault(k[1:], len(first))
                order = sorted(range(len(keys)), key=lambda i: first[keys[i][1:]])
                fns, prep, keys = ([lst[i] for i in order] for lst in (fns, prep, keys))
                grad_off = torch is not None and group[0] != "backward"
                per_round = []
                with torch.no_grad() if grad_off else contextlib.nullcontext():
                    got = timeit_many(fns, repeat=repeat, prepare=prep, min_time=min_time,
                                      samples=per_round)
                at = {k: i for i, k in enumerate(keys)}
                for isa in isas:
                    i0 = at.get(("train", "bnfast", isa))
                    i1 = at.get(("train_relu", "bnfast", isa))
                    if i0 is not None and i1 is not None:   # (not a, b: the closures' names)
                        relu_cost[isa] = float(np.median(np.asarray(per_round[i1]) /
                                                         np.asarray(per_round[i0])))
                for k, v in zip(keys, got):
                    if k[0] is None:               # the set's copy serves its ops
                        for op in group:
                            times[(op,) + k[1:]] = v
                    else:
                        times[k] = v
            for op in (o for o in ops if o in pending):
                relu = op == "train_relu"
                times_op = {k[1:]: v for k, v in times.items() if k[0] == op}
                nan2 = (math.nan, math.nan)
                t_np = times_op.get(("numpy", None), nan2)
                t_t = times_op.get(("torch", None), nan2)
                t_d = times_op.get(("onednn", None), nan2)
                t_c = times_op.get(("copy", None))
                if t_c is None:       # the copy measured once for the case
                    t_c = (min(copy_np[0], copy_mt[0]), min(copy_np[1], copy_mt[1]))
                for isa in isas:
                    _config.set_isa(isa)
                    if _config.get_isa() != isa:       # never report a variant not run
                        raise RuntimeError(f"variant {isa} was asked for, "
                                           f"{_config.get_isa()} is in use")
                    plan, strategy = _plan(x, op if op != "train_relu" else "train", axis,
                                           relu)
                    t_bn = times_op[("bnfast", isa)]
                    t_fr = times_op.get(("fresh", isa), nan2)
                    results.append({
                        "class": shape_class, "op": op, "shape": list(shape),
                        "layout": "cl" if cl else "cf", "dtype": dtype.name,
                        "threads": threads, "bytes": int(x.nbytes), "isa": isa,
                        "bnfast_ms": t_bn[0] * 1e3, "bnfast_min_ms": t_bn[1] * 1e3,
                        "bnfast_fresh_ms": t_fr[0] * 1e3, "bnfast_fresh_min_ms": t_fr[1] * 1e3,
                        "numpy_ms": t_np[0] * 1e3, "numpy_min_ms": t_np[1] * 1e3,
                        "torch_ms": t_t[0] * 1e3, "torch_min_ms": t_t[1] * 1e3,
                        "onednn_ms": t_d[0] * 1e3, "onednn_min_ms": t_d[1] * 1e3,
                        "copy_ms": t_c[0] * 1e3, "copy_min_ms": t_c[1] * 1e3,
                        "copy_numpy_ms": copy_np[0] * 1e3, "copy_threads_ms": copy_mt[0] * 1e3,
                        "strategy": strategy, "plan": plan,
                    })
                    if op == "train_relu" and isa in relu_cost:
                        results[-1]["relu_cost"] = relu_cost[isa]
    finally:
        _config.set_isa(orig_isa)
    return results


# ------------------------------------------------------------------ suites

def _fits(shape, dtype, factor=14):
    need = factor * math.prod(shape) * np.dtype(dtype).itemsize
    try:
        avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return True
    return need < avail


def suite(quick=False, threads_list=None):
    """The cases of the full or quick benchmark, as dicts.

    Each case has ``class``, ``shape``, ``layout``, ``dtype``, ``threads`` and ``ops``.
    By default one thread count: all of bnfast's threads (PyTorch gets the same).  Cases
    that would not fit in the free memory are left out.
    """
    if threads_list is None:
        threads_list = [get_num_threads()]
    specs = ([("classic", s, OPS, "float32") for s in QUICK_F32] if quick else FULL_CASES)
    cases = []
    for cls, shape, ops, dt in specs:
        if not _fits(shape, dt):
            continue
        for layout in (["cf"] if len(shape) == 2 else ["cf", "cl"]):
            for t in threads_list:
                cases.append({"class": cls, "shape": tuple(shape), "layout": layout,
                              "dtype": np.dtype(dt), "threads": t, "ops": tuple(ops)})
    return cases


def plans_not_run(cases, names):
    """The plans that the variants `names` (compiled in, but not supported by this CPU, so
    not timed) would take for each case and operation of the suite: bnfast.explain with
    ``isa=``, from the shape alone (the arrays are allocated, never written).  Returns
    rows like :func:`run_case`'s without the times."""
    out = []
    for c in cases:
        shape, dtype = tuple(c["shape"]), np.dtype(c["dtype"])
        cl = c["layout"] == "cl" and len(shape) > 2
        store = (shape[0],) + shape[2:] + (shape[1],) if cl else shape
        x = np.empty(store, dtype)
        with num_threads(c["threads"]):
            for isa in names:
                for op in c["ops"]:
                    plan, strategy = _plan(x, op if op != "train_relu" else "train",
                                           -1 if cl else 1, op == "train_relu", isa=isa)
                    out.append({"class": c["class"], "op": op, "shape": list(shape),
                                "layout": "cl" if cl else "cf", "dtype": dtype.name,
                                "threads": c["threads"], "isa": isa, "strategy": strategy,
                                "plan": plan})
        del x
    return out


# Plan fields that say where a pass runs (not labels: variant, forced, threads asked).
_PLAN_SKIP = ("variant", "forced", "threads_asked")


def _plan_diff(a, b, prefix=""):
    """The dotted names of the fields in which plan dicts `a` and `b` differ."""
    if not (isinstance(a, dict) and isinstance(b, dict)):
        return [] if a == b else [prefix.rstrip(".") or "plan"]
    out = []
    for k in sorted(set(a) | set(b)):
        if k in _PLAN_SKIP:
            continue
        if isinstance(a.get(k), dict) or isinstance(b.get(k), dict):
            out += _plan_diff(a.get(k), b.get(k), f"{prefix}{k}.")
        elif a.get(k) != b.get(k):
            out.append(f"{prefix}{k}")
    return out


def markdown_plans(plans, rows):
    """The plans of a variant not run here (:func:`plans_not_run`), one table per
    operation, beside the variant that ran with the closest instruction set (the last of
    `rows`' variants): the strategy of each, and the plan fields where they differ."""
    if not plans:
        return ""
    isa = plans[0]["isa"]
    ran = [i for i in _config.ISA_NAMES if any(r["isa"] == i for r in rows)]
    other = ran[-1] if ran else None
    key = lambda r: (r["op"], tuple(r["shape"]), r["layout"], r["dtype"], r["threads"])
    theirs = {key(r): r for r in rows if r["isa"] == other}
    out = [f"The plans that the {isa} variant would take (it is not supported by this CPU, "
           f"so it was not timed), from `bnfast.explain(x, op=..., isa={isa!r})`"
           + (f", beside those of {other}, which ran" if other else "") + ".\n"]
    ndiff = 0
    for op in OPS:
        rs = _by_class([r for r in plans if r["op"] == op])
        if not rs:
            continue
        out.append(f"**{isa} (not run): {OP_TITLES[op]}** ({len(rs)} cases)\n")
        cols = ["case", f"{isa} plan"] + ([f"{other} plan", "differs in"] if other else [])
        out.append("| " + " | ".join(cols) + " |")
        out.append("|" + "|".join("---" for _ in cols) + "|")
        cls = None
        for r in rs:
            if r["class"] != cls:
                cls = r["class"]
                out.append(f"| *{cls}* |" + " |" * (len(cols) - 1))
            case = f"{shape_str(r['shape'])} {r['layout']}" + (
                "" if r["dtype"] == "float32" else f" f{r['dtype'][-2:]}")
            cells = [case, plan_short(r.get("strategy"), r.get("plan"))]
            if other:
                o = theirs.get(key(r))
                diff = _plan_diff(r.get("plan"), o.get("plan")) if o else ["not run"]
                ndiff += bool(diff)
                cells += [plan_short(o.get("strategy"), o.get("plan")) if o else "-",
                          ", ".join(diff) if diff else "-"]
            out.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
        out.append("")
    if other:
        out.insert(1, f"{ndiff} of {len(plans)} plans differ from {other}'s.\n")
    return "\n".join(out)


def resolve_isas(isa, quick=False):
    """The variants to run for ``--isa``: a name, ``'all'`` (those this CPU supports) or
    None (the default: all for the full run; for ``--quick`` the variant in use, that is
    ``BNFAST_ISA`` or the best).  Returns ``(names, skipped)``, `skipped` listing the
    variants of ``'all'`` this CPU or build lacks."""
    avail = _config.available_isas()
    if isa is None:
        isa = _config.get_isa() if quick else ALL
    if isa == ALL:
        return list(avail), [n for n in _config.ISA_NAMES if n not in avail]
    if isa not in avail:
        raise ValueError(f"variant {isa!r} is not supported by this CPU or build; "
                         f"available: {', '.join(avail)}")
    return [isa], []


# ------------------------------------------------------------------ figures of merit

def _f(v):
    return math.nan if v is None else float(v)


def speedup(r):
    """PyTorch time / bnfast time (nan without PyTorch)."""
    return _f(r.get("torch_ms")) / _f(r["bnfast_ms"])


def vs_onednn(r):
    """oneDNN time / bnfast time (nan where oneDNN did not run)."""
    return _f(r.get("onednn_ms")) / _f(r["bnfast_ms"])


def x_copy(r):
    """bnfast time / copy time."""
    return _f(r["bnfast_ms"]) / _f(r["copy_ms"])


def _geomean(v):
    v = [x for x in v if x == x and x > 0]
    return float(np.exp(np.mean(np.log(v)))) if v else math.nan


def shape_str(shape):
    return "x".join(str(int(s)) for s in shape)


def case_label(r):
    return f"{r['op']} {shape_str(r['shape'])} {r['layout']} {r['dtype']}"


def summarize(rows):
    """Median, minimum and geometric-mean speed-ups against PyTorch, per op."""
    out = {}
    for op in OPS:
        r = [speedup(x) for x in rows if x["op"] == op]
        r = [v for v in r if v == v]
        if r:
            out[op] = {"median": float(np.median(r)), "min": float(np.min(r)),
                       "geomean": _geomean(r), "cases": len(r)}
    return out


def _target(name, limit, figure, met, detail=""):
    return {"target": name, "limit": limit, "figure": figure,
            "met": None if met is None else bool(met), "detail": detail}


def _key(r):
    return (r["op"], tuple(r["shape"]), r["layout"], r["dtype"], int(r["threads"]))


def regression(rows, reference_rows, tolerance=1.05):
    """This run's bnfast times against a reference run's, case by case (same op, shape,
    layout, dtype, threads): geometric mean and worst of new / old."""
    ref = {_key(r): r for r in reference_rows}
    pairs = [(r, _f(r["bnfast_ms"]) / _f(ref[_key(r)]["bnfast_ms"])) for r in rows
             if _key(r) in ref]
    pairs = [(r, q) for r, q in pairs if q == q]
    if not pairs:
        return None
    worst = max(pairs, key=lambda p: p[1])
    g = _geomean([q for _, q in pairs])
    # The same comparison on the speed-up over PyTorch (old speed-up / new speed-up), which
    # cancels a load that slows both alike.
    rel = _geomean([speedup(ref[_key(r)]) / speedup(r) for r, _ in pairs])
    return {"cases": len(pairs), "geomean": g, "worst": worst[1],
            "worst_case": case_label(worst[0]), "speedup_geomean": rel,
            "slower_25pct": sum(q > 1.25 for _, q in pairs), "met": g <= tolerance}


def summarize_variant(rows, reference_rows=None):
    """The summary of one variant's rows: speed-ups per op, the geometric mean of the
    training-forward and backward speed-ups, the cases slower than PyTorch, the worst
    one, and the issue's targets (float32 rows), each marked met / not met with its
    figure (``met`` is None where the run has no case for it)."""
    f32 = [r for r in rows if r["dtype"] == "float32"]
    with_torch = [r for r in f32 if speedup(r) == speedup(r)]
    slower = sorted((r for r in with_torch if speedup(r) < 1.0), key=speedup)
    worst = min(with_torch, key=speedup) if with_torch else None
    gtb = _geomean([speedup(r) for r in with_torch if r["op"] in ("train", "backward")])
    # The same from each side's fastest sample: what a quiet machine would show, roughly
    # (medians remain the figures of record).
    gtb_min = _geomean([_f(r.get("torch_min_ms")) / _f(r.get("bnfast_min_ms"))
                        for r in with_torch if r["op"] in ("train", "backward")])
    f64_torch = [r for r in rows if r["dtype"] == "float64" and speedup(r) == speedup(r)]
    out = {
        "per_op": summarize(rows),
        "cases_float32": len(with_torch),
        "geomean_train_backward": gtb,
        "geomean_train_backward_of_minima": gtb_min,
        "slower_than_torch_by_minima": sum(
            _f(r.get("torch_min_ms")) < _f(r.get("bnfast_min_ms")) for r in with_torch),
        "slower_than_torch": [{"case": case_label(r), "speedup": speedup(r)} for r in slower],
        "worst": ({"case": case_label(worst), "speedup": speedup(worst)} if worst else None),
        "float64_slower_than_torch": sum(speedup(r) < 1.0 for r in f64_torch),
        "float64_cases": len(f64_torch),
    }
    t = []
    if with_torch:
        t.append(_target("never slower than PyTorch (speed-up >= 1.0)", 1.0,
                         worst and speedup(worst), not slower,
                         f"{len(slower)} of {len(with_torch)} cases slower; worst "
                         f"{case_label(worst)}"))
        t.append(_target("geometric mean of train and backward speed-ups >= 2x", 2.0, gtb,
                         gtb >= 2.0))
    dnn = [r for r in f32 if r["op"] == "train" and vs_onednn(r) == vs_onednn(r)]
    if dnn:
        w = min(dnn, key=vs_onednn)
        n_slow = sum(vs_onednn(r) < 1.0 for r in dnn)
        t.append(_target("training forward at least as fast as oneDNN", 1.0, vs_onednn(w),
                         n_slow == 0, f"{n_slow} of {len(dnn)} cases slower; worst "
                                      f"{case_label(w)}"))
    out["vs_onednn"] = {}
    for op in ("train", "backward"):       # oneDNN's figures (only training is a target)
        d = [vs_onednn(r) for r in f32 if r["op"] == op and vs_onednn(r) == vs_onednn(r)]
        if d:
            out["vs_onednn"][op] = {"cases": len(d), "slower": sum(v < 1.0 for v in d),
                                    "geomean": _geomean(d), "min": float(min(d))}
    for (layout, op), limit in LLC_TARGETS.items():
        big = [r for r in f32 if r["class"] == "> LLC" and r["layout"] == layout
               and r["op"] == op]
        if big:
            w = max(big, key=x_copy)
            name = {"cf": "channels-first", "cl": "channels-last"}[layout]
            t.append(_target(f"> LLC {name} {OP_TITLES[op]} <= {limit}x copy", limit,
                             x_copy(w), x_copy(w) <= limit,
                             f"worst {case_label(w)}; {len(big)} cases"))
    if reference_rows is not None:
        reg = regression(f32, reference_rows)
        if reg is not None:
            t.append(_target("no regression against the reference run (geometric mean of "
                             "time ratios <= 1.05)", 1.05, reg["geomean"], reg["met"],
                             f"{reg['cases']} cases; worst {reg['worst']:.2f}x "
                             f"({reg['worst_case']}); {reg['slower_25pct']} more than "
                             f"1.25x slower; relative to PyTorch in each run: "
                             f"{reg['speedup_geomean']:.2f}x"))
    out["targets"] = t
    # Item 2 of the issue (tuning goals), measured by the same run.
    item2 = []
    by = {_key(r): r for r in f32}
    # the paired figure (median of the per-round ratios, same variant, calls adjacent)
    # where the run has it; older runs: the ratio of the medians
    relu = [(r, r["relu_cost"] if r.get("relu_cost") is not None
             else _f(r["bnfast_ms"]) / _f(by[k]["bnfast_ms"])) for r in f32
            if r["op"] == "train_relu"
            and (k := ("train",) + _key(r)[1:]) in by]
    if relu:
        w = max(relu, key=lambda p: p[1])
        item2.append(_target("fused ReLU costs at most 10% more than training forward",
                             1.10, w[1], w[1] <= 1.10,
                             f"worst {case_label(w[0])}; "
                             f"{sum(q > 1.10 for _, q in relu)} of {len(relu)} over"
                             + ("; medians of per-round ratios"
                                if all(r.get("relu_cost") is not None for r, _ in relu)
                                else "")))
    b1 = [r for r in f32 if r["class"] == "batch-1" and r["op"] == "infer"]
    if b1:
        q = [(r, _f(r["bnfast_ms"]) / max(1.5 * _f(r["copy_ms"]), 0.005)) for r in b1]
        w = max(q, key=lambda p: p[1])
        item2.append(_target("batch-1 inference within max(1.5x copy, 5 us)", 1.0, w[1],
                             w[1] <= 1.0, f"worst {case_label(w[0])} "
                                          f"{w[0]['bnfast_ms'] * 1e3:.1f} us"))
    out["item2"] = item2
    return out


def compare_variants(rows, faster="avx2", slower="baseline"):
    """Cases (float32) where variant `faster` is not faster than `slower`: the issue wants
    avx2 to beat baseline on every case.  None unless both ran."""
    a = {_key(r): r for r in rows if r["isa"] == faster and r["dtype"] == "float32"}
    b = {_key(r): r for r in rows if r["isa"] == slower and r["dtype"] == "float32"}
    common = [k for k in a if k in b]
    if not common:
        return None
    q = [(a[k], _f(b[k]["bnfast_ms"]) / _f(a[k]["bnfast_ms"])) for k in common]
    w = min(q, key=lambda p: p[1])
    return {"cases": len(q), "not_faster": sum(v < 1.0 for _, v in q),
            "geomean": _geomean([v for _, v in q]), "worst": w[1],
            "worst_case": case_label(w[0]),
            "met": all(v >= 1.0 for _, v in q)}


# ------------------------------------------------------------------ tables

def _ms(v):
    v = _f(v)
    if v != v:
        return "-"
    return f"{v:#.3g}" if v < 100 else f"{v:.0f}"


def _x(v, nd=2):
    v = _f(v)
    return "-" if v != v else f"{v:.{nd}f}"


def _r(v):
    """A ratio in 3-4 characters plus x: 0.96x, 2.00x, 11.0x, 112x."""
    v = _f(v)
    if v != v:
        return "-"
    return f"{v:.0f}x" if v >= 99.5 else f"{v:.1f}x" if v >= 9.995 else f"{v:.2f}x"


def format_table(rows, torch=None):
    """The quick command's text table (one variant, with NumPy and fresh outputs).

    `torch` says why there are no PyTorch times when none of `rows` has one ('not
    installed', 'skipped (--no-torch)'): the PyTorch columns are then left out and a
    line says so, rather than columns of nan.
    """
    has_torch = any(_f(r["torch_ms"]) == _f(r["torch_ms"]) for r in rows)
    has_plan = any(r.get("strategy") for r in rows)

    def ms(v, width):
        v = _f(v)
        return f"{v:>{width}.3f}" if v == v else f"{'-':>{width}}"

    head = (f"{'op':<10} {'shape':<19} {'lay':<3} {'dtype':<7} {'thr':>3} {'bnfast':>9} "
            f"{'fresh':>9} {'numpy':>9} " + (f"{'torch':>9} " if has_torch else "")
            + f"{'copy':>8} " + (f"{'vs torch':>8} " if has_torch else "")
            + f"{'vs np':>7} {'x copy':>6}" + ("  plan" if has_plan else ""))
    lines = [head, "-" * len(head)]
    for r in rows:
        vt = speedup(r)
        vn = _f(r["numpy_ms"]) / _f(r["bnfast_ms"])
        lines.append(
            f"{r['op']:<10} {str(tuple(r['shape'])):<19} {r['layout']:<3} {r['dtype']:<7} "
            f"{r['threads']:>3} {ms(r['bnfast_ms'], 9)} {ms(r['bnfast_fresh_ms'], 9)} "
            f"{ms(r['numpy_ms'], 9)} " + (f"{ms(r['torch_ms'], 9)} " if has_torch else "")
            + f"{ms(r['copy_ms'], 8)} "
            + ((f"{vt:>7.2f}x " if vt == vt else f"{'-':>8} ") if has_torch else "")
            + (f"{vn:>6.1f}x" if vn == vn else f"{'-':>7}")
            + f" {x_copy(r):>6.2f}"
            + (f"  {plan_short(r.get('strategy'), r.get('plan'))}" if has_plan else ""))
    lines.append("times: median ms; fresh = bnfast allocating its outputs; "
                 + ("vs torch/np = their time / bnfast's" if has_torch
                    else "vs np = NumPy's time / bnfast's")
                 + "; x copy = bnfast / copy floor"
                 + ("; plan = bnfast.explain's strategy (rows / cols and the walks; "
                    "1t: one thread)" if has_plan else ""))
    if not has_torch:
        why = torch or "not installed"
        hint = " (pip install torch)" if why == "not installed" else ""
        lines.append(f"PyTorch: {why}{hint}; its columns are left out")
    return "\n".join(lines)


def format_variant_table(rows):
    """One variant's rows as a text table (the bench command's output)."""
    has_dnn = any(vs_onednn(r) == vs_onednn(r) for r in rows)
    has_plan = any(r.get("strategy") for r in rows)
    head = (f"{'class':<8} {'op':<10} {'shape':<16} {'lay':<3} {'dt':<3} {'bnfast':>8} "
            f"{'torch':>8} {'speedup':>7} " + (f"{'oneDNN':>8} {'vs dnn':>6} " if has_dnn
                                             else "") + f"{'x copy':>6}"
            + ("  plan" if has_plan else ""))
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['class']:<8} {r['op']:<10} {shape_str(r['shape']):<16} {r['layout']:<3} "
            f"{'f' + r['dtype'][-2:]:<3} {_ms(r['bnfast_ms']):>8} {_ms(r.get('torch_ms')):>8} "
            f"{_x(speedup(r)):>7} "
            + (f"{_ms(r.get('onednn_ms')):>8} {_x(vs_onednn(r)):>6} " if has_dnn else "")
            + f"{_x(x_copy(r)):>6}"
            + (f"  {plan_short(r.get('strategy'), r.get('plan'))}" if has_plan else ""))
    return "\n".join(lines)


def format_summary(isa, s):
    """A variant's summary as text lines (also used in the Markdown report)."""
    lines = [f"variant {isa}:"]
    for op, v in s["per_op"].items():
        lines.append(f"  speed-up over PyTorch, {op}: median {v['median']:.2f}x, "
                     f"min {v['min']:.2f}x, geomean {v['geomean']:.2f}x over {v['cases']} cases")
    lines.append(f"  geometric mean of train and backward speed-ups (float32): "
                 f"{s['geomean_train_backward']:.2f}x")
    lines.append(f"  slower than PyTorch: {len(s['slower_than_torch'])} of "
                 f"{s['cases_float32']} float32 cases, {s['float64_slower_than_torch']} of "
                 f"{s['float64_cases']} float64 cases")
    if s["worst"]:
        lines.append(f"  worst: {s['worst']['case']} {s['worst']['speedup']:.2f}x")
    for op, d in s.get("vs_onednn", {}).items():
        lines.append(f"  {op} against oneDNN: geomean {d['geomean']:.2f}x, min {d['min']:.2f}x, "
                     f"{d['slower']} of {d['cases']} cases slower")
    for t in s["targets"] + s["item2"]:
        mark = {True: "met", False: "NOT MET", None: "n/a"}[t["met"]]
        fig = "-" if t["figure"] is None else f"{t['figure']:.2f}"
        lines.append(f"  [{mark}] {t['target']}: {fig}" +
                     (f" ({t['detail']})" if t["detail"] else ""))
    return "\n".join(lines)


def _by_class(rows):
    """Rows grouped by shape class, in the order of CLASSES (stable within a class)."""
    rank = {c: k for k, c in enumerate(CLASSES)}
    return sorted(rows, key=lambda r: rank.get(r["class"], len(rank)))


def markdown_tables(rows, isa):
    """One variant's results as Markdown: one table per operation, narrow enough for a
    page (times in ms; a row in italics names each shape class; the case is the shape, the
    layout and, for float64, f64)."""
    has_plan = any(r.get("strategy") for r in rows)
    out = []
    for op in OPS:
        rs = _by_class([r for r in rows if r["op"] == op])
        if not rs:
            continue
        dnn = any(vs_onednn(r) == vs_onednn(r) for r in rs)
        out.append(f"**{isa}: {OP_TITLES[op]}** ({len(rs)} cases; times in ms)\n")
        cols = ["case", "bnfast", "PyTorch", "speed-up"]
        cols += ["oneDNN"] if dnn else []
        cols += ["x copy"] + (["plan"] if has_plan else [])
        out.append("| " + " | ".join(cols) + " |")
        out.append("|" + "|".join("---" if c in ("case", "plan") else "---:"
                                  for c in cols) + "|")
        cls = None
        for r in rs:
            if r["class"] != cls:
                cls = r["class"]
                out.append(f"| *{cls}* |" + " |" * (len(cols) - 1))
            su = speedup(r)
            sus = _r(su)
            if su == su and su < 1.0:
                sus = f"**{sus}**"
            case = f"{shape_str(r['shape'])} {r['layout']}" + (
                "" if r["dtype"] == "float32" else f" f{r['dtype'][-2:]}")
            cells = [case, _ms(r["bnfast_ms"]), _ms(r.get("torch_ms")), sus]
            if dnn:
                cells += [_ms(r.get("onednn_ms"))]
            cells += [_r(x_copy(r))]
            if has_plan:
                cells += [plan_short(r.get("strategy"), r.get("plan"))]
            out.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
        out.append("")
    return "\n".join(out)


def markdown_summary(summaries, cross=None):
    """The per-variant summaries and targets as Markdown tables."""
    isas = list(summaries)
    out = ["| | " + " | ".join(isas) + " |", "|---|" + "---:|" * len(isas)]

    def row(name, fn):
        out.append(f"| {name} | " + " | ".join(fn(summaries[i]) for i in isas) + " |")

    row("geomean train+backward speed-up", lambda s: f"{s['geomean_train_backward']:.2f}x")
    row("the same from minima (not a target)",
        lambda s: f"{s.get('geomean_train_backward_of_minima', math.nan):.2f}x")
    for op in OPS:
        row(f"{op}: median (min) speed-up",
            lambda s, op=op: (f"{s['per_op'][op]['median']:.2f}x "
                              f"({s['per_op'][op]['min']:.2f}x)" if op in s["per_op"] else "-"))
    row("float32 cases slower than PyTorch",
        lambda s: f"{len(s['slower_than_torch'])} of {s['cases_float32']}")
    row("the same from minima (not a target)",
        lambda s: f"{s.get('slower_than_torch_by_minima', '-')} of {s['cases_float32']}")
    row("float64 cases slower than PyTorch",
        lambda s: f"{s['float64_slower_than_torch']} of {s['float64_cases']}")
    row("worst case", lambda s: (f"{s['worst']['speedup']:.2f}x {s['worst']['case']}"
                                 if s["worst"] else "-"))
    for op in ("train", "backward"):
        if any(op in s.get("vs_onednn", {}) for s in summaries.values()):
            row(f"{op} vs oneDNN: geomean (min), slower",
                lambda s, op=op: (f"{s['vs_onednn'][op]['geomean']:.2f}x "
                                  f"({s['vs_onednn'][op]['min']:.2f}x), "
                                  f"{s['vs_onednn'][op]['slower']} of "
                                  f"{s['vs_onednn'][op]['cases']}"
                                  if op in s.get("vs_onednn", {}) else "-"))
    names = []
    for s in summaries.values():
        for t in s["targets"] + s["item2"]:
            if t["target"] not in names:
                names.append(t["target"])
    for name in names:
        def cell(s, name=name):
            for t in s["targets"] + s["item2"]:
                if t["target"] == name:
                    fig = "-" if t["figure"] is None else f"{t['figure']:.2f}"
                    mark = {True: "met", False: "**not met**", None: "n/a"}[t["met"]]
                    return f"{mark}: {fig}"
            return "-"
        out.append(f"| {name} | " + " | ".join(cell(summaries[i]) for i in isas) + " |")
    if cross:
        out.append("")
        out.append(f"avx2 against baseline (float32): avx2 faster on "
                   f"{cross['cases'] - cross['not_faster']} of {cross['cases']} cases, "
                   f"geometric mean {cross['geomean']:.2f}x, worst {cross['worst']:.2f}x "
                   f"({cross['worst_case']}).")
    return "\n".join(out)


# ------------------------------------------------------------------ plots

_LAYOUT_COLOR = {"cf": "C0", "cl": "C1"}
_OFFSETS = {("cf", "float32"): -0.24, ("cl", "float32"): -0.08,
            ("cf", "float64"): 0.08, ("cl", "float64"): 0.24}


def _tick(v, _pos=None):
    return f"{v:g}"


def plot(rows, path, title=None):
    """Save a PNG of one variant's rows: per operation (one row of panels each), the
    speed-up over PyTorch (left; oneDNN as crosses) and the time as a multiple of a copy
    (right; the issue's targets for the largest tensors as red ticks), one line per shape
    class, one dot per case (blue channels-first, orange channels-last, hollow float64)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ops = [op for op in OPS if any(r["op"] == op for r in rows)]
    classes = [c for c in CLASSES if any(r["class"] == c for r in rows)]
    classes += sorted({r["class"] for r in rows} - set(classes))
    ypos = {c: i for i, c in enumerate(classes)}
    h = 0.62 + 0.27 * len(classes)
    fig, axes = plt.subplots(len(ops), 2, figsize=(7.5, 0.7 + h * len(ops)), squeeze=False)
    for i, op in enumerate(ops):
        rs = [r for r in rows if r["op"] == op]
        for j, (fn, xlabel) in enumerate([(speedup, "PyTorch time / bnfast time"),
                                          (x_copy, "bnfast time / copy time")]):
            ax = axes[i][j]
            for r in rs:
                v = fn(r)
                if v != v:
                    continue
                y = ypos[r["class"]] + _OFFSETS.get((r["layout"], r["dtype"]), 0.0)
                c = _LAYOUT_COLOR.get(r["layout"], "C2")
                face = c if r["dtype"] == "float32" else "none"
                ax.scatter([v], [y], s=16, facecolors=face, edgecolors=c, linewidths=0.9,
                           zorder=3)
                if j == 0 and vs_onednn(r) == vs_onednn(r):
                    ax.scatter([vs_onednn(r)], [y], s=18, marker="x", color="0.25",
                               linewidths=0.9, zorder=3)
            ax.axvline(1.0, color="k", lw=0.8)
            if j == 0:
                ax.axvspan(1e-3, 1.0, color="C3", alpha=0.07, lw=0)
            else:
                for (layout, top), limit in LLC_TARGETS.items():
                    if top == op and "> LLC" in ypos:
                        y = ypos["> LLC"] + _OFFSETS[(layout, "float32")]
                        ax.plot([limit, limit], [y - 0.08, y + 0.08], color="C3", lw=1.6,
                                zorder=4)
            ax.set_xscale("log")
            ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            ax.xaxis.set_minor_locator(LogLocator(base=10, subs=np.arange(1, 10)))
            ax.xaxis.set_major_formatter(FuncFormatter(_tick))
            ax.xaxis.set_minor_formatter(NullFormatter())
            vals = [fn(r) for r in rs if fn(r) == fn(r)]
            if j == 0:
                vals += [vs_onednn(r) for r in rs if vs_onednn(r) == vs_onednn(r)]
            if vals:
                lo, hi = min(vals + [1.0]), max(vals + [1.0])
                ax.set_xlim(lo / 1.25, hi * 1.25)
            ax.set_ylim(len(classes) - 0.5, -0.5)
            ax.set_yticks(range(len(classes)))
            ax.set_yticklabels(classes if j == 0 else [], fontsize=8)
            ax.tick_params(axis="x", labelsize=7.5)
            ax.grid(axis="x", which="both", color="0.9", lw=0.5)
            for y in range(len(classes) - 1):
                ax.axhline(y + 0.5, color="0.85", lw=0.5)
            ax.set_title(f"{OP_TITLES[op]}: " + ("speed-up over PyTorch" if j == 0
                                                  else "time / copy"), fontsize=9)
            if i == len(ops) - 1:
                ax.set_xlabel(xlabel, fontsize=8)
    handles = [Line2D([], [], ls="", marker="o", color="C0", label="channels-first"),
               Line2D([], [], ls="", marker="o", color="C1", label="channels-last")]
    if any(r["dtype"] == "float64" for r in rows):
        handles.append(Line2D([], [], ls="", marker="o", mfc="none", color="0.3",
                              label="float64"))
    if any(vs_onednn(r) == vs_onednn(r) for r in rows):
        handles.append(Line2D([], [], ls="", marker="x", color="0.25",
                              label="bnfast vs oneDNN"))
    if "> LLC" in ypos:
        handles.append(Line2D([], [], color="C3", lw=1.6, label="target (> LLC)"))
    H = fig.get_figheight()
    fig.tight_layout(h_pad=1.0)
    fig.subplots_adjust(top=1 - 0.72 / H)
    fig.legend(handles=handles, loc="center", ncol=len(handles), fontsize=7.5,
               frameon=False, bbox_to_anchor=(0.5, 1 - 0.36 / H))
    if title:
        fig.text(0.5, 1 - 0.06 / H, title, fontsize=10, ha="center", va="top")
    fig.savefig(path, dpi=150)
    plt.close(fig)


# ------------------------------------------------------------------ machine, JSON

_FLAGS = ("sse2", "avx", "avx2", "fma", "avx512f", "avx512dq", "avx512bw", "avx512vl",
          "avx512_vnni", "avx512_bf16")


def machine_info():
    """The CPU model (lscpu's 'Model name'), a subset of its flags, cores and caches."""
    info = {"model": platform.processor() or platform.machine(), "flags": [],
            "cpus": os.cpu_count()}
    fields = {}
    try:
        import subprocess

        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10,
                             env=dict(os.environ, LC_ALL="C")).stdout
        for line in out.splitlines():
            k, _, v = line.partition(":")
            fields[k.strip()] = v.strip()
    except (OSError, ValueError, Exception):
        pass
    if fields.get("Model name"):
        info["model"] = fields["Model name"]
    flags = fields.get("Flags", "").split()
    if not flags:
        try:
            with open("/proc/cpuinfo") as f:
                for line in f:
                    if line.startswith("flags"):
                        flags = line.split(":", 1)[1].split()
                        break
        except OSError:
            pass
    info["flags"] = [f for f in _FLAGS if f in flags]
    for k in ("L2 cache", "L3 cache"):
        if k in fields:
            info[k.split()[0].lower() + "_cache"] = fields[k]
    return info


def anchors_info(torch):
    """What the anchors ran: PyTorch's version and the CPU code it dispatches to (ATen's
    CPU capability: DEFAULT, AVX2 or AVX512, which ``ATEN_CPU_CAPABILITY`` lowers), and the
    limit on oneDNN's instruction set (``ONEDNN_MAX_CPU_ISA``, none by default).

    Both anchors pick their code for the CPU they run on, so against an AVX-512 CPU's
    PyTorch the baseline variant is compared with code that CPUs without AVX2 do not run;
    ``ATEN_CPU_CAPABILITY=default ONEDNN_MAX_CPU_ISA=SSE41 bnfast bench --isa baseline``
    gives the comparison such a CPU would see (docs/user_guide/performance.md)."""
    info = {"torch": getattr(torch, "__version__", None), "torch_cpu_capability": None,
            "onednn_max_cpu_isa": (os.environ.get("ONEDNN_MAX_CPU_ISA")
                                   or os.environ.get("DNNL_MAX_CPU_ISA") or None)}
    if torch is not None:
        try:
            info["torch_cpu_capability"] = str(torch.backends.cpu.get_cpu_capability())
        except Exception:        # older PyTorch: no such query
            pass
    return info


def anchors_line(info):
    """One line for logs and the Markdown summary."""
    if info.get("torch") is None:
        return "anchors: PyTorch not installed"
    cap = info.get("torch_cpu_capability") or "unknown"
    dnn = info.get("onednn_max_cpu_isa") or "none"
    return (f"anchors: PyTorch {info['torch']} (ATen CPU capability {cap}); "
            f"oneDNN instruction-set limit: {dnn}")


def _json_safe(v):
    if isinstance(v, float):
        return None if v != v else float(f"{v:.6g}")     # 6 digits: far below the noise
    if isinstance(v, dict):
        return {k: _json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_safe(x) for x in v]
    return v


def _write_json(out_dir, stem, torch, t0, summ, rows, interrupted=False, extra=None):
    from ._config import get_config

    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, stem + ".json")
    try:
        load = list(os.getloadavg())
    except (OSError, AttributeError):
        load = None
    blob = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "config": get_config(), "machine": machine_info(), "load_average_end": load,
            "torch": getattr(torch, "__version__", None),
            "torch_threads": torch.get_num_threads() if torch is not None else None,
            "seconds": time.perf_counter() - t0, "summary": summ, "results": rows}
    blob.update(extra or {})
    if interrupted:
        blob["interrupted"] = True
    blob = _json_safe(blob)
    rows_out = blob.pop("results")
    text = json.dumps(blob, indent=1, default=str)
    # one line per result row: a full run has hundreds of rows
    body = ",\n".join("  " + json.dumps(r, default=str) for r in rows_out)
    text = text[:-2] + ',\n "results": [\n' + body + "\n ]\n}\n"
    with open(path, "w") as f:
        f.write(text)
    return path


def load_rows(path):
    """The results of a JSON file written by the benchmark (None read back as nan)."""
    with open(path) as f:
        blob = json.load(f)
    rows = blob["results"]
    for r in rows:
        for k, v in list(r.items()):
            if k.endswith("_ms") and v is None:
                r[k] = math.nan
        r.setdefault("isa", blob.get("config", {}).get("isa"))
        r.setdefault("class", "")
    return rows


# ------------------------------------------------------------------ the run

def _torch():
    try:
        import torch
    except Exception:
        return None
    return torch


def _onednn_works(torch):
    """Whether PyTorch's mkldnn (oneDNN) batch norm runs here; (ok, why not)."""
    try:
        if not torch.backends.mkldnn.is_available():
            return False, "torch.backends.mkldnn.is_available() is False"
        x = torch.randn(2, 3, 4, 4)
        w = torch.ones(3, requires_grad=True)
        xm = x.to_mkldnn().requires_grad_(True)
        y = torch.nn.functional.batch_norm(xm, None, None, w, torch.zeros(3), training=True)
        torch.autograd.grad(y, (xm, w), torch.ones(2, 3, 4, 4).to_mkldnn())
        return True, ""
    except Exception as exc:
        return False, f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"


def write_reports(rows, out_dir, stem, summaries=None, cross=None, log=print, anchors=None):
    """Write the Markdown summary (``<stem>_summary.md``), one Markdown file of tables and
    one PNG per variant (``<stem>_<variant>.md/.png``) into `out_dir`; `anchors` (from
    :func:`anchors_info`) heads the summary."""
    isas = [i for i in _config.ISA_NAMES if any(r["isa"] == i for r in rows)]
    if summaries is None:
        summaries = {i: summarize_variant([r for r in rows if r["isa"] == i]) for i in isas}
        cross = compare_variants(rows)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, stem + "_summary.md"), "w") as f:
        if anchors is not None:
            f.write(anchors_line(anchors) + "\n\n")
        f.write(markdown_summary(summaries, cross) + "\n")
    for isa in isas:
        with open(os.path.join(out_dir, f"{stem}_{isa}.md"), "w") as f:
            f.write(markdown_tables([r for r in rows if r["isa"] == isa], isa))
    threads = "/".join(str(t) for t in sorted({int(r["threads"]) for r in rows}))
    try:
        for isa in isas:
            plot([r for r in rows if r["isa"] == isa],
                 os.path.join(out_dir, f"{stem}_{isa}.png"),
                 title=f"bnfast ({isa}) against PyTorch, {machine_info()['model']}, "
                       f"{threads} threads, median times")
    except ImportError:
        log("note: matplotlib is not installed; no plot written (pip install matplotlib)")
    log(f"wrote {os.path.join(out_dir, stem)}_summary.md and {stem}_<variant>.md/.png "
        f"({', '.join(isas)})")


def run(quick=False, out_dir="results", threads_list=None, repeat=None, log=print,
        isas=None, reference=None, min_time=None):
    """Run the benchmark suite; print one table and summary per variant; write JSON,
    Markdown tables and one PNG per variant (if matplotlib exists).

    `isas`: the variant names to run (default: see :func:`resolve_isas`); `reference`: a
    JSON file of an earlier run whose bnfast times this run's are compared with.
    """
    torch = _torch()
    if torch is None:
        log("note: PyTorch is not installed; its columns are left out (pip install torch)")
    if isas is None:
        isas, _ = resolve_isas(None, quick)
    # Variants compiled in but not supported here: not timed; their plans are reported
    # (the full run, which covers every variant).
    unsupported = [] if quick else [
        name for i, name in enumerate(_config.ISA_NAMES)
        if name not in _config.available_isas() and _core.isa_compiled(i)]
    onednn, why = (_onednn_works(torch) if torch is not None and not quick
                   else (False, "not in --quick" if torch is not None else "no PyTorch"))
    if torch is not None and not quick and not onednn:
        log(f"note: oneDNN (PyTorch mkldnn tensors) does not run here: {why}")
    ref_rows = load_rows(reference) if reference else None
    cases = suite(quick, threads_list)
    rows = []
    t0 = time.perf_counter()
    stem = "bench_quick" if quick else "bench"
    try:
        load0 = list(os.getloadavg())
    except (OSError, AttributeError):
        load0 = None
    anchors = anchors_info(torch)
    log(anchors_line(anchors))
    log(f"variants: {', '.join(isas)}; {len(cases)} cases; oneDNN: "
        f"{'yes' if onednn else 'no (' + why + ')'}"
        + (f"; load average {load0[0]:.1f} (1 min)" if load0 else ""))
    try:
        for c in cases:
            size = math.prod(c["shape"]) * c["dtype"].itemsize
            rep = repeat or (3 if size > 256e6 else 5 if (quick or size > 16e6) else 7)
            kw = dict(ops=c["ops"], repeat=rep, isas=isas, shape_class=c["class"],
                      include_numpy=quick, include_fresh=quick, include_onednn=onednn)
            if min_time:
                kw["min_time"] = min_time
            rows += run_case(c["shape"], c["layout"], c["dtype"], c["threads"], **kw)
            log(f"  {c['class']:<8} {shape_str(c['shape']):<16} {c['layout']} "
                f"{c['dtype'].name} t{c['threads']}: done ({time.perf_counter() - t0:.0f} s)")
    except KeyboardInterrupt:
        if out_dir and rows:
            path = _write_json(out_dir, stem, torch, t0, summarize(rows), rows,
                               interrupted=True, extra={"anchors": anchors})
            log(f"\ninterrupted after {len(rows)} rows; wrote them to {path}")
        raise
    seconds = time.perf_counter() - t0
    summaries = {}
    for isa in isas:
        rs = [r for r in rows if r["isa"] == isa]
        summaries[isa] = summarize_variant(rs, ref_rows if isa == "avx512" else None)
        log("")
        if quick:
            log(f"variant {isa}:")
            log(format_table(rs, torch=None if torch is not None else "not installed"))
        else:
            log(format_variant_table(rs))
        log(format_summary(isa, summaries[isa]))
    cross = compare_variants(rows)
    if cross:
        log(f"\navx2 against baseline: avx2 faster on {cross['cases'] - cross['not_faster']} "
            f"of {cross['cases']} float32 cases; geomean {cross['geomean']:.2f}x, worst "
            f"{cross['worst']:.2f}x ({cross['worst_case']})")
    plans = plans_not_run(cases, unsupported) if unsupported and rows else []
    for isa in unsupported:
        mine = [p for p in plans if p["isa"] == isa]
        text = markdown_plans(mine, rows)
        log(f"\nvariant {isa}: not supported by this CPU, not timed; "
            + (text.split("\n")[2] if len(text.split("\n")) > 2 else ""))
    log(f"\n{len(rows)} rows in {seconds:.0f} s")
    if out_dir:
        extra = {"isas": isas, "onednn": onednn if onednn else why, "cross": cross,
                 "not_run": unsupported, "plans_not_run": plans,
                 "anchors": anchors,
                 "load_average_start": load0,
                 "threads": sorted({c["threads"] for c in cases})}
        path = _write_json(out_dir, stem, torch, t0, summaries, rows, extra=extra)
        log(f"wrote {path}")
        write_reports(rows, out_dir, stem, summaries, cross, log=log, anchors=anchors)
        for isa in unsupported:
            path = os.path.join(out_dir, f"{stem}_plans_{isa}.md")
            with open(path, "w") as f:
                f.write(markdown_plans([p for p in plans if p["isa"] == isa], rows))
            log(f"wrote {path}")
    return rows
