"""The element-wise passes of float32 data in float32 arithmetic (csrc/bn_elementwise.h,
ew_f32; docs/user_guide/semantics.md).

The normalisation: per channel mh = f32(m), af = f32(a), bf = f32(b - (m - mh) * a); per
element t = (x - mh) * af + bf in three float32 operations.  The backward's dx without the
ReLU: kdf = f32(kd), kxf = f32(kx), k0f = f32(k0 + kx * (mh - m)); per element
(g * kdf + k0f) + (x - mh) * kxf (eval mode: g * kdf).  The float64 formula where t is not
finite or the channel's parameters do not fit float32.  Checked here: the exact bits against
a NumPy emulation of those sequences (NumPy's float32 loops round each operation once, as
the kernels do), the error bounds against the float64 twin, every fallback, and the forced
float64 arithmetic against the float64 formula.
"""
import numpy as np
import pytest

import bnfast
from bnfast import reference as ref
from bnfast._plan import force_strategy, forced_strategy
from conftest import assert_same_bits, dx_f32, norm_f32, rng_for

EPS32 = float(np.finfo(np.float32).eps)


@pytest.fixture
def arith():
    """arith(name): force the element-wise arithmetic for the rest of the test."""
    before = forced_strategy()
    yield lambda name: force_strategy(arithmetic=name)
    force_strategy(**before)


def _coeffs(var, w, b, eps):
    """The kernels' per-channel scale and shift (bn_train.h: coeffs), same IEEE operations."""
    inv = 1.0 / np.sqrt(var + eps)
    return inv * w, b.astype(np.float64)


def _emulate(x, axis, m, a, b, relu, f32=True):
    """The kernels' float32 (or float64) element-wise formula in NumPy, bit for bit."""
    shp = [1] * x.ndim
    shp[axis] = -1
    m, a, b = (np.asarray(v, np.float64).reshape(shp) for v in (m, a, b))
    with np.errstate(all="ignore"):
        yd = (x.astype(np.float64) - m) * a + b
        if relu:
            yd = np.where(yd <= 0, 0.0, yd)
        yd = yd.astype(np.float32)
    if not f32:
        return np.where(np.isnan(yd), np.float32(np.nan), yd)
    return norm_f32(x, m, a, b, relu, yd)


# (shape, axis): the rows layout, the columns layout's spans, period-64, tiles and rows
# walks, tails of every length, a batch-1 row
SHAPES = [((4, 3, 100), 1), ((8, 16, 9, 9), 1), ((32, 512, 7, 7), 1), ((16, 8, 8, 24), -1),
          ((64, 64), 1), ((32, 2048), 1), ((5, 13), 1), ((1, 512, 7, 7), 1), ((2, 7, 3), 1),
          ((256, 5, 3), 1), ((3, 4, 2, 5, 9), 2)]


def _small(shape, axis):
    """Whether the plan computes float32 data of this shape in double: fewer than
    F32_MIN_PER_CHANNEL elements per channel (test_small_channels_stay_in_double)."""
    from bnfast import _core
    return int(np.prod(shape)) // shape[axis] < _core.F32_MIN_PER_CHANNEL


def _special(x):
    """Elements the float32 formula cannot compute: NaN with a sign and payload (float32
    arithmetic would keep them; the fallback stores the canonical NaN), infinities."""
    x.flat[::97] = np.uint32(0xFFC00123).view(np.float32)
    x.flat[5::101] = np.float32(np.inf)
    x.flat[7::103] = np.float32(-np.inf)


def _case(key, shape, axis, loc=0.5, spread=3.0):
    rng = rng_for("f32-arith", key, shape, axis)
    x = (loc + spread * rng.standard_normal(shape)).astype(np.float32)
    C = shape[axis]
    w = rng.standard_normal(C) * 2
    b = rng.standard_normal(C)
    m = loc + rng.standard_normal(C)
    v = rng.random(C) * spread ** 2 + 0.1
    return x, w, b, m, v


@pytest.mark.parametrize("relu", [False, True], ids=["plain", "relu"])
@pytest.mark.parametrize("shape,axis", SHAPES, ids=[f"{'x'.join(map(str, s))}-ax{a}"
                                                    for s, a in SHAPES])
def test_bits_of_the_float32_formula(shape, axis, relu, isa, nthreads, arith):
    x, w, b, m, v = _case("bits", shape, axis)
    _special(x)
    if _small(shape, axis):   # the plan keeps these in double: the float32 code forced
        arith("float32")
    assert bnfast.explain(x, op="infer", axis=axis)["elementwise"]["arithmetic"] == "float32"
    a, sh = _coeffs(v, w, b, 1e-5)
    want = _emulate(x, axis % x.ndim, m, a, sh, relu)
    assert_same_bits(bnfast.batch_norm_infer(x, m, v, w, b, axis=axis, relu=relu), want,
                     "inference")
    y, mean, invstd = bnfast.batch_norm_train(x, w, b, axis=axis, relu=relu)
    assert_same_bits(y, _emulate(x, axis % x.ndim, mean, invstd * w, b, relu), "training")
    out = x.copy()                       # in place: the same bits
    bnfast.batch_norm_infer(out, m, v, w, b, axis=axis, relu=relu, out=out)
    assert_same_bits(out, want, "in place")


def _out_for_streaming(x):
    """An output 1 KiB after x modulo 4 KiB (16-byte aligned), so that the kernels' rule
    against 4 KiB aliasing (bn_stream_alias) leaves streaming stores on."""
    buf = np.zeros(x.size + 2048, np.float32)
    delta = (x.ctypes.data + 1024 - buf.ctypes.data) % 4096
    assert delta % 16 == 0
    k = delta // 4
    return buf[k:k + x.size].reshape(x.shape)


# the rows layout, the spans, period-64 and tiles walks, each with whole 16-byte periods
STREAMED = [((4, 3, 100), 1), ((16, 8, 8, 24), -1), ((64, 64), 1), ((32, 2048), 1)]


@pytest.mark.parametrize("relu", [False, True], ids=["plain", "relu"])
@pytest.mark.parametrize("shape,axis", STREAMED, ids=[f"{'x'.join(map(str, s))}-ax{a}"
                                                      for s, a in STREAMED])
def test_streaming_stores_rewrite_their_spans(shape, axis, relu, isa, nthreads):
    """With streaming stores, a span holding a non-finite value is rewritten element by
    element after its streaming stores: the same bits as the formula."""
    from bnfast import _config
    x, w, b, m, v = _case("stream", shape, axis)
    _special(x)
    a, sh = _coeffs(v, w, b, 1e-5)
    out = _out_for_streaming(x)
    with _config._stream_min_bytes(0):
        assert bnfast.explain(x, op="infer", axis=axis)["elementwise"]["stream"]
        bnfast.batch_norm_infer(x, m, v, w, b, axis=axis, relu=relu, out=out)
    assert_same_bits(out, _emulate(x, axis % x.ndim, m, a, sh, relu))


@pytest.mark.parametrize("relu", [False, True], ids=["plain", "relu"])
@pytest.mark.parametrize("shape,axis", SHAPES[:6], ids=[f"{'x'.join(map(str, s))}-ax{a}"
                                                        for s, a in SHAPES[:6]])
def test_forced_float64_is_the_double_formula(shape, axis, relu, isa, arith):
    x, w, b, m, v = _case("f64", shape, axis)
    arith("float64")
    assert bnfast.explain(x, op="train", axis=axis)["elementwise"]["arithmetic"] == "float64"
    a, sh = _coeffs(v, w, b, 1e-5)
    got = bnfast.batch_norm_infer(x, m, v, w, b, axis=axis, relu=relu)
    assert_same_bits(got, _emulate(x, axis % x.ndim, m, a, sh, relu, f32=False))
    arith("float32")
    f32 = bnfast.batch_norm_infer(x, m, v, w, b, axis=axis, relu=relu)
    assert not np.array_equal(f32, got), "the two arithmetics gave the same bits"


def _scale_of(x, axis, m, a, b):
    """Per channel: |a| max |x - m| + |b|, the magnitude of the terms of y."""
    xc = np.moveaxis(x.astype(np.float64), axis, 0).reshape(x.shape[axis], -1)
    return np.abs(a) * np.abs(xc - m[:, None]).max(axis=1) + np.abs(b)


def test_error_bound_against_the_twin(isa):
    """|y - y64| <= 2 FLT_EPSILON (|a| max|x - m| + |b|) per channel, over data far from
    zero, tiny and huge spreads, shifts that cancel the normalised values, and both modes;
    the largest error seen is printed (docs/user_guide/semantics.md quotes it)."""
    rng = rng_for("f32-bound", isa)
    worst = 0.0
    for trial in range(240):
        C, n = 6, 300
        loc = [0.0, 1e6, -3.0, 1e3, 0.5, 1e-3][trial % 6] * 10 ** rng.uniform(-1, 1)
        spread = 10 ** rng.uniform(-3, 3)
        x = (loc + spread * rng.standard_normal((n, C))).astype(np.float32)
        if trial % 5 == 0:
            x = (loc + spread * rng.uniform(-1, 1, (n, C))).astype(np.float32)
        w = rng.standard_normal(C) * 10 ** rng.uniform(-2, 2, C)
        b = rng.standard_normal(C) * 10 ** rng.uniform(-2, 2, C)
        if trial % 7 == 0:
            b = -w * rng.uniform(0.5, 3, C)   # the shift cancels the normalised values
        relu = trial % 3 == 0
        if trial % 2:
            y, _, _ = bnfast.batch_norm_train(x, w, b, relu=relu)
            _, mean, invstd = ref.batch_norm_train(x, w, b)
            m, a = np.asarray(mean), np.asarray(invstd) * w
        else:
            m = loc + spread * rng.standard_normal(C)
            v = spread ** 2 * (rng.random(C) + 0.2)
            y = bnfast.batch_norm_infer(x, m, v, w, b, relu=relu)
            a = w / np.sqrt(v + 1e-5)
        y64 = (x.astype(np.float64) - m) * a + b
        if relu:
            y64 = np.maximum(y64, 0.0)
        err = np.abs(y.astype(np.float64) - y64).max(axis=0)
        ratio = err / (EPS32 * _scale_of(x, 1, m, a, b))
        assert (ratio <= 2.0).all(), (trial, ratio.max())
        worst = max(worst, float(ratio.max()))
    print(f"\nfloat32 normalisation, largest error: {worst:.3f} FLT_EPSILON x channel scale")


def test_fallbacks_match_the_double_formula(isa):
    """Elements float32 cannot compute (overflow, inf, NaN) and channels whose parameters
    it cannot carry (subnormal or infinite scale, huge mean) take the float64 value."""
    C = 6
    x = np.ones((40, C), np.float32)
    x[:, 0] = np.where(np.arange(40) % 2, 3e38, -3e38)   # x - m overflows float32
    x[:, 1] = np.linspace(-1, 1, 40)
    x[3, 1], x[4, 1], x[5, 1] = np.inf, -np.inf, np.nan
    x[:, 2] = np.linspace(-1, 1, 40)
    x[:, 3] = 2.0 ** 100 * np.linspace(1, 2, 40)
    x[:, 4] = np.linspace(-1, 1, 40)
    x[:, 5] = np.linspace(-1, 1, 40)
    m = np.array([-3e38, 0.0, 0.0, 0.0, 1e39, 0.0])      # 1e39: not a float32
    v = np.array([16.0, 1.0, 1e78, 1.0, 1.0, 1.0])
    w = np.array([1.0, 1.0, 1e-3, 1e-30, 1.0, 1e40])      # scales: 0.25, 1, subnormal in
    b = np.array([-0.5, 0.0, 0.0, 0.0, 0.0, 0.0])          # float32, 1e-30, 1, inf in f32
    for relu in (False, True):
        a, sh = _coeffs(v, w, b, 1e-5)
        got = bnfast.batch_norm_infer(x, m, v, w, b, relu=relu)
        assert_same_bits(got, _emulate(x, 1, m, a, sh, relu), f"relu={relu}")
        f64 = _emulate(x, 1, m, a, sh, relu, f32=False)
        # where float32 cannot go, the double formula's value
        for c in (0, 2, 4, 5):
            assert_same_bits(got[:, c], f64[:, c], f"channel {c}")
        assert_same_bits(got[3:6, 1], f64[3:6, 1], "inf and NaN elements")
        # channel 0: 3e38 - (-3e38) is inf in float32, 1.5e38 in double
        assert np.isfinite(got[:, 0]).all() and got[:, 0].max() > 1.4e38
        assert np.isinf((x[1, 0] - np.float32(m[0])) * np.float32(a[0]))


def test_constant_channel_is_exactly_beta_and_offset_data(isa):
    rng = rng_for("f32-const", isa)
    x = (1e6 + rng.standard_normal((64, 3))).astype(np.float32)
    x[:, 1] = np.float32(123.456)
    b = np.array([0.25, -7.5, 3.0])
    y, mean, _ = bnfast.batch_norm_train(x, None, b)
    assert (y[:, 1] == np.float32(-7.5)).all()
    assert mean[1] == np.float64(np.float32(123.456))
    # 1e6 offset: the mean's float32 rounding (0.03 here) is folded into the shift
    z = (x[:, 0].astype(np.float64) - x[:, 0].astype(np.float64).mean())
    z = z / np.sqrt((z * z).mean() + 1e-5) + 0.25
    assert np.abs(y[:, 0] - z).max() <= 2 * EPS32 * (np.abs(z - 0.25).max() + 0.25)


def test_tiny_scale_takes_the_double_formula(isa):
    """A scale that float32 flushes to zero (|a| < 2**-150) but whose products are normal
    float32 values: the channel is computed in float64, not as y = bf."""
    x = np.stack([np.linspace(-1e10, 1e10, 40), np.linspace(-1, 1, 40)], 1).astype(np.float32)
    m, v = np.zeros(2), np.ones(2)
    w, b = np.array([1e-46, 1.0]), np.zeros(2)
    y = bnfast.batch_norm_infer(x, m, v, w, b, eps=0.0)
    a, sh = _coeffs(v, w, b, 0.0)
    assert np.float32(a[0]) == 0 and abs(y[0, 0]) > 1e-37
    assert_same_bits(y, _emulate(x, 1, m, a, sh, False))
    assert_same_bits(y[:, 0], _emulate(x, 1, m, a, sh, False, f32=False)[:, 0])


def test_which_passes_compute_in_float32():
    x = np.zeros((8, 4, 3))
    for op in ("train", "infer", "backward"):
        for relu in (False, True):
            assert bnfast.explain(x, op=op, relu=relu)["elementwise"]["arithmetic"] == "float64"
    x = x.astype(np.float32)
    for op in ("train", "infer"):
        for relu in (False, True):
            assert bnfast.explain(x, op=op, relu=relu)["elementwise"]["arithmetic"] == "float32"
    assert bnfast.explain(x, op="backward")["elementwise"]["arithmetic"] == "float32"
    assert bnfast.explain(x, op="backward", relu=True)["elementwise"]["arithmetic"] == "float64"


# (shape, axis) with fewer than 8 elements per channel: batch-1 fully connected, 1x1
# maps, a short 3-D sequence, channels last
SMALL = [((1, 2048), 1), ((2, 2048), 1), ((7, 33), 1), ((1, 512, 1, 1), 1), ((1, 64, 7), 1),
         ((1, 2, 5), 1), ((1, 3, 2, 40), -1)]


@pytest.mark.parametrize("shape,axis", SMALL, ids=[f"{'x'.join(map(str, s))}-ax{a}"
                                                   for s, a in SMALL])
def test_small_channels_stay_in_double(shape, axis, isa, nthreads):
    """Channels of fewer than F32_MIN_PER_CHANNEL elements (N * S) are normalised, and their
    dx computed, in double in every variant (the float32 path's per-channel parameters
    would cost more than they save there: csrc/plan.c); 8 elements or more, in float32."""
    from bnfast import _core
    assert _small(shape, axis) and _core.F32_MIN_PER_CHANNEL == 8
    x, w, b, m, v = _case("small", shape, axis)
    _special(x)
    for variant in ("baseline", "avx2", "avx512"):
        for op, relu in (("train", True), ("infer", False), ("backward", False)):
            plan = bnfast.explain(x, op=op, axis=axis, relu=relu, isa=variant)
            assert plan["elementwise"]["arithmetic"] == "float64", (variant, op)
    a, sh = _coeffs(v, w, b, 1e-5)
    for relu in (False, True):
        got = bnfast.batch_norm_infer(x, m, v, w, b, axis=axis, relu=relu)
        assert_same_bits(got, _emulate(x, axis % x.ndim, m, a, sh, relu, f32=False))
        if x.size > x.shape[axis]:        # training needs 2 values per channel
            y, mean, invstd = bnfast.batch_norm_train(x, w, b, axis=axis, relu=relu)
            assert_same_bits(y, _emulate(x, axis % x.ndim, mean, invstd * w, b, relu,
                                         f32=False))
    dy, x, m, inv, w = _dx_case("small", shape, axis)
    d3, x3 = _kernel_view(dy, axis), _kernel_view(x, axis)
    for training in (True, False):
        want = _emulate_dx(d3, x3, m, *_dx_coeffs(d3, x3, m, inv, w, training), training,
                           f32=False)
        got, _, _ = bnfast.batch_norm_backward(dy, x, m, inv, w, training=training, axis=axis)
        assert_same_bits(got, want.reshape(shape), f"dx, training={training}")


def test_eight_elements_per_channel_take_float32():
    for shape in ((8, 2048), (1, 512, 2, 4), (4, 64, 2)):
        for op in ("train", "infer", "backward"):
            plan = bnfast.explain(np.zeros(shape, np.float32), op=op)
            assert plan["elementwise"]["arithmetic"] == "float32", (shape, op)


# ------------------------------------------------------------------ the backward's dx

def _kernel_view(a, axis):
    """(N, C, S) view of a C-contiguous array with its channel axis at `axis`."""
    ax = axis % a.ndim
    return a.reshape(int(np.prod(a.shape[:ax])), a.shape[ax], -1)


def _dx_coeffs(dy, x, m, inv, w, training):
    """The kernels' float64 dx coefficients (kd, kx, k0) for the data at hand, from the same
    sums and the same formulas (bnfast._core, as batch_norm_backward calls them)."""
    from bnfast import _core
    N, C, S = x.shape
    sd, sx = _core.backward_sums(dy, x, N, C, S, m, inv, w, None, False,
                                 bnfast.get_num_threads())
    _, kx, k0, _ = _core.backward_coefficients(sd, sx, inv, w, float(N * S), training)
    return inv * w, kx, k0


def _emulate_dx(dy, x, m, kd, kx, k0, training, f32=True):
    """dx of (N, C, S) float32 data: the kernels' float32 formula (or the float64 one) in
    NumPy, bit for bit, with the fallbacks."""
    m, kd, kx, k0 = (np.asarray(v, np.float64).reshape(1, -1, 1) for v in (m, kd, kx, k0))
    with np.errstate(all="ignore"):
        g64 = dy.astype(np.float64)
        d = kd * g64 if not training else (kd * g64 + kx * (x.astype(np.float64) - m)) + k0
        d = d.astype(np.float32)
    if not f32:
        return np.where(np.isnan(d), np.float32(np.nan), d)
    return dx_f32(dy, x, m, kd, kx, k0, training, d)


# the rows layout (S = 100, 81, 49: tails), the columns layout's spans, tiles and rows
# walks, batch-1, odd channel counts, a 5-D tensor with the channel axis in the middle
DX_SHAPES = [((4, 3, 100), 1), ((8, 16, 9, 9), 1), ((32, 512, 7, 7), 1), ((16, 8, 8, 24), -1),
             ((64, 64), 1), ((32, 2048), 1), ((5, 13), 1), ((2, 7, 3), 1), ((256, 5, 3), 1),
             ((3, 4, 2, 5, 9), 2), ((20, 2050), 1), ((12, 2800, 3, 3), 1)]


def _dx_case(key, shape, axis, special=True):
    rng = rng_for("f32-dx", key, shape, axis)
    x = (0.5 + 3 * rng.standard_normal(shape)).astype(np.float32)
    dy = (0.2 + rng.standard_normal(shape)).astype(np.float32)
    if special:
        _special(x)
        dy.flat[11::89] = np.float32(np.nan)
        dy.flat[13::107] = np.float32(-np.inf)
    C = shape[axis]
    m = 0.5 + rng.standard_normal(C)
    inv = 1 / np.sqrt(rng.random(C) * 9 + 0.1)
    w = rng.standard_normal(C) * 2
    return dy, x, m, inv, w


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape,axis", DX_SHAPES, ids=[f"{'x'.join(map(str, s))}-ax{a}"
                                                       for s, a in DX_SHAPES])
def test_dx_bits_of_the_float32_formula(shape, axis, training, isa, nthreads, arith):
    """dx of float32 data without the ReLU: the exact bits of the float32 sequence, out of
    place and in place over dy and x; with NaN and infinite inputs (the kernel's dx pass
    with the clean data's coefficients: batch_norm_backward recomputes a channel whose sums
    are not finite in long double), those elements take the float64 value."""
    from bnfast import _core
    dy, x, m, inv, w = _dx_case("bits", shape, axis, special=False)
    if _small(shape, axis):   # the plan keeps these in double: the float32 code forced
        arith("float32")
    assert bnfast.explain(x, op="backward", axis=axis)["elementwise"]["arithmetic"] == "float32"
    d3, x3 = _kernel_view(dy, axis), _kernel_view(x, axis)
    coeffs = _dx_coeffs(d3, x3, m, inv, w, training)
    want = _emulate_dx(d3, x3, m, *coeffs, training).reshape(shape)
    dx, _, _ = bnfast.batch_norm_backward(dy, x, m, inv, w, training=training, axis=axis)
    assert_same_bits(dx, want, "dx")
    for name in ("dy", "x"):
        d, xx = dy.copy(), x.copy()
        out = d if name == "dy" else xx
        bnfast.batch_norm_backward(d, xx, m, inv, w, training=training, axis=axis, out=out)
        assert_same_bits(out, want, f"in place over {name}")
    ds, xs, _, _, _ = _dx_case("bits", shape, axis)
    d3, x3 = _kernel_view(ds, axis), _kernel_view(xs, axis)
    _, kx, k0 = coeffs
    for target in ("new", "dy", "x"):
        d, xx = d3.copy(), x3.copy()
        out = np.empty_like(x3) if target == "new" else d if target == "dy" else xx
        _core.backward_dx(d, xx, out, *x3.shape, m, inv, w, None, kx, k0, False, training,
                          bnfast.get_num_threads())
        assert_same_bits(out, _emulate_dx(d3, x3, m, *coeffs, training), f"special, {target}")


@pytest.mark.parametrize("shape,axis", STREAMED, ids=[f"{'x'.join(map(str, s))}-ax{a}"
                                                      for s, a in STREAMED])
def test_dx_streaming_stores_rewrite_their_spans(shape, axis, isa, nthreads):
    from bnfast import _config
    dy, x, m, inv, w = _dx_case("stream", shape, axis)
    d3, x3 = _kernel_view(dy, axis), _kernel_view(x, axis)
    want = _emulate_dx(d3, x3, m, *_dx_coeffs(d3, x3, m, inv, w, True), True).reshape(shape)
    out = _out_for_streaming(x)
    with _config._stream_min_bytes(0):
        assert bnfast.explain(x, op="backward", axis=axis)["elementwise"]["stream"]
        bnfast.batch_norm_backward(dy, x, m, inv, w, axis=axis, out=out)
    assert_same_bits(out, want)


@pytest.mark.parametrize("shape,axis", DX_SHAPES[:6], ids=[f"{'x'.join(map(str, s))}-ax{a}"
                                                           for s, a in DX_SHAPES[:6]])
def test_dx_forced_float64_and_the_relu_are_the_double_formula(shape, axis, isa, arith):
    dy, x, m, inv, w = _dx_case("f64", shape, axis, special=False)
    d3, x3 = _kernel_view(dy, axis), _kernel_view(x, axis)
    f64 = _emulate_dx(d3, x3, m, *_dx_coeffs(d3, x3, m, inv, w, True), True,
                      f32=False).reshape(shape)
    arith("float64")
    assert bnfast.explain(x, op="backward", axis=axis)["elementwise"]["arithmetic"] == "float64"
    got, _, _ = bnfast.batch_norm_backward(dy, x, m, inv, w, axis=axis)
    assert_same_bits(got, f64)
    arith(None)
    f32, _, _ = bnfast.batch_norm_backward(dy, x, m, inv, w, axis=axis)
    assert not np.array_equal(f32, got), "the two arithmetics gave the same bits"
    # with the ReLU, dx is the double formula of the masked dy whatever the setting
    b = np.zeros_like(m)
    r1, _, _ = bnfast.batch_norm_backward(dy, x, m, inv, w, bias=b, relu=True, axis=axis)
    arith("float64")
    r2, _, _ = bnfast.batch_norm_backward(dy, x, m, inv, w, bias=b, relu=True, axis=axis)
    assert_same_bits(r1, r2, "relu")


def _dx_bound(S, kx, m):
    """The documented bound of dx's float32 arithmetic: 2 FLT_EPSILON S + FLT_EPSILON^2
    (2 |kx m| + 5 S), S the channel's terms."""
    return 2 * EPS32 * S + EPS32 ** 2 * (2 * np.abs(kx * m) + 5 * S)


def test_dx_error_bound_against_the_twin(isa):
    """|dx - dx64| <= 2 FLT_EPSILON (|kd| max|g| + |kx| max|x - m| + |k0|) per channel (plus
    the second-order term, _dx_bound), dx64 the float64 twin's: data far from zero, tiny and huge spreads, dy with a mean far from
    zero, dy proportional to x (dx = 0: the terms cancel), eval mode; the largest error seen,
    and the largest against the channel's own max|dx64|, are printed
    (docs/user_guide/semantics.md quotes them)."""
    rng = rng_for("f32-dx-bound", isa)
    worst = worst_out = 0.0
    for trial in range(240):
        C, n = 6, 300
        loc = [0.0, 1e6, -3.0, 1e3, 0.5, 1e-3][trial % 6] * 10 ** rng.uniform(-1, 1)
        spread = 10 ** rng.uniform(-3, 3)
        x = (loc + spread * rng.standard_normal((n, C))).astype(np.float32)
        gs = 10 ** rng.uniform(-3, 3)
        dy = gs * (rng.standard_normal((n, C)) + [0.0, 0.1, 1.0, 0.0, 0.0, 30.0][trial % 6])
        if trial % 7 == 0:   # dy proportional to the normalised x: the terms cancel
            dy = gs * (x - x.astype(np.float64).mean(0)) / spread
        dy = dy.astype(np.float32)
        w = rng.standard_normal(C) * 10 ** rng.uniform(-2, 2, C)
        training = trial % 5 != 0
        _, mean, invstd = ref.batch_norm_train(x, w, None)
        if not training:
            mean = loc + spread * rng.standard_normal(C)
            invstd = 1 / (spread * np.sqrt(rng.random(C) + 0.2))
        dx, _, _ = bnfast.batch_norm_backward(dy, x, mean, invstd, w, training=training)
        dx64, dw, db = ref.batch_norm_backward(dy, x, mean, invstd, w, training=training)
        kd = w * invstd
        g = dy.astype(np.float64)
        S = np.abs(kd) * np.abs(g).max(0)
        if training:
            kx = -kd * invstd * dw / n
            k0 = -kd * db / n
            S += np.abs(kx) * np.abs(x - mean).max(0) + np.abs(k0)
        err = np.abs(dx.astype(np.float64) - dx64).max(0)
        assert (err[S == 0] == 0).all(), trial          # dy = 0 (a constant x here)
        kxm = np.abs(kx * mean) if training else np.zeros(C)
        assert (err <= _dx_bound(S, kxm, 1.0)).all(), trial
        ratio = err[S > 0] / (EPS32 * S[S > 0])
        worst = max(worst, float(ratio.max(initial=0.0)))
        top = np.abs(dx64).max(0)
        if trial % 7 and (top > 0).all():
            worst_out = max(worst_out, float((err / (EPS32 * top)).max()))
    print(f"\nfloat32 dx, largest error: {worst:.3f} FLT_EPSILON x channel terms; "
          f"{worst_out:.3f} FLT_EPSILON x max|dx| (dy not proportional to x)")


def test_dx_bound_where_the_spread_is_one_ulp_of_the_mean(isa, arith):
    """Two values one float32 ulp apart at 63.8, the mean between them: the x term as
    computed, |kx| |x - mh|, exceeds |kx| |x - m| by half an ulp of m, and the error reaches
    2.15 FLT_EPSILON of S (the exact value in rationals): within the bound only through its
    second-order term (a case from review)."""
    from fractions import Fraction
    from bnfast import _core
    arith("float32")   # two elements per channel: the plan would take double
    mh = np.float32(63.77708435058594)
    m, kx, g = 63.77708623305153, 1.0132334837100854, np.float32(1.1746748018737208e-09)
    x = np.array([mh, np.nextafter(mh, np.float32(np.inf))], np.float32).reshape(2, 1, 1)
    dy = np.full((2, 1, 1), g, np.float32)
    out = np.empty_like(x)
    _core.backward_dx(dy, x, out, 2, 1, 1, np.array([m]), np.ones(1), np.ones(1), None,
                      np.array([kx]), np.zeros(1), False, True, bnfast.get_num_threads())
    S = abs(float(g)) + kx * np.abs(x.astype(np.float64) - m).max()
    exact = [Fraction(float(g)) + Fraction(kx) * (Fraction(float(v)) - Fraction(m))
             for v in x.ravel()]
    err = max(float(abs(Fraction(float(o)) - e)) for o, e in zip(out.ravel(), exact))
    assert 2 * EPS32 * S < err <= _dx_bound(S, kx, m), err / (EPS32 * S)


def test_dx_fallbacks_match_the_double_formula(isa):
    """Elements float32 cannot compute (overflow of g * kd, inf and NaN inputs) and
    channels whose scales it cannot carry (kd or kx subnormal or flushed to zero, a mean
    beyond float32) take the float64 value; the others the float32 formula."""
    from bnfast import _core
    N, C, S = 40, 7, 1
    x = np.tile(np.linspace(-1, 1, N, dtype=np.float32)[:, None], (1, C)).reshape(N, C, S)
    dy = np.tile(np.linspace(2, -1, N, dtype=np.float32)[:, None], (1, C)).reshape(N, C, S)
    dy[:, 0] = 3e38             # g * kd overflows float32, g * kd + k0 does not
    x[3, 1], x[4, 1], dy[5, 1], dy[6, 1] = np.inf, np.nan, -np.inf, np.nan
    dy[:, 4] = 1e30                                      # kd * g = 1e-16: normal in float32
    m = np.array([0.0, 0.0, 0.0, 0.0, 0.0, 1e39, 0.0])
    inv = np.ones(C)
    w = np.array([4.0, 1.0, 1e-40, 1.0, 1e-46, 1.0, 1.0])   # kd: subnormal, flushed to 0
    kx = np.array([0.5, 0.5, 0.5, 1e-41, 0.5, 0.5, -0.25])  # kx subnormal in float32
    k0 = np.array([-1.2e39, 1.0, 1.0, 1.0, 0.0, 1.0, 0.125])
    kd = inv * w
    want = _emulate_dx(dy, x, m, kd, kx, k0, True)
    f64 = _emulate_dx(dy, x, m, kd, kx, k0, True, f32=False)
    for training in (True, False):
        dx = np.empty_like(x)
        _core.backward_dx(dy, x, dx, N, C, S, m, inv, w, None, kx, k0, False, training,
                          bnfast.get_num_threads())
        if not training:
            want = _emulate_dx(dy, x, m, kd, kx, k0, False)
            f64 = _emulate_dx(dy, x, m, kd, kx, k0, False, f32=False)
        assert_same_bits(dx, want, f"training={training}")
        for c in (0, 2, 4) + ((3, 5) if training else ()):
            assert_same_bits(dx[:, c], f64[:, c], f"channel {c}")
        assert_same_bits(dx[3:7, 1], f64[3:7, 1], "inf and NaN elements")
        if training:    # 3e38 * 4 - 1.2e39 + 0.5 x: finite in double
            assert np.isfinite(dx[:, 0]).all()
