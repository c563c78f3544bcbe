"""Every public function against the pure-NumPy float64 twin (bnfast.reference).

Grid: shapes (2-D to 5-D, small and large inner size S, odd sizes that leave vector tails)
x channel axis (1, -1 and an inner axis) x dtype x kernel variant x thread count.
"""
import numpy as np
import pytest

import bnfast
from bnfast import reference as ref
from conftest import (DTYPES, RTOL, assert_close, channel_abs_sum, make_params, make_stats,
                      make_x, reduce_axes, rng_for)

# (shape, axis).  With axis=1, S = prod(shape[2:]); axis=-1 is channels-last (S = 1).
# The layout each takes (rows for S >= 64 or S >= 2 N, else columns) is asserted through
# the plan in test_grid_covers_both_layouts.
SHAPES = [
    (5, 3),            # (N, C)
    (2, 1),            # N=2, C=1
    (2, 17),           # C=17: one vector + a tail
    (7, 65),           # C=65
    (2, 7, 9),         # (N, C, L), S=9
    (3, 9, 1),         # S=1
    (3, 4, 65),        # S=65, tail of 1
    (4, 1, 129),       # C=1, S=129
    (2, 3, 5, 7),      # (N, C, H, W), S=35
    (2, 3, 8, 9),      # S=72
    (2, 2, 3, 4, 5),   # (N, C, D, H, W), S=60
    (2, 5, 3, 3, 8),   # S=72
]
# with axis=1: S >= 64, or S >= 2 N (few rows)
ROWS_LAYOUT = {(3, 4, 65), (4, 1, 129), (2, 3, 8, 9), (2, 5, 3, 3, 8), (2, 7, 9),
               (2, 3, 5, 7), (2, 2, 3, 4, 5)}


def test_grid_covers_both_layouts():
    for shape in SHAPES:
        for op in ("moments", "train", "infer", "backward"):
            p = bnfast.explain(np.empty(shape), op=op, axis=1)
            assert p["layout"] == ("rows" if shape in ROWS_LAYOUT else "columns"), shape
            assert bnfast.explain(np.empty(shape), op=op, axis=-1)["layout"] == "columns"


def _cases():
    out = []
    for shape in SHAPES:
        axes = [1] if len(shape) == 2 else [1, -1]
        if len(shape) >= 4:
            axes.append(2)
        out += [pytest.param(shape, ax, id=f"{'x'.join(map(str, shape))}-ax{ax}")
                for ax in axes]
    return out


CASES = _cases()
grid = pytest.mark.parametrize("shape,axis", CASES)
dtypes = pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)


def _data(shape, axis, dtype, *tag):
    rng = rng_for("grid", shape, axis, np.dtype(dtype).name, *tag)
    x = make_x(rng, shape, dtype, axis=axis)
    C = shape[axis]
    w, b = make_params(rng, C)
    dy = rng.standard_normal(shape).astype(dtype)
    rm, rv = make_stats(rng, C)
    return rng, x, w, b, dy, rm, rv


def _bshape(ndim, axis, C):
    s = [1] * ndim
    s[axis % ndim] = C
    return tuple(s)


@grid
@dtypes
def test_moments(shape, axis, dtype, isa, nthreads):
    _, x, *_ = _data(shape, axis, dtype)
    mean, var = bnfast.moments(x, axis=axis)
    rmean, rvar = ref.moments(x, axis=axis)
    # float64 for either dtype, computed in float64 from the (exact) data: float64 accuracy
    assert mean.dtype == np.float64 and var.dtype == np.float64
    assert mean.shape == var.shape == (shape[axis],)
    xmax = np.abs(x.astype(np.float64)).max(axis=reduce_axes(x.ndim, axis))
    assert_close(mean, rmean, scale=xmax, what="mean", kind="moments", src=dtype)
    assert_close(var, rvar, scale=0.0, what="var", kind="moments", src=dtype)


@grid
@dtypes
@pytest.mark.parametrize("relu", [False, True], ids=["plain", "relu"])
def test_train(shape, axis, dtype, relu, isa, nthreads):
    _, x, w, b, _, rm0, rv0 = _data(shape, axis, dtype)
    rm, rv = rm0.astype(dtype), rv0.astype(dtype)
    rm_ref, rv_ref = rm.astype(np.float64), rv.astype(np.float64)
    y, mean, invstd = bnfast.batch_norm_train(x, w, b, axis=axis, running_mean=rm,
                                              running_var=rv, momentum=0.3, relu=relu)
    ry, rmean, rinv = ref.batch_norm_train(x, w, b, axis=axis, running_mean=rm_ref,
                                           running_var=rv_ref, momentum=0.3, relu=relu)
    assert y.dtype == dtype and y.shape == x.shape
    assert mean.dtype == np.float64 and invstd.dtype == np.float64
    if relu:
        assert (y >= 0).all()
    assert_close(y, ry, what="y", kind="forward", src=dtype)
    xmax = np.abs(x.astype(np.float64)).max(axis=reduce_axes(x.ndim, axis))
    # mean/invstd are float64 for either dtype, computed from the same (exact) data
    assert_close(mean, rmean, dtype=np.float64, scale=xmax, what="mean", kind="stats",
                 src=dtype)
    assert_close(invstd, rinv, dtype=np.float64, scale=0.0, what="invstd", kind="stats",
                 src=dtype)
    assert rm.dtype == dtype and rv.dtype == dtype
    assert_close(rm, rm_ref, scale=np.abs(rm_ref) + xmax, what="running_mean", kind="running",
                 src=dtype)
    assert_close(rv, rv_ref, scale=0.0, what="running_var", kind="running", src=dtype)
    assert not np.array_equal(rm.astype(np.float64), rm0), "running_mean was not updated"


@grid
@dtypes
@pytest.mark.parametrize("relu", [False, True], ids=["plain", "relu"])
def test_infer(shape, axis, dtype, relu, isa, nthreads):
    _, x, w, b, _, m, v = _data(shape, axis, dtype)
    y = bnfast.batch_norm_infer(x, m, v, w, b, eps=1e-3, axis=axis, relu=relu)
    ry = ref.batch_norm_infer(x, m, v, w, b, eps=1e-3, axis=axis, relu=relu)
    assert y.dtype == dtype and y.shape == x.shape
    assert_close(y, ry, what="y", kind="forward", src=dtype)


@grid
@dtypes
@pytest.mark.parametrize("training,relu", [(True, False), (False, False), (True, True),
                                           (False, True)],
                         ids=["train", "eval", "train-relu", "eval-relu"])
def test_backward(shape, axis, dtype, training, relu, isa, nthreads):
    _, x, w, b, dy, rm, rv = _data(shape, axis, dtype)
    if training:
        _, mean, invstd = ref.batch_norm_train(x, w, b, axis=axis)
    else:
        mean, invstd = rm, 1.0 / np.sqrt(rv + 1e-5)
    dx, dw, db = bnfast.batch_norm_backward(dy, x, mean, invstd, w, bias=b, relu=relu,
                                            training=training, axis=axis)
    rdx, rdw, rdb = ref.batch_norm_backward(dy, x, mean, invstd, w, bias=b, relu=relu,
                                            training=training, axis=axis)
    assert dx.dtype == dtype and dx.shape == x.shape
    assert dw.dtype == dtype and db.dtype == dtype
    assert dw.shape == db.shape == (shape[axis],)

    bs = _bshape(x.ndim, axis, shape[axis])
    xhat = (x.astype(np.float64) - mean.reshape(bs)) * invstd.reshape(bs)
    g = dy.astype(np.float64)
    if relu:
        pre = xhat * w.reshape(bs) + b.reshape(bs)
        assert np.abs(pre).min() > 1e-9, "test data too close to the ReLU kink"
        g = np.where(pre > 0, g, 0.0)
    assert_close(db, rdb, scale=channel_abs_sum(g, axis), what="dbias", kind="dweight/db",
                 src=dtype)
    assert_close(dw, rdw, scale=channel_abs_sum(g * xhat, axis), what="dweight",
                 kind="dweight/db", src=dtype)
    m = x.size // shape[axis]
    k = np.abs(w * invstd)
    dx_scale = np.max(k * (np.abs(g).max() + np.abs(xhat).max() * np.abs(rdw) / m
                           + np.abs(rdb) / m))
    assert_close(dx, rdx, scale=dx_scale, what="dx", kind="dx", src=dtype)


@grid
@dtypes
@pytest.mark.parametrize("mode", ["train", "train-relu", "eval", "eval-relu", "batchstats"])
def test_batch_norm(shape, axis, dtype, mode, isa, nthreads):
    _, x, w, b, _, rm0, rv0 = _data(shape, axis, dtype)
    training = mode.startswith("train")
    relu = mode.endswith("relu")
    if mode == "batchstats":
        y = bnfast.batch_norm(x, None, None, w, b, training=False, axis=axis)
        ry = ref.batch_norm(x, None, None, w, b, training=False, axis=axis)
        assert_close(y, ry, what="y", kind="forward", src=dtype)
        return
    rm, rv = rm0.copy(), rv0.copy()
    rm_ref, rv_ref = rm0.copy(), rv0.copy()
    y = bnfast.batch_norm(x, rm, rv, w, b, training, 0.2, 1e-4, axis=axis, relu=relu)
    ry = ref.batch_norm(x, rm_ref, rv_ref, w, b, training, 0.2, 1e-4, axis=axis, relu=relu)
    assert y.dtype == dtype and y.shape == x.shape
    assert_close(y, ry, what="y", kind="forward", src=dtype)
    assert_close(rm, rm_ref, dtype=np.float64, scale=1.0, what="running_mean")
    assert_close(rv, rv_ref, dtype=np.float64, scale=0.0, what="running_var")
    if training:
        assert not np.array_equal(rm, rm0)
    else:
        # eval mode must leave the running statistics alone, bit for bit
        assert np.array_equal(rm, rm0) and np.array_equal(rv, rv0)


def test_tolerances_are_meaningful():
    """The grid's tolerances must reject an error of one float32 ulp in float64 results and
    a genuinely wrong float32 value (guards against a vacuous comparison helper)."""
    e = np.array([1.0, -2.0, 3.0])
    with pytest.raises(AssertionError):
        assert_close(e.astype(np.float32).astype(np.float64) + [2 ** -23, 0, 0], e,
                     dtype=np.float64)
    with pytest.raises(AssertionError):
        assert_close((e * (1 + 1e-4)).astype(np.float32), e)
    with pytest.raises(AssertionError):
        assert_close(np.array([1.0, np.nan]), np.array([1.0, 2.0]))
    assert RTOL[np.dtype(np.float64)] <= 1e-9
