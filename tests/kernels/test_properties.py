"""Property-based tests (hypothesis): normalisation, scale invariance, layout independence."""
import numpy as np
import pytest

import bnfast
from conftest import reduce_axes

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import assume, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.extra import numpy as hnp  # noqa: E402

U = {np.float32: 2.0 ** -24, np.float64: 2.0 ** -53}


@st.composite
def batches(draw, min_dims=2, max_dims=4):
    """(x, axis): a float32/float64 batch of a small random shape and channel axis, with
    values drawn by hypothesis (including repeated values and wide ranges)."""
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    ndim = draw(st.integers(min_dims, max_dims))
    shape = [draw(st.integers(2, 5))] + [draw(st.integers(1, 9 if ndim == 2 else 4))
                                         for _ in range(ndim - 1)]
    if ndim >= 3 and draw(st.booleans()):
        shape[-1] = draw(st.integers(60, 70))  # both sides of the S=64 strategy switch
    shape = tuple(shape)
    axis = draw(st.sampled_from([1, -1] + ([2] if ndim >= 3 else [])))
    elems = st.floats(-1e4, 1e4, allow_nan=False, allow_infinity=False, allow_subnormal=False,
                      width=32 if dtype == np.float32 else 64)
    x = draw(hnp.arrays(dtype, shape, elements=elems))
    return x, axis


def _channel_view(a, axis):
    """(m, C) float64 view of a with the channel axis last."""
    return np.moveaxis(a.astype(np.float64), axis, -1).reshape(-1, a.shape[axis])


def _well_conditioned(x, axis, ratio=1e-3):
    """Every channel has a spread of at least `ratio` times its largest magnitude."""
    x2 = _channel_view(x, axis)
    std = x2.std(axis=0)
    amax = np.abs(x2).max(axis=0)
    return bool(np.all(std > ratio * np.maximum(amax, 1e-30)) and np.all(amax > 1e-20))


@settings(max_examples=40)
@given(batches())
def test_training_output_is_standardised(xa):
    x, axis = xa
    assume(_well_conditioned(x, axis))
    y, mean, invstd = bnfast.batch_norm_train(x, eps=0.0, axis=axis)
    y2 = _channel_view(y, axis)
    m = y2.shape[0]
    # |y| <= sqrt(m - 1) for a standardised channel; float32 rounds every y once
    tol = 64 * U[x.dtype.type] * np.sqrt(m) + 1e-12
    assert np.all(np.isfinite(y2))
    assert np.abs(y2.mean(axis=0)).max() <= tol
    assert np.abs(y2.var(axis=0) - 1.0).max() <= 4 * tol


@settings(max_examples=40)
@given(batches(), st.floats(1e-3, 1e3))
def test_scale_invariance(xa, a):
    """BN(a x) == BN(x) for a > 0 (eps = 0), to within the rounding of a*x."""
    x, axis = xa
    assume(_well_conditioned(x, axis))
    xs = (x * x.dtype.type(a)).astype(x.dtype)
    assume(np.all(np.isfinite(xs)) and _well_conditioned(xs, axis))
    y1, _, _ = bnfast.batch_norm_train(x, eps=0.0, axis=axis)
    y2, _, _ = bnfast.batch_norm_train(xs, eps=0.0, axis=axis)
    # rounding a*x perturbs each value by u|x|, i.e. y by u|x|/std: per-channel condition
    x2 = _channel_view(x, axis)
    cond = np.abs(x2).max(axis=0) / x2.std(axis=0)
    shp = [1] * x.ndim
    shp[axis] = -1
    tol = (16 * U[x.dtype.type] * (cond + np.sqrt(x2.shape[0]))).reshape(shp)
    diff = np.abs(y1.astype(np.float64) - y2.astype(np.float64))
    assert np.all(diff <= tol), f"max diff {diff.max():.3e}"


@settings(max_examples=30)
@given(batches(), st.integers(-8, 8))
def test_power_of_two_scaling_is_exact(xa, k):
    """Scaling by 2**k is exact in floating point, so BN(2**k x) is bit-identical to BN(x)."""
    x, axis = xa
    assume(_well_conditioned(x, axis))
    nz = np.abs(x[x != 0])
    assume(nz.size == 0 or nz.min() > 1e-30)
    xs = x * x.dtype.type(2.0 ** k)
    y1, m1, i1 = bnfast.batch_norm_train(x, eps=0.0, axis=axis)
    y2, m2, i2 = bnfast.batch_norm_train(xs, eps=0.0, axis=axis)
    assert np.array_equal(y1, y2)
    assert np.array_equal(m1 * 2.0 ** k, m2)
    assert np.array_equal(i1 * 2.0 ** -k, i2)


@settings(max_examples=30)
@given(batches(min_dims=3), st.booleans())
def test_layout_independence(xa, relu):
    """The same data channels-first (axis=1) and channels-last (axis=-1) give the same
    results, up to the rounding of a different (but fixed) summation order."""
    x, _ = xa
    assume(_well_conditioned(x, 1, ratio=1e-2))
    xl = np.ascontiguousarray(np.moveaxis(x, 1, -1))
    C = x.shape[1]
    rng = np.random.default_rng(x.size)
    w, b = rng.uniform(0.5, 2, C), rng.standard_normal(C)
    dy = rng.standard_normal(x.shape).astype(x.dtype)
    dyl = np.ascontiguousarray(np.moveaxis(dy, 1, -1))
    u = U[x.dtype.type]
    m = x.size // C
    tol = 64 * u * np.sqrt(m) * 100  # y values are bounded by sqrt(m); cond <= 100

    mf, vf = bnfast.moments(x, axis=1)
    ml, vl = bnfast.moments(xl, axis=-1)
    x2 = _channel_view(x, 1)
    # two summation orders: each mean is within ~m*u*max|x| of the exact one
    u64 = U[np.float64]
    assert np.all(np.abs(mf - ml) <= (8 + m) * u64 * np.abs(x2).max(axis=0) + 1e-300)
    assert np.all(np.abs(vf - vl) <= 1e3 * u64 * vf * 100 ** 2)

    yf, meanf, invf = bnfast.batch_norm_train(x, w, b, eps=1e-5, axis=1, relu=relu)
    yl, meanl, invl = bnfast.batch_norm_train(xl, w, b, eps=1e-5, axis=-1, relu=relu)
    assert np.allclose(np.moveaxis(yf, 1, -1), yl, rtol=0, atol=tol * 2)
    assert np.allclose(meanf, meanl, rtol=1e-12, atol=1e-12 * np.abs(x2).max())
    assert np.allclose(invf, invl, rtol=1e-9, atol=0)

    dxf, dwf, dbf = bnfast.batch_norm_backward(dy, x, meanf, invf, w, bias=b, relu=relu)
    dxl, dwl, dbl = bnfast.batch_norm_backward(dyl, xl, meanf, invf, w, bias=b, relu=relu,
                                               axis=-1)
    assert np.allclose(np.moveaxis(dxf, 1, -1), dxl, rtol=0, atol=tol * 4 * w.max())
    assert np.allclose(dbf, dbl, rtol=0, atol=64 * u * m * np.abs(dy).max() + 1e-30)
    assert np.allclose(dwf, dwl, rtol=0, atol=tol * m * np.abs(dy).max())


@settings(max_examples=25)
@given(batches())
def test_moments_match_float64_numpy(xa):
    """moments() equals the float64 two-pass mean/variance of the same data."""
    x, axis = xa
    mean, var = bnfast.moments(x, axis=axis)
    x64 = x.astype(np.float64)
    ax = reduce_axes(x.ndim, axis)
    rmean = x64.mean(axis=ax)
    rvar = ((x64 - x64.mean(axis=ax, keepdims=True)) ** 2).mean(axis=ax)
    assert mean.dtype == np.float64 and var.dtype == np.float64
    amax = np.abs(x64).max(axis=ax)
    assert np.all(np.abs(mean - rmean) <= 1e-13 * amax)
    assert np.all(np.abs(var - rvar) <= 1e-12 * rvar + 1e-13 * amax ** 2)
