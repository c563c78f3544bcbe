"""Every public function over the adversarial inputs of tests/api/adversarial.py.

Each adversarial array is put, alone, in each argument position of each public function
(x, dy, weight, bias, mean, var, invstd, running_mean, running_var, out), and each awkward
scalar in each scalar position (eps, momentum, axis, relu, training).  Every call must either

* return what the float64 reference (bnfast.reference) returns, within a tolerance (float32
  ~1e-5, float64 ~1e-12, relative to the largest value of the result), with results of the
  documented dtype and shape, `out` returned when given; or
* raise TypeError or ValueError whose message names the bad argument;

and no call may modify its inputs (all arguments are compared, byte for byte, with copies
taken before the call, including the bytes of the buffer around a view), except the
documented outputs (`out` and, in training, the running statistics), which may only change
inside the view, and only when the call succeeds.  No call may crash the process.

Which outcome is right depends on the argument position (an int64 array is fine as a weight
but not as data or running statistics); `expectation()` encodes the documented rules.

The tests named test_issue12_* pin the fixes of issue 12's functional-API defects (thread
counts too large; running statistics with strides that are not whole elements, big-endian,
or interleaved with each other; vectors sharing memory with `out`; float64 near the largest
double; masked arrays; relu=True backward without bias; eps=0 on a constant channel; NaN
variance; huge Python ints; flags that are not bools; NaN bits across ISA variants).

Defects these tests find that are still open are listed in `KNOWN`; `known_defect()` sets
their cases aside from the main tests, and a strict-xfail test per defect runs them.  When a
defect is fixed, its test passes, strict xfail reports that as a failure, and the key, its
branch in `known_defect()` and the marker are to be removed (the cases then join the main
tests).  None is open today; the three these tests found (a segfault with a non-array `out`
and running statistics, a NaN mean for a channel holding +inf, NaN or overflow in backward
where the result is +-inf or representable) are fixed and keep their regression tests.

`python tests/api/adversarial.py` prints the number of distinct adversarial inputs; a run of
this file prints it too, with the number of calls checked, in the terminal summary.
"""
import copy
import math
import os
import re
import subprocess
import sys
import tempfile
from functools import lru_cache

import numpy as np
import pytest

import bnfast
from bnfast import reference

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import adversarial as adv_mod  # noqa: E402
from adversarial import Adv  # noqa: E402

from conftest import package_env  # noqa: E402

C = 3
BASE_SHAPE = (4, C, 5)
RTOL = {4: 1e-5, 8: 1e-12}

FUNCS = ["moments", "train", "infer", "backward", "bn_train", "bn_eval"]
# argument positions of each function (arrays, then scalars)
ARRAY_POS = {
    "moments": ["x"],
    "train": ["x", "weight", "bias", "running_mean", "running_var", "out"],
    "infer": ["x", "mean", "var", "weight", "bias", "out"],
    "backward": ["dy", "x", "mean", "invstd", "weight", "bias", "out"],
    "bn_train": ["x", "running_mean", "running_var", "weight", "bias", "out"],
    "bn_eval": ["x", "running_mean", "running_var", "weight", "bias", "out"],
}
SCALAR_POS = {
    "moments": ["axis"],
    "train": ["eps", "axis", "momentum", "relu"],
    "infer": ["eps", "axis", "relu"],
    "backward": ["relu", "training", "axis"],
    "bn_train": ["training", "momentum", "eps", "axis", "relu"],
    "bn_eval": ["training", "momentum", "eps", "axis", "relu"],
}
VECTORS = {"weight", "bias", "mean", "var", "invstd"}
RUNNING = {"running_mean", "running_var"}


# ------------------------------------------------------------------ calling


def _call(mod, fn, a):
    """Call function `fn` of module `mod` (bnfast or bnfast.reference) with args dict `a`."""
    if fn == "moments":
        return mod.moments(a["x"], axis=a["axis"])
    if fn == "train":
        return mod.batch_norm_train(a["x"], a["weight"], a["bias"], eps=a["eps"],
                                    axis=a["axis"], running_mean=a["running_mean"],
                                    running_var=a["running_var"], momentum=a["momentum"],
                                    out=a["out"], relu=a["relu"])
    if fn == "infer":
        return (mod.batch_norm_infer(a["x"], a["mean"], a["var"], a["weight"], a["bias"],
                                     eps=a["eps"], axis=a["axis"], out=a["out"],
                                     relu=a["relu"]),)
    if fn == "backward":
        return mod.batch_norm_backward(a["dy"], a["x"], a["mean"], a["invstd"], a["weight"],
                                       bias=a["bias"], relu=a["relu"],
                                       training=a["training"], axis=a["axis"], out=a["out"])
    if fn in ("bn_train", "bn_eval"):
        return (mod.batch_norm(a["x"], a["running_mean"], a["running_var"], a["weight"],
                               a["bias"], a["training"], a["momentum"], a["eps"],
                               axis=a["axis"], out=a["out"], relu=a["relu"]),)
    raise AssertionError(fn)


def _channels(shape, axis):
    try:
        return shape[axis]
    except (IndexError, TypeError):
        return C


def good_args(fn, x, axis=1, rng=None, dtype=None):
    """Valid arguments for `fn` around data `x` (an Adv), as {name: Adv or scalar}."""
    rng = rng or np.random.default_rng(12)
    shape = np.shape(x.array)
    c = _channels(shape, axis)
    if dtype is None:
        dt = np.asarray(x.array).dtype if x.values is not None else np.dtype(np.float64)
        dtype = dt.newbyteorder("=") if dt.kind == "f" and dt.itemsize in (4, 8) else \
            np.dtype(np.float64)

    def vec(lo, hi, signed):
        v = rng.uniform(lo, hi, c) * (rng.choice([-1.0, 1.0], c) if signed else 1)
        return Adv("good", v, v.copy())

    a = {"x": x, "axis": axis, "eps": 1e-5, "momentum": 0.1, "relu": False,
         "training": True, "out": None, "weight": vec(0.5, 2, True), "bias": vec(-1, 1, True)}
    if fn == "infer":
        a["mean"], a["var"] = vec(-1, 1, True), vec(0.5, 2, False)
    if fn == "backward":
        a["mean"], a["invstd"] = vec(-1, 1, True), vec(0.5, 2, False)
        d = rng.standard_normal(shape).astype(dtype)
        a["dy"] = Adv("good", d, d.astype(np.float64))
    if fn in ("train", "bn_train", "bn_eval"):
        rm, rv = vec(-1, 1, True), vec(0.5, 2, False)
        a["running_mean"], a["running_var"] = rm, rv
        if fn == "train":
            a["running_mean"], a["running_var"] = None, None
    if fn == "bn_train":
        a["training"] = True
    if fn == "bn_eval":
        a["training"] = False
    return a


def _obj(v):
    return v.array if isinstance(v, Adv) else v


def _vals(v):
    return v.values if isinstance(v, Adv) else v


# ------------------------------------------------------------------ snapshots


def _snapshot(v):
    """A copy of everything an argument could let bnfast write to."""
    o = _obj(v)
    if isinstance(o, np.ndarray):
        owner = v.owner if isinstance(v, Adv) and v.owner is not None else None
        return (np.array(o, copy=True, subok=False) if o.dtype.kind != "O"
                else copy.deepcopy(o.tolist()),
                None if owner is None else owner.copy(),
                np.ma.getmaskarray(o).copy() if isinstance(o, np.ma.MaskedArray) else None)
    return copy.deepcopy(o) if not isinstance(o, object) or o is None or isinstance(
        o, (list, tuple, int, float, str)) else None


def _view_on(owner_copy, owner, view):
    off = view.__array_interface__["data"][0] - owner.__array_interface__["data"][0]
    return np.ndarray(view.shape, view.dtype, buffer=owner_copy, offset=off,
                      strides=view.strides)


def _bits(a):
    a = np.asarray(a)
    return np.ascontiguousarray(a).tobytes() if a.dtype.kind != "O" else repr(a.tolist())


def _unchanged(name, v, snap, may_write):
    """'' if argument `v` is as in `snap` (outside the view when it may be written)."""
    o = _obj(v)
    if not isinstance(o, np.ndarray):
        if isinstance(o, list) and o != snap:
            return f"{name} (a list) was modified"
        return ""
    arr, owner_copy, mask = snap
    if mask is not None and not np.array_equal(np.ma.getmaskarray(o), mask):
        return f"the mask of {name} was modified"
    if not may_write:
        if o.dtype.kind == "O":
            if copy.deepcopy(o.tolist()) != arr:
                return f"{name} was modified"
        elif _bits(np.asarray(o)) != _bits(arr):
            return f"{name} was modified"
    if owner_copy is not None:
        owner = v.owner
        if may_write and o.size:
            # accept any change inside the view, none outside
            _view_on(owner_copy, owner, o)[...] = np.asarray(o)
        if owner_copy.tobytes() != owner.tobytes():
            return f"bytes of the buffer under {name}{' outside the view' if may_write else ''} " \
                   "were modified"
    return ""


# ------------------------------------------------------------------ expectations

ACCEPT, REJECT, EITHER = "accept", "reject", "either"


def _is_float_data(adv):
    return adv.values is not None and ({"f32", "f64"} & adv.tags) and "masked" not in adv.tags \
        and isinstance(adv.array, np.ndarray)


def _kind(o):
    return np.asarray(o).dtype.kind if not isinstance(o, np.ma.MaskedArray) else "masked"


def _updates_running(fn, a):
    """Whether the call updates running statistics (if it is given any)."""
    return fn == "train" or (fn in ("bn_train", "bn_eval") and bool(_truth(a["training"])))


def expectation(fn, a, pos):
    """(ACCEPT | REJECT | EITHER, name that a rejection must mention) for args `a` in which
    only position `pos` is adversarial."""
    mode, name = _expectation(fn, a, pos)
    if mode != REJECT:
        zero = _zero_division(fn, a)
        if zero:
            return REJECT, zero
    return mode, name


def _zero_division(fn, a):
    """'eps' or 'var' when eps == 0 meets a zero variance (0/0 = NaN outputs, refused), else
    ''."""
    try:
        eps = float(_obj(a.get("eps", 1e-5)))
    except Exception:  # noqa: BLE001
        return ""
    if fn == "moments" or fn == "backward" or eps != 0:
        return ""
    x = _vals(a["x"])
    if x is None:
        return ""
    x = np.asarray(x, dtype=np.float64)
    try:
        ax = int(_obj(a["axis"])) % x.ndim
    except Exception:  # noqa: BLE001
        return ""
    train = fn == "train" or (fn in ("bn_train", "bn_eval") and (
        _truth(_obj(a["training"])) or _obj(a["running_mean"]) is None))
    if train:
        c = x.shape[ax]
        if not c or not x.size:
            return ""
        xl = np.moveaxis(x, ax, -1).reshape(-1, c)
        const = np.all(xl == xl[:1], axis=0) & np.all(np.isfinite(xl), axis=0)
        return "eps" if const.any() else ""
    var = _vals(a["var" if fn == "infer" else "running_var"])
    if var is None:
        return ""
    return "var" if np.any(np.asarray(var, dtype=np.float64) == 0) else ""


def _expectation(fn, a, pos):
    v = a[pos]
    o = _obj(v)
    tags = v.tags if isinstance(v, Adv) else frozenset()
    x = _obj(a["x"])
    if pos in ("x", "dy"):
        if "masked" in tags:
            return REJECT, pos
        if not _is_float_data(v):
            return REJECT, pos
        if pos == "dy":
            xd = np.asarray(x).dtype
            if np.asarray(o).dtype.itemsize != xd.itemsize:
                return REJECT, "dy"
            return ACCEPT, None
        shape = np.shape(o)
        if len(shape) < 2:
            return REJECT, "x"
        ax = a["axis"] % len(shape)
        c = shape[ax]
        n = math.prod(shape) // c if c else math.prod(s for i, s in enumerate(shape) if i != ax)
        if fn == "train" or (fn in ("bn_train", "bn_eval") and (
                _truth(a["training"]) or a["running_mean"] is None)):
            if n <= 1:
                return REJECT, "x"
        if fn == "moments" and n == 0 and c > 0:
            return REJECT, "x"
        return ACCEPT, None
    training_stats = pos in RUNNING and _updates_running(fn, a)
    if pos in VECTORS or (pos in RUNNING and not training_stats):
        name = pos if pos in VECTORS else pos.replace("running_", "")
        if isinstance(o, np.ma.MaskedArray):
            return REJECT, name
        k = _kind(o)
        if k not in "fiu":
            return REJECT, name
        if np.shape(o) != (_channels(np.shape(x), a["axis"]),):
            return REJECT, name
        if name == "var":
            vv = np.asarray(o, dtype=np.float64)
            if (vv < 0).any() or np.isnan(vv).any():
                return REJECT, name
        return ACCEPT, None
    if pos in RUNNING:
        if not isinstance(o, np.ndarray) or isinstance(o, np.ma.MaskedArray):
            return REJECT, pos
        if o.dtype.kind != "f" or o.dtype.itemsize not in (4, 8):
            return REJECT, pos
        if np.shape(o) != (_channels(np.shape(x), a["axis"]),):
            return REJECT, pos
        if not o.flags.writeable:
            return REJECT, pos
        other = _obj(a["running_var" if pos == "running_mean" else "running_mean"])
        if isinstance(other, np.ndarray) and other.dtype.itemsize != o.dtype.itemsize:
            return REJECT, pos
        if not o.dtype.isnative:
            return EITHER, pos
        return ACCEPT, None
    if pos == "out":
        if not isinstance(o, np.ndarray) or isinstance(o, np.ma.MaskedArray):
            return REJECT, "out"
        xd = np.asarray(x).dtype
        if o.dtype.kind != "f" or o.dtype.itemsize != xd.itemsize:
            return REJECT, "out"
        if o.shape != np.shape(x):
            return REJECT, "out"
        if not o.flags.writeable:
            return REJECT, "out"
        if not o.dtype.isnative:
            return EITHER, "out"
        return ACCEPT, None
    # scalars
    return _scalar_expectation(fn, pos, o, a)


def _truth(v):
    try:
        return bool(v)
    except Exception:
        return None


def _scalar_expectation(fn, pos, v, a):
    import numbers
    if pos in ("relu", "training"):
        return (EITHER if _truth(v) is not None else REJECT), pos
    if isinstance(v, (bool, np.bool_)):
        return EITHER, pos
    if pos == "axis":
        if not isinstance(v, numbers.Integral):
            return REJECT, "axis"
        nd = np.ndim(_obj(a["x"]))
        return (ACCEPT if -nd <= int(v) < nd else REJECT), "axis"
    if not isinstance(v, numbers.Real):
        return REJECT, pos
    try:
        f = float(v)
    except OverflowError:
        return REJECT, pos
    if pos == "eps":
        return (ACCEPT if 0 <= f < math.inf else REJECT), "eps"
    if pos == "momentum":
        return (ACCEPT if 0 <= f <= 1 else REJECT), "momentum"
    raise AssertionError(pos)


def known_defect(fn, a, pos):
    """The key (in KNOWN) of the open defect that makes this case fail today, or None.

    The cases of each open defect are set aside from test_adversarial and run by a strict
    xfail test of their own; when the defect is fixed, that test passes, strict xfail reports
    it, and the key and the marker are to be removed here so the cases join the main tests.
    """
    # No open defect today: the three found by these tests (a segfault with a non-array
    # `out` and running statistics, a NaN mean for a channel holding +inf, NaN where
    # backward's result is +-inf or representable) are fixed, and their cases run in
    # test_adversarial and in the regression tests below.
    return None


# ------------------------------------------------------------------ the oracle


def _scaled_reference(fn, vals):
    """The reference for float64 data near the largest double: the statistics of x * 2**-64
    scaled back (exact for powers of two), so that the reference itself does not overflow."""
    k = 2.0 ** -64
    vals = dict(vals)
    x = vals["x"]
    vals["x"] = x * k
    if fn == "moments":
        m, var = _call(reference, fn, vals)
        with np.errstate(over="ignore"):
            return m / k, var / k / k
    vals["eps"] = vals["eps"] * k * k
    rm, rv = vals.get("running_mean"), vals.get("running_var")
    has_rs = rm is not None and (fn == "train" or bool(vals["training"]))
    if has_rs:
        rm0, rv0 = rm.copy(), rv.copy()
    res = list(_call(reference, fn, vals))
    if fn == "train":
        m, inv = res[1], res[2]
        res[1], res[2] = m / k, inv * k
    if has_rs:
        _, var = _call(reference, "moments", {"x": vals["x"], "axis": vals["axis"]})
        x2 = np.asarray(x)
        n = x2.size // x2.shape[vals["axis"]]
        mom = vals["momentum"]
        m, _ = reference.moments(vals["x"], axis=vals["axis"])
        with np.errstate(over="ignore", invalid="ignore"):
            rm[...] = (1 - mom) * rm0 + mom * (m / k)
            rv[...] = (1 - mom) * rv0 + mom * ((var / k / k) * n / (n - 1))
    return tuple(res)


def _ref_args(a):
    vals = {}
    for k, v in a.items():
        if isinstance(v, Adv):
            vals[k] = None if v.values is None else np.array(v.values, dtype=np.float64)
            if k in RUNNING and type(v.array) in (np.ndarray, np.memmap, adv_mod.MyArray) \
                    and v.array.dtype.kind == "f":
                # updated in place by earlier calls: their values now
                vals[k] = np.array(v.array, dtype=np.float64)
        else:
            vals[k] = v
    # (invalid scalars stay as they are: such a call must be refused, the reference is not
    # consulted)
    for k, conv in (("relu", bool), ("training", bool), ("eps", float), ("momentum", float),
                    ("axis", int)):
        try:
            vals[k] = conv(vals[k])
        except Exception:  # noqa: BLE001
            pass
    return vals


def _compare(got, exp, rdtype, what, rtol=None, scale=None):
    """'' if got (bnfast) matches exp (reference, float64) once exp is rounded to rdtype.

    The bound is rtol * (|exp| + scale): `scale` (default: the largest finite |exp|; may be
    an array broadcasting against the result's last axis... or a per-channel vector for
    per-channel results) is the magnitude the result was computed from, so that the
    rounding error of a cancelling sum is judged fairly.
    """
    got = np.asarray(got)
    with np.errstate(over="ignore"):
        e = np.asarray(exp, dtype=np.float64).astype(rdtype).astype(np.float64)
    if got.shape != e.shape:
        return f"{what}: shape {got.shape} != {e.shape}"
    g = got.astype(np.float64)
    if not np.array_equal(np.isnan(g), np.isnan(e)):
        i = np.argwhere(np.isnan(g) != np.isnan(e))[0]
        return f"{what}: NaN pattern differs (at {tuple(i)}: got {g[tuple(i)]!r}, " \
               f"expected {e[tuple(i)]!r})"
    gi, ei = np.isinf(g), np.isinf(e)
    if not np.array_equal(np.where(gi, g, 0), np.where(ei, e, 0)):
        i = np.argwhere((gi != ei) | (gi & (g != e)))[0]
        return f"{what}: inf pattern differs (at {tuple(i)}: got {g[tuple(i)]!r}, " \
               f"expected {e[tuple(i)]!r})"
    fin = np.isfinite(e)
    if not fin.any():
        return ""
    if scale is None:
        scale = np.max(np.abs(e[fin]))
    with np.errstate(invalid="ignore"):
        scale = np.nan_to_num(np.broadcast_to(np.asarray(scale, dtype=np.float64), e.shape),
                              nan=np.inf)[fin]
    if rtol is None:
        rtol = RTOL[np.dtype(rdtype).itemsize]
    tiny = np.finfo(rdtype).tiny
    diff = np.abs(g[fin] - e[fin])
    with np.errstate(over="ignore", invalid="ignore"):
        bound = rtol * (np.abs(e[fin]) + scale) + tiny
    if (diff > bound).any():
        j = np.argmax(np.where(diff > bound, diff - np.nan_to_num(bound), -1))
        return f"{what}: got {g[fin][j]!r}, expected {e[fin][j]!r} (rtol {rtol:g})"
    return ""


def _error_scales(fn, v, mscale, vscale, rtol):
    """Per-result magnitudes that bound the rounding error of a correct float64 computation
    (first-order forward error analysis), so that ill-conditioned but legitimate inputs (a
    channel of 1000.0001 and 1000.0002: the mean is known to ~1e-13, its spread is 5e-5) are
    judged fairly.  Per-channel vectors are shaped to broadcast against the results."""
    x = np.asarray(v["x"], dtype=np.float64)
    ax = v["axis"] % x.ndim
    c = x.shape[ax]
    bshape = [1] * x.ndim
    bshape[ax] = c

    def vec(name, default):
        a = v.get(name)
        return np.full(c, float(default)) if a is None else np.abs(np.asarray(a, np.float64))

    def per_channel(a):
        a = np.moveaxis(np.abs(np.where(np.isfinite(a), a, 0.0)), ax, -1)
        return a.reshape(a.size // c if c else 0, c)

    def chan_max(a):
        a = per_channel(a)
        return a.max(axis=0) if a.shape[0] else np.zeros(c)

    w, b = vec("weight", 1.0), vec("bias", 0.0)
    train = fn in ("moments", "train") or (fn in ("bn_train", "bn_eval") and (
        v["training"] or v["running_mean"] is None))
    if fn == "backward":
        dy = np.asarray(v["dy"], dtype=np.float64)
        m, inv = vec("mean", 0.0), vec("invstd", 1.0)
        xm = chan_max(x) + m                       # |x| + |mean|, bounds |x - mean|
        n = max(x.size // c, 1) if c else 1
        sdy = per_channel(dy).sum(axis=0)
        sdw = sdy * xm * inv
        dx = w * inv * (chan_max(dy) + sdy / n + xm * inv * sdw / n)
        if not v["training"]:
            dx = w * inv * chan_max(dy)
        return {"dx": dx.reshape(bshape), "dweight": sdw, "dbias": sdy}
    if train:
        eps = v["eps"]
        _, var = reference.moments(np.where(np.isfinite(x), x, 0.0), axis=ax) if x.size \
            else (None, np.zeros(c))
        inv = 1.0 / np.sqrt(var + eps)
        # var is known to +-rtol * vscale: invstd lies between lo and hi
        delta = rtol * vscale
        lo = 1.0 / np.sqrt(var + eps + delta)
        hi = 1.0 / np.sqrt(np.maximum(var - delta, 0.0) + eps)
        inv_scale = np.maximum(hi - inv, inv - lo) / rtol
        y = w * (hi * mscale + np.sqrt(vscale) * inv_scale) + b
        return {"mean": mscale, "var": vscale, "invstd": inv_scale, "y": y.reshape(bshape)}
    # inference: given statistics
    m = vec("mean" if fn == "infer" else "running_mean", 0.0)
    var = vec("var" if fn == "infer" else "running_var", 1.0)
    y = (chan_max(x) + m) * w / np.sqrt(var + v["eps"]) + b
    return {"y": y.reshape(bshape)}


def _constant_channels_exact(fn, v, got):
    """A channel whose values are all equal (and finite) has exactly that mean, variance 0,
    and (training, eps > 0) normalises to exactly bias (README: "a float32 channel constant
    at 1e7 normalises to exactly beta")."""
    train = fn in ("moments", "train") or (fn in ("bn_train", "bn_eval") and (
        v["training"] or v["running_mean"] is None))
    if not train:
        return ""
    x = np.asarray(v["x"], dtype=np.float64)
    ax = v["axis"] % x.ndim
    c = x.shape[ax]
    if not c or x.size <= c:
        return ""
    xl = np.moveaxis(x, ax, -1).reshape(-1, c)
    const = np.all(xl == xl[:1], axis=0) & np.all(np.isfinite(xl), axis=0)
    if not const.any():
        return ""
    idx = np.flatnonzero(const)
    if fn in ("moments", "train"):
        mean = got[0] if fn == "moments" else got[1]
        if not np.array_equal(mean[idx], xl[0, idx], equal_nan=True):
            return f"constant channels {idx.tolist()}: mean {mean[idx]} != {xl[0, idx]}"
        if fn == "moments" and np.any(got[1][idx] != 0):
            return f"constant channels {idx.tolist()}: var {got[1][idx]} != 0"
    if fn != "moments" and v["eps"] > 0:
        w = np.ones(c) if v.get("weight") is None else np.asarray(v["weight"], np.float64)
        idx = idx[np.isfinite(w[idx])]          # (0 * inf is NaN)
        b = np.zeros(c) if v.get("bias") is None else np.asarray(v["bias"], np.float64)
        want = np.maximum(b, 0.0) if v["relu"] else b
        y = np.moveaxis(np.asarray(got[0], dtype=np.float64), ax, -1).reshape(-1, c)
        rd = np.asarray(got[0]).dtype
        exp = want.astype(rd).astype(np.float64)
        if not np.array_equal(y[:, idx], np.broadcast_to(exp[idx], y[:, idx].shape),
                              equal_nan=True):
            return f"constant channels {idx.tolist()}: y is not exactly bias {exp[idx]}"
    return ""


def _channel_scales(x, axis):
    """Per-channel magnitudes of what the statistics are computed from: mean |x| for the
    mean, mean x**2 for the variance (inf when that overflows: no bound on finite values)."""
    x = np.asarray(x, dtype=np.float64)
    c = x.shape[axis]
    xl = np.moveaxis(x, axis, -1).reshape(x.size // c if c else 0, c)
    with np.errstate(all="ignore"):
        fin = np.where(np.isfinite(xl), xl, 0.0)
        n = max(xl.shape[0], 1)
        return np.abs(fin).sum(axis=0) / n, (fin * fin).sum(axis=0) / n


def _result_dtype(a):
    xd = np.asarray(_obj(a["x"])).dtype
    return np.dtype(xd.newbyteorder("="))


def check_case(fn, a, pos):
    """Run one case; return '' on success or a description of the failure."""
    mode, name = expectation(fn, a, pos)
    label = a[pos].label if isinstance(a[pos], Adv) else repr(a[pos])
    where = f"{fn}({pos}={label})"
    may_write = {"out"} | (RUNNING if _updates_running(fn, a) else set())
    if a.get("out") is not None:
        # in place: the argument that is `out` itself is written
        may_write |= {k for k, v in a.items() if k != "out" and v is a["out"]}
    snaps = {k: _snapshot(v) for k, v in a.items()}
    args = {k: _obj(v) for k, v in a.items()}
    vals = _ref_args(a)        # copies, taken before the call (out may be x itself)
    try:
        with np.errstate(all="ignore"):
            got = _call(bnfast, fn, args)
    except (TypeError, ValueError) as e:
        msg = str(e)
        if mode == ACCEPT:
            return f"{where}: raised {type(e).__name__}({msg!r}) for a valid input"
        if pos == "running_mean" or pos == "running_var" and fn == "bn_eval":
            pat = rf"{name}|running_{name}"
        elif name == "x":
            pat = r"\bx\b|input"
        else:
            pat = rf"\b{re.escape(name)}\b|{re.escape(name)}"
        if name and not re.search(pat, msg):
            return f"{where}: {type(e).__name__}({msg!r}) does not name {name}"
        if pos in RUNNING and mode == EITHER and not re.search(r"byte|endian|order", msg):
            return f"{where}: refusing byte-swapped {pos} should say why ({msg!r})"
        for k, v in a.items():
            bad = _unchanged(k, v, snaps[k], False)
            if bad:
                return f"{where}: raised, but {bad}"
        return ""
    except Exception as e:  # noqa: BLE001
        return f"{where}: raised {type(e).__name__}({e!r})"
    if mode == REJECT:
        return f"{where}: accepted an invalid input (should raise naming {name})"
    # accepted: compare with the reference
    if pos in ("relu", "training"):
        vals[pos] = bool(args[pos])
    rs = {}
    for k in RUNNING:
        if vals.get(k) is not None:
            rs[k] = vals[k]
    tags = a["x"].tags if isinstance(a["x"], Adv) else frozenset()
    with np.errstate(all="ignore"):
        if "huge" in tags and "f64" in tags and fn in ("moments", "train", "bn_train"):
            exp = _scaled_reference(fn, vals)
        elif "huge" in tags and "f64" in tags and fn == "backward":
            # dx, dweight and dbias are linear in dy: the reference on dy * 2**-64, scaled
            # back, has no overflowing intermediate (x * dweight) where the result is finite
            k = 2.0 ** -64
            exp = tuple(r / k for r in _call(reference, fn, dict(vals, dy=vals["dy"] * k)))
        else:
            exp = _call(reference, fn, vals)
    rdt = _result_dtype(a)
    if len(got) != len(exp):
        return f"{where}: {len(got)} results, expected {len(exp)}"
    out = args["out"]
    if out is not None and got[0] is not out:
        return f"{where}: the result is not the out array"
    kinds = {"moments": ["mean", "var"], "train": ["y", "mean", "invstd"],
             "backward": ["dx", "dweight", "dbias"]}.get(fn, ["y"])
    rtol = RTOL[rdt.itemsize]
    mscale, vscale = _channel_scales(vals["x"], vals["axis"])
    with np.errstate(all="ignore"):
        scales = _error_scales(fn, vals, mscale, vscale, rtol)
    for g, e, kind in zip(got, exp, kinds):
        if not isinstance(g, np.ndarray):
            return f"{where}: {kind} is a {type(g).__name__}"
        want = np.float64 if kind in ("mean", "var", "invstd") else rdt
        if g.dtype != want:
            return f"{where}: {kind} has dtype {g.dtype}, expected {np.dtype(want)}"
        bad = _compare(g, e, want, f"{where} {kind}", rtol, scales.get(kind))
        if bad:
            return bad
    bad = _constant_channels_exact(fn, vals, got)
    if bad:
        return f"{where}: {bad}"
    for k, ref_v in rs.items():
        if k in may_write:
            o = args[k]
            odt = o.dtype.newbyteorder("=")
            sc = np.abs(vals[k]) + (mscale if k == "running_mean" else vscale)
            bad = _compare(o, ref_v, odt, f"{where} updated {k}",
                           max(rtol, RTOL[odt.itemsize]), sc)
            if bad:
                return bad
    for k, v in a.items():
        bad = _unchanged(k, v, snaps[k], k in may_write and (k != "out" or out is not None))
        if bad:
            return f"{where}: {bad}"
    return ""


# ------------------------------------------------------------------ the cases


def _x_variants():
    rng = np.random.default_rng(1)
    base = rng.standard_normal(BASE_SHAPE) * 2 + 0.5
    res = [(v, 1) for v in adv_mod.dtype_variants(base, "x")]
    for dt in ("<f4", "<f8", ">f8"):
        res += [(v, 1) for v in adv_mod.layouts(base.astype(dt), "x")]
    for dt in (np.float32, np.float64):
        for v in adv_mod.data_shapes(dt, rng):
            res += [(v, 1), (v, -1)]
        res += [(v, 1) for v in adv_mod.special_data((6, C, 7), dt, rng)]
    return res


def _plain_x(dtype=np.float64, shape=BASE_SHAPE, seed=2):
    a = (np.random.default_rng(seed).standard_normal(shape) * 2 + 0.5).astype(dtype)
    return Adv(f"{np.dtype(dtype).str}{list(shape)}", a, a.astype(np.float64), None,
               frozenset({"f32" if np.dtype(dtype).itemsize == 4 else "f64", "c"}))


@lru_cache(maxsize=None)
def all_cases():
    """[(fn, pos, args)] for every function, position and adversarial input."""
    cases = []
    rng = np.random.default_rng(3)
    for xv, axis in _x_variants():
        for fn in FUNCS:
            cases.append((fn, "x", good_args(fn, xv, axis)))
    for dtype in (np.float64, np.float32):
        x = _plain_x(dtype)
        for fn in FUNCS:
            for pos in ARRAY_POS[fn]:
                if pos == "x":
                    continue
                if pos in VECTORS or pos in RUNNING:
                    if dtype == np.float32 and pos not in RUNNING:
                        continue
                    variants = adv_mod.vector_variants(
                        C, rng, positive=pos in ("var", "invstd", "running_var"), tag=pos)
                elif pos == "dy":
                    d = rng.standard_normal(BASE_SHAPE)
                    variants = list(adv_mod.dtype_variants(d, "dy"))
                    for dt in ("<f4", "<f8", ">f8", ">f4"):
                        variants += list(adv_mod.layouts(d.astype(dt), "dy"))
                elif pos == "out":
                    z = np.zeros(BASE_SHAPE)
                    variants = list(adv_mod.dtype_variants(z, "out"))
                    for dt in sorted({np.dtype(dtype).str, "<f8", ">" + np.dtype(dtype).str[1:]}):
                        variants += [v for v in adv_mod.layouts(z.astype(dt), "out")]
                    variants += [Adv("out:shape" + str(s), np.zeros(s, dtype), None, None,
                                     frozenset({"badshape"}))
                                 for s in [(4, C), (4, C, 6), (5, C, 5), (5, C, 4)]]
                    variants.append(Adv("out:list", z.tolist(), None, None,
                                        frozenset({"list"})))
                for v in variants:
                    if fn in ("train", "bn_train") and pos in RUNNING:
                        # both running statistics present: the other one is a good array
                        a = good_args(fn, x)
                        if fn == "train":
                            g = good_args("bn_train", x)
                            a["running_mean"], a["running_var"] = g["running_mean"], \
                                g["running_var"]
                            a["running_mean"] = Adv("good", a["running_mean"].array.copy(),
                                                    a["running_mean"].values)
                    else:
                        a = good_args(fn, x)
                    a[pos] = v
                    cases.append((fn, pos, a))
    # scalars
    for fn in FUNCS:
        for pos in SCALAR_POS[fn]:
            for label, s in adv_mod.bad_scalars():
                x = _plain_x(np.float32 if fn in ("train", "infer") else np.float64)
                axis = 1
                if pos == "axis" and isinstance(s, (int, np.integer)) and \
                        not isinstance(s, (bool, np.bool_)) and -3 <= int(s) < 3:
                    axis = int(s)
                a = good_args(fn, x, axis)
                if fn == "train" and pos == "momentum":
                    g = good_args("bn_train", x, axis)
                    a["running_mean"], a["running_var"] = g["running_mean"], g["running_var"]
                a[pos] = s
                cases.append((fn, pos, a))
    return cases


def _select(fn=None, pos=None, item=None):
    res = []
    for f, p, a in all_cases():
        if fn is not None and f != fn:
            continue
        if pos is not None and p != pos:
            continue
        k = known_defect(f, a, p)
        if k == item:
            res.append((f, p, a))
    return res


SUMMARY = {"cases": 0, "failed": 0, "failed-known": 0}


class _Summary:
    def pytest_terminal_summary(self, terminalreporter):
        if SUMMARY["cases"]:
            total, _ = adv_mod.count_inputs()
            terminalreporter.section("bnfast adversarial inputs")
            terminalreporter.write_line(
                f"{total} distinct adversarial inputs (tests/api/adversarial.py); "
                f"{SUMMARY['cases']} calls checked ({len(all_cases())} function/position/"
                f"input cases, {sum(1 for c in all_cases() if known_defect(c[0], c[2], c[1]))}"
                f" of them in the domain of an open defect); failed: {SUMMARY['failed']}, and "
                f"{SUMMARY['failed-known']} of the open defects' cases (strict xfail)")


@pytest.fixture(scope="module", autouse=True)
def _report(request):
    request.config.pluginmanager.register(_Summary(), "bnfast-adversarial-summary")
    yield


def _matching(pred):
    """The cases (outside the open defects) for which pred(fn, pos, args) holds."""
    res = [(f, p, a) for f, p, a in all_cases() if known_defect(f, a, p) is None
           and pred(f, p, a)]
    assert res, "no cases"
    return res


def _run(cases):
    failures = []
    for f, p, a in cases:
        msg = check_case(f, a, p)
        if msg:
            failures.append(msg)
            SUMMARY["failed-known" if known_defect(f, a, p) else "failed"] += 1
    SUMMARY["cases"] += len(cases)
    assert not failures, f"{len(failures)} of {len(cases)} cases failed:\n" + \
        "\n".join(failures[:40])


POSITIONS = sorted({(f, p) for f in FUNCS for p in ARRAY_POS[f] + SCALAR_POS[f]})


@pytest.mark.parametrize("fn,pos", POSITIONS, ids=[f"{f}-{p}" for f, p in POSITIONS])
def test_adversarial(fn, pos):
    cases = _select(fn, pos)
    assert cases or pos in ("relu",), "no cases"
    _run(cases)


ISA_VALUES = ["avx9", "", "AVX2", " avx2", "avx2\x00", b"avx2", "auto", "best", "baseline",
              "Baseline "]


def test_isa_control_adversarial():
    """set_isa / use_isa with awkward names: accepted (the variant then in use is one this
    CPU has) or TypeError/ValueError naming the instruction set; a refusal changes
    nothing."""
    failures = []
    values = ISA_VALUES + [s for _, s in adv_mod.bad_scalars()]
    for v in values:
        for how in ("set_isa", "use_isa"):
            before = bnfast.get_isa()
            try:
                if how == "set_isa":
                    bnfast.set_isa(v)
                else:
                    with bnfast.use_isa(v):
                        assert bnfast.get_isa() in bnfast.available_isas()
            except (TypeError, ValueError) as e:
                if not re.search(r"instruction set|isa", str(e), re.I):
                    failures.append(f"{how}({v!r}): {e!r} does not name the instruction set")
                if bnfast.get_isa() != before:
                    failures.append(f"{how}({v!r}) failed but changed the variant")
            except Exception as e:  # noqa: BLE001
                failures.append(f"{how}({v!r}): {e!r}")
            else:
                if bnfast.get_isa() not in bnfast.available_isas():
                    failures.append(f"{how}({v!r}) selected {bnfast.get_isa()!r}")
            bnfast.set_isa(before)
    assert not failures, "\n".join(failures)


def test_thread_control_adversarial():
    """set_num_threads / num_threads with awkward values (small enough to run in process;
    huge ones: test_known_threads): accepted, with the same results, or TypeError/ValueError
    naming the thread count; a refusal changes nothing."""
    x = np.random.default_rng(8).standard_normal((16, 4, 3000))
    ref = bnfast.batch_norm_train(x)[0]
    failures = []
    values = [s for _, s in adv_mod.bad_scalars()] + [2, 3, 64, np.int32(2)]
    for v in values:
        if isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_)) \
                and int(v) > 64:
            continue
        for how in ("set_num_threads", "num_threads"):
            before = bnfast.get_num_threads()
            try:
                if how == "set_num_threads":
                    bnfast.set_num_threads(v)
                    y = bnfast.batch_norm_train(x)[0]
                else:
                    with bnfast.num_threads(v):
                        y = bnfast.batch_norm_train(x)[0]
            except (TypeError, ValueError) as e:
                if "thread" not in str(e):
                    failures.append(f"{how}({v!r}): {e!r} does not name the thread count")
                if bnfast.get_num_threads() != before:
                    failures.append(f"{how}({v!r}) failed but changed the thread count")
            except Exception as e:  # noqa: BLE001
                failures.append(f"{how}({v!r}): {e!r}")
            else:
                if not np.array_equal(y, ref):
                    failures.append(f"{how}({v!r}): results differ")
            bnfast.set_num_threads(None)
    assert not failures, "\n".join(failures)


def test_input_count():
    total, fam = adv_mod.count_inputs()
    assert total >= 200
    print(f"\n{total} distinct adversarial inputs: {fam}")


def test_every_isa_agrees_on_adversarial_data():
    """The float inputs with special values give the same bits (up to NaN signs, item 12)
    under every kernel variant."""
    isas = bnfast.available_isas()
    if len(isas) < 2:
        pytest.skip("one kernel variant on this CPU")
    rng = np.random.default_rng(5)
    for dt in (np.float32, np.float64):
        for v in adv_mod.special_data((6, C, 7), dt, rng):
            for fn in FUNCS:
                a = {k: _obj(w) for k, w in good_args(fn, v).items()}
                outs = []
                for isa in isas:
                    with bnfast.use_isa(isa), np.errstate(all="ignore"):
                        outs.append(_call(bnfast, fn, a))
                for isa, r in zip(isas[1:], outs[1:]):
                    for g, e in zip(r, outs[0]):
                        g, e = np.asarray(g), np.asarray(e)
                        # NaNs compare by position only here (their sign: item 12)
                        gn, en = np.isnan(g), np.isnan(e)
                        assert np.array_equal(gn, en), (fn, v.label, isa)
                        assert np.array_equal(np.where(gn, 0, g), np.where(en, 0, e)), \
                            (fn, v.label, isa)


# ------------------------------------------------------------------ known defects (issue 12)

KNOWN = {}


def _xfail(key):
    return pytest.mark.xfail(strict=True, reason=f"new defect found by the adversarial "
                                                 f"tests: {KNOWN[key]}")


def test_issue12_threads():
    """Thread counts beyond what the system can run are refused (naming the thread count)
    or clamped; the kernels still compute the right answer.  In a subprocess: it crashes."""
    code = r"""
import numpy as np, bnfast
x = np.random.default_rng(0).standard_normal((64, 8, 4096))
ref = bnfast.batch_norm_train(x)[0]
for n in (100000, 2**31 - 1, 2**31, 2**63, 10**400):
    try:
        bnfast.set_num_threads(n)
    except (TypeError, ValueError) as e:
        assert "thread" in str(e), repr(e)
        continue
    y = bnfast.batch_norm_train(x)[0]
    assert np.allclose(y, ref, rtol=1e-12, atol=1e-12), n
    bnfast.set_num_threads(None)
    try:
        with bnfast.num_threads(n):
            y = bnfast.batch_norm_train(x)[0]
        assert np.allclose(y, ref, rtol=1e-12, atol=1e-12), n
    except (TypeError, ValueError) as e:
        assert "thread" in str(e), repr(e)
print("ok")
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env=package_env(), timeout=300, cwd=tempfile.gettempdir())
    assert r.returncode == 0 and "ok" in r.stdout, (r.returncode, r.stderr[-2000:])


def test_issue12_running_odd_stride():
    _run(_matching(lambda f, p, a: p in RUNNING and _updates_running(f, a) and isinstance(_obj(a[p]), np.ndarray) and _obj(a[p]).dtype.kind == "f" and any(st % _obj(a[p]).dtype.itemsize for st in _obj(a[p]).strides)))


def _share_out_cases():
    """Per-channel vectors that are views into `out`."""
    cases = []
    for fn in ("train", "infer", "backward", "bn_train", "bn_eval"):
        for pos in ARRAY_POS[fn]:
            if pos not in VECTORS and pos not in RUNNING:
                continue
            for where in ("start", "middle", "end"):
                x = _plain_x()
                a = good_args(fn, x)
                if fn == "train" and pos in RUNNING:
                    g = good_args("bn_train", x)
                    a["running_mean"], a["running_var"] = g["running_mean"], g["running_var"]
                if a.get(pos) is None:
                    continue
                out = np.zeros(BASE_SHAPE)
                flat = out.reshape(-1)
                i = {"start": 0, "middle": 17, "end": flat.size - C}[where]
                vec = flat[i:i + C]
                vec[...] = a[pos].values
                a["out"] = Adv("out", out, None)
                a[pos] = Adv(f"{pos} inside out ({where})", vec, vec.copy(), None,
                             frozenset({"f64", "shares-out"}))
                cases.append((fn, pos, a))
    return cases


def check_share_out(fn, a, pos):
    """Either the result equals the reference computed from the vector's value before the
    call, or a TypeError/ValueError names the vector or out."""
    args = {k: _obj(v) for k, v in a.items()}
    vals = _ref_args(a)
    where = f"{fn}({a[pos].label})"
    try:
        with np.errstate(all="ignore"):
            got = _call(bnfast, fn, args)
    except (TypeError, ValueError) as e:
        if not re.search(rf"{pos}|out", str(e)):
            return f"{where}: {e!r} names neither {pos} nor out"
        return ""
    exp = _call(reference, fn, vals)
    for g, e in zip(got, exp):
        bad = _compare(g, e, np.float64, where)
        if bad:
            return bad
    for k in RUNNING:
        if k != pos and vals.get(k) is not None and (fn == "train" or fn == "bn_train"):
            bad = _compare(args[k], vals[k], np.float64, f"{where} {k}")
            if bad:
                return bad
    return ""


def test_issue12_shares_out():
    cases = _share_out_cases()
    failures = [m for f, p, a in cases if (m := check_share_out(f, a, p))]
    assert not failures, "\n".join(failures)


def test_issue12_huge_float64():
    _run(_matching(lambda f, p, a: p == "x" and {"huge", "f64"} <= a[p].tags and f in ("moments", "train", "bn_train")))


def test_issue12_masked():
    _run(_matching(lambda f, p, a: isinstance(a[p], Adv) and "masked" in a[p].tags))


def test_issue12_relu_no_bias():
    """relu=True without bias is refused with an error naming bias: the ReLU's gradient mask
    depends on the forward's bias, so silently assuming 0 gives a wrong gradient when the
    forward had one (the issue-12 decision; the reference assumes 0)."""
    failures = []
    for dtype in (np.float32, np.float64):
        for shape, axis in [((4, C, 5), 1), ((6, C), 1), ((3, 4, C), -1)]:
            rng = np.random.default_rng(6)
            x = rng.standard_normal(shape).astype(dtype)
            dy = rng.standard_normal(shape).astype(dtype)
            for variant in ("plain", "fortran"):
                xx = x if variant == "plain" else np.asfortranarray(x)
                _, m, inv = bnfast.batch_norm_train(xx, axis=axis)
                for training in (True, False):
                    w = f"{np.dtype(dtype)} {shape} {variant} training={training}"
                    try:
                        bnfast.batch_norm_backward(dy, xx, m, inv, relu=True,
                                                   training=training, axis=axis)
                    except (TypeError, ValueError) as e:
                        if "bias" not in str(e):
                            failures.append(f"{w}: {e!r} does not name bias")
                        continue
                    failures.append(f"{w}: accepted relu=True without bias")
    assert not failures, "\n".join(failures)


def test_issue12_eps0_constant():
    """eps=0 on a constant channel: y is beta there (x - mean is exactly 0), or eps=0 is
    refused naming eps."""
    failures = []
    for dtype in (np.float32, np.float64):
        x = np.random.default_rng(7).standard_normal((5, C, 4)).astype(dtype)
        x[:, 1] = 2.5
        w, b = np.array([1.0, 2.0, -1.0]), np.array([0.5, -0.25, 1.0])
        calls = {
            "train": lambda: bnfast.batch_norm_train(x, w, b, eps=0)[0],
            "train_relu": lambda: bnfast.batch_norm_train(x, w, b, eps=0, relu=True)[0],
            "bn_train": lambda: bnfast.batch_norm(x, None, None, w, b, True, 0.1, 0.0),
            "channels_last": lambda: bnfast.batch_norm_train(
                np.ascontiguousarray(np.moveaxis(x, 1, -1)), w, b, eps=0.0, axis=-1)[0][..., 1],
        }
        for name, call in calls.items():
            try:
                y = call()
            except (TypeError, ValueError) as e:
                if "eps" not in str(e):
                    failures.append(f"{dtype} {name}: {e!r} does not name eps")
                continue
            ych = y if name == "channels_last" else y[:, 1]
            want = max(b[1], 0) if name == "train_relu" else b[1]
            if not np.all(ych == want):
                failures.append(f"{np.dtype(dtype)} {name}: constant channel gives "
                                f"{np.unique(ych)}, expected {want}")
    assert not failures, "\n".join(failures)


def test_issue12_nan_var():
    _run(_matching(lambda f, p, a: p in ("var", "running_var") and f in ("infer", "bn_eval") and isinstance(a[p], Adv) and "nan" in a[p].tags))


def test_issue12_huge_int():
    _run(_matching(lambda f, p, a: p in ("eps", "momentum", "axis") and type(a[p]) is int and abs(a[p]) >= 2 ** 31))


def test_issue12_running_bigendian():
    _run(_matching(lambda f, p, a: p in RUNNING and isinstance(a[p], Adv) and "bigendian" in a[p].tags))


def _interleaved():
    x = _plain_x()
    res = []
    s = np.zeros(C, dtype=[("m", "f8"), ("v", "f8")])
    res.append(("fields", s["m"], s["v"]))
    buf = np.zeros(2 * C)
    res.append(("even/odd", buf[0::2], buf[1::2]))
    buf32 = np.zeros(2 * C, np.float32)
    res.append(("even/odd float32", buf32[0::2], buf32[1::2]))
    buf2 = np.zeros(2 * C)
    res.append(("reversed/odd", buf2[-2::-2], buf2[1::2]))
    return x, res


def test_issue12_interleaved():
    x, pairs = _interleaved()
    failures = []
    for label, rm, rv in pairs:
        rm[...] = [0.1, 0.2, 0.3]
        rv[...] = [1.0, 2.0, 3.0]
        erm, erv = rm.astype(np.float64), rv.astype(np.float64)
        reference.batch_norm_train(x.array, running_mean=erm, running_var=erv)
        try:
            bnfast.batch_norm_train(x.array, running_mean=rm, running_var=rv)
        except (TypeError, ValueError) as e:
            failures.append(f"{label}: {e!r}")
            continue
        tol = 1e-6 if rm.dtype == np.float32 else 1e-12
        if not (np.allclose(rm, erm, rtol=tol) and np.allclose(rv, erv, rtol=tol)):
            failures.append(f"{label}: {rm} {rv} != {erm} {erv}")
    assert not failures, "\n".join(failures)


def test_issue12_nan_sign():
    """Every kernel variant gives the same bits, NaN signs included, for NaN data and NaN
    parameters."""
    isas = bnfast.available_isas()
    if len(isas) < 2:
        pytest.skip("one kernel variant on this CPU")
    rng = np.random.default_rng(5)
    bad = []
    for shape in [(6, C, 7), (16, 5, 40)]:
        for dt in (np.float32, np.float64):
            for mode in ("data", "params"):
                x = rng.standard_normal(shape).astype(dt)
                c = shape[1]
                w, b, m, v = np.ones(c), np.zeros(c), np.zeros(c), np.ones(c)
                if mode == "data":
                    x[:, 0].flat[::3] = np.nan
                    x[:, 1].flat[::5] = -np.nan
                else:
                    w[0], b[1], m[2], v[0] = np.nan, -np.nan, np.nan, np.inf
                calls = {
                    "train_relu": lambda: bnfast.batch_norm_train(x, w, b, relu=True),
                    "infer_relu": lambda: (bnfast.batch_norm_infer(x, m, v, w, b, relu=True),),
                    "backward": lambda: bnfast.batch_norm_backward(x, x, m, v, w, bias=b),
                    "backward_relu": lambda: bnfast.batch_norm_backward(x, x, m, v, w, bias=b,
                                                                        relu=True),
                    "backward_eval": lambda: bnfast.batch_norm_backward(
                        x, x, m, v, w, bias=b, relu=True, training=False),
                }
                for name, f in calls.items():
                    outs = []
                    for isa in isas:
                        with bnfast.use_isa(isa), np.errstate(all="ignore"):
                            outs.append(f())
                    for isa, r in zip(isas[1:], outs[1:]):
                        for g, e in zip(r, outs[0]):
                            if np.asarray(g).tobytes() != np.asarray(e).tobytes():
                                bad.append(f"{name} {mode} {np.dtype(dt)} {shape}: {isa} "
                                           f"vs {isas[0]}")
    assert not bad, "\n".join(bad)


def test_issue12_flags_naming():
    """relu=np.array([1, 0]) (or training=...) raises NumPy's "The truth value of an array
    with more than one element is ambiguous" ValueError, which does not name the argument."""
    _run(_matching(lambda f, p, a: p in ("relu", "training") and _truth(a[p]) is None))


def test_new_backward_nonfinite_parameters():
    """batch_norm_backward with weight or invstd containing inf: dx differs from the float64
    reference in its non-finite values (e.g. -inf where the reference has NaN, NaN where it
    has inf)."""
    _run(_select(item="new-backward-nonfinite"))


def test_new_inf_mean():
    """moments(x) where a channel holds one +inf (and otherwise finite values): the mean is
    +inf (the reference's answer), not NaN; also the training mean and running_mean."""
    _run(_select(item="new-inf-mean"))


def test_new_crash_out_not_array():
    """batch_norm_train(x, running_mean=rm, running_var=rv, out=<a list>) must raise
    TypeError naming out; it crashes the interpreter (the Cython fast path compares the
    running statistics' memory with `out` before checking that `out` is an array).  Run in a
    subprocess."""
    code = r"""
import numpy as np, bnfast
x = np.random.default_rng(0).standard_normal((4, 3, 5))
for out in (x.tolist(), "abc", 1.5):
    for call in (
        lambda: bnfast.batch_norm_train(x, running_mean=np.zeros(3), running_var=np.ones(3),
                                        out=out),
        lambda: bnfast.batch_norm(x, np.zeros(3), np.ones(3), training=True, out=out),
    ):
        try:
            call()
        except TypeError as e:
            assert "out" in str(e), repr(e)
        else:
            raise AssertionError("accepted out=%r" % (out,))
print("ok")
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env=package_env(), timeout=120, cwd=tempfile.gettempdir())
    assert r.returncode == 0 and "ok" in r.stdout, (r.returncode, r.stderr[-2000:])
