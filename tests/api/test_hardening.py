"""Regression tests for the defects of the adversarial probe (issue 12) in the functional
API, the thread and variant settings, and the kernels' numerics.

Each test failed before its fix.
"""
import subprocess
import sys
import tempfile
import threading

import numpy as np
import pytest

import bnfast
from bnfast import reference as ref
from conftest import package_env

ISAS = bnfast.available_isas()


# ---------------------------------------------------------------- 1. thread counts

@pytest.mark.parametrize("n", [100_000, 60_000, bnfast.MAX_THREADS + 1, 2**31, 10**400])
def test_thread_count_above_the_cap_is_refused(n):
    before = bnfast.get_num_threads()
    with pytest.raises(ValueError, match=r"number of threads must be at most"):
        bnfast.set_num_threads(n)
    with pytest.raises(ValueError, match=r"number of threads must be at most"):
        with bnfast.num_threads(n):
            pass
    assert bnfast.get_num_threads() == before
    # still usable afterwards, and blocks still restore
    with bnfast.num_threads(1):
        assert bnfast.get_num_threads() == 1
    assert bnfast.get_num_threads() == before
    bnfast.moments(np.ones((2, 32768), np.float32))


def test_thread_count_at_the_cap_runs():
    x = np.random.default_rng(0).standard_normal((4, 32768)).astype(np.float32)
    ref_m = bnfast.moments(x)
    with bnfast.num_threads(bnfast.MAX_THREADS):
        m = bnfast.moments(x)
    np.testing.assert_array_equal(m[0], ref_m[0])
    np.testing.assert_array_equal(m[1], ref_m[1])


def test_omp_num_threads_huge_is_capped_with_a_warning():
    code = ("import warnings, numpy as np, bnfast\n"
            "with warnings.catch_warnings(record=True) as w:\n"
            "    warnings.simplefilter('always')\n"
            "    n = bnfast.get_num_threads()\n"
            "    bnfast.moments(np.ones((2, 32768), np.float32))\n"
            "print(n, bnfast.MAX_THREADS, len(w), w[0].message if w else '')\n")
    # outside the checkout, whose uncompiled bnfast/ would shadow the installed one
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env=package_env(OMP_NUM_THREADS="100000"), timeout=120,
                       cwd=tempfile.gettempdir())
    assert r.returncode == 0, r.stderr
    n, cap, nwarn, msg = r.stdout.split(" ", 3)
    assert n == cap and int(nwarn) >= 1 and "100000" in msg


# ---------------------------------------------------------------- 2 and 11. running statistics

def _train_ref(x, rm, rv, momentum=0.1):
    mean, var = x.mean(0), x.var(0)
    n = x.shape[0]
    return ((1 - momentum) * rm + momentum * mean,
            (1 - momentum) * rv + momentum * var * n / (n - 1))


def test_running_stats_in_a_structured_array_field():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((16, 4))
    rec = np.zeros(4, [("m", "f8"), ("tag", "i4")])
    rec["tag"] = 7
    rvar = np.zeros(4, [("v", "f8"), ("tag", "i4")])
    rvar["v"] = 1.0
    rvar["tag"] = -3
    bnfast.batch_norm_train(x, running_mean=rec["m"], running_var=rvar["v"])
    em, ev = _train_ref(x, np.zeros(4), np.ones(4))
    np.testing.assert_allclose(rec["m"], em, rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(rvar["v"], ev, rtol=1e-13)
    assert (rec["tag"] == 7).all() and (rvar["tag"] == -3).all()


def test_interleaved_fields_that_do_not_overlap_are_accepted():
    x = np.random.default_rng(2).standard_normal((16, 3)).astype(np.float32)
    rec = np.zeros(3, [("m", "f4"), ("v", "f4")])
    rec["v"] = 1.0
    bnfast.batch_norm_train(x, running_mean=rec["m"], running_var=rec["v"])
    em, ev = _train_ref(x.astype(np.float64), np.zeros(3), np.ones(3))
    np.testing.assert_allclose(rec["m"], em, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(rec["v"], ev, rtol=1e-6)


def test_big_endian_running_stats_are_updated():
    x = np.random.default_rng(3).standard_normal((16, 3))
    rm, rv = np.zeros(3, ">f8"), np.ones(3, ">f8")
    bnfast.batch_norm_train(x, running_mean=rm, running_var=rv)
    em, ev = _train_ref(x, np.zeros(3), np.ones(3))
    assert rm.dtype == np.dtype(">f8")
    np.testing.assert_allclose(rm, em, rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(rv, ev, rtol=1e-13)


def test_running_stats_that_truly_overlap_are_refused():
    buf = np.zeros(5)
    with pytest.raises(ValueError, match="running_mean and running_var must not share"):
        bnfast.batch_norm_train(np.ones((4, 4)) + np.arange(4.0)[:, None],
                                running_mean=buf[:4], running_var=buf[1:])


def test_running_stats_sharing_memory_with_x_or_out_are_refused():
    x = np.random.default_rng(4).standard_normal((8, 4, 4))
    with pytest.raises(ValueError, match="running_mean must not share memory with x"):
        bnfast.batch_norm_train(x, running_mean=x[0, 0], running_var=np.ones(4))
    out = np.empty_like(x)
    with pytest.raises(ValueError, match="running_var must not share memory with out"):
        bnfast.batch_norm_train(x, running_mean=np.zeros(4), running_var=out[0, 0], out=out)


# ---------------------------------------------------------------- 3. vectors that alias out

@pytest.mark.parametrize("threads", [1, 2])
def test_infer_with_mean_a_view_of_out(threads):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((3, 4, 4))
    x0 = x.copy()
    mean = x[0, 0, :4]
    var = np.full(4, 2.0)
    expect = ref.batch_norm_infer(x0, x0[0, 0, :4].copy(), var)
    with bnfast.num_threads(threads):
        y = bnfast.batch_norm_infer(x, mean, var, out=x)
    assert y is x
    np.testing.assert_allclose(y, expect, rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("threads", [1, 2])
def test_backward_with_mean_a_view_of_out_dy(threads):
    rng = np.random.default_rng(6)
    x = rng.standard_normal((64, 8, 70))
    dy = rng.standard_normal(x.shape)
    dy0 = dy.copy()
    _, mean, invstd = bnfast.batch_norm_train(x)
    mean_in_dy = dy[0, 0, :8]
    mean_in_dy[...] = mean
    e = ref.batch_norm_backward(dy0, x, mean.copy(), invstd)
    with bnfast.num_threads(threads):
        dx, dw, db = bnfast.batch_norm_backward(dy, x, mean_in_dy, invstd, out=dy)
    assert dx is dy
    # dy0 holds the mean in its first 8 values, as the call saw it
    dy0[0, 0, :8] = mean
    e = ref.batch_norm_backward(dy0, x, mean, invstd)
    np.testing.assert_allclose(dx, e[0], rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(db, e[2], rtol=1e-10, atol=1e-10)


def test_train_with_weight_a_view_of_out():
    x = np.random.default_rng(7).standard_normal((16, 4)) + 3
    w = x[0].copy()
    expect, _, _ = bnfast.batch_norm_train(x.copy(), w)
    y, _, _ = bnfast.batch_norm_train(x, x[0], out=x)
    np.testing.assert_array_equal(y, expect)


# ------------------------------------------------------------ 4. float64 near the largest double

def test_moments_near_the_largest_double():
    x = np.array([[1.7e308], [-1.7e308], [1.0], [2.0]])
    mean, var = bnfast.moments(x)
    assert mean[0] == 0.75
    assert var[0] == np.inf       # the true variance, about 1.4e616, is beyond the range


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("shape", [(4, 3), (4, 3, 70), (3000, 2)])
def test_huge_values_give_finite_exact_means_in_every_variant(isa, shape):
    rng = np.random.default_rng(8)
    x = rng.choice([1.5e308, -1.5e308, 1.0, 3.0], size=shape)
    xc = x.astype(object)       # exact rational arithmetic on Python floats
    with bnfast.use_isa(isa):
        mean, var = bnfast.moments(x)
        with bnfast.num_threads(1):
            mean1, var1 = bnfast.moments(x)
    from fractions import Fraction
    for c in range(shape[1]):
        vals = np.moveaxis(xc, 1, 0)[c].ravel()
        exact = sum(Fraction(v) for v in vals) / len(vals)
        assert np.isfinite(mean[c])
        assert abs(Fraction(mean[c]) - exact) <= abs(exact) * Fraction(1, 2**50) + Fraction(
            1, 2**40), (c, mean[c], float(exact))
    np.testing.assert_array_equal(mean, mean1)
    np.testing.assert_array_equal(var, var1)


def test_fallback_keeps_huge_but_representable_variance():
    # values +-1e154 * 1.2: the variance 1.44e308 is representable; sums of squares of
    # the shifted values overflow in the blocked pass for long channels
    x = np.tile(np.array([[1.2e154], [-1.2e154]]), (2000, 1))
    mean, var = bnfast.moments(x)
    assert mean[0] == 0.0
    from fractions import Fraction
    exact = float(Fraction(1.2e154) ** 2)      # the mean is 0: var = (1.2e154)**2
    np.testing.assert_allclose(var[0], exact, rtol=4e-16)


def test_train_forward_near_the_largest_double_has_finite_statistics():
    x = np.array([[1.7e308], [-1.7e308], [1.0], [2.0]])
    y, mean, invstd = bnfast.batch_norm_train(x)
    assert mean[0] == 0.75 and invstd[0] == 0.0
    assert np.isfinite(y).all()


# ---------------------------------------------------------------- 5. masked arrays and subclasses

MASKED = np.ma.masked_array([[1.0], [2.0], [1e6]], mask=[[0], [0], [1]])


@pytest.mark.parametrize("call", [
    lambda m: bnfast.moments(m),
    lambda m: bnfast.batch_norm_train(m),
    lambda m: bnfast.batch_norm(m, training=True),
    lambda m: bnfast.batch_norm_infer(m, [0.0], [1.0]),
    lambda m: bnfast.batch_norm_backward(m, np.ones((3, 1)), [0.0], [1.0]),
    lambda m: bnfast.batch_norm_backward(np.ones((3, 1)), m, [0.0], [1.0]),
    lambda m: bnfast.batch_norm_infer(np.ones((3, 1)), np.ma.masked_array([0.0]), [1.0]),
    lambda m: bnfast.batch_norm_train(np.ones((3, 1)), np.ma.masked_array([1.0])),
    lambda m: bnfast.batch_norm_train(np.ones((3, 1)) * [[1], [2], [3]],
                                      running_mean=np.ma.masked_array([0.0]),
                                      running_var=np.ones(1)),
    lambda m: bnfast.batch_norm_infer(np.ones((3, 1)), [0.0], [1.0],
                                      out=np.ma.masked_array(np.ones((3, 1)))),
], ids=["moments", "train", "batch_norm", "infer", "backward-dy", "backward-x",
        "infer-mean", "train-weight", "train-running", "infer-out"])
def test_masked_arrays_are_refused(call):
    with pytest.raises(TypeError, match="masked array"):
        call(MASKED)


def test_ndarray_subclass_gives_a_plain_result():
    class Sub(np.ndarray):
        pass
    x = np.random.default_rng(9).standard_normal((8, 3)).view(Sub)
    y, m, v = bnfast.batch_norm_train(x)
    e = bnfast.batch_norm_train(np.asarray(x))
    np.testing.assert_array_equal(y, e[0])
    assert type(y) is np.ndarray


def test_matrix_input():
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PendingDeprecationWarning)
        x = np.matrix([[1.0, 2.0], [3.0, 6.0]])
    m, v = bnfast.moments(x)
    assert m.tolist() == [2.0, 4.0]


# ------------------------------------------------------------ 7. fused-ReLU backward needs the bias

@pytest.mark.parametrize("training", [True, False])
def test_relu_backward_requires_the_bias(training):
    x = np.random.default_rng(10).standard_normal((8, 3))
    y, mean, invstd = bnfast.batch_norm_train(x, bias=np.full(3, 2.0), relu=True)
    with pytest.raises(ValueError, match="bias is required when relu=True"):
        bnfast.batch_norm_backward(np.ones_like(x), x, mean, invstd, relu=True,
                                   training=training)
    bnfast.batch_norm_backward(np.ones_like(x), x, mean, invstd, relu=True,
                               bias=np.full(3, 2.0), training=training)


# ---------------------------------------------------------------- 9. eps = 0 and the variance

def test_eps_zero_on_a_constant_channel_is_refused_before_writing():
    x = np.ones((4, 3))
    x[:, 1] = [1.0, 2.0, 3.0, 4.0]
    x0 = x.copy()
    rm, rv = np.zeros(3), np.ones(3)
    with pytest.raises(ValueError, match=r"eps=0 with a constant channel: channel 0"):
        bnfast.batch_norm_train(x, eps=0.0, running_mean=rm, running_var=rv, out=x)
    np.testing.assert_array_equal(x, x0)
    assert rm.tolist() == [0, 0, 0] and rv.tolist() == [1, 1, 1]
    with pytest.raises(ValueError, match=r"eps=0 with a constant channel"):
        bnfast.batch_norm(x, training=True, eps=0)
    # a constant channel with eps > 0 normalises to exactly beta
    y, _, _ = bnfast.batch_norm_train(x, bias=np.array([0.5, 0, 0]))
    assert (y[:, 0] == 0.5).all()


def test_eps_zero_without_constant_channels_still_works():
    x = np.array([[1.0, 2.0], [3.0, 6.0]])
    y, _, _ = bnfast.batch_norm_train(x, eps=0.0)
    assert y.tolist() == [[-1.0, -1.0], [1.0, 1.0]]


@pytest.mark.parametrize("var, match", [
    ([1.0, np.nan], r"var must be >= 0 \(and not NaN\) in every channel; channel 1"),
    ([1.0, -1.0], r"var must be >= 0 \(and not NaN\) in every channel; channel 1"),
])
def test_infer_refuses_nan_or_negative_variance(var, match):
    with pytest.raises(ValueError, match=match):
        bnfast.batch_norm_infer(np.ones((2, 2)), [0.0, 0.0], np.array(var))


def test_infer_refuses_zero_variance_with_zero_eps():
    with pytest.raises(ValueError, match=r"var \+ eps must be > 0 in every channel; "
                                         r"channel 0"):
        bnfast.batch_norm_infer(np.ones((2, 2)), [0.0, 0.0], [0.0, 1.0], eps=0.0)
    bnfast.batch_norm_infer(np.ones((2, 2)), [0.0, 0.0], [0.0, 1.0], eps=1e-5)


# ---------------------------------------------------------------- 10. huge Python ints and flags

@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(eps=10**400), ValueError, r"^eps must be >= 0.0 and finite, got 1000"),
    (dict(momentum=10**400), ValueError, r"^momentum must be in \[0.0, 1.0\], got 1000"),
    (dict(axis=2**31), ValueError, r"^axis 2147483648 is out of bounds"),
    (dict(axis=-2**63 - 1), ValueError, r"^axis -9223372036854775809 is out of bounds"),
    (dict(axis=10**400), ValueError, r"^axis 1000.* is out of bounds"),
    (dict(relu="no"), TypeError, r"^relu must be a bool, got 'no'"),
    (dict(relu=2), TypeError, r"^relu must be a bool, got 2"),
    (dict(eps=float("nan")), ValueError, r"^eps must be >= 0.0 and finite"),
])
def test_bad_scalars_name_the_argument(kwargs, exc, match):
    x = np.random.default_rng(11).standard_normal((4, 3))
    with pytest.raises(exc, match=match):
        bnfast.batch_norm_train(x, **kwargs)


def test_bad_flags_in_backward_and_batch_norm():
    x = np.random.default_rng(12).standard_normal((4, 3))
    y, m, inv = bnfast.batch_norm_train(x)
    with pytest.raises(TypeError, match="^training must be a bool"):
        bnfast.batch_norm_backward(x, x, m, inv, training="yes")
    with pytest.raises(TypeError, match="^training must be a bool"):
        bnfast.batch_norm(x, training=[1])
    with pytest.raises(TypeError, match="^relu must be a bool"):
        bnfast.batch_norm_infer(x, m, 1 / inv**2, relu=None)
    # numpy bools and 0/1 are fine
    bnfast.batch_norm_backward(x, x, m, inv, training=np.True_)
    bnfast.batch_norm_infer(x, m, 1 / inv**2, relu=0)


def test_set_num_threads_huge_int_leaves_the_setting_consistent():
    before = bnfast.get_num_threads()
    with pytest.raises(ValueError, match="at most"):
        bnfast.set_num_threads(2**31)
    assert bnfast.get_num_threads() == before
    with bnfast.num_threads(1):
        pass
    assert bnfast.get_num_threads() == before


# ---------------------------------------------------------------- 16. settings and Python threads

def test_num_threads_blocks_in_two_python_threads_exiting_out_of_order():
    bnfast.set_num_threads(None)
    before = bnfast.get_num_threads()
    a_in, b_in, a_may_exit, b_may_exit = (threading.Event() for _ in range(4))
    seen = {}

    def worker_a():
        with bnfast.num_threads(2):
            a_in.set()
            b_in.wait(10)
            seen["a_inside"] = bnfast.get_num_threads()
            a_may_exit.wait(10)
        seen["a_after"] = bnfast.get_num_threads()

    def worker_b():
        a_in.wait(10)
        with bnfast.num_threads(1):
            b_in.set()
            seen["b_inside"] = bnfast.get_num_threads()
            b_may_exit.wait(10)
        seen["b_after"] = bnfast.get_num_threads()

    ta, tb = threading.Thread(target=worker_a), threading.Thread(target=worker_b)
    ta.start()
    tb.start()
    b_in.wait(10)
    seen["main_during"] = bnfast.get_num_threads()
    b_may_exit.set()      # b (entered last) exits first ...
    tb.join(10)
    a_may_exit.set()      # ... then a; and the other order below
    ta.join(10)
    assert seen == {"a_inside": 2, "b_inside": 1, "main_during": before,
                    "b_after": before, "a_after": before}
    assert bnfast.get_num_threads() == before


def test_num_threads_blocks_closed_out_of_order_in_one_thread():
    before = bnfast.get_num_threads()
    outer, inner = bnfast.num_threads(2), bnfast.num_threads(1)
    outer.__enter__()
    inner.__enter__()
    assert bnfast.get_num_threads() == 1
    outer.__exit__(None, None, None)
    assert bnfast.get_num_threads() == 1
    inner.__exit__(None, None, None)
    assert bnfast.get_num_threads() == before


@pytest.mark.skipif(len(ISAS) < 2, reason="needs two kernel variants")
def test_use_isa_blocks_exiting_out_of_order_restore_the_original():
    original = bnfast.get_isa()
    a, b = bnfast.use_isa(ISAS[0]), bnfast.use_isa(ISAS[1])
    a.__enter__()
    b.__enter__()
    assert bnfast.get_isa() == ISAS[1]
    a.__exit__(None, None, None)          # the first block ends first
    assert bnfast.get_isa() == ISAS[1]    # the other block is still active
    b.__exit__(None, None, None)
    assert bnfast.get_isa() == original


@pytest.mark.skipif(len(ISAS) < 2, reason="needs two kernel variants")
def test_use_isa_from_two_python_threads_restores_the_original():
    original = bnfast.get_isa()
    a_in, b_in, a_exit = threading.Event(), threading.Event(), threading.Event()

    def worker_a():
        with bnfast.use_isa(ISAS[0]):
            a_in.set()
            b_in.wait(10)
            a_exit.wait(10)

    def worker_b():
        a_in.wait(10)
        with bnfast.use_isa(ISAS[1]):
            b_in.set()
            a_exit.set()
            ta.join(10)      # a exits while b is still inside
            assert bnfast.get_isa() == ISAS[1]

    ta, tb = threading.Thread(target=worker_a), threading.Thread(target=worker_b)
    ta.start()
    tb.start()
    tb.join(20)
    assert bnfast.get_isa() == original


# ---------------------------------------------------------------- 17. NaN bits across variants

def test_nan_outputs_have_the_same_bits_in_every_variant():
    args = (np.ones((3, 9), "f4"), np.zeros((3, 9), "f4"), np.zeros(9),
            np.r_[np.nan, np.ones(8)])
    results = []
    for isa in ISAS:
        with bnfast.use_isa(isa):
            dx, dw, db = bnfast.batch_norm_backward(*args, relu=True, bias=np.ones(9))
            y, m, inv = bnfast.batch_norm_train(
                np.where(np.arange(27).reshape(3, 9) % 4 == 0, -np.nan, 1.0).astype("f4"),
                np.r_[-np.nan, np.ones(8)], np.r_[np.nan, -np.ones(8)])
            results.append([a.copy() for a in (dx, dw, db, y, m, inv)])
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert a.tobytes() == b.tobytes()
    dx = results[0][0]
    assert np.isnan(dx[:, 0]).all()
    assert (dx[:, 0].view(np.uint32) == 0x7FC00000).all()   # the canonical quiet NaN


@pytest.mark.parametrize("C", [1, 2, 3, 9, 2049])
def test_backward_sums_nan_bits_are_canonical_at_every_position(C):
    # the backward sums' NaNs are made canonical by the kernel (csrc/bn_stats.h,
    # backward_reduce): a NaN of either sign, any payload, in any channel
    rng = np.random.default_rng(C)
    x = rng.standard_normal((4, C))
    dy = rng.standard_normal((4, C))
    bad = sorted({0, C // 2, C - 1})
    payloads = np.array([0xFFF8000000000000, 0x7FF0000000000001, 0xFFF4000000000000],
                        np.uint64).view(np.float64)
    for i, c in enumerate(bad):
        dy[1, c] = payloads[i % 3]
    _, m, inv = bnfast.batch_norm_train(x, np.ones(C), np.zeros(C))
    dx, dw, db = bnfast.batch_norm_backward(dy, x, m, inv, np.ones(C))
    for out in (dw, db):
        bits = out.view(np.uint64)
        assert (bits[bad] == 0x7FF8000000000000).all(), [hex(b) for b in bits[bad]]
        good = np.setdiff1d(np.arange(C), bad)
        assert np.isfinite(out[good]).all()


# ---------------------------------------------------------------- found by the adversarial tests

def test_out_not_an_array_with_running_stats_raises():
    # the fast path compared the running statistics' memory with a non-array out: segfault
    x = np.random.default_rng(13).standard_normal((4, 3, 5))
    for out in (x.tolist(), "abc", 1.5):
        with pytest.raises(TypeError, match="^out must be a numpy.ndarray"):
            bnfast.batch_norm_train(x, running_mean=np.zeros(3), running_var=np.ones(3),
                                    out=out)
        with pytest.raises(TypeError, match="^out must be a numpy.ndarray"):
            bnfast.batch_norm(x, np.zeros(3), np.ones(3), training=True, out=out)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(6, 3), (6, 3, 70), (3000, 3)])
def test_infinite_values_give_ieee_statistics(isa, dtype, shape):
    x = np.random.default_rng(14).standard_normal(shape).astype(dtype)
    x[1, 0] = np.inf                       # +inf alone: mean +inf
    x[2, 1], x[3, 1] = np.inf, -np.inf     # both: NaN
    x[0, 2] = -np.inf                      # -inf alone: mean -inf
    with bnfast.use_isa(isa):
        mean, var = bnfast.moments(x)
        rm, rv = np.zeros(3), np.ones(3)
        _, tmean, _ = bnfast.batch_norm_train(x, running_mean=rm, running_var=rv)
    assert mean[0] == np.inf and np.isnan(mean[1]) and mean[2] == -np.inf
    assert np.isnan(var).all()
    np.testing.assert_array_equal(tmean, mean)
    assert rm[0] == np.inf and np.isnan(rm[1]) and rm[2] == -np.inf


@pytest.mark.parametrize("which", ["weight", "invstd"])
def test_backward_with_an_infinite_coefficient_matches_the_twin(which):
    rng = np.random.default_rng(15)
    x, dy = rng.standard_normal((6, 3, 5)), rng.standard_normal((6, 3, 5))
    _, mean, invstd = bnfast.batch_norm_train(x)
    w = np.ones(3)
    (w if which == "weight" else invstd)[0] = np.inf
    dx, dw, db = bnfast.batch_norm_backward(dy, x, mean, invstd, w)
    with np.errstate(all="ignore"):
        rdx, rdw, rdb = ref.batch_norm_backward(dy, x, mean, invstd, w)
    # channel 0 exactly (+-inf, not inf - inf = NaN), the others to rounding
    np.testing.assert_array_equal(dx[:, 0], rdx[:, 0])
    np.testing.assert_allclose(dx[:, 1:], rdx[:, 1:], rtol=1e-13, atol=1e-14)
    np.testing.assert_allclose(dw, rdw, rtol=1e-13)
    np.testing.assert_allclose(db, rdb, rtol=1e-13)
    if which == "weight":
        assert np.isinf(dx[:, 0]).all()
    else:                       # xhat = (x - mean) * inf: the twin's answer is NaN too
        assert np.isnan(dx[:, 0]).all() and np.isnan(dw[0])


@pytest.mark.parametrize("over", ["x", "dy"])
@pytest.mark.parametrize("training", [True, False])
def test_backward_degenerate_channel_in_place(over, training):
    # the recomputation of a degenerate channel must use x and dy as they were before
    # dx overwrote them (the fuzz found x = [[nan]], out=x, eval mode: a finite dweight)
    rng = np.random.default_rng(16)
    x = rng.standard_normal((5, 3, 4)).astype(np.float32)
    x[0, 1, 0] = np.nan
    dy = rng.standard_normal(x.shape).astype(np.float32)
    mean, invstd = np.zeros(3), np.ones(3)
    invstd[2] = np.inf
    want = bnfast.batch_norm_backward(dy.copy(), x.copy(), mean, invstd, training=training)
    target = x if over == "x" else dy
    got = bnfast.batch_norm_backward(dy, x, mean, invstd, training=training, out=target)
    assert got[0] is target
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)
    assert np.isnan(got[1][1])
