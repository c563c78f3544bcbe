"""Numerically hard inputs: constant channels far from zero, large mean with tiny spread,
huge magnitudes, NaN isolation."""
import warnings

import numpy as np
import pytest

import bnfast
from bnfast import reference as ref
from conftest import assert_same_bits, channel_last, reduce_axes, rng_for

# column strategy (S < 64), row strategy (S >= 64), 2-D, several blocks/groups, multithreaded
SHAPES = [(16, 3, 5), (16, 3, 100), (4000, 3), (64, 3, 30, 30), (3, 3, 9000), (2, 3)]
shapes = pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
layouts = pytest.mark.parametrize("layout", ["first", "last"])


def _in_layout(x, layout):
    """(array, axis) for channel axis 1 data presented channels-first or channels-last."""
    return (x, 1) if layout == "first" else (channel_last(x, 1), -1)


def _chan(a, c, axis):
    return np.take(a, c, axis=axis)


# ------------------------------------------------------------------ (a) constant channel

@shapes
@layouts
@pytest.mark.parametrize("value", [1e7, -1e7, 123456.75])
def test_constant_float32_channel_normalises_to_exactly_beta(shape, layout, value, isa):
    rng = rng_for("const", shape, layout, value)
    x = rng.standard_normal(shape).astype(np.float32)
    x[:, 1] = np.float32(value)
    x, axis = _in_layout(x, layout)
    w = np.array([2.0, 3.0, 4.0])
    b = np.array([0.5, 0.25, -3.0])
    y, mean, invstd = bnfast.batch_norm_train(x, w, b, axis=axis)
    yc = _chan(y, 1, axis)
    assert np.array_equal(yc, np.full(yc.shape, np.float32(0.25))), np.unique(yc)
    # with ReLU, into a preallocated output, and through batch_norm
    y2, _, _ = bnfast.batch_norm_train(x, w, -b, axis=axis, relu=True,
                                       out=np.full_like(x, np.nan))
    assert np.array_equal(_chan(y2, 1, axis), np.zeros(yc.shape, np.float32))
    y3 = bnfast.batch_norm(x, None, None, w, b, axis=axis)
    assert np.array_equal(_chan(y3, 1, axis), yc)
    m, v = bnfast.moments(x, axis=axis)
    assert m[1] == np.float32(value) and v[1] == 0.0
    assert mean[1] == value and invstd[1] == 1.0 / np.sqrt(1e-5)
    # the other channels are normalised as usual
    ry, _, _ = ref.batch_norm_train(x, w, b, axis=axis)
    assert np.allclose(y, ry, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(64, 3, 30, 30), (4000, 3)])
def test_constant_channel_backward_is_exact(shape, isa):
    """dy constant over a constant channel: dx is exactly zero there (no 1e7 residue)."""
    x = rng_for("constbwd", shape).standard_normal(shape).astype(np.float32)
    x[:, 1] = np.float32(1e7)
    y, mean, invstd = bnfast.batch_norm_train(x)
    dy = np.ones_like(x)
    dx, dw, db = bnfast.batch_norm_backward(dy, x, mean, invstd)
    assert np.array_equal(dx[:, 1], np.zeros_like(dx[:, 1]))
    assert dw[1] == 0.0 and db[1] == x[:, 1].size


@pytest.mark.parametrize("shape", [(4, 2, 70), (64, 2), (8, 2, 9)],
                         ids=lambda s: "x".join(map(str, s)))
@layouts
def test_float32_inference_far_from_zero_rounds_once(shape, layout, isa):
    """batch_norm_infer evaluates (x - mean) * scale + bias in float64 and rounds once: for
    float32 x = 1e7 + k (k small integers), mean 1e7, var 4 and weight 2, y is exactly k
    (+ bias).  A float32 evaluation of the folded form x * scale + (bias - mean * scale)
    would lose the digits below ~1."""
    rng = rng_for("far", shape, layout)
    k = rng.integers(-50, 50, size=shape).astype(np.float32)
    x = np.float32(1e7) + k
    x, axis = _in_layout(x, layout)
    kk = _in_layout(k, layout)[0]
    y = bnfast.batch_norm_infer(x, [1e7, 1e7], [4.0, 4.0], [2.0, 2.0], [0.0, 0.5], eps=0.0,
                                axis=axis)
    expected = kk.copy()
    np.moveaxis(expected, axis, 0)[1] += np.float32(0.5)
    assert np.array_equal(y, expected)


# ------------------------------------------------------------------ (b) large mean, tiny spread

def _float32_near_1e6(rng, shape):
    """float32 data with mean ~1e6 and standard deviation ~1e-2 in every channel.

    float32's spacing at 1e6 is 0.0625, so 1e6 + 1e-2 * N(0, 1) would round to a constant:
    instead take 1e6 + 0.0625 * k with k in {-1, 0, 1}, P(k = +-1) = 0.0256 (std 0.01),
    and at least one -1 and one +1 per channel.
    """
    p = 0.0256
    k = rng.choice([-1.0, 0.0, 1.0], size=shape, p=[p / 2, 1 - p, p / 2])
    k[0, :] = 1.0
    k[1, :] = -1.0
    return (np.float32(1e6) + np.float32(0.0625) * k).astype(np.float32)


@pytest.mark.parametrize("shape", SHAPES[:-1], ids=lambda s: "x".join(map(str, s)))
@layouts
def test_float32_large_mean_tiny_std_variance(shape, layout, isa):
    rng = rng_for("1e6", shape, layout)
    x = _float32_near_1e6(rng, shape)
    x, axis = _in_layout(x, layout)
    ax = reduce_axes(x.ndim, axis)
    rvar = np.var(x.astype(np.float64), axis=ax)
    assert (rvar > 1e-6).all() and (rvar < 1e-2).all(), rvar
    mean, var = bnfast.moments(x, axis=axis)
    assert np.all(np.abs(var - rvar) <= 1e-3 * rvar), (var, rvar)
    # the statistics used by the forward pass, float64
    _, m64, invstd = bnfast.batch_norm_train(x, eps=0.0, axis=axis)
    assert np.all(np.abs(1.0 / invstd ** 2 - rvar) <= 1e-3 * rvar)
    assert np.all(np.abs(m64 - np.mean(x.astype(np.float64), axis=ax)) <= 1e-9 * 1e6)
    rm, rv = np.zeros(3, np.float64), np.zeros(3, np.float64)
    n = x.size // 3
    bnfast.batch_norm_train(x, axis=axis, running_mean=rm, running_var=rv, momentum=1.0)
    assert np.all(np.abs(rv - rvar * n / (n - 1)) <= 1e-3 * rvar)


@shapes
@layouts
@pytest.mark.parametrize("noise", [1.0, 1e-3])
def test_float64_large_mean_variance(shape, layout, noise, isa):
    """1e9 + noise in float64: no catastrophic cancellation (E[x^2] - E[x]^2 would give
    garbage: E[x^2] ~ 1e18 has an ulp of 128)."""
    rng = rng_for("1e9", shape, layout, noise)
    x = 1e9 + noise * rng.standard_normal(shape)
    x, axis = _in_layout(x, layout)
    ax = reduce_axes(x.ndim, axis)
    # x - 1e9 is exact (Sterbenz), so this is the variance of the data to ~1e-16
    rvar = np.var(x - 1e9, axis=ax)
    mean, var = bnfast.moments(x, axis=axis)
    # The condition number is kappa = |mean|/std = 1e9/noise: the naive E[x^2] - E[x]^2
    # would be off by O(u * kappa^2) = 1e2 .. 1e8 (garbage), merging unshifted block means
    # by O(u * kappa), and np.var itself is off by ~1e-5 for noise=1e-3.  bnfast shifts each
    # channel by its first value, so the variance is accurate to a few ulps whatever kappa.
    tol = 1e-13
    rel = np.abs(var - rvar) / rvar
    assert np.all(rel <= tol), rel
    assert np.all(np.abs(mean - 1e9 - np.mean(x - 1e9, axis=ax)) <= 1e-14 * 1e9)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_rows_of_drifting_channels_take_the_second_pass_lane_by_lane(dtype):
    """The rows layout with short rows (S = 49 <= BN_SEG) finishes four channels' segments
    together (their divisions by S as one vector): where a row's values sit far from the
    channel's shift (its first value) against their spread, that lane alone takes the
    second pass.  Some channels start with a value 1000 standard deviations off (mean(x - K)^2
    > 16 var in every row), in a pattern that mixes passing and failing lanes in every
    group of four; items of 5 channels (36 channels) leave one to the scalar tail.
    Accurate against the float64
    twin, the same bits on 1 and 2 threads and in every variant, and those of each channel
    computed alone (the one-segment path: a lane that skipped its second pass would differ
    there in the last bits)."""
    rng = np.random.default_rng(7)
    N, C, S = 5, 36, 49
    x = rng.standard_normal((N, C, S))
    far = np.resize(np.array([0, 1, 1, 0, 1, 0, 0, 1, 1], bool), C)
    x[0, far, 0] = -1000.0
    x = x.astype(dtype)
    plan = bnfast.explain(x, op="moments")
    assert plan["layout"] == "rows" and plan["reduce"]["channels_per_item"] == 5, plan
    got = []
    for isa in bnfast.available_isas():
        for nt in (1, 2):
            with bnfast.use_isa(isa), bnfast.num_threads(nt):
                got.append(bnfast.moments(x))
    for m, v in got[1:]:
        assert_same_bits(m, got[0][0], "mean")
        assert_same_bits(v, got[0][1], "var")
    mean, var = got[0]
    rmean, rvar = ref.moments(x.astype(np.float64))
    assert np.allclose(mean, rmean, rtol=1e-13, atol=0)
    assert np.all(np.abs(var - rvar) <= 1e-12 * rvar), np.abs(var - rvar) / rvar
    for c in range(C):   # one channel alone: only the tail path, no group of four
        m1, v1 = bnfast.moments(np.ascontiguousarray(x[:, c:c + 1]))
        assert_same_bits(m1, mean[c:c + 1], f"mean of channel {c} alone")
        assert_same_bits(v1, var[c:c + 1], f"var of channel {c} alone")


# ------------------------------------------------------------------ (c) huge magnitudes

@pytest.mark.parametrize("shape", [(50, 3, 10), (50, 3, 100), (5000, 3)],
                         ids=lambda s: "x".join(map(str, s)))
@layouts
def test_float32_magnitude_1e30_training_is_finite(shape, layout, isa):
    rng = rng_for("1e30", shape, layout)
    x = (1e30 * rng.standard_normal(shape)).astype(np.float32)
    x, axis = _in_layout(x, layout)
    ax = reduce_axes(x.ndim, axis)
    rvar = np.var(x.astype(np.float64), axis=ax)
    rm, rv = np.zeros(3), np.ones(3)
    y, mean, invstd = bnfast.batch_norm_train(x, axis=axis, running_mean=rm, running_var=rv)
    assert np.all(np.isfinite(y)) and np.all(np.isfinite(mean))
    assert np.all(np.isfinite(invstd)) and np.all(invstd > 0)
    assert np.allclose(1.0 / invstd ** 2, rvar, rtol=1e-12)
    assert np.all(np.isfinite(rv)) and np.all(np.isfinite(rm))
    ry, _, _ = ref.batch_norm_train(x, axis=axis)
    assert np.allclose(y, ry, rtol=1e-6, atol=1e-6)
    dx, dw, db = bnfast.batch_norm_backward(np.ones_like(x), x, mean, invstd, axis=axis)
    assert np.all(np.isfinite(dx)) and np.all(np.isfinite(dw)) and np.all(np.isfinite(db))
    # float32 running statistics hold the mean (~1e29) but not the variance (~1e60)
    rm32, rv32 = np.zeros(3, np.float32), np.ones(3, np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        bnfast.batch_norm_train(x, axis=axis, running_mean=rm32, running_var=rv32)
    assert np.all(np.isfinite(rm32))


@pytest.mark.parametrize("shape", [(50, 3, 10), (50, 3, 100), (5000, 3)],
                         ids=lambda s: "x".join(map(str, s)))
@layouts
def test_float32_magnitude_1e30_moments_variance_is_finite(shape, layout, isa):
    """float32 values of magnitude 1e30 give a finite variance (~1e60, so it is returned
    in float64) and mean, without any overflow warning."""
    x = (1e30 * rng_for("1e30m", shape, layout).standard_normal(shape)).astype(np.float32)
    x, axis = _in_layout(x, layout)
    ax = reduce_axes(x.ndim, axis)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        mean, var = bnfast.moments(x, axis=axis)
    assert np.all(np.isfinite(var)) and np.all(np.isfinite(mean)), (mean, var)
    x64 = x.astype(np.float64)
    assert np.allclose(var, np.var(x64, axis=ax), rtol=1e-12)
    assert np.allclose(mean, np.mean(x64, axis=ax), rtol=0,
                       atol=1e-13 * np.abs(x64).max())


@layouts
def test_float32_magnitude_1e18_moments_variance_is_finite(layout, isa):
    """Squares of 1e18 overflow float32 (sum of squares ~1e39); the accumulation is double."""
    x = (1e18 * rng_for("1e18", layout).standard_normal((400, 3, 10))).astype(np.float32)
    x, axis = _in_layout(x, layout)
    mean, var = bnfast.moments(x, axis=axis)
    rvar = np.var(x.astype(np.float64), axis=reduce_axes(x.ndim, axis))
    assert np.all(np.isfinite(var))
    assert np.allclose(var, rvar, rtol=1e-12)


# ------------------------------------------------------------------ (d) NaN isolation

NAN_SHAPES = [(8, 4, 5), (8, 4, 70), (300, 4), (16, 4, 40, 40), (64, 4, 1000)]


@pytest.mark.parametrize("shape", NAN_SHAPES, ids=lambda s: "x".join(map(str, s)))
@layouts
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
def test_nan_in_one_channel_leaves_others_untouched(shape, layout, dtype, isa):
    rng = rng_for("nan", shape, layout, np.dtype(dtype).name)
    clean = rng.standard_normal(shape).astype(dtype)
    dy_clean = rng.standard_normal(shape).astype(dtype)
    bad = clean.copy()
    idx = tuple(s // 2 for s in shape)
    idx = (idx[0], 2) + idx[2:]
    bad[idx] = np.nan
    dy_bad = dy_clean.copy()
    dy_bad[idx] = np.nan
    (clean, axis), (bad, _) = _in_layout(clean, layout), _in_layout(bad, layout)
    dy_clean, dy_bad = _in_layout(dy_clean, layout)[0], _in_layout(dy_bad, layout)[0]
    C = 4
    others = [0, 1, 3]
    w, b = rng.uniform(0.5, 2, C), rng.standard_normal(C)

    def run(x, dy):
        res = {}
        res["moments"] = bnfast.moments(x, axis=axis)
        rm, rv = np.zeros(C, dtype), np.ones(C, dtype)
        y, mean, invstd = bnfast.batch_norm_train(x, w, b, axis=axis, running_mean=rm,
                                                  running_var=rv)
        res["train"] = (y, mean, invstd)
        res["running"] = (rm, rv)
        res["train_relu"] = bnfast.batch_norm_train(x, w, b, axis=axis, relu=True)
        # A NaN variance is refused (test_errors), so the NaN channel's gets a stand-in.
        var = np.nan_to_num(1 / invstd ** 2, nan=1.0)
        res["infer"] = (bnfast.batch_norm_infer(x, mean, var, w, b, axis=axis),)
        for tr in (True, False):
            for relu in (False, True):
                res[f"backward{tr}{relu}"] = bnfast.batch_norm_backward(
                    dy, x, mean, invstd, w, bias=b, relu=relu, training=tr, axis=axis)
        return res

    r_clean = run(clean, dy_clean)
    r_badx = run(bad, dy_clean)
    r_baddy = run(clean, dy_bad)
    for name in r_clean:
        for i, (a, bx, bdy) in enumerate(zip(r_clean[name], r_badx[name], r_baddy[name])):
            if a.ndim == 1:  # per-channel statistics / gradients
                assert_same_bits(a[others], bx[others], f"{name}[{i}] (NaN in x)")
                assert_same_bits(a[others], bdy[others], f"{name}[{i}] (NaN in dy)")
            else:
                for c in others:
                    assert_same_bits(_chan(a, c, axis), _chan(bx, c, axis),
                                     f"{name}[{i}] channel {c} (NaN in x)")
                    assert_same_bits(_chan(a, c, axis), _chan(bdy, c, axis),
                                     f"{name}[{i}] channel {c} (NaN in dy)")
    # and the NaN does show up in its own channel
    assert np.isnan(r_badx["moments"][0][2]) and np.isnan(r_badx["running"][1][2])
    assert np.isnan(r_badx["backward" "True" "False"][1][2])
    assert np.isnan(r_baddy["backward" "True" "False"][2][2])


# ------------------------------------------------------------------ (e) ill-conditioned neighbours

# Columns layout (channels-last, 2-D): a tile of up to 256 columns, vectors of 8, the last
# C % 8 columns one by one; 300 channels span two tiles.  The rows layout (S >= 64) too.
ILL_SHAPES = [(64, 300), (200, 20), (16, 24, 3, 3), (8, 300, 2, 2), (4, 13, 80)]


@pytest.mark.parametrize("shape", ILL_SHAPES, ids=lambda s: "x".join(map(str, s)))
@layouts
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
def test_ill_conditioned_channel_leaves_others_untouched(shape, layout, dtype, isa):
    """A channel whose shift (its first value) lies far from its mean takes the statistics'
    second pass; the channels beside it -- in the same vector of 8 columns, the same tile or
    the scalar tail -- keep the bits of their one-pass result."""
    rng = rng_for("ill", shape, layout, np.dtype(dtype).name)
    C = shape[1]
    clean = rng.standard_normal(shape).astype(dtype)
    ill = clean.copy()
    chans = sorted({1, 9, C - 1, C // 2} & set(range(C)))
    for c in chans:
        ill[(0, c) + (0,) * (len(shape) - 2)] = 40.0   # first value of channel c: 40 sd out
    if C > 20:
        ill[:, 17] += dtype(1e6)                        # and a large offset
        chans.append(17)
    others = [c for c in range(C) if c not in chans]
    (clean, axis), (ill, _) = _in_layout(clean, layout), _in_layout(ill, layout)
    w, b = rng.uniform(0.5, 2, C), rng.standard_normal(C)
    for nt in (1, 2):
        with bnfast.num_threads(nt):
            mc, vc = bnfast.moments(clean, axis=axis)
            mi, vi = bnfast.moments(ill, axis=axis)
            yc, _, ic = bnfast.batch_norm_train(clean, w, b, axis=axis)
            yi, _, ii = bnfast.batch_norm_train(ill, w, b, axis=axis)
        for name, a, z in (("mean", mc, mi), ("var", vc, vi), ("invstd", ic, ii)):
            assert_same_bits(a[others], z[others], f"{name}, {nt} threads")
        for c in others:
            assert_same_bits(_chan(yc, c, axis), _chan(yi, c, axis), f"y channel {c}")
        # the ill-conditioned channels themselves are right (float64 twin)
        rm, rv = ref.moments(ill, axis=axis)
        assert np.allclose(mi[chans], rm[chans], rtol=1e-12, atol=0)
        assert np.allclose(vi[chans], rv[chans], rtol=1e-9, atol=0)
