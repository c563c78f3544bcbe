"""One validation layer: the Cython fast paths accept only what the general path accepts,
and give the same bits.

Every public function first calls a fast path in ``bnfast._core`` that returns None unless
its cheap checks pass (see the comment above the fast paths in ``_core.pyx``).  Here each
call is made twice on fresh, identical arguments: once as users make it, and once with the
fast paths switched off (they return None, so ``bnfast._api``'s general path does
everything).  Both must raise the same exception with the same message, or return the same
bits and leave every argument (outputs and running statistics included) with the same
bits.  The argument sets are drawn at random from valid and invalid values of every kind.
"""
import numpy as np
import pytest

import bnfast
from bnfast import _core

FAST = ("fast_moments", "fast_train", "fast_infer", "fast_backward")
N_CALLS = 1500         # per public function


def _x_variants(rng, shape, dtype):
    base = rng.standard_normal(shape).astype(dtype)
    kind = rng.integers(9) if rng.random() < 0.5 else 0
    if kind == 0:
        return base, 1
    if kind == 1:       # channels-last
        return np.ascontiguousarray(np.moveaxis(base, 1, -1)), -1
    if kind == 2:
        return np.asfortranarray(base), 1
    if kind == 3:
        return base.astype(base.dtype.newbyteorder(">")), 1
    if kind == 4:       # misaligned but C-contiguous
        buf = np.zeros(base.nbytes + 1, np.uint8)
        a = buf[1:].view(dtype).reshape(shape)
        a[...] = base
        return a, 1
    if kind == 5:
        return base[::-1], 1
    if kind == 6:
        b = base.copy()
        b.flat[::7] = np.nan
        return b, 1
    if kind == 7:
        return np.full(shape, 3.0, dtype), 1     # constant channels
    return base.astype(np.int32), 1


def _vec(rng, C, dtype, out=None):
    kind = rng.integers(12) if rng.random() < 0.3 else [0, 1, 2, 11][rng.integers(4)]
    if kind == 0:
        return None
    if kind == 1:
        return rng.uniform(0.5, 2, C).astype(np.float32)
    if kind == 2:
        return rng.uniform(0.5, 2, C)
    if kind == 3:
        return rng.uniform(0.5, 2, C + 1)
    if kind == 4:
        return [1.0] * C
    if kind == 5:
        return np.arange(C)
    if kind == 6:
        return rng.uniform(0.5, 2, (C, 1))
    if kind == 7 and out is not None and out.size >= C and out.dtype == np.float64:
        return out.reshape(-1)[:C]           # a view of the output
    if kind == 8:
        return rng.uniform(0.5, 2, 2 * C)[::2]
    if kind == 9:
        return rng.uniform(0.5, 2, C).astype(">f8")
    if kind == 10:
        return np.full(C, np.nan)
    return rng.uniform(0.5, 2, C).astype(dtype)


def _scalar(rng, kind_of):
    if rng.random() < 0.8:
        return {"eps": 1e-5, "momentum": 0.1, "axis": 1, "flag": False}[kind_of] \
            if rng.random() < 0.5 else {"eps": 1e-3, "momentum": 0.5, "axis": 1,
                                        "flag": True}[kind_of]
    choices = {
        "eps": [1e-5, 0.0, 0, -1e-5, float("nan"), float("inf"), 10**400, True, "1e-5",
                np.float64(1e-3), 1e308, 5e-324],
        "momentum": [0.1, 0.0, 1.0, 1.5, -0.1, float("nan"), 10**400, None, np.float32(0.5),
                     1],
        "axis": [1, 1, 1, -1, 2**31, -2**63 - 1, 1.0, True, np.int64(1), 5, "1"],
        "flag": [False, True, False, 1, 0, 2, "x", None, np.True_, np.False_],
    }[kind_of]
    return choices[rng.integers(len(choices))]


def _out(rng, x, inputs):
    kind = rng.integers(8)
    if kind <= 2 or not isinstance(x, np.ndarray):
        return None
    if kind == 3:
        return np.full(x.shape, 7, x.dtype)
    if kind == 4:
        return inputs[rng.integers(len(inputs))]          # in place over an input
    if kind == 5:
        o = np.full(x.shape, 7, x.dtype)
        o.flags.writeable = False
        return o
    if kind == 6:
        return np.full(x.shape, 7, np.float64 if x.dtype == np.float32 else np.float32)
    return np.full(x.shape[::-1], 7, x.dtype)


def _make(op, seed):
    """The arguments of one call, built afresh from `seed` (so two runs get equal ones)."""
    rng = np.random.default_rng(seed)
    ndim = int(rng.integers(2, 5))
    shape = tuple(int(s) for s in rng.integers(1, 6, ndim))
    if rng.integers(10) == 0:
        shape = (shape[0], 0) + shape[2:]
    dtype = [np.float32, np.float64][rng.integers(2)]
    x, axis = _x_variants(rng, shape, dtype)
    if rng.integers(5) == 0:
        axis = _scalar(rng, "axis")
    C = x.shape[axis] if isinstance(axis, int) and -x.ndim <= axis < x.ndim else 1
    if op == "moments":
        return (x,), dict(axis=axis)
    if op == "train":
        out = _out(rng, x, [x])
        kw = dict(eps=_scalar(rng, "eps"), axis=axis, momentum=_scalar(rng, "momentum"),
                  out=out, relu=_scalar(rng, "flag"))
        if rng.integers(2):
            rdt = [np.float32, np.float64, ">f8"][rng.integers(3)]
            kw["running_mean"] = np.zeros(C, rdt)
            kw["running_var"] = np.ones(C, rdt)
            if rng.integers(5) == 0 and out is not None and out.dtype == np.float64 and \
                    out.size >= C:
                kw["running_var"] = out.reshape(-1)[:C]
        return (x, _vec(rng, C, dtype, out), _vec(rng, C, dtype, out)), kw
    if op == "infer":
        out = _out(rng, x, [x])
        var = _vec(rng, C, dtype, out)
        if var is not None and rng.integers(4) == 0:
            var = np.where(np.arange(C) == 0, [0.0, -1.0][rng.integers(2)], 1.0)
        return ((x, _vec(rng, C, dtype, out), var, _vec(rng, C, dtype, out),
                 _vec(rng, C, dtype, out)),
                dict(eps=_scalar(rng, "eps"), axis=axis, out=out, relu=_scalar(rng, "flag")))
    assert op == "backward"
    dy = rng.standard_normal(x.shape).astype(x.dtype) if rng.integers(5) else \
        rng.standard_normal(x.shape).astype(np.float64)
    out = _out(rng, x, [x, dy])
    bias = _vec(rng, C, dtype, out)
    return ((dy, x, _vec(rng, C, dtype, out), _vec(rng, C, dtype, out),
             _vec(rng, C, dtype, out)),
            dict(bias=bias, relu=_scalar(rng, "flag"), training=_scalar(rng, "flag"),
                 axis=axis, out=out))


FUNCS = {"moments": bnfast.moments, "train": bnfast.batch_norm_train,
         "infer": bnfast.batch_norm_infer, "backward": bnfast.batch_norm_backward}


def _snapshot(obj):
    if isinstance(obj, np.ndarray):
        return ("a", obj.dtype.str, obj.shape, obj.tobytes())
    if isinstance(obj, (tuple, list)):
        return tuple(_snapshot(o) for o in obj)
    if isinstance(obj, dict):
        return tuple((k, _snapshot(v)) for k, v in sorted(obj.items()))
    return ("o", repr(obj))


def _run(op, seed):
    args, kw = _make(op, seed)
    try:
        r = FUNCS[op](*args, **kw)
        outcome = ("ok", _snapshot(r))
    except (TypeError, ValueError) as exc:
        outcome = (type(exc).__name__, str(exc))
    return outcome, _snapshot((args, kw))


@pytest.mark.parametrize("op", list(FUNCS))
def test_fast_path_accepts_only_what_the_general_path_accepts(op, monkeypatch):
    taken = 0
    calls = {}
    originals = {name: getattr(_core, name) for name in FAST}

    def counting(name):
        def f(*a, **k):
            nonlocal taken
            r = originals[name](*a, **k)
            taken += r is not None
            return r
        return f

    for name in FAST:
        monkeypatch.setattr(_core, name, counting(name))
    fast = [_run(op, (list(FUNCS).index(op), s)) for s in range(N_CALLS)]
    for name in FAST:
        monkeypatch.setattr(_core, name, lambda *a, **k: None)
    general = [_run(op, (list(FUNCS).index(op), s)) for s in range(N_CALLS)]
    for s, (f, g) in enumerate(zip(fast, general)):
        assert f[0] == g[0], (op, s, f[0][:2] if f[0][0] != "ok" else "ok",
                              g[0][:2] if g[0][0] != "ok" else "ok")
        assert f[1] == g[1], (op, s, "arguments left with different bits")
    n_ok = sum(f[0][0] == "ok" for f in fast)
    calls[op] = (N_CALLS, n_ok, taken)
    # the comparison means something only if both outcomes occur and the fast path ran
    assert 0.05 * N_CALLS < n_ok < 0.95 * N_CALLS, calls
    assert taken > 0.02 * N_CALLS, calls


@pytest.mark.parametrize("C", [1, 2, 3, 5, 8, 33, 257, 2048])
@pytest.mark.parametrize("bad", ["nan", "negative", "tiny negative", "-0 with eps 0",
                                 "+0 with eps 0", "-0", "inf", None])
@pytest.mark.parametrize("vdtype", [np.float32, np.float64])
@pytest.mark.parametrize("N", [3, 1])
def test_infer_fast_path_variance_check_at_every_position(C, bad, vdtype, N, monkeypatch):
    """fast_infer's variance check (the kernel's infer_coeffs: eight values a step, a
    scalar tail, blocks of 256 channels; with N = 1, one element per channel, the direct
    walk's check of all of var first) rejects exactly what the general path rejects,
    wherever the bad channel is, and then leaves `out` untouched, also when `out` is x."""
    x = np.random.default_rng(C).standard_normal((N, C)).astype(np.float32)
    walk = bnfast.explain(x, op="infer")["elementwise"]["walk"]
    assert (walk == "direct") == (N == 1), walk
    for pos in sorted({0, min(7, C - 1), min(8, C - 1), C // 2, min(256, C - 1), C - 1}):
        var = np.full(C, 0.5, vdtype)
        eps = 1e-5
        if bad is not None:
            var[pos], eps = {"nan": (np.nan, eps), "negative": (-1.0, eps),
                             "tiny negative": (-1e-30, eps), "-0 with eps 0": (-0.0, 0.0),
                             "+0 with eps 0": (0.0, 0.0), "-0": (-0.0, eps),
                             "inf": (np.inf, eps)}[bad]
        out = np.full_like(x, 7.0)
        got = _core.fast_infer(x, np.zeros(C), var, None, None, eps, 1, out, False, 1)
        accepted = bool(np.all((var >= 0) & (var + vdtype(eps) > 0)))
        assert (got is not None) == accepted, (C, bad, pos)
        if not accepted:
            assert np.all(out == 7.0), (C, bad, pos)
            x_in = x.copy()
            assert _core.fast_infer(x_in, np.zeros(C), var, None, None, eps, 1, x_in, False,
                                    1) is None
            assert x_in.tobytes() == x.tobytes(), (C, bad, pos)
        outcomes = []
        for fast in (True, False):
            if not fast:
                monkeypatch.setattr(_core, "fast_infer", lambda *a, **k: None)
            try:
                outcomes.append(bnfast.batch_norm_infer(x, np.zeros(C), var, eps=eps).tobytes())
            except ValueError as exc:
                outcomes.append(str(exc))
            monkeypatch.undo()
        assert outcomes[0] == outcomes[1], (C, bad, pos)


@pytest.mark.parametrize("isa", bnfast.available_isas())
@pytest.mark.parametrize("C", [1, 9, 255, 256, 263, 520])
def test_inference_parameters_of_mixed_dtypes(isa, C, monkeypatch):
    """Inference with each of mean, var, weight and bias float32 or float64 (16 mixes, and
    weight or bias left out), in the fast path (the kernel table's infer_coeffs widens the
    float32 ones in its pass: blocks of 256 channels, eight a vector, a scalar tail) and
    the general path: the bits of all-float64 parameters, for float32 and float64 data."""
    rng = np.random.default_rng(C)
    p64 = {"m": rng.standard_normal(C), "v": rng.uniform(0.0, 3.0, C),
           "w": rng.standard_normal(C), "b": rng.standard_normal(C)}
    p64 = {k: v.astype(np.float32).astype(np.float64) for k, v in p64.items()}
    p64["v"][C // 2] = 0.0                     # var 0 (with eps 1e-5): accepted
    with bnfast.use_isa(isa):
        for dt in (np.float32, np.float64):
            x = rng.standard_normal((3, C, 2)).astype(dt)
            for mask in range(16):
                p = {k: v.astype(np.float32) if mask >> i & 1 else v
                     for i, (k, v) in enumerate(p64.items())}
                for drop in ((), ("w",), ("b",), ("w", "b")):
                    args = [p["m"], p["v"]] + [None if k in drop else p[k] for k in "wb"]
                    want = bnfast.batch_norm_infer(
                        x, p64["m"], p64["v"], *[None if k in drop else p64[k] for k in "wb"])
                    got = bnfast.batch_norm_infer(x, *args)
                    fast = _core.fast_infer(x, *args, 1e-5, 1, None, False, 2)
                    assert fast is not None
                    with monkeypatch.context() as mp:
                        mp.setattr(_core, "fast_infer", lambda *a, **k: None)
                        general = bnfast.batch_norm_infer(x, *args)
                    assert (got.tobytes() == want.tobytes() == fast.tobytes()
                            == general.tobytes()), (dt, mask, drop)


def test_fast_paths_ask_the_thread_setting_only_where_it_matters():
    """The fast paths take bnfast.get_num_threads itself and call it only where the plan
    could use more than one thread (BN_PAR_MIN = 32768 elements, bn_plan_parallel): a small
    call does not pay for it, a large one follows it."""
    asked = []

    def nthreads():
        asked.append(1)
        return 2

    for shape in [(64, 128), (4, 8, 32, 31), (4, 8, 32, 32)]:
        asked.clear()
        x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
        mean, var = _core.fast_moments(x, 1, nthreads)
        y, m, inv = _core.fast_train(x, None, None, 1e-5, 1, None, None, 0.1, None, False,
                                     nthreads)
        _core.fast_infer(x, mean, var, None, None, 1e-5, 1, None, False, nthreads)
        _core.fast_backward(x, x, m, inv, None, None, False, True, 1, None, nthreads)
        big = x.size >= 32768
        assert len(asked) == (4 if big else 0), (shape, asked)
        with bnfast.num_threads(1):
            y1 = bnfast.batch_norm_train(x)[0]
        assert y1.tobytes() == y.tobytes()


@pytest.mark.parametrize("C", [1, 7, 8, 9, 255, 256, 257, 2051, 40000])
def test_direct_inference_walk(C):
    """One element per channel (N = S = 1): the inference's direct walk (coefficients and
    element in one loop over the channels, BN_PAR_BLOCK channels a block, parameters as
    given or widened) gives the bits of the spans walk, in every variant, on 1 and 2
    threads (40,000 channels: three items), for float32 and float64 data, with and without
    ReLU, weight and bias, parameters of the data's type, float64 or mixed, NaN and -0 in
    x, in place too; and it is close to the float64 twin."""
    from bnfast import reference as ref
    from bnfast._plan import force_strategy
    from conftest import assert_close
    rng = np.random.default_rng(C)
    for dt in (np.float32, np.float64):
        x = (3.0 * rng.standard_normal((1, C)) + 1.0).astype(dt)
        x[0, ::5] = -0.0
        x[0, 3::11] = np.nan
        p64 = {"m": rng.standard_normal(C), "v": rng.uniform(0.0, 3.0, C),
               "w": rng.standard_normal(C), "b": rng.standard_normal(C)}
        p64["v"][::7] = 0.0
        for kind in ("data", "float64", "mixed"):
            p = {k: v.astype(dt if kind == "data" else
                             np.float32 if kind == "mixed" and k in "mw" else np.float64)
                 for k, v in p64.items()}
            for drop in ((), ("w",), ("b",), ("w", "b")):
                args = [p["m"], p["v"]] + [None if k in drop else p[k] for k in "wb"]
                for relu in (False, True):
                    got = {}
                    for walk in ("direct", "spans"):
                        old = force_strategy(elementwise=walk)
                        try:
                            assert bnfast.explain(x, op="infer")["elementwise"]["walk"] == walk
                            for isa in bnfast.available_isas():
                                for nt in (1, 2):
                                    with bnfast.use_isa(isa), bnfast.num_threads(nt):
                                        got[walk, isa, nt] = bnfast.batch_norm_infer(
                                            x, *args, relu=relu)
                                        x_in = x.copy()
                                        bnfast.batch_norm_infer(x_in, *args, relu=relu,
                                                                out=x_in)
                                        assert x_in.tobytes() == got[walk, isa, nt].tobytes()
                        finally:
                            force_strategy(**old)
                    first = next(iter(got.values()))
                    for key, y in got.items():
                        assert y.tobytes() == first.tobytes(), (dt, kind, drop, relu, key)
                    want = ref.batch_norm_infer(x.astype(np.float64), *[
                        None if a is None else a.astype(np.float64) for a in args], relu=relu)
                    assert np.array_equal(np.isnan(first), np.isnan(want))
                    ok = ~np.isnan(want)
                    assert_close(first[ok], want[ok], dtype=dt,
                                 scale=np.abs(want[ok]).max(initial=0.0),
                                 what=f"direct {dt.__name__} {kind} {drop} relu={relu}")
                    nan_bits = first.view(np.uint32 if dt == np.float32 else np.uint64)
                    canon = np.array([np.nan], dt).view(nan_bits.dtype)[0]
                    assert np.all(nan_bits[np.isnan(first)] == canon)


@pytest.mark.parametrize("isa", bnfast.available_isas())
@pytest.mark.parametrize("C", [1, 7, 8, 15, 16, 17, 33, 2048])
def test_float32_parameters_are_widened_exactly(isa, C):
    """Per-channel float32 arrays (mean, var, weight, bias, running statistics, invstd) are
    widened to float64 (the kernel table's widen_f32, with the variant's vectors): the
    results equal those of the same values given as float64, bit for bit, at every channel
    (C around the vector loops' edges), in every variant; float32 running statistics are the float64
    update rounded once."""
    rng = np.random.default_rng(C)
    x = rng.standard_normal((4, C)).astype(np.float32)
    dy = rng.standard_normal((4, C)).astype(np.float32)
    p32 = {k: rng.uniform(0.5, 2.0, C).astype(np.float32) for k in ("m", "v", "w", "b")}
    p64 = {k: v.astype(np.float64) for k, v in p32.items()}
    with bnfast.use_isa(isa):
        got, want = [], []
        for p, out in ((p32, got), (p64, want)):
            out.append(bnfast.batch_norm_infer(x, p["m"], p["v"], p["w"], p["b"]))
            rm, rv = p["m"].copy(), p["v"].copy()
            y, mean, invstd = bnfast.batch_norm_train(x, p["w"], p["b"], running_mean=rm,
                                                      running_var=rv)
            out += [y, mean, invstd, rm, rv]   # float32 statistics: rounded once
            out += list(bnfast.batch_norm_backward(dy, x, p["m"], p["v"], p["w"]))
    for g, w in zip(got, want):
        # the same dtype, or float32 running statistics against float64 ones
        assert g.dtype == w.dtype or (g.dtype == np.float32 and w.dtype == np.float64)
        assert g.tobytes() == w.astype(g.dtype).tobytes()
