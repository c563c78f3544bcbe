"""bnfast against torch.nn.functional.batch_norm (forward, running statistics, autograd)."""
import numpy as np
import pytest

import bnfast
from conftest import assert_close, make_params, make_stats, make_x, rng_for

torch = pytest.importorskip("torch")
F = torch.nn.functional

SHAPES = [(6, 5), (2, 3, 70), (4, 3, 5, 7), (2, 4, 2, 3, 5), (3, 17, 9)]
dtypes = pytest.mark.parametrize("dtype", [np.float32, np.float64],
                                 ids=lambda d: np.dtype(d).name)
shapes = pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))

# torch's float32 kernels accumulate in float32 (and use a different summation order), so
# the comparison tolerance is torch's accuracy, not bnfast's.
TORCH_RTOL = {np.float32: 2e-5, np.float64: 1e-10}


def T(a, grad=False):
    t = torch.from_numpy(np.ascontiguousarray(a))
    return t.requires_grad_(grad) if grad else t


def _setup(shape, dtype, tag):
    rng = rng_for("torch", shape, np.dtype(dtype).name, tag)
    x = make_x(rng, shape, dtype)
    C = shape[1]
    w, b = make_params(rng, C, dtype)
    rm, rv = make_stats(rng, C, dtype)
    R = rng.standard_normal(shape).astype(dtype)
    return x, w, b, rm, rv, R


def _grad_scales(R, x, mean, invstd, w):
    """Magnitudes the gradients are computed from (channel axis 1): for dx, |w| invstd
    (|R| + |xhat| max|R|); for dweight and dbias, per-channel sums of |R xhat| and |R|."""
    bs = (1, -1) + (1,) * (x.ndim - 2)
    xhat = (x.astype(np.float64) - np.reshape(mean, bs)) * np.reshape(invstd, bs)
    g = np.abs(R.astype(np.float64))
    axes = (0,) + tuple(range(2, x.ndim))
    k = np.abs(np.asarray(w, np.float64)) * np.asarray(invstd, np.float64)
    sdx = float(np.max(k) * g.max() * (1 + np.abs(xhat).max()))
    return sdx, (g * np.abs(xhat)).sum(axis=axes), g.sum(axis=axes)


@pytest.fixture(autouse=True)
def _torch_threads():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@shapes
@dtypes
@pytest.mark.parametrize("relu", [False, True], ids=["plain", "relu"])
def test_train_forward_and_running_stats(shape, dtype, relu, isa):
    x, w, b, rm, rv, _ = _setup(shape, dtype, "train")
    rm_t, rv_t = T(rm.copy()), T(rv.copy())
    yt = F.batch_norm(T(x), rm_t, rv_t, T(w), T(b), training=True, momentum=0.3, eps=1e-4)
    if relu:
        yt = F.relu(yt)
    rm_b, rv_b = rm.copy(), rv.copy()
    y = bnfast.batch_norm(x, rm_b, rv_b, w, b, training=True, momentum=0.3, eps=1e-4,
                          relu=relu)
    rtol = TORCH_RTOL[dtype]
    assert_close(y, yt.numpy(), rtol=rtol, what="y")
    assert_close(rm_b, rm_t.numpy(), rtol=rtol, scale=1.0, what="running_mean")
    assert_close(rv_b, rv_t.numpy(), rtol=rtol, scale=0.0, what="running_var")
    # the same through batch_norm_train
    rm_c, rv_c = rm.copy(), rv.copy()
    y2, _, _ = bnfast.batch_norm_train(x, w, b, eps=1e-4, running_mean=rm_c, running_var=rv_c,
                                       momentum=0.3, relu=relu)
    assert np.array_equal(y2, y) and np.array_equal(rm_c, rm_b) and np.array_equal(rv_c, rv_b)


@shapes
@dtypes
def test_eval_forward(shape, dtype, isa):
    x, w, b, rm, rv, _ = _setup(shape, dtype, "eval")
    rm_t, rv_t = T(rm.copy()), T(rv.copy())
    yt = F.batch_norm(T(x), rm_t, rv_t, T(w), T(b), training=False, eps=1e-3)
    y = bnfast.batch_norm(x, rm, rv, w, b, training=False, eps=1e-3)
    assert_close(y, yt.numpy(), rtol=TORCH_RTOL[dtype], what="y")
    y2 = bnfast.batch_norm_infer(x, rm, rv, w, b, eps=1e-3)
    assert np.array_equal(y, y2)


@shapes
@dtypes
@pytest.mark.parametrize("relu", [False, True], ids=["plain", "relu"])
def test_train_backward_vs_autograd(shape, dtype, relu, isa):
    x, w, b, _, _, R = _setup(shape, dtype, "bwd")
    xt, wt, bt = T(x, True), T(w, True), T(b, True)
    yt = F.batch_norm(xt, None, None, wt, bt, training=True, eps=1e-5)
    if relu:
        yt = F.relu(yt)
    (yt * T(R)).sum().backward()

    y, mean, invstd = bnfast.batch_norm_train(x, w, b, relu=relu)
    dx, dw, db = bnfast.batch_norm_backward(R, x, mean, invstd, w, bias=b, relu=relu)
    rtol = TORCH_RTOL[dtype]
    sdx, sdw, sdb = _grad_scales(R, x, mean, invstd, w)
    assert_close(dx, xt.grad.numpy(), rtol=rtol, scale=sdx, what="dx")
    assert_close(dw, wt.grad.numpy(), rtol=rtol, scale=sdw, what="dweight")
    assert_close(db, bt.grad.numpy(), rtol=rtol, scale=sdb, what="dbias")


@shapes
@dtypes
def test_eval_backward_vs_autograd(shape, dtype, isa):
    x, w, b, rm, rv, R = _setup(shape, dtype, "evalbwd")
    eps = 1e-5
    xt, wt, bt = T(x, True), T(w, True), T(b, True)
    yt = F.batch_norm(xt, T(rm.copy()), T(rv.copy()), wt, bt, training=False, eps=eps)
    (yt * T(R)).sum().backward()

    invstd = 1.0 / np.sqrt(rv.astype(np.float64) + eps)
    dx, dw, db = bnfast.batch_norm_backward(R, x, rm, invstd, w, training=False)
    rtol = TORCH_RTOL[dtype]
    sdx, sdw, sdb = _grad_scales(R, x, rm, invstd, w)
    assert_close(dx, xt.grad.numpy(), rtol=rtol, scale=sdx, what="dx")
    assert_close(dw, wt.grad.numpy(), rtol=rtol, scale=sdw, what="dweight")
    assert_close(db, bt.grad.numpy(), rtol=rtol, scale=sdb, what="dbias")


@dtypes
@pytest.mark.parametrize("shape", [(3, 5, 7, 6), (2, 6, 9, 11), (4, 70, 2, 3)],
                         ids=lambda s: "x".join(map(str, s)))
def test_channels_last_vs_torch(shape, dtype, isa):
    """axis=-1 on an (N, H, W, C) array matches torch on the permuted (N, C, H, W) tensor."""
    rng = rng_for("torch-cl", shape, np.dtype(dtype).name)
    x_nchw = make_x(rng, shape, dtype)
    C = shape[1]
    w, b = make_params(rng, C, dtype)
    rm, rv = make_stats(rng, C, dtype)
    R_nchw = rng.standard_normal(shape).astype(dtype)
    x_cl = np.ascontiguousarray(x_nchw.transpose(0, 2, 3, 1))
    R_cl = np.ascontiguousarray(R_nchw.transpose(0, 2, 3, 1))
    rtol = TORCH_RTOL[dtype]

    # training forward + running stats
    rm_t, rv_t = T(rm.copy()), T(rv.copy())
    xt, wt, bt = T(x_nchw, True), T(w, True), T(b, True)
    yt = F.batch_norm(xt, rm_t, rv_t, wt, bt, training=True, momentum=0.1, eps=1e-5)
    (yt * T(R_nchw)).sum().backward()
    rm_b, rv_b = rm.copy(), rv.copy()
    y, mean, invstd = bnfast.batch_norm_train(x_cl, w, b, axis=-1, running_mean=rm_b,
                                              running_var=rv_b)
    assert y.shape == x_cl.shape
    assert_close(y, yt.detach().numpy().transpose(0, 2, 3, 1), rtol=rtol, what="y")
    assert_close(rm_b, rm_t.numpy(), rtol=rtol, scale=1.0, what="running_mean")
    assert_close(rv_b, rv_t.numpy(), rtol=rtol, scale=0.0, what="running_var")

    dx, dw, db = bnfast.batch_norm_backward(R_cl, x_cl, mean, invstd, w, axis=-1)
    sdx, sdw, sdb = _grad_scales(R_nchw, x_nchw, mean, invstd, w)
    assert_close(dx, xt.grad.numpy().transpose(0, 2, 3, 1), rtol=rtol, scale=sdx, what="dx")
    assert_close(dw, wt.grad.numpy(), rtol=rtol, scale=sdw, what="dweight")
    assert_close(db, bt.grad.numpy(), rtol=rtol, scale=sdb, what="dbias")

    # eval mode
    ye = F.batch_norm(T(x_nchw), T(rm.copy()), T(rv.copy()), T(w), T(b), training=False)
    y2 = bnfast.batch_norm(x_cl, rm, rv, w, b, training=False, axis=-1)
    assert_close(y2, ye.numpy().transpose(0, 2, 3, 1), rtol=rtol, what="eval y")

    # a torch channels_last tensor's memory is exactly our (N, H, W, C) array
    xt_cl = T(x_nchw).contiguous(memory_format=torch.channels_last)
    assert np.array_equal(xt_cl.permute(0, 2, 3, 1).contiguous().numpy(), x_cl)
