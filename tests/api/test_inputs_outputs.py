"""Argument handling: inputs are never modified, layouts and `out=` arrays, byte order."""
import numpy as np
import pytest

import bnfast
from conftest import assert_same_bits, make_params, make_stats, make_x, rng_for

dtypes = pytest.mark.parametrize("dtype", [np.float32, np.float64],
                                 ids=lambda d: np.dtype(d).name)


def _setup(shape, dtype, tag=""):
    rng = rng_for("io", shape, np.dtype(dtype).name, tag)
    x = make_x(rng, shape, dtype)
    C = shape[1]
    w, b = make_params(rng, C)
    m, v = make_stats(rng, C)
    dy = rng.standard_normal(shape).astype(dtype)
    return x, dy, w, b, m, v


# Each entry: name -> function(x, dy, w, b, mean, var, invstd, axis, **kw) returning results
CALLS = {
    "moments": lambda x, dy, w, b, m, v, inv, axis, **kw: bnfast.moments(x, axis=axis),
    "train": lambda x, dy, w, b, m, v, inv, axis, **kw: bnfast.batch_norm_train(
        x, w, b, axis=axis, **kw),
    "train_relu": lambda x, dy, w, b, m, v, inv, axis, **kw: bnfast.batch_norm_train(
        x, w, b, axis=axis, relu=True, **kw),
    "infer": lambda x, dy, w, b, m, v, inv, axis, **kw: (bnfast.batch_norm_infer(
        x, m, v, w, b, axis=axis, **kw),),
    "infer_relu": lambda x, dy, w, b, m, v, inv, axis, **kw: (bnfast.batch_norm_infer(
        x, m, v, w, b, axis=axis, relu=True, **kw),),
    "backward": lambda x, dy, w, b, m, v, inv, axis, **kw: bnfast.batch_norm_backward(
        dy, x, m, inv, w, axis=axis, **kw),
    "backward_relu": lambda x, dy, w, b, m, v, inv, axis, **kw: bnfast.batch_norm_backward(
        dy, x, m, inv, w, bias=b, relu=True, axis=axis, **kw),
    "backward_eval": lambda x, dy, w, b, m, v, inv, axis, **kw: bnfast.batch_norm_backward(
        dy, x, m, inv, w, training=False, axis=axis, **kw),
    "batch_norm_train": lambda x, dy, w, b, m, v, inv, axis, **kw: (bnfast.batch_norm(
        x, None, None, w, b, training=True, axis=axis, **kw),),
    "batch_norm_eval": lambda x, dy, w, b, m, v, inv, axis, **kw: (bnfast.batch_norm(
        x, m, v, w, b, training=False, axis=axis, **kw),),
}
FORWARD = ["train", "train_relu", "infer", "infer_relu", "batch_norm_train", "batch_norm_eval"]
BACKWARD = ["backward", "backward_relu", "backward_eval"]
calls = pytest.mark.parametrize("name", list(CALLS))


def _call(name, x, dy, w, b, m, v, axis=1, **kw):
    inv = 1.0 / np.sqrt(np.asarray(v, dtype=np.float64) + 1e-5)
    return CALLS[name](x, dy, w, b, m, v, inv, axis, **kw)


def _results_equal(r1, r2, what):
    assert len(r1) == len(r2)
    for i, (a, c) in enumerate(zip(r1, r2)):
        assert a.shape == c.shape, f"{what}[{i}]: shape {a.shape} != {c.shape}"
        assert_same_bits(a, c, f"{what}[{i}]")


# ------------------------------------------------------------------ inputs never mutated

@calls
@pytest.mark.parametrize("layout", ["contiguous", "channels-last", "strided"])
@dtypes
def test_inputs_are_not_modified(name, layout, dtype):
    x, dy, w, b, m, v = _setup((4, 3, 70) if layout != "strided" else (4, 3, 140), dtype)
    if layout == "channels-last":
        x = np.moveaxis(np.ascontiguousarray(np.moveaxis(x, 1, -1)), -1, 1)
        dy = np.moveaxis(np.ascontiguousarray(np.moveaxis(dy, 1, -1)), -1, 1)
    elif layout == "strided":
        x, dy = x[..., ::2], dy[..., ::2]
    # weights etc. in float32 too, to catch an in-place conversion
    w, b = w.astype(np.float32), b.astype(np.float32)
    inv = (1.0 / np.sqrt(v + 1e-5))
    inputs = [x, dy, w, b, m, v, inv]
    copies = [a.copy() for a in inputs]
    CALLS[name](x, dy, w, b, m, v, inv, 1)
    for a, c, nm in zip(inputs, copies, ["x", "dy", "weight", "bias", "mean", "var", "invstd"]):
        assert_same_bits(a, c, f"{name} modified {nm}")


@dtypes
@pytest.mark.parametrize("rs_dtype", [np.float32, np.float64], ids=["rs32", "rs64"])
def test_only_running_stats_and_out_change(dtype, rs_dtype):
    x, dy, w, b, _, _ = _setup((5, 3, 7), dtype)
    rm, rv = np.full(3, 0.5, rs_dtype), np.full(3, 2.0, rs_dtype)
    out = np.full_like(x, np.nan)
    xc, wc, bc = x.copy(), w.copy(), b.copy()
    y, mean, invstd = bnfast.batch_norm_train(x, w, b, running_mean=rm, running_var=rv,
                                              out=out)
    assert y is out and not np.isnan(out).any()
    assert_same_bits(x, xc, "x")
    assert_same_bits(w, wc, "weight")
    assert_same_bits(b, bc, "bias")
    assert rm.dtype == rs_dtype and rv.dtype == rs_dtype
    n = x.size // 3
    xm = x.astype(np.float64).mean(axis=(0, 2))
    xv = x.astype(np.float64).var(axis=(0, 2))
    tol = 1e-6 if rs_dtype == np.float32 else 1e-12
    assert np.allclose(rm, 0.9 * 0.5 + 0.1 * xm, rtol=tol, atol=tol)
    assert np.allclose(rv, 0.9 * 2.0 + 0.1 * xv * n / (n - 1), rtol=tol, atol=tol)


def test_strided_running_stats_are_updated_in_place():
    x, *_ = _setup((6, 3, 5), np.float64)
    buf_m, buf_v = np.zeros(6), np.ones(6)
    rm, rv = buf_m[::2], buf_v[::-2]  # non-contiguous views, one with a negative stride
    bnfast.batch_norm_train(x, running_mean=rm, running_var=rv, momentum=0.5)
    rm_ref, rv_ref = np.zeros(3), np.ones(3)
    bnfast.reference.batch_norm_train(x, running_mean=rm_ref, running_var=rv_ref, momentum=0.5)
    assert np.allclose(rm, rm_ref, rtol=1e-14) and np.allclose(rv, rv_ref, rtol=1e-14)
    assert np.array_equal(buf_m[1::2], np.zeros(3)) and np.array_equal(buf_v[0::2], np.ones(3))


# ------------------------------------------------------------------ layouts

DENSE_LAYOUTS = ("fortran", "transposed", "channels-last-memory")


def _layouts(x):
    """Non-C-contiguous presentations of x's data (all with channel axis 1)."""
    big = np.zeros(x.shape[:-1] + (2 * x.shape[-1],), x.dtype)
    big[..., ::2] = x
    return {
        "fortran": np.asfortranarray(x),
        "step-sliced": big[..., ::2],
        "transposed": np.ascontiguousarray(np.swapaxes(x, 0, -1)).swapaxes(0, -1),
        "channels-last-memory": np.moveaxis(np.ascontiguousarray(np.moveaxis(x, 1, -1)), -1, 1),
        "reversed": np.ascontiguousarray(x[::-1])[::-1],
    }


@calls
@pytest.mark.parametrize("shape", [(4, 3, 5, 6), (3, 4, 70), (8, 5)],
                         ids=lambda s: "x".join(map(str, s)))
@dtypes
def test_non_contiguous_inputs_match_contiguous(name, shape, dtype, isa):
    x, dy, w, b, m, v = _setup(shape, dtype)
    expected = _call(name, x, dy, w, b, m, v)
    lx, ldy = _layouts(x), _layouts(dy)
    for lay in lx:
        assert not lx[lay].flags.c_contiguous or x.ndim == 2 and lay == "channels-last-memory"
        got = _call(name, lx[lay], ldy[lay], w, b, m, v)
        if lay in DENSE_LAYOUTS:
            # dense in another axis order: used without a copy, so the kernels see another
            # (N, C, S) split and sum in another (fixed) order: equal up to rounding
            tol = 1e-5 if dtype == np.float32 else 1e-12
            for a, e in zip(got, expected):
                assert a.shape == e.shape
                assert np.allclose(a, e, rtol=tol, atol=tol * np.abs(e).max()), lay
        else:
            # copied to the same C-contiguous array: bit-identical
            _results_equal(got, expected, f"{name} {lay}")
        # mixed: x in one layout, dy contiguous
        if name in BACKWARD:
            got2 = _call(name, lx[lay], dy, w, b, m, v)
            for a, e in zip(got2, got):
                assert np.allclose(a, e, rtol=1e-5, atol=1e-5 * np.abs(e).max())


@calls
@dtypes
def test_channels_last_memory_with_axis1_equals_axis_minus1(name, dtype, isa):
    """An NCHW view of NHWC memory with axis=1 runs exactly the channels-last computation."""
    x, dy, w, b, m, v = _setup((3, 5, 4, 6), dtype)
    x_cl, dy_cl = (np.ascontiguousarray(a.transpose(0, 2, 3, 1)) for a in (x, dy))
    x_view, dy_view = x_cl.transpose(0, 3, 1, 2), dy_cl.transpose(0, 3, 1, 2)
    assert x_view.shape == x.shape and not x_view.flags.c_contiguous
    got = _call(name, x_view, dy_view, w, b, m, v, axis=1)
    ref_cl = _call(name, x_cl, dy_cl, w, b, m, v, axis=-1)
    for a, r in zip(got, ref_cl):
        if a.ndim == 1:
            assert_same_bits(a, r, name)
        else:
            assert a.shape == x.shape, f"{name}: output shape {a.shape}"
            assert_same_bits(a, r.transpose(0, 3, 1, 2), name)


# ------------------------------------------------------------------ out=

def _out_layouts(shape, dtype):
    return {
        "c": np.full(shape, np.nan, dtype),
        "fortran": np.asfortranarray(np.full(shape, np.nan, dtype)),
        "channels-last": np.full(shape[:1] + shape[2:] + shape[1:2], np.nan,
                                 dtype).transpose(0, 3, 1, 2) if len(shape) == 4 else
        np.full(shape, np.nan, dtype),
        "strided": np.full(shape[:-1] + (2 * shape[-1],), np.nan, dtype)[..., ::2],
    }


@pytest.mark.parametrize("name", FORWARD + BACKWARD)
@pytest.mark.parametrize("out_layout", ["c", "fortran", "channels-last", "strided"])
@pytest.mark.parametrize("x_layout", ["c", "channels-last"])
@dtypes
def test_out_is_used_and_returned(name, out_layout, x_layout, dtype):
    shape = (3, 4, 5, 6)
    x, dy, w, b, m, v = _setup(shape, dtype)
    if x_layout == "channels-last":
        x = np.moveaxis(np.ascontiguousarray(np.moveaxis(x, 1, -1)), -1, 1)
    expected = _call(name, x, dy, w, b, m, v)
    out = _out_layouts(shape, dtype)[out_layout]
    got = _call(name, x, dy, w, b, m, v, out=out)
    assert got[0] is out
    assert_same_bits(np.ascontiguousarray(out), np.ascontiguousarray(expected[0]),
                     f"{name} out ({out_layout})")
    _results_equal(got[1:], expected[1:], f"{name} extra results")


@pytest.mark.parametrize("name", FORWARD)
@pytest.mark.parametrize("x_layout", ["c", "channels-last", "fortran", "2d"])
@dtypes
def test_forward_in_place(name, x_layout, dtype, isa):
    shape = (3, 4, 70) if x_layout != "2d" else (50, 7)
    x, dy, w, b, m, v = _setup(shape, dtype)
    if x_layout == "channels-last":
        x = np.moveaxis(np.ascontiguousarray(np.moveaxis(x, 1, -1)), -1, 1)
    elif x_layout == "fortran":
        x = np.asfortranarray(x)
    expected = _call(name, x.copy(order="K"), dy, w, b, m, v)
    got = _call(name, x, dy, w, b, m, v, out=x)
    assert got[0] is x
    _results_equal(got, expected, f"{name} in place ({x_layout})")


@pytest.mark.parametrize("name", BACKWARD)
@pytest.mark.parametrize("target", ["dy", "x"])
@pytest.mark.parametrize("layout", ["c", "channels-last"])
@dtypes
def test_backward_in_place(name, target, layout, dtype, isa):
    shape = (3, 4, 70)
    x, dy, w, b, m, v = _setup(shape, dtype)
    if layout == "channels-last":
        x, dy = (np.moveaxis(np.ascontiguousarray(np.moveaxis(a, 1, -1)), -1, 1)
                 for a in (x, dy))
    expected = _call(name, x.copy(order="K"), dy.copy(order="K"), w, b, m, v)
    out = dy if target == "dy" else x
    got = _call(name, x, dy, w, b, m, v, out=out)
    assert got[0] is out
    _results_equal(got, expected, f"{name} out={target}")


@pytest.mark.parametrize("name", FORWARD)
def test_out_overlapping_input_is_safe(name):
    """out shares memory with x but is not x: the result must still be right."""
    x, dy, w, b, m, v = _setup((6, 3, 8), np.float64)
    buf = np.zeros(x.size + 8)
    xv = buf[:x.size].reshape(x.shape)
    xv[...] = x
    out = buf[8:].reshape(x.shape)
    expected = _call(name, x, dy, w, b, m, v)
    got = _call(name, xv, dy, w, b, m, v, out=out)
    assert got[0] is out
    assert_same_bits(out, expected[0], name)


# ------------------------------------------------------------------ byte order

@calls
@dtypes
def test_byteswapped_input(name, dtype):
    x, dy, w, b, m, v = _setup((3, 4, 9), dtype)
    expected = _call(name, x, dy, w, b, m, v)
    swapped = lambda a: a.astype(a.dtype.newbyteorder(">"))  # noqa: E731
    xs, dys = swapped(x), swapped(dy)
    assert not xs.dtype.isnative and np.array_equal(xs, x)
    got = _call(name, xs, dys, swapped(np.asarray(w)), swapped(np.asarray(b)), swapped(m),
                swapped(v))
    for a, e in zip(got, expected):
        assert a.dtype == e.dtype and a.dtype.isnative
        assert_same_bits(a, e, name)


# ------------------------------------------------------------------ other accepted inputs

def test_array_likes_and_python_scalars():
    x = [[1.0, 2.0], [3.0, 6.0]]
    y, mean, invstd = bnfast.batch_norm_train(x, [1, 1], [0, 0], eps=0)
    assert y.dtype == np.float64
    assert y.tolist() == [[-1.0, -1.0], [1.0, 1.0]]
    assert mean.tolist() == [2.0, 4.0]
    m, v = bnfast.moments(np.array(x, dtype=np.float32))
    assert m.dtype == np.float64 and m.tolist() == [2.0, 4.0] and v.tolist() == [1.0, 4.0]
    # integer weights are fine (they are parameters, not data)
    y2 = bnfast.batch_norm_infer(np.array(x), [0, 0], [1, 1], np.array([2, 2]), eps=0)
    assert y2.tolist() == [[2.0, 4.0], [6.0, 12.0]]


def test_mixed_dtype_running_stats():
    x = make_x(rng_for("mixed"), (8, 3, 5), np.float32)
    rm64, rv64 = np.zeros(3), np.ones(3)
    rm32, rv32 = np.zeros(3, np.float32), np.ones(3, np.float32)
    bnfast.batch_norm_train(x, running_mean=rm64, running_var=rv64)
    bnfast.batch_norm_train(x, running_mean=rm32, running_var=rv32)
    assert np.array_equal(rm64.astype(np.float32), rm32)
    assert np.array_equal(rv64.astype(np.float32), rv32)


@pytest.mark.parametrize("shape,axis", [((0, 3, 4), 1), ((0, 3), 1), ((0, 4, 3), -1),
                                        ((2, 0, 4), 1)])
@dtypes
def test_empty_batch_in_inference(shape, axis, dtype):
    x = np.zeros(shape, dtype)
    C = shape[axis]
    m, v = np.zeros(C), np.ones(C)
    y = bnfast.batch_norm_infer(x, m, v, axis=axis)
    assert y.shape == shape and y.dtype == dtype
    y2 = bnfast.batch_norm(x, m, v, training=False, axis=axis)
    assert y2.shape == shape and y2.dtype == dtype
    y3 = bnfast.batch_norm_infer(x, m, v, axis=axis, relu=True, out=np.empty_like(x))
    assert y3.shape == shape
