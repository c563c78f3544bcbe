"""Every bad input raises the documented exception, with a message naming the problem."""
import numpy as np
import pytest

import bnfast

C = 3
X = np.random.default_rng(0).standard_normal((4, C, 5))
DY = np.ones_like(X)
W, B = np.ones(C), np.zeros(C)
M, V = np.zeros(C), np.ones(C)
INV = np.ones(C)


def _all_calls(x=X, **kw):
    """One call of every public function on x (with matching auxiliary arrays)."""
    c = x.shape[1] if x.ndim >= 2 else 1
    w, m, v = np.ones(c), np.zeros(c), np.ones(c)
    return {
        "moments": lambda: bnfast.moments(x, **kw),
        "batch_norm_train": lambda: bnfast.batch_norm_train(x, w, w, **kw),
        "batch_norm_infer": lambda: bnfast.batch_norm_infer(x, m, v, w, w, **kw),
        "batch_norm_backward": lambda: bnfast.batch_norm_backward(x, x, m, v, w, **kw),
        "batch_norm(train)": lambda: bnfast.batch_norm(x, training=True, **kw),
        "batch_norm(eval)": lambda: bnfast.batch_norm(x, m, v, w, w, **kw),
    }


# ------------------------------------------------------------------ dtypes

@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.float16, np.complex64, np.complex128,
                                   np.bool_, object, np.longdouble],
                         ids=lambda d: np.dtype(d).name)
def test_unsupported_dtype_of_x(dtype):
    if np.dtype(dtype) == np.dtype(np.float64):  # longdouble == double on some platforms
        pytest.skip("longdouble is float64 here")
    x = X.astype(dtype)
    for name, call in _all_calls(x).items():
        # (backward checks x before dy)
        with pytest.raises(TypeError, match=r"x must have dtype float32 or float64"):
            call()


@pytest.mark.parametrize("dtype", [np.int64, np.float16, np.complex128, object])
def test_unsupported_dtype_of_dy(dtype):
    with pytest.raises(TypeError, match=r"dy must have dtype float32 or float64"):
        bnfast.batch_norm_backward(DY.astype(dtype), X, M, INV, W)


def test_dy_dtype_mismatch():
    with pytest.raises(TypeError, match=r"dy has dtype float32 but x has dtype float64"):
        bnfast.batch_norm_backward(DY.astype(np.float32), X, M, INV, W)


@pytest.mark.parametrize("name", ["weight", "bias"])
def test_complex_parameter(name):
    kw = {name: np.ones(C, np.complex128)}
    with pytest.raises(TypeError, match=name):
        bnfast.batch_norm_train(X, **kw)
    with pytest.raises(TypeError, match=name):
        bnfast.batch_norm_infer(X, M, V, **kw)


@pytest.mark.parametrize("name", ["mean", "var"])
def test_non_numeric_statistics(name):
    kw = {"mean": M, "var": V}
    kw[name] = np.array(["a"] * C)
    with pytest.raises(TypeError, match=name):
        bnfast.batch_norm_infer(X, **kw)


# ------------------------------------------------------------------ dimensions, axis

@pytest.mark.parametrize("x", [np.ones(5), np.float64(1.0), np.ones(0)],
                         ids=["1d", "0d", "empty1d"])
def test_ndim_below_two(x):
    x = np.asarray(x)
    for name, call in _all_calls(x).items():
        with pytest.raises(ValueError, match=r"at least 2 dimensions"):
            call()


@pytest.mark.parametrize("axis", [3, -4, 10])
def test_axis_out_of_range(axis):
    for name, call in _all_calls(axis=axis).items():
        with pytest.raises(ValueError, match=rf"axis {axis} is out of bounds"):
            call()


# ------------------------------------------------------------------ shapes of the parameters

BAD_VECTORS = [np.ones(C + 1), np.ones(C - 1), np.ones((C, 1)), np.ones((1, C)), np.float64(1.0)]
bad_vec = pytest.mark.parametrize("bad", BAD_VECTORS, ids=["C+1", "C-1", "Cx1", "1xC", "scalar"])


@bad_vec
@pytest.mark.parametrize("name", ["weight", "bias"])
def test_parameter_shape_mismatch(bad, name):
    match = rf"{name} must have shape \(3,\)"
    with pytest.raises(ValueError, match=match):
        bnfast.batch_norm_train(X, **{name: bad})
    with pytest.raises(ValueError, match=match):
        bnfast.batch_norm_infer(X, M, V, **{name: bad})
    with pytest.raises(ValueError, match=match):
        bnfast.batch_norm(X, M, V, **{name: bad})
    with pytest.raises(ValueError, match=match):
        bnfast.batch_norm_backward(DY, X, M, INV, **{name: bad})


@bad_vec
@pytest.mark.parametrize("name", ["mean", "var"])
def test_statistics_shape_mismatch(bad, name):
    kw = {"mean": M, "var": V, name: bad}
    with pytest.raises(ValueError, match=rf"{name} must have shape \(3,\)"):
        bnfast.batch_norm_infer(X, **kw)


@bad_vec
@pytest.mark.parametrize("name", ["mean", "invstd"])
def test_backward_statistics_shape_mismatch(bad, name):
    kw = {"mean": M, "invstd": INV, name: bad}
    with pytest.raises(ValueError, match=rf"{name} must have shape \(3,\)"):
        bnfast.batch_norm_backward(DY, X, **kw)


@pytest.mark.parametrize("which", ["running_mean", "running_var"])
@pytest.mark.parametrize("bad", [np.ones(C + 1), np.ones((C, 1)), np.ones(1)],
                         ids=["C+1", "Cx1", "1"])
def test_running_stats_shape_mismatch(which, bad):
    kw = {"running_mean": np.zeros(C), "running_var": np.ones(C), which: bad}
    with pytest.raises(ValueError, match=rf"{which} must have shape \(3,\)"):
        bnfast.batch_norm_train(X, **kw)
    kw = {"running_mean": np.zeros(C), "running_var": np.ones(C), which: bad}
    with pytest.raises(ValueError, match=which):
        bnfast.batch_norm(X, kw["running_mean"], kw["running_var"], training=True)


def test_running_stats_eval_shape_mismatch():
    with pytest.raises(ValueError, match=r"must have shape \(3,\)"):
        bnfast.batch_norm(X, np.zeros(C + 1), np.ones(C + 1), training=False)


@pytest.mark.parametrize("shape", [(4, C, 6), (4, C), (5, C, 5), (4, C, 5, 1)])
def test_dy_shape_mismatch(shape):
    with pytest.raises(ValueError, match=r"dy has shape"):
        bnfast.batch_norm_backward(np.ones(shape), X, M, INV, W)


@pytest.mark.parametrize("shape", [(4, C, 6), (4, C), (5, C, 5), X.shape[::-1]])
def test_out_shape_mismatch(shape):
    out = np.empty(shape)
    match = r"out has shape .* but the result has shape"
    with pytest.raises(ValueError, match=match):
        bnfast.batch_norm_train(X, out=out)
    with pytest.raises(ValueError, match=match):
        bnfast.batch_norm_infer(X, M, V, out=out)
    with pytest.raises(ValueError, match=match):
        bnfast.batch_norm_backward(DY, X, M, INV, out=out)
    with pytest.raises(ValueError, match=match):
        bnfast.batch_norm(X, M, V, out=out)


# ------------------------------------------------------------------ scalars

@pytest.mark.parametrize("eps", [-1e-5, -1.0, float("nan")])
def test_eps_negative(eps):
    with pytest.raises(ValueError, match=r"eps must be >= 0"):
        bnfast.batch_norm_train(X, eps=eps)
    with pytest.raises(ValueError, match=r"eps must be >= 0"):
        bnfast.batch_norm_infer(X, M, V, eps=eps)
    with pytest.raises(ValueError, match=r"eps must be >= 0"):
        bnfast.batch_norm(X, M, V, eps=eps)


def test_eps_infinite():
    with pytest.raises(ValueError, match=r"eps must be"):
        bnfast.batch_norm_train(X, eps=float("inf"))


@pytest.mark.parametrize("momentum", [-0.1, 1.1, 2, float("nan"), float("inf")])
def test_momentum_outside_unit_interval(momentum):
    rm, rv = np.zeros(C), np.ones(C)
    with pytest.raises(ValueError, match=r"momentum must be in \[0.0, 1.0\]"):
        bnfast.batch_norm_train(X, running_mean=rm, running_var=rv, momentum=momentum)
    with pytest.raises(ValueError, match=r"momentum must be in \[0.0, 1.0\]"):
        bnfast.batch_norm_train(X, momentum=momentum)
    with pytest.raises(ValueError, match=r"momentum"):
        bnfast.batch_norm(X, rm, rv, training=True, momentum=momentum)
    with pytest.raises(ValueError, match=r"momentum"):
        bnfast.batch_norm(X, rm, rv, training=False, momentum=momentum)
    assert np.array_equal(rm, np.zeros(C)) and np.array_equal(rv, np.ones(C))


@pytest.mark.parametrize("momentum", [0, 0.0, 1, 1.0, 0.5])
def test_momentum_bounds_accepted(momentum):
    rm, rv = np.full(C, 0.25), np.full(C, 4.0)
    _, mean, invstd = bnfast.batch_norm_train(X, running_mean=rm, running_var=rv,
                                              momentum=momentum)
    if momentum == 0:
        assert np.array_equal(rm, np.full(C, 0.25)) and np.array_equal(rv, np.full(C, 4.0))
    if momentum == 1:
        assert np.allclose(rm, mean, rtol=1e-15, atol=1e-15)


def test_negative_var_in_inference():
    with pytest.raises(ValueError, match=r"var must be >= 0"):
        bnfast.batch_norm_infer(X, M, np.array([1.0, -1e-3, 1.0]))


# ------------------------------------------------------------------ running statistics

@pytest.mark.parametrize("which", ["running_mean", "running_var"])
def test_read_only_running_stats(which):
    kw = {"running_mean": np.zeros(C), "running_var": np.ones(C)}
    kw[which].flags.writeable = False
    with pytest.raises(ValueError, match=rf"{which} is read-only"):
        bnfast.batch_norm_train(X, **kw)
    with pytest.raises(ValueError, match=rf"{which} is read-only"):
        bnfast.batch_norm(X, kw["running_mean"], kw["running_var"], training=True)
    # read-only statistics are fine where they are only read (eval mode)
    bnfast.batch_norm(X, kw["running_mean"], kw["running_var"], training=False)


@pytest.mark.parametrize("which", ["running_mean", "running_var"])
@pytest.mark.parametrize("bad", [[0.0, 0.0, 0.0], (1.0, 1.0, 1.0)], ids=["list", "tuple"])
def test_running_stats_not_an_array(which, bad):
    kw = {"running_mean": np.zeros(C), "running_var": np.ones(C), which: bad}
    with pytest.raises(TypeError, match=rf"{which} must be a numpy.ndarray"):
        bnfast.batch_norm_train(X, **kw)


@pytest.mark.parametrize("which", ["running_mean", "running_var"])
@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.float16, np.complex128])
def test_running_stats_wrong_dtype(which, dtype):
    kw = {"running_mean": np.zeros(C), "running_var": np.ones(C)}
    kw[which] = kw[which].astype(dtype)
    with pytest.raises(TypeError, match=rf"{which} must have dtype float32 or float64"):
        bnfast.batch_norm_train(X, **kw)


def test_running_stats_mixed_dtypes():
    with pytest.raises(TypeError, match=r"running_mean .* and running_var .* same dtype"):
        bnfast.batch_norm_train(X, running_mean=np.zeros(C, np.float32),
                                running_var=np.ones(C))


@pytest.mark.parametrize("which", ["running_mean", "running_var"])
def test_only_one_running_stat(which):
    kw = {which: np.zeros(C)}
    with pytest.raises(ValueError, match=r"running_mean and running_var must both be given"):
        bnfast.batch_norm_train(X, **kw)
    args = (kw.get("running_mean"), kw.get("running_var"))
    with pytest.raises(ValueError, match=r"must both be given"):
        bnfast.batch_norm(X, *args, training=False)


def test_running_stats_sharing_memory():
    buf = np.zeros(C)
    with pytest.raises(ValueError, match=r"must not share memory"):
        bnfast.batch_norm_train(X, running_mean=buf, running_var=buf)


# ------------------------------------------------------------------ out

def _out_calls(out):
    return [
        lambda: bnfast.batch_norm_train(X, out=out),
        lambda: bnfast.batch_norm_infer(X, M, V, out=out),
        lambda: bnfast.batch_norm_backward(DY, X, M, INV, out=out),
        lambda: bnfast.batch_norm(X, M, V, out=out),
        lambda: bnfast.batch_norm(X, training=True, out=out),
    ]


def test_out_read_only():
    out = np.empty_like(X)
    out.flags.writeable = False
    for call in _out_calls(out):
        with pytest.raises(ValueError, match=r"out is read-only"):
            call()


@pytest.mark.parametrize("out", [X.tolist(), np.empty(X.shape, np.float32),
                                 np.empty(X.shape, np.int64), np.empty(X.shape, complex)],
                         ids=["list", "float32", "int64", "complex"])
def test_out_wrong_type(out):
    match = (r"out must be a numpy.ndarray" if isinstance(out, list)
             else r"out has dtype .* but the result has dtype float64")
    for call in _out_calls(out):
        with pytest.raises(TypeError, match=match):
            call()


# ------------------------------------------------------------------ too few values

@pytest.mark.parametrize("shape", [(1, C), (1, C, 1), (1, C, 1, 1)])
def test_training_with_one_value_per_channel(shape):
    x = np.ones(shape)
    match = r"more than 1 value per channel"
    with pytest.raises(ValueError, match=match):
        bnfast.batch_norm_train(x)
    with pytest.raises(ValueError, match=match):
        bnfast.batch_norm(x, np.zeros(C), np.ones(C), training=True)
    with pytest.raises(ValueError, match=match):
        bnfast.batch_norm(x)  # no running stats: batch statistics
    # inference with one value is fine
    assert bnfast.batch_norm_infer(x, np.zeros(C), np.ones(C), eps=0).shape == shape
    assert np.array_equal(bnfast.batch_norm(x, np.zeros(C), np.ones(C), eps=0), x)


@pytest.mark.parametrize("shape", [(0, C), (0, C, 4), (2, C, 0)])
def test_training_on_empty_batch(shape):
    with pytest.raises(ValueError, match=r"more than 1 value per channel"):
        bnfast.batch_norm_train(np.ones(shape))
    with pytest.raises(ValueError, match=r"empty batch"):
        bnfast.moments(np.ones(shape))


def test_errors_leave_outputs_and_running_stats_alone():
    rm, rv = np.zeros(C), np.ones(C)
    out = np.full_like(X, 7.0)
    with pytest.raises(ValueError):
        bnfast.batch_norm_train(X, np.ones(C + 1), running_mean=rm, running_var=rv, out=out)
    with pytest.raises(ValueError):
        bnfast.batch_norm_train(X, eps=-1, running_mean=rm, running_var=rv, out=out)
    assert np.array_equal(rm, np.zeros(C)) and np.array_equal(rv, np.ones(C))
    assert (out == 7.0).all()
