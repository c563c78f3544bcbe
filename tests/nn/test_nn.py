"""Tests of bnfast.nn: gradient checks, module protocol, batch-norm features, files, fit."""
import numpy as np
import pytest

import bnfast
from bnfast import nn, optim
from bnfast import reference as ref
from bnfast.train import Trainer, fit, iterate_minibatches

F64 = np.float64


def rng_(seed):
    return np.random.default_rng(seed)


# ---------------------------------------------------------------------------- gradient checks

def _numeric(f, a, idx, h=1e-6):
    old = a[idx]
    a[idx] = old + h
    fp = f()
    a[idx] = old - h
    fm = f()
    a[idx] = old
    return (fp - fm) / (2 * h)


def _sample(shape, k, rng):
    """Up to k element indices of an array of `shape` (all of them if it is small)."""
    n = int(np.prod(shape))
    flat = np.arange(n) if n <= k else rng.choice(n, k, replace=False)
    return [np.unravel_index(i, shape) for i in flat]


def gradcheck(module, x, *, reset=None, k=40, seed=0, rtol=1e-5, atol=1e-7, check_x=True):
    """Compare backward() with central differences of L = sum(forward(x) * R)."""
    rng = rng_(seed)
    x = np.array(x, dtype=F64)

    def run():
        if reset is not None:
            reset()
        return module.forward(x)

    y = run()
    R = rng.standard_normal(y.shape)

    def loss():
        return float(np.sum(run() * R))

    module.zero_grad()
    run()
    dx = module.backward(R)
    grads = {n: (p.grad.copy() if p.grad is not None else None)
             for n, p in module.named_parameters()}
    scale = 1.0
    if check_x:
        assert dx.shape == x.shape
        for idx in _sample(x.shape, k, rng):
            num = _numeric(loss, x, idx)
            assert abs(dx[idx] - num) <= atol * scale + rtol * abs(num), (
                f"d/dx{idx}: analytic {dx[idx]!r} vs numeric {num!r}")
    for name, p in module.named_parameters():
        g = grads[name]
        assert g is not None, f"no gradient for {name}"
        assert g.shape == p.data.shape and g.dtype == p.data.dtype
        for idx in _sample(p.data.shape, k, rng):
            num = _numeric(loss, p.data, idx)
            assert abs(g[idx] - num) <= atol + rtol * abs(num), (
                f"d/d{name}{idx}: analytic {g[idx]!r} vs numeric {num!r}")


D = dict(dtype=F64)


@pytest.mark.parametrize("bias", [True, False])
def test_grad_linear(bias):
    gradcheck(nn.Linear(5, 4, bias, rng=0, **D), rng_(1).standard_normal((3, 5)))
    gradcheck(nn.Linear(5, 4, bias, rng=0, **D), rng_(1).standard_normal((2, 3, 5)))


@pytest.mark.parametrize("kernel,stride,padding", [(3, 1, 1), (3, 2, 0),
                                                   ((2, 3), (2, 1), (1, 0)),
                                                   (1, 1, 0), (2, 2, 0)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_grad_conv2d(kernel, stride, padding, channels_last):
    conv = nn.Conv2d(3, 4, kernel, stride, padding, channels_last=channels_last, rng=0, **D)
    x = rng_(1).standard_normal((2, 3, 6, 5))
    if channels_last:
        x = x.transpose(0, 2, 3, 1)
    gradcheck(conv, x, k=30)


@pytest.mark.parametrize("kernel,stride,padding",
                         [(2, None, 0), (3, 2, 1), (3, 1, 0), ((2, 3), 2, (1, 1))])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("cls", [nn.MaxPool2d, nn.AvgPool2d])
def test_grad_pool(cls, kernel, stride, padding, channels_last):
    x = rng_(2).standard_normal((2, 3, 7, 6))      # distinct values: no ties
    if channels_last:
        x = x.transpose(0, 2, 3, 1)
    gradcheck(cls(kernel, stride, padding, channels_last=channels_last), x, k=60)


def test_grad_avgpool_exclude_pad():
    gradcheck(nn.AvgPool2d(3, 2, 1, count_include_pad=False),
              rng_(2).standard_normal((2, 2, 5, 5)))


@pytest.mark.parametrize("layer", [nn.ReLU(), nn.Sigmoid(), nn.Tanh(), nn.Flatten(),
                                   nn.Identity(),
                                   nn.Flatten(0, 2)])
def test_grad_elementwise(layer):
    x = rng_(3).standard_normal((4, 3, 2, 2))
    x[np.abs(x) < 1e-3] = 0.5          # keep ReLU away from its kink
    gradcheck(layer, x)


def test_grad_dropout():
    d = nn.Dropout(0.4)

    def reset():
        d._rng = np.random.default_rng(7)
    gradcheck(d, rng_(3).standard_normal((6, 5)), reset=reset)


BN_CASES = [
    (nn.BatchNorm1d, (6, 4), {}),
    (nn.BatchNorm1d, (5, 3, 4), {}),
    (nn.BatchNorm2d, (3, 4, 3, 2), {}),
    (nn.BatchNorm2d, (3, 3, 2, 4), {"channels_last": True}),
    (nn.BatchNorm1d, (6, 4), {"affine": False}),
    (nn.BatchNorm1d, (6, 4), {"relu": True}),
    (nn.BatchNorm2d, (3, 4, 3, 2), {"relu": True, "channels_last": True}),
    (nn.BatchNorm1d, (6, 4), {"momentum": None}),
    (nn.BatchNorm3d, (3, 2, 2, 3, 2), {}),
    (nn.BatchNorm3d, (3, 2, 3, 2, 4), {"channels_last": True, "relu": True}),
]


def _bn(cls, kw, C, seed=0):
    bn = cls(C, **kw, **D)
    rng = rng_(seed)
    if bn.affine:
        bn.weight.data[:] = rng.uniform(0.5, 2, C) * rng.choice([-1, 1], C)
        bn.bias.data[:] = rng.standard_normal(C)
    bn.running_mean[:] = rng.standard_normal(C)
    bn.running_var[:] = rng.uniform(0.5, 2, C)
    return bn


@pytest.mark.parametrize("mode", ["train", "eval", "frozen", "untracked"])
@pytest.mark.parametrize("cls,shape,kw", BN_CASES)
def test_grad_batchnorm(cls, shape, kw, mode):
    kw = dict(kw)
    if mode == "untracked":
        kw["track_running_stats"] = False
        bn = cls(shape[-1] if kw.get("channels_last") else shape[1], **kw, **D)
        bn.eval()      # untracked: batch statistics even in eval mode
    else:
        C = shape[-1] if kw.get("channels_last") else shape[1]
        bn = _bn(cls, kw, C)
        if mode == "eval":
            bn.eval()
        elif mode == "frozen":
            bn.freeze_bn_stats()
    x = rng_(4).standard_normal(shape) * 2 + 1
    gradcheck(bn, x, k=30, rtol=1e-5, atol=1e-6)


def test_grad_residual_and_basic_block():
    body = nn.Sequential(nn.Linear(4, 4, rng=0, **D), nn.BatchNorm1d(4, **D), nn.Tanh())
    gradcheck(nn.Residual(body, activation=nn.Sigmoid()), rng_(5).standard_normal((6, 4)))
    res = nn.Residual(nn.Linear(4, 3, rng=1, **D), shortcut=nn.Linear(4, 3, rng=2, **D))
    gradcheck(res, rng_(5).standard_normal((6, 4)))
    for stride, cin, cout in ((1, 3, 3), (2, 3, 4)):
        block = nn.BasicBlock(cin, cout, stride, rng=0, **D)
        gradcheck(block, rng_(6).standard_normal((2, cin, 5, 5)), k=20, atol=1e-6)


def small_convnet(dtype=F64, rng=0, channels_last=False):
    rng = rng_(rng) if isinstance(rng, int) else rng
    cl = dict(channels_last=channels_last)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1, rng=rng, dtype=dtype, **cl),
        nn.BatchNorm2d(4, dtype=dtype, **cl), nn.ReLU(), nn.MaxPool2d(2, **cl),
        nn.Conv2d(4, 6, 3, stride=1, padding=1, bias=False, rng=rng, dtype=dtype, **cl),
        nn.BatchNorm2d(6, relu=True, dtype=dtype, **cl), nn.AvgPool2d(2, **cl),
        nn.Flatten(), nn.Linear(6 * 2 * 2, 5, rng=rng, dtype=dtype),
        nn.BatchNorm1d(5, dtype=dtype), nn.Sigmoid(), nn.Dropout(0.0),
        nn.Linear(5, 3, rng=rng, dtype=dtype))


@pytest.mark.parametrize("channels_last", [False, True])
def test_grad_small_network(channels_last):
    net = small_convnet(channels_last=channels_last)
    x = rng_(7).standard_normal((4, 2, 8, 8))
    if channels_last:
        x = x.transpose(0, 2, 3, 1)
    gradcheck(net, x, k=12, atol=1e-6)


def test_grad_network_with_loss():
    """The whole chain: network -> cross-entropy, against central differences of the loss."""
    net = nn.Sequential(nn.Linear(6, 5, rng=0, **D), nn.BatchNorm1d(5, **D), nn.Sigmoid(),
                        nn.Linear(5, 4, rng=1, **D))
    loss_fn = nn.CrossEntropyLoss()
    rng = rng_(8)
    x, y = rng.standard_normal((7, 6)), rng.integers(0, 4, 7)
    net.zero_grad()
    loss_fn(net(x), y)
    dx = net.backward(loss_fn.backward())
    f = lambda: loss_fn(net(x), y)  # noqa: E731
    for idx in _sample(x.shape, 15, rng):
        assert np.isclose(dx[idx], _numeric(f, x, idx), rtol=1e-5, atol=1e-8)
    for name, p in net.named_parameters():
        for idx in _sample(p.data.shape, 8, rng):
            assert np.isclose(p.grad[idx], _numeric(f, p.data, idx), rtol=1e-5, atol=1e-8), name


@pytest.mark.parametrize("target", ["index", "prob", "smooth"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_grad_losses(target, reduction):
    rng = rng_(9)
    z = rng.standard_normal((5, 4)) * 3
    if target == "prob":
        t = rng.dirichlet(np.ones(4), 5)
    else:
        t = rng.integers(0, 4, 5)
    ce = nn.CrossEntropyLoss(reduction, label_smoothing=0.2 if target == "smooth" else 0.0)
    ce(z, t)
    g = ce.backward()
    for idx in _sample(z.shape, 20, rng):
        assert np.isclose(g[idx], _numeric(lambda: ce(z, t), z, idx), rtol=1e-6, atol=1e-9)
    mse = nn.MSELoss(reduction)
    t2 = rng.standard_normal((5, 4))
    mse(z, t2)
    g = mse.backward()
    for idx in _sample(z.shape, 20, rng):
        assert np.isclose(g[idx], _numeric(lambda: mse(z, t2), z, idx), rtol=1e-6, atol=1e-9)


def test_cross_entropy_stable_and_exact():
    ce = nn.CrossEntropyLoss()
    z = np.array([[1000.0, 0.0, -1000.0], [-1e4, 1e4, 0.0]], dtype=np.float32)
    loss = ce(z, np.array([0, 1]))
    assert np.isfinite(loss) and loss == 0.0
    g = ce.backward()
    assert np.all(np.isfinite(g)) and g.dtype == np.float32
    z = rng_(0).standard_normal((4, 3))
    t = np.array([0, 2, 1, 1])
    expected = np.mean(np.log(np.exp(z).sum(1)) - z[np.arange(4), t])
    assert np.isclose(ce(z, t), expected, rtol=1e-13)
    with pytest.raises(ValueError, match="class indices"):
        ce(z, np.array([0, 3, 1, 1]))
    with pytest.raises(ValueError, match="shape"):
        ce(z, np.array([0, 1]))
    with pytest.raises(ValueError, match=r"\(N, C\)"):
        ce(z[0], t)


@pytest.mark.parametrize("make,shape", [
    (lambda: nn.Linear(4, 3, **D), (5, 4)),
    (lambda: nn.Conv2d(2, 3, 3, 2, 1, **D), (2, 2, 5, 5)),
    (lambda: nn.MaxPool2d(3, 2, 1), (2, 2, 5, 5)),
    (lambda: nn.AvgPool2d(2), (2, 2, 4, 4)),
    (lambda: nn.BatchNorm2d(2, relu=True, **D), (3, 2, 2, 2)),
    (lambda: nn.BatchNorm1d(4, **D).eval(), (5, 4)),
    (lambda: nn.Sigmoid(), (5, 4)), (lambda: nn.Tanh(), (5, 4)), (lambda: nn.ReLU(), (5, 4)),
    (lambda: nn.Dropout(0.5, rng=0), (5, 4)), (lambda: nn.Flatten(), (2, 2, 3)),
    (lambda: small_convnet(), (3, 2, 8, 8)),
])
def test_layers_do_not_modify_their_inputs(make, shape):
    m = make()
    x = rng_(12).standard_normal(shape)
    x0 = x.copy()
    y = m(x)
    g = rng_(13).standard_normal(y.shape)
    g0 = g.copy()
    m.backward(g)
    assert np.array_equal(x, x0) and np.array_equal(g, g0)


# ---------------------------------------------------------------------------- module protocol

def mlp(dtype=np.float32, rng=0):
    rng = rng_(rng)
    return nn.Sequential(nn.Linear(8, 6, rng=rng, dtype=dtype), nn.BatchNorm1d(6, dtype=dtype),
                         nn.Sigmoid(), nn.Dropout(0.2, rng=1),
                         nn.Linear(6, 3, rng=rng, dtype=dtype))


def test_protocol_names_and_buffers():
    net = mlp()
    names = [n for n, _ in net.named_parameters()]
    assert names == ["0.weight", "0.bias", "1.weight", "1.bias", "4.weight", "4.bias"]
    assert [n for n, _ in net.named_buffers()] == [
        "1.running_mean", "1.running_var", "1.num_batches_tracked"]
    assert list(net.state_dict()) == [
        "0.weight", "0.bias", "1.weight", "1.bias", "1.running_mean", "1.running_var",
        "1.num_batches_tracked", "4.weight", "4.bias"]
    # buffers are not trained parameters
    assert all(isinstance(p, nn.Parameter) for p in net.parameters())
    assert not any(b is p.data for b in net.buffers() for p in net.parameters())
    assert net[0].weight.shape == (6, 8)
    nbt = net[1].num_batches_tracked
    assert nbt.dtype == np.int64 and nbt.shape == ()
    assert "BatchNorm1d(6" in repr(net)
    block = nn.BasicBlock(3, 4, 2, rng=0)
    keys = list(block.state_dict())
    assert keys[:2] == ["conv1.weight", "bn1.weight"]
    assert "downsample.0.weight" in keys and "downsample.1.running_var" in keys


def test_train_eval_zero_grad():
    net = mlp()
    assert all(m.training for m in net.modules())
    assert net.eval() is net and not any(m.training for m in net.modules())
    net.train()
    x = rng_(0).standard_normal((5, 8), dtype=np.float32)
    out = net(x)
    net.backward(np.ones_like(out))
    g1 = net[0].weight.grad.copy()
    net(x)
    net.backward(np.ones_like(out))
    # gradients accumulate (dropout differs between calls, so only check they changed)
    assert not np.array_equal(net[0].weight.grad, g1)
    net.zero_grad()
    assert all(p.grad is None for p in net.parameters())


def test_gradient_accumulates_exactly():
    lin = nn.Linear(4, 3, rng=0, **D)
    x = rng_(1).standard_normal((5, 4))
    g = rng_(2).standard_normal((5, 3))
    lin(x)
    lin.backward(g)
    once = lin.weight.grad.copy()
    lin(x)
    lin.backward(g)
    np.testing.assert_allclose(lin.weight.grad, 2 * once, rtol=1e-14)


def test_requires_grad_false_and_needs_input_grad():
    net = mlp(F64)
    net[0].weight.requires_grad = False
    net[0].needs_input_grad = False
    out = net(rng_(0).standard_normal((4, 8)))
    assert net.backward(np.ones_like(out)) is None
    assert net[0].weight.grad is None and net[0].bias.grad is not None
    bad = nn.Sequential(nn.ReLU(), net[0])
    bad(np.ones((2, 8)))
    with pytest.raises(RuntimeError, match="first layer"):
        bad.backward(np.ones((2, 6)))


def test_dtypes_and_to():
    for dt in (np.float32, np.float64):
        net = small_convnet(dtype=dt)
        out = net(rng_(0).standard_normal((3, 2, 8, 8)).astype(dt))
        assert out.dtype == dt
        dx = net.backward(np.ones_like(out))
        assert dx.dtype == dt
        assert all(p.grad.dtype == dt for p in net.parameters())
    net = mlp(np.float32)
    with pytest.raises(TypeError, match="float32 parameters but got a float64 input"):
        net(np.zeros((2, 8)))
    net.to(np.float64)
    assert all(p.data.dtype == F64 for p in net.parameters())
    assert net[1].running_var.dtype == F64 and net[1].num_batches_tracked.dtype == np.int64
    assert net(np.zeros((2, 8))).dtype == F64
    with pytest.raises(TypeError, match="float32 or float64"):
        nn.Linear(2, 2, dtype=np.int32)
    with pytest.raises(TypeError, match="float32 or float64"):
        nn.ReLU()(np.array([1, 2]))


@pytest.mark.parametrize("make,x,match", [
    (lambda: nn.Linear(4, 3), np.zeros((2, 5), np.float32), r"\(\.\.\., 4\)"),
    (lambda: nn.Conv2d(3, 4, 3), np.zeros((2, 4, 5, 5), np.float32), "3 input channels"),
    (lambda: nn.Conv2d(3, 4, 3), np.zeros((2, 3, 5), np.float32), "4-d input"),
    (lambda: nn.Conv2d(3, 4, 5), np.zeros((2, 3, 3, 3), np.float32), "smaller than the kernel"),
    (lambda: nn.Conv2d(3, 4, 3, channels_last=True), np.zeros((2, 3, 5, 5), np.float32),
     "channels_last=True"),
    (lambda: nn.BatchNorm1d(4), np.zeros((2, 3), np.float32), r"BatchNorm1d\(4\) got 3"),
    (lambda: nn.BatchNorm1d(4), np.zeros((2, 4, 1, 1), np.float32), r"\(N, C\) or \(N, C, L\)"),
    (lambda: nn.BatchNorm2d(4), np.zeros((2, 4), np.float32), r"\(N, C, H, W\)"),
    (lambda: nn.BatchNorm2d(4, channels_last=True), np.zeros((2, 4, 3, 3), np.float32),
     "channel axis -1"),
    (lambda: nn.BatchNorm1d(4), np.zeros((1, 4), np.float32), "more than 1 value"),
    (lambda: nn.MaxPool2d(2), np.zeros((2, 3, 4), np.float32), "4-d input"),
    (lambda: nn.MaxPool2d(3), np.zeros((1, 1, 2, 2), np.float32), "smaller than the kernel"),
    (lambda: nn.Flatten(2, 5), np.zeros((2, 3), np.float32), "does not fit"),
    (lambda: nn.Residual(nn.Linear(4, 3)), np.zeros((2, 4), np.float32), "shortcut"),
])
def test_shape_errors(make, x, match):
    with pytest.raises(ValueError, match=match):
        make()(x)


@pytest.mark.parametrize("make", [
    lambda: nn.Linear(0, 3), lambda: nn.Conv2d(3, 4, 0), lambda: nn.Conv2d(3, 4, 3, padding=-1),
    lambda: nn.BatchNorm1d(0), lambda: nn.BatchNorm1d(3, momentum=1.5),
    lambda: nn.BatchNorm1d(3, eps=-1), lambda: nn.Dropout(1.5),
    lambda: nn.MaxPool2d(2, padding=2),
    lambda: nn.CrossEntropyLoss("none"), lambda: nn.MSELoss("avg"),
])
def test_constructor_errors(make):
    with pytest.raises(ValueError):
        make()


def test_backward_before_forward():
    for m in (nn.Linear(2, 2), nn.Conv2d(1, 1, 1), nn.BatchNorm1d(2), nn.MaxPool2d(2),
              nn.CrossEntropyLoss()):
        with pytest.raises(RuntimeError, match="before forward"):
            m.backward(np.zeros((1, 2), np.float32))


def test_load_state_dict_checks():
    net, other = mlp(rng=0), mlp(rng=1)
    sd = net.state_dict()
    other.load_state_dict(sd)
    for k, v in other.state_dict().items():
        np.testing.assert_array_equal(v, sd[k])
    bad = dict(sd)
    bad.pop("0.bias")
    bad["extra"] = np.zeros(1)
    with pytest.raises(nn.StateDictError,
                       match=r'Missing key\(s\) in state_dict: "0.bias". \n\t'
                             r'Unexpected key\(s\) in state_dict: "extra"'):
        other.load_state_dict(bad)
    missing, unexpected = other.load_state_dict(bad, strict=False)
    assert missing == ["0.bias"] and unexpected == ["extra"]
    with pytest.raises(ValueError, match="shape"):
        other.load_state_dict({**sd, "0.weight": np.zeros((8, 6))})
    with pytest.raises(TypeError, match="cannot cast"):
        other.load_state_dict({**sd, "1.num_batches_tracked": np.array(1.5)})
    # float64 values load into a float32 model (cast), in place
    w = other[0].weight.data
    other.load_state_dict({k: v.astype(F64) if v.dtype.kind == "f" else v
                           for k, v in sd.items()})
    assert other[0].weight.data is w and w.dtype == np.float32


# ---------------------------------------------------------------------------- batch norm

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("momentum", [0.1, 0.3, None])
def test_bn_running_stats_match_reference(dtype, momentum):
    C = 5
    bn = nn.BatchNorm2d(C, momentum=momentum, dtype=dtype)
    rm, rv = np.zeros(C), np.ones(C)
    rng = rng_(0)
    for step in range(1, 5):
        x = (rng.standard_normal((4, C, 3, 3)) * 3 + 2).astype(dtype)
        y = bn(x)
        factor = 1.0 / step if momentum is None else momentum
        yr, _, _ = ref.batch_norm_train(x, bn.weight.data, bn.bias.data, running_mean=rm,
                                        running_var=rv, momentum=factor)
        tol = 1e-5 if dtype == np.float32 else 1e-12
        np.testing.assert_allclose(y, yr, rtol=tol, atol=tol)
        np.testing.assert_allclose(bn.running_mean, rm, rtol=tol, atol=tol)
        np.testing.assert_allclose(bn.running_var, rv, rtol=tol, atol=tol)
        assert int(bn.num_batches_tracked) == step
    if momentum is None:     # cumulative average of the batch statistics
        assert bn.running_mean.dtype == dtype


def test_bn_modes():
    C = 3
    rng = rng_(1)
    x = rng.standard_normal((8, C)) * 2 + 1
    bn = _bn(nn.BatchNorm1d, {}, C)
    rm0, rv0 = bn.running_mean.copy(), bn.running_var.copy()
    expected_eval = ref.batch_norm_infer(x, rm0, rv0, bn.weight.data, bn.bias.data)
    # eval: running statistics, no update
    bn.eval()
    np.testing.assert_allclose(bn(x), expected_eval, rtol=1e-12)
    np.testing.assert_array_equal(bn.running_mean, rm0)
    # frozen while training: the same, and training stays True
    bn.train().freeze_bn_stats()
    assert bn.training and bn.frozen
    np.testing.assert_allclose(bn(x), expected_eval, rtol=1e-12)
    np.testing.assert_array_equal(bn.running_mean, rm0)
    assert int(bn.num_batches_tracked) == 0
    g = rng.standard_normal(x.shape)
    dx = bn.backward(g)
    np.testing.assert_allclose(dx, g * bn.weight.data / np.sqrt(rv0 + bn.eps), rtol=1e-12)
    bn.unfreeze_bn_stats()
    assert not bn.frozen
    bn(x)
    assert int(bn.num_batches_tracked) == 1 and not np.array_equal(bn.running_mean, rm0)
    # untracked: batch statistics in both modes
    un = nn.BatchNorm1d(C, track_running_stats=False, **D)
    assert un.running_mean is None and list(un.state_dict()) == ["weight", "bias"]
    yb = ref.batch_norm_train(x)[0]
    np.testing.assert_allclose(un(x), yb, rtol=1e-12)
    np.testing.assert_allclose(un.eval()(x), yb, rtol=1e-12)
    # affine=False: no parameters
    assert nn.BatchNorm1d(C, affine=False).parameters() == []


def test_freeze_bn_stats_keeps_dropout_training():
    net = mlp(F64)
    net.freeze_bn_stats()
    assert net[1].frozen and net[3].training
    x = rng_(0).standard_normal((6, 8))
    a, b = net(x), net(x)
    assert not np.array_equal(a, b)       # dropout still active
    assert int(net[1].num_batches_tracked) == 0
    net.unfreeze_bn_stats()
    assert not net[1].frozen


def test_bn_channels_last_equals_channels_first():
    x = rng_(2).standard_normal((3, 4, 5, 2)).astype(np.float32)
    a, b = nn.BatchNorm2d(4), nn.BatchNorm2d(4, channels_last=True)
    ya = a(x)
    yb = b(np.ascontiguousarray(x.transpose(0, 2, 3, 1)))
    np.testing.assert_allclose(yb.transpose(0, 3, 1, 2), ya, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(a.running_var, b.running_var, rtol=1e-6)
    g = rng_(3).standard_normal(x.shape).astype(np.float32)
    da = a.backward(g)
    db = b.backward(np.ascontiguousarray(g.transpose(0, 2, 3, 1)))
    np.testing.assert_allclose(db.transpose(0, 3, 1, 2), da, rtol=1e-5, atol=1e-6)


def test_bn_fused_relu_equals_separate():
    x = rng_(4).standard_normal((6, 3, 2, 2))
    fused = nn.BatchNorm2d(3, relu=True, **D)
    sep = nn.Sequential(nn.BatchNorm2d(3, **D), nn.ReLU())
    for m in (fused, sep[0]):
        m.weight.data[:] = [1.5, -0.5, 2.0]
        m.bias.data[:] = [0.1, 0.2, -0.3]
    np.testing.assert_allclose(fused(x), sep(x), rtol=1e-12)
    g = rng_(5).standard_normal(x.shape)
    np.testing.assert_allclose(fused.backward(g), sep.backward(g), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(fused.weight.grad, sep[0].weight.grad, rtol=1e-10)


# ---------------------------------------------------------------------------- population stats

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_population_stats(dtype):
    rng = rng_(6)
    net = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, rng=rng, dtype=dtype),
                        nn.BatchNorm2d(3, dtype=dtype), nn.ReLU(), nn.Flatten(),
                        nn.Linear(3 * 16, 4, rng=rng, dtype=dtype),
                        nn.BatchNorm1d(4, dtype=dtype), nn.Dropout(0.5))
    batches = [(rng.standard_normal((5, 2, 4, 4)) * 2 + 1).astype(dtype) for _ in range(6)]
    net[1].frozen = True
    nbt = int(net[1].num_batches_tracked)
    out = nn.compute_population_stats(net, [(b, None) for b in batches])
    assert out is net
    # expected: run each batch through the training-mode network (batch statistics), and
    # average the batch means and the unbiased batch variances (Algorithm 2)
    means = {1: [], 5: []}
    varis = {1: [], 5: []}
    for b in batches:
        h = net[0](b).astype(F64)
        means[1].append(h.mean(axis=(0, 2, 3)))
        m = h.size // 3
        varis[1].append(h.var(axis=(0, 2, 3)) * m / (m - 1))
        y = ref.batch_norm_train(h, net[1].weight.data, net[1].bias.data)[0]
        h2 = net[4](np.maximum(y, 0).astype(dtype).reshape(5, -1)).astype(F64)
        means[5].append(h2.mean(axis=0))
        varis[5].append(h2.var(axis=0) * 5 / 4)
    tol = 2e-5 if dtype == np.float32 else 1e-12
    for i in (1, 5):
        np.testing.assert_allclose(net[i].running_mean, np.mean(means[i], axis=0),
                                   rtol=tol, atol=tol)
        np.testing.assert_allclose(net[i].running_var, np.mean(varis[i], axis=0),
                                   rtol=tol, atol=tol)
    # modes restored, counters untouched
    assert all(m.training for m in net.modules()) and net[1].frozen and not net[5].frozen
    assert int(net[1].num_batches_tracked) == nbt
    with pytest.raises(ValueError, match="no batches"):
        nn.compute_population_stats(net, [])
    with pytest.raises(ValueError, match="no batch-norm"):
        nn.compute_population_stats(nn.Linear(2, 2), batches)
    with pytest.raises(ValueError, match="track_running_stats=False"):
        nn.compute_population_stats(nn.BatchNorm1d(2, track_running_stats=False), batches)


# ---------------------------------------------------------------------------- folding

def _train_some(net, x, steps=3):
    opt = optim.SGD(net.parameters(), lr=0.05, momentum=0.5)
    for _ in range(steps):
        opt.zero_grad()
        out = net(x)
        net.backward(out - 0.1)
        opt.step()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("channels_last", [False, True])
def test_fold_batchnorm_convnet(dtype, channels_last):
    net = small_convnet(dtype=dtype, channels_last=channels_last)
    x = rng_(8).standard_normal((6, 2, 8, 8)).astype(dtype)
    if channels_last:
        x = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
    _train_some(net, x)
    before = net.state_dict()
    folded = nn.fold_batchnorm(net, sample=x)
    kinds = [type(m).__name__ for m in folded]
    assert kinds[:7] == ["Conv2d", "Identity", "ReLU", "MaxPool2d", "Conv2d", "ReLU",
                         "AvgPool2d"]
    assert kinds[8:10] == ["Linear", "Identity"]
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert not folded.training and net.training
    for k, v in net.state_dict().items():         # the original is untouched
        np.testing.assert_array_equal(v, before[k])
    net.eval()
    y = net(x)
    tol = 1e-4 if dtype == np.float32 else 1e-10
    np.testing.assert_allclose(folded(x), y, rtol=tol, atol=tol * np.abs(y).max())


def test_fold_batchnorm_basic_block_and_errors():
    block = nn.Sequential(nn.BasicBlock(3, 4, 2, rng=0, **D), nn.BasicBlock(4, 4, rng=1, **D))
    x = rng_(9).standard_normal((4, 3, 6, 6))
    _train_some(block, x)
    folded = nn.fold_batchnorm(block, sample=x)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in folded.modules()) == 0
    assert folded[0].conv1.bias is not None
    with pytest.raises(ValueError, match="without running statistics"):
        nn.fold_batchnorm(nn.Sequential(nn.Linear(2, 2),
                                        nn.BatchNorm1d(2, track_running_stats=False)))
    # a failing equivalence check is reported: a Linear subclass whose forward the fold
    # formula does not describe
    class Doubled(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    net = nn.Sequential(Doubled(3, 3, rng=0, **D), nn.BatchNorm1d(3, **D))
    x = rng_(1).standard_normal((5, 3))
    _train_some(net, x)
    nn.fold_batchnorm(net)                       # no sample: no check
    with pytest.raises(AssertionError, match="differs"):
        nn.fold_batchnorm(net, sample=x)


# ---------------------------------------------------------------------------- save / load

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_save_load_round_trip(tmp_path, dtype):
    net = small_convnet(dtype=dtype, rng=0)
    x = rng_(10).standard_normal((5, 2, 8, 8)).astype(dtype)
    _train_some(net, x)
    path = tmp_path / "model.npz"
    nn.save(net, path)
    with np.load(path, allow_pickle=False) as f:
        assert list(f.files) == list(net.state_dict())
    other = small_convnet(dtype=dtype, rng=1)
    nn.load(other, path)
    for k, v in net.state_dict().items():
        w = other.state_dict()[k]
        assert w.dtype == v.dtype and w.shape == v.shape
        assert w.tobytes() == v.tobytes(), k
    net.eval()
    other.eval()
    assert net(x).tobytes() == other(x).tobytes()
    net.save(tmp_path / "again")                      # method form; .npz appended
    assert (tmp_path / "again.npz").exists()
    third = small_convnet(dtype=dtype, rng=2).load(tmp_path / "again.npz")
    assert third.state_dict()["1.num_batches_tracked"] == 3


# ---------------------------------------------------------------------------- training loop

def _blobs(n=240, seed=0):
    rng = rng_(seed)
    centers = np.array([[2.0, 0.0], [-2.0, 1.0], [0.0, -2.0]])
    y = rng.integers(0, 3, n)
    X = (centers[y] + rng.standard_normal((n, 2)) * 0.5).astype(np.float32)
    X = np.hstack([X, rng.standard_normal((n, 4)).astype(np.float32)])
    return X, y


def test_fit_learns_and_reports(capsys):
    X, y = _blobs()
    rng = rng_(0)
    net = nn.Sequential(nn.Linear(6, 16, rng=rng), nn.BatchNorm1d(16), nn.ReLU(),
                        nn.Linear(16, 3, rng=rng))
    opt = optim.SGD(net.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    sched = optim.StepLR(opt, step_size=2, gamma=0.5)
    seen = []
    hist = fit(net, nn.CrossEntropyLoss(), opt, (X, y), epochs=4, batch_size=32,
               val_data=(X, y), scheduler=sched, rng=0, progress=True,
               callback=lambda e, r: seen.append(e))
    assert seen == [1, 2, 3, 4]
    assert hist["epoch"] == [1, 2, 3, 4] and hist["lr"] == [0.1, 0.1, 0.05, 0.05]
    assert hist["val_accuracy"][-1] > 0.95 and hist["loss"][-1] < hist["loss"][0]
    assert net.training                      # evaluation restored training mode
    err = capsys.readouterr().err
    assert "epoch 4/4" in err                # the tqdm bar


def test_trainer_evaluate_uses_eval_mode_and_batches():
    X, y = _blobs(100)
    net = nn.Sequential(nn.Linear(6, 3, rng=0), nn.BatchNorm1d(3))
    tr = Trainer(net, nn.CrossEntropyLoss(), optim.Adam(net.parameters(), lr=0.01))
    tr.fit(lambda: iterate_minibatches(X, y, 20, shuffle=True, rng=1), epochs=2, progress=False)
    nbt = int(net[1].num_batches_tracked)
    assert nbt == 10
    res = tr.evaluate((X, y), batch_size=7)
    assert int(net[1].num_batches_tracked) == nbt     # eval mode: statistics unchanged
    net.eval()
    out = net(X)
    assert np.isclose(res["loss"], nn.CrossEntropyLoss()(out, y), rtol=1e-5)
    assert np.isclose(res["accuracy"], np.mean(out.argmax(1) == y))
    np.testing.assert_allclose(tr.predict(X, batch_size=9), out, rtol=1e-6)
    # MSE regression: no default metrics
    lin = nn.Linear(6, 1, rng=0)
    reg = Trainer(lin, nn.MSELoss(), optim.SGD(lin.parameters(), 0.1))
    assert reg.metrics == {}
    batches = list(iterate_minibatches(X, y, 32, drop_last=True))
    assert len(batches) == 3 and all(len(b[0]) == 32 for b in batches)


def test_paper_mlp_trains_on_synthetic_digits():
    """The paper's MNIST architecture (sigmoid, BN on every hidden layer) trains end to end."""
    rng = rng_(0)
    protos = rng.standard_normal((10, 784)).astype(np.float32)
    y = rng.integers(0, 10, 600)
    X = protos[y] + rng.standard_normal((600, 784)).astype(np.float32) * 2.0
    layers = []
    for i, o in ((784, 100), (100, 100), (100, 100)):
        layers += [nn.Linear(i, o, rng=rng), nn.BatchNorm1d(o), nn.Sigmoid()]
    net = nn.Sequential(*layers, nn.Linear(100, 10, rng=rng))
    opt = optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    hist = fit(net, nn.CrossEntropyLoss(), opt, (X, y), epochs=3, batch_size=60, rng=1,
               progress=False)
    assert hist["accuracy"][-1] > 0.9
    nn.compute_population_stats(net, iterate_minibatches(X, y, 60))
    net.eval()
    assert np.mean(net(X).argmax(1) == y) > 0.9


def test_num_threads_do_not_change_results():
    net = small_convnet(dtype=np.float32)
    x = rng_(11).standard_normal((4, 2, 8, 8)).astype(np.float32)
    outs = []
    for n in (1, 2):
        with bnfast.num_threads(n):
            m = net.copy()
            y = m(x)
            outs.append((y, m.backward(np.ones_like(y))))
    assert outs[0][0].tobytes() == outs[1][0].tobytes()


def test_docs_examples_run(tmp_path, monkeypatch):
    """The code blocks of docs/user_guide/nn.md run, in order, in one namespace."""
    import os
    import re
    doc = os.path.join(os.path.dirname(__file__), os.pardir, os.pardir, "docs", "user_guide", "nn.md")
    if not os.path.exists(doc):
        pytest.skip("docs/user_guide/nn.md is not present")
    with open(doc) as f:
        blocks = re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)
    assert len(blocks) >= 4
    monkeypatch.chdir(tmp_path)
    ns = {}
    for code in blocks:
        if "import torch" in code:
            try:
                __import__("torch")
            except ImportError:
                continue
        exec(compile(code, doc, "exec"), ns)
    assert ns["history"]["val_accuracy"][-1] > 0.8
    assert (tmp_path / "model.npz").exists()


# ---------------------------------------------------------------------------- issue 12

@pytest.mark.parametrize("make,shape", [
    (lambda: nn.Linear(4, 3), (2, 4)), (lambda: nn.Conv2d(2, 3, 3), (2, 2, 5, 5)),
    (lambda: nn.BatchNorm1d(4), (3, 4)), (lambda: nn.BatchNorm2d(2), (3, 2, 2, 2)),
])
@pytest.mark.parametrize("in_dtype", [np.int64, np.int32, np.uint8, np.bool_, np.float16,
                                      np.float64])
def test_dtype_error_suggests_only_what_works(make, shape, in_dtype):
    """The error for an input of the wrong dtype suggests only conversions that work."""
    layer = make()                                  # float32 parameters
    x = np.ones(shape, dtype=in_dtype)
    with pytest.raises(TypeError, match="float32 parameters") as err:
        layer(x)
    msg = str(err.value)
    assert "x.astype(np.float32)" in msg
    assert layer(x.astype(np.float32)).dtype == np.float32      # that suggestion works
    if np.dtype(in_dtype) == np.float64:
        assert "model.to(np.float64)" in msg
        assert layer.to(np.float64)(x).dtype == np.float64        # and so does this one
    else:
        assert "model.to" not in msg, msg
        with pytest.raises(TypeError):                            # it would not have worked
            layer.to(in_dtype)


def _to_nhwc(a):
    return np.ascontiguousarray(a.transpose(0, 2, 3, 1))


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_channels_last_copy_loads_channels_first_state_dict(tmp_path, mode):
    """A channels-last model with the same layers (Flatten included, no extra argument)
    loads a channels-first model's state dict -- directly or through a file -- and gives
    the same outputs, input gradients (transposed) and parameter gradients."""
    cf = small_convnet(channels_last=False, rng=0)
    cl = small_convnet(channels_last=True, rng=1)
    x = rng_(20).standard_normal((4, 2, 8, 8))
    _train_some(cf, x)                                 # non-trivial running statistics
    nn.save(cf, tmp_path / "cf")
    nn.load(cl, tmp_path / "cf")
    for m in (cf, cl):
        m.train(mode == "train")
    y_cf, y_cl = cf(x), cl(_to_nhwc(x))
    assert np.abs(y_cf).max() > 0.1
    np.testing.assert_allclose(y_cl, y_cf, rtol=1e-12, atol=1e-12)
    R = rng_(21).standard_normal(y_cf.shape)
    cf.zero_grad()
    cl.zero_grad()
    dx_cf, dx_cl = cf.backward(R), cl.backward(R)
    np.testing.assert_allclose(dx_cl, _to_nhwc(dx_cf), rtol=1e-10, atol=1e-12)
    g_cl = dict(cl.named_parameters())
    for name, p in cf.named_parameters():
        np.testing.assert_allclose(g_cl[name].grad, p.grad, rtol=1e-10, atol=1e-12,
                                   err_msg=name)
    # and back: the channels-last model's state dict is the channels-first model's
    back = small_convnet(channels_last=False, rng=2)
    back.load_state_dict(cl.state_dict())
    back.train(mode == "train")
    np.testing.assert_allclose(back(x), y_cf, rtol=1e-12, atol=1e-12)


def test_flatten_layout():
    x = rng_(22).standard_normal((2, 3, 4, 5))              # NCHW
    xl = _to_nhwc(x)
    # explicit: PyTorch order for channels-last input, the input's own order otherwise
    assert np.array_equal(nn.Flatten(channels_last=True)(xl), x.reshape(2, -1))
    assert np.array_equal(nn.Flatten(channels_last=False)(xl), xl.reshape(2, -1))
    assert np.array_equal(nn.Flatten()(xl), xl.reshape(2, -1))      # alone: as given
    f = nn.Flatten(start_dim=2, channels_last=True)
    assert np.array_equal(f(xl), x.reshape(2, 3, 20))
    assert np.array_equal(f.backward(x.reshape(2, 3, 20)), xl)
    gradcheck(nn.Flatten(channels_last=True), xl, k=20)
    gradcheck(nn.Flatten(1, 2, channels_last=True), xl, k=20)
    # inferred in a Sequential from the last layer with a channels_last setting
    for cl in (False, True):
        net = nn.Sequential(nn.Conv2d(3, 3, 1, channels_last=cl, rng=0, **D), nn.ReLU(),
                            nn.Flatten(), nn.Linear(60, 2, rng=0, **D))
        assert net[2]._input_channels_last() is cl
        assert ("channels_last=True" in repr(net[2])) is cl
    block = nn.Sequential(nn.BasicBlock(3, 3, channels_last=True, rng=0, **D),
                          nn.Sequential(nn.Flatten(), nn.Linear(60, 2, rng=0, **D)))
    assert block[1][0]._input_channels_last()
    # an explicit setting is kept (e.g. channels_last=False for Keras-ordered weights)
    keras = nn.Sequential(nn.MaxPool2d(1, channels_last=True), nn.Flatten(channels_last=False))
    assert np.array_equal(keras(xl), xl.reshape(2, -1))
    # appended or assigned layers are resolved too
    net = nn.Sequential(nn.MaxPool2d(1, channels_last=True))
    net.append(nn.Flatten())
    assert np.array_equal(net(xl), x.reshape(2, -1))
    # one Flatten instance cannot serve both layouts
    shared = nn.Flatten()
    nn.Sequential(nn.MaxPool2d(1, channels_last=True), shared)
    nn.Sequential(shared)                                  # no layout before it: fine
    with pytest.raises(ValueError, match="one Flatten per model"):
        nn.Sequential(nn.MaxPool2d(1), shared)
    with pytest.raises(RuntimeError, match="before forward"):
        nn.Flatten().backward(np.zeros((2, 3)))
    assert nn.Flatten()(np.zeros((0, 3, 4))).shape == (0, 12)


@pytest.mark.parametrize("make,shape", [
    (lambda: nn.Linear(4, 3, **D), (5, 4)),
    (lambda: nn.Conv2d(2, 3, 3, 2, 1, **D), (2, 2, 5, 5)),
    (lambda: nn.Conv2d(2, 3, 3, 1, 1, channels_last=True, **D), (2, 5, 5, 2)),
    (lambda: nn.MaxPool2d(3, 2, 1), (2, 2, 5, 5)),
    (lambda: nn.MaxPool2d(2, channels_last=True), (2, 4, 4, 2)),
    (lambda: nn.AvgPool2d(3, 1, 1, False), (2, 2, 4, 4)),
    (lambda: nn.BatchNorm2d(2, relu=True, **D), (3, 2, 2, 2)),
    (lambda: nn.BatchNorm2d(2, channels_last=True, **D), (3, 2, 2, 2)),
    (lambda: nn.BatchNorm1d(4, **D), (5, 4)),
    (lambda: nn.BatchNorm3d(2, **D), (3, 2, 2, 2, 3)),
    (lambda: nn.BatchNorm3d(3, channels_last=True, relu=True, **D), (3, 2, 2, 2, 3)),
    (lambda: nn.BatchNorm1d(4, **D).eval(), (5, 4)),
    (lambda: nn.BatchNorm1d(4, **D).freeze_bn_stats(), (5, 4)),
    (lambda: nn.Sigmoid(), (5, 4)), (lambda: nn.Tanh(), (5, 4)), (lambda: nn.ReLU(), (5, 4)),
    (lambda: nn.Dropout(0.5, rng=0), (5, 4)), (lambda: nn.Dropout(0.5, rng=0).eval(), (5, 4)),
    (lambda: nn.Identity(), (5, 4)),
    (lambda: nn.Flatten(), (2, 2, 3)), (lambda: nn.Flatten(channels_last=True), (2, 2, 3)),
    (lambda: nn.Residual(nn.Linear(4, 4, **D)), (5, 4)),
    (lambda: nn.BasicBlock(2, 3, 2, **D), (2, 2, 4, 4)),
    (lambda: small_convnet(), (3, 2, 8, 8)),
    (lambda: small_convnet(channels_last=True), (3, 8, 8, 2)),
    (lambda: mlp(F64), (5, 8)),
])
def test_layers_never_write_to_caller_arrays(make, shape):
    """Inputs and output gradients are read-only here: any in-place write raises; the
    returned arrays may be written by the caller without changing the inputs."""
    m = make()
    x = rng_(12).standard_normal(shape)
    x0 = x.copy()
    x.flags.writeable = False
    y = m(x)
    g = rng_(13).standard_normal(y.shape)
    g0 = g.copy()
    g.flags.writeable = False
    dx = m.backward(g)
    assert np.array_equal(x, x0) and np.array_equal(g, g0)
    for out in (y, dx):
        if out.flags.writeable:        # a new array, not a view of the caller's
            assert not np.shares_memory(out, x) and not np.shares_memory(out, g)


# ---------------------------------------------------------------------------- BatchNorm3d

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_batchnorm3d_matches_reference(dtype, channels_last, momentum):
    C = 3
    bn = nn.BatchNorm3d(C, momentum=momentum, channels_last=channels_last, dtype=dtype)
    axis = -1 if channels_last else 1
    rm, rv = np.zeros(C), np.ones(C)
    tol = 1e-5 if dtype == np.float32 else 1e-12
    rng = rng_(20)
    for step in range(1, 4):
        x = (rng.standard_normal((2, C, 3, 2, 4)) * 2 + step).astype(dtype)
        if channels_last:
            x = np.moveaxis(x, 1, -1)                   # (N, D, H, W, C)
        y = bn(x)
        factor = 1.0 / step if momentum is None else momentum
        yr, mean, invstd = ref.batch_norm_train(x, bn.weight.data, bn.bias.data, axis=axis,
                                                running_mean=rm, running_var=rv,
                                                momentum=factor)
        assert y.dtype == dtype and y.shape == x.shape
        np.testing.assert_allclose(y, yr, rtol=tol, atol=tol)
        np.testing.assert_allclose(bn.running_mean, rm, rtol=tol, atol=tol)
        np.testing.assert_allclose(bn.running_var, rv, rtol=tol, atol=tol)
        g = rng.standard_normal(x.shape).astype(dtype)
        dx = bn.backward(g)
        dxr, dwr, dbr = ref.batch_norm_backward(g, x, mean, invstd, bn.weight.data, axis=axis)
        np.testing.assert_allclose(dx, dxr, rtol=10 * tol, atol=10 * tol)
        np.testing.assert_allclose(bn.weight.grad, dwr, rtol=10 * tol, atol=10 * tol)
        bn.zero_grad()
    bn.eval()
    x = rng.standard_normal(x.shape).astype(dtype)
    np.testing.assert_allclose(bn(x), ref.batch_norm_infer(x, rm, rv, bn.weight.data,
                                                           bn.bias.data, axis=axis),
                               rtol=tol, atol=tol)


def test_batchnorm3d_checks_and_layout():
    bn = nn.BatchNorm3d(4)
    assert list(bn.state_dict()) == ["weight", "bias", "running_mean", "running_var",
                                     "num_batches_tracked"]
    with pytest.raises(ValueError, match=r"BatchNorm3d expects input of shape "
                                         r"\(N, C, D, H, W\), got 4-d"):
        bn(np.zeros((2, 4, 3, 3), np.float32))
    with pytest.raises(ValueError, match=r"\(N, D, H, W, C\)"):
        nn.BatchNorm3d(4, channels_last=True)(np.zeros((2, 4, 3, 3), np.float32))
    with pytest.raises(ValueError, match=r"BatchNorm3d\(4\) got 3 channels"):
        bn(np.zeros((2, 3, 2, 2, 2), np.float32))
    with pytest.raises(TypeError, match="float32 parameters but got a float64 input"):
        bn(np.zeros((2, 4, 2, 2, 2)))
    assert "channels_last=True" in repr(nn.BatchNorm3d(4, channels_last=True))
    assert not isinstance(bn, nn.BatchNorm2d)
    # channels-last equals channels-first, and a whole-model conversion works
    x = rng_(21).standard_normal((3, 4, 2, 3, 2)).astype(np.float32)
    a, b = nn.BatchNorm3d(4), nn.BatchNorm3d(4, channels_last=True)
    np.testing.assert_allclose(np.moveaxis(b(np.moveaxis(x, 1, -1)), -1, 1), a(x),
                               rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(a.running_mean, b.running_mean)
    assert [n for n, _ in nn.batchnorm_layers(nn.Sequential(a, b))] == ["0", "1"]
    c = nn.BatchNorm3d(4).double()
    assert c(x.astype(F64)).dtype == F64
    with pytest.raises(ValueError, match="cannot fold BatchNorm3d into a Linear"):
        nn.fold_batchnorm(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm3d(4)))
    with pytest.raises(ValueError, match="cannot fold BatchNorm3d into a Conv2d"):
        nn.fold_batchnorm(nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm3d(4,
                                                                           channels_last=True)))


def test_batchnorm3d_population_stats_and_freeze():
    net = nn.Sequential(nn.BatchNorm3d(2, **D), nn.ReLU())
    data = rng_(22).standard_normal((12, 2, 2, 2, 2)) * 3 + 1
    nn.compute_population_stats(net, np.split(data, 3))
    means = np.mean([b.mean(axis=(0, 2, 3, 4)) for b in np.split(data, 3)], axis=0)
    np.testing.assert_allclose(net[0].running_mean, means, rtol=1e-12)
    net.freeze_bn_stats()
    assert net[0].frozen


# ---------------------------------------------------------------------------- conveniences

def test_apply_visits_children_first_and_returns_self():
    net = nn.Sequential(nn.Linear(2, 2), nn.Residual(nn.Sequential(nn.Linear(2, 2),
                                                                    nn.BatchNorm1d(2))))
    seen = []
    assert net.apply(seen.append) is net
    assert seen == [net[0], net[1].body[0], net[1].body[1], net[1].body, net[1], net]
    with pytest.raises(TypeError, match="callable"):
        net.apply(None)


def test_reset_parameters():
    lin = nn.Linear(5, 3, rng=0)
    w, b = lin.weight.data, lin.bias.data
    w0, b0 = w.copy(), b.copy()
    opt = optim.SGD(lin.parameters(), lr=0.1)
    lin.weight.grad = np.ones_like(w)
    lin.reset_parameters(rng=1)
    assert lin.weight.data is w and lin.bias.data is b          # in place
    assert not np.array_equal(w, w0)
    assert lin.weight.grad is not None                          # gradients untouched
    lin.reset_parameters(rng=0)                                 # the constructor's draw
    np.testing.assert_array_equal(w, w0)
    np.testing.assert_array_equal(b, b0)
    opt.step()
    np.testing.assert_array_equal(w, w0 - np.float32(0.1))      # the optimizer still sees it
    for m, bound in ((nn.Linear(50, 40, dtype=F64), 1 / np.sqrt(50)),
                     (nn.Conv2d(3, 40, (3, 2), dtype=F64), 1 / np.sqrt(18))):
        m.weight.data[...] = 9
        m.bias.data[...] = 9
        m.reset_parameters()
        for p in (m.weight.data, m.bias.data):
            assert np.abs(p).max() <= bound and np.abs(p).max() > 0.8 * bound
    nobias = nn.Conv2d(2, 2, 1, bias=False, rng=3)
    nobias.reset_parameters(rng=3)
    np.testing.assert_array_equal(nobias.weight.data, nn.Conv2d(2, 2, 1, bias=False,
                                                                rng=3).weight.data)
    bn = _bn(nn.BatchNorm2d, {}, 3)
    bn.num_batches_tracked[...] = 7
    bn.reset_parameters()
    np.testing.assert_array_equal(bn.weight.data, np.ones(3))
    np.testing.assert_array_equal(bn.bias.data, np.zeros(3))
    np.testing.assert_array_equal(bn.running_mean, np.zeros(3))
    np.testing.assert_array_equal(bn.running_var, np.ones(3))
    assert int(bn.num_batches_tracked) == 0
    nn.BatchNorm1d(3, affine=False, track_running_stats=False).reset_parameters()
    # containers and parameter-free layers have none (as in PyTorch); apply is the idiom
    for m in (nn.Module(), nn.Sequential(), nn.ModuleList(), nn.ReLU(), nn.BasicBlock(2, 2)):
        assert not hasattr(m, "reset_parameters")
    net, twin = mlp(rng=5), mlp(rng=5)
    _ = net(rng_(0).standard_normal((4, 8)).astype(np.float32))
    net.apply(lambda m: m.reset_parameters(rng=9) if hasattr(m, "reset_parameters") else None)
    twin.apply(lambda m: m.reset_parameters(rng=9) if hasattr(m, "reset_parameters") else None)
    for (k, a), (_, c) in zip(net.state_dict().items(), twin.state_dict().items()):
        np.testing.assert_array_equal(a, c, err_msg=k)
    assert int(net[1].num_batches_tracked) == 0
    with pytest.raises(TypeError, match="rng"):
        lin.reset_parameters(rng="seed")


def test_add_module():
    m = nn.Module()
    m.add_module("b", nn.Linear(2, 3, rng=0))
    m.add_module("a-1", nn.BatchNorm1d(3))
    m.add_module("none", None)
    assert [k for k, _ in m.named_children()] == ["b", "a-1"]
    assert m.none is None and getattr(m, "a-1").num_features == 3
    assert list(m.state_dict())[:3] == ["b.weight", "b.bias", "a-1.weight"]
    m.add_module("b", nn.Linear(2, 4, rng=0))                # replace: keeps its place
    assert [k for k, _ in m.named_children()] == ["b", "a-1"] and m.b.out_features == 4
    m.add_module("none", nn.ReLU())                           # a None slot may be filled
    with pytest.raises(TypeError, match="not a Module subclass"):
        m.add_module("x", np.zeros(2))
    with pytest.raises(TypeError, match="should be a string"):
        m.add_module(1, nn.ReLU())
    for bad, msg in (("", "empty"), ("a.b", "contain"), ("_x", "start with '_'"),
                     ("training", "already exists"), ("forward", "already exists")):
        with pytest.raises(KeyError, match=msg):
            m.add_module(bad, nn.ReLU())
    lin = nn.Linear(2, 2)
    with pytest.raises(KeyError, match="'weight' already exists"):
        lin.add_module("weight", nn.ReLU())


def test_sequential_names():
    net = nn.Sequential({"fc": nn.Linear(4, 3, rng=0), "bn": nn.BatchNorm1d(3)})
    assert [k for k, _ in net.named_children()] == ["fc", "bn"]
    assert net.fc is net[0] and net.bn is net[1] and len(net) == 2
    net.append(nn.ReLU())
    net.add_module("out", nn.Linear(3, 2, rng=0))
    assert [k for k, _ in net.named_children()] == ["fc", "bn", "2", "out"]
    assert net(np.ones((5, 4), np.float32)).shape == (5, 2)
    tail = net[1:3]
    assert [k for k, _ in tail.named_children()] == ["bn", "2"] and tail[0] is net.bn
    new_bn = nn.BatchNorm1d(3)
    net.bn = new_bn                          # setattr by name replaces in place
    assert net[1] is new_bn and "bn" not in vars(net)
    net.add_module("fc", nn.Linear(4, 3, rng=1))
    assert [k for k, _ in net.named_children()] == ["fc", "bn", "2", "out"]
    with pytest.raises(TypeError, match="not a Module"):
        net.bn = 3
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        net.nope
    with pytest.raises(KeyError, match="contain"):
        nn.Sequential({"a.b": nn.ReLU()})
    with pytest.raises(TypeError, match="layer x is not a Module"):
        nn.Sequential({"x": 1})
    with pytest.raises(KeyError, match="already exists"):
        net.add_module("training", nn.ReLU())
    assert net.copy().bn is not net.bn and [k for k, _ in net.copy().named_children()] == [
        "fc", "bn", "2", "out"]


def test_module_list():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([nn.Linear(4, 4, rng=i, **D) for i in range(3)])
            self.bn = nn.BatchNorm1d(4, **D)

        def forward(self, x):
            for b in self.blocks:
                x = b(x)
            return self.bn(x)

        def backward(self, g):
            g = self.bn.backward(g)
            for b in reversed(self.blocks):
                g = b.backward(g)
            return g

    net = Net()
    assert [n for n, _ in net.named_parameters()] == [
        "blocks.0.weight", "blocks.0.bias", "blocks.1.weight", "blocks.1.bias",
        "blocks.2.weight", "blocks.2.bias", "bn.weight", "bn.bias"]
    gradcheck(net, rng_(23).standard_normal((5, 4)), k=20, atol=1e-6)
    ml = net.blocks
    a, b, c = list(ml)
    del ml[0]
    assert list(ml) == [b, c] and [k for k, _ in ml.named_children()] == ["0", "1"]
    ml.insert(0, a)
    ml.append(nn.ReLU()).extend([nn.Tanh()])
    ml += [nn.Sigmoid()]
    assert isinstance(ml, nn.ModuleList) and len(ml) == 6 and ml[-1].__class__ is nn.Sigmoid
    assert [k for k, _ in ml.named_children()] == [str(i) for i in range(6)]
    assert isinstance(ml[1:3], nn.ModuleList) and list(ml[1:3]) == [b, c]
    assert list(ml + nn.ModuleList([a]))[-1] is a
    ml[1] = nn.Identity()
    assert isinstance(ml[1], nn.Identity)
    setattr(ml, "1", b)                     # how convert_sync_batchnorm replaces children
    assert ml[1] is b and getattr(ml, "1") is b
    ml.add_module("6", nn.ReLU())
    ml.add_module("0", a)
    assert len(ml) == 7
    with pytest.raises(KeyError, match="named by position"):
        ml.add_module("9", nn.ReLU())
    with pytest.raises(TypeError, match="not a Module"):
        ml.append(3)
    with pytest.raises(TypeError, match="not a Module"):
        nn.ModuleList([nn.ReLU(), "x"])
    with pytest.raises(NotImplementedError):
        ml(np.zeros(2))
    assert len(nn.ModuleList()) == 0 and repr(nn.ModuleList()) == "ModuleList()"
    twin = net.copy()
    assert twin.blocks[0] is not net.blocks[0]
    np.testing.assert_array_equal(twin.blocks[0].weight.data, net.blocks[0].weight.data)


def test_float_and_double():
    net = mlp(F64)
    assert net.float() is net
    assert all(v.dtype == (np.int64 if k.endswith("num_batches_tracked") else np.float32)
               for k, v in net.state_dict().items())
    assert net[0].dtype == np.float32 and net[1].dtype == np.float32
    assert net(np.ones((4, 8), np.float32)).dtype == np.float32
    assert net.double() is net and net(np.ones((4, 8))).dtype == F64
    assert net[1].running_mean.dtype == F64 and net[1].num_batches_tracked.dtype == np.int64


def test_state_dict_prefix_destination_keep_vars():
    net = mlp()
    keys = list(net.state_dict())
    assert list(net.state_dict(prefix="model.")) == ["model." + k for k in keys]
    sub = net[1].state_dict(prefix="1.")
    assert list(sub) == [k for k in keys if k.startswith("1.")]
    dest = {"other": 1}
    assert net.state_dict(destination=dest, prefix="m.") is dest
    assert list(dest) == ["other"] + ["m." + k for k in keys]
    live = net.state_dict(keep_vars=True)
    assert live["0.weight"] is net[0].weight and live["1.running_mean"] is net[1].running_mean
    copies = net.state_dict()
    assert not np.shares_memory(copies["0.weight"], net[0].weight.data)
    other = mlp(rng=3)
    other.load_state_dict(live)                 # Parameters are accepted as values
    np.testing.assert_array_equal(other[0].weight.data, net[0].weight.data)
    with pytest.raises(TypeError, match="prefix must be a str"):
        net.state_dict(prefix=None)
    with pytest.raises(TypeError):
        net.state_dict({}, "p.")                # keyword-only, as PyTorch recommends


def test_load_state_dict_errors_and_result():
    net, other = mlp(rng=0), mlp(rng=1)
    sd = net.state_dict()
    res = other.load_state_dict(sd)
    assert res == ([], []) and res.missing_keys == [] and res.unexpected_keys == []
    assert repr(res) == "<All keys matched successfully>"
    before = other.state_dict()
    bad = {k: v for k, v in sd.items() if k not in ("0.bias", "4.weight")}
    bad["x.weight"] = np.zeros(2)
    bad["1.running_mean"] = np.zeros(7)
    with pytest.raises(nn.StateDictError) as info:
        other.load_state_dict(bad)
    assert isinstance(info.value, ValueError)
    assert str(info.value) == (
        'Error(s) in loading state_dict for Sequential:\n'
        '\tMissing key(s) in state_dict: "0.bias", "4.weight". \n'
        '\tUnexpected key(s) in state_dict: "x.weight". \n'
        '\tsize mismatch for 1.running_mean: copying a param with shape (7,) from '
        'checkpoint, the shape in current model is (6,).')
    # without strict, only the shape mismatch is an error
    with pytest.raises(nn.StateDictError, match=r"Sequential:\n\tsize mismatch for "
                                                r"1.running_mean"):
        other.load_state_dict(bad, strict=False)
    for k, v in other.state_dict().items():            # nothing was written
        np.testing.assert_array_equal(v, before[k])
    bad["1.running_mean"] = sd["1.running_mean"]
    res = other.load_state_dict(bad, strict=False)
    assert res.missing_keys == ["0.bias", "4.weight"] and res.unexpected_keys == ["x.weight"]
    assert repr(res) == ("_IncompatibleKeys(missing_keys=['0.bias', '4.weight'], "
                         "unexpected_keys=['x.weight'])")
    np.testing.assert_array_equal(other[0].weight.data, net[0].weight.data)
    # a value that cannot be cast is a TypeError, as before
    with pytest.raises(TypeError, match="cannot cast"):
        other.load_state_dict({**sd, "1.num_batches_tracked": np.array(2.5)})


# ---------------------------------------------------------------------------- functional
# momentum=None

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("channels_last", [False, True])
def test_functional_cumulative_average_equals_layer(dtype, channels_last):
    C = 3
    layer = nn.BatchNorm2d(C, momentum=None, channels_last=channels_last, dtype=dtype)
    rm, rv = np.zeros(C, dtype), np.ones(C, dtype)
    w, b = layer.weight.data, layer.bias.data
    axis = -1 if channels_last else 1
    rng = rng_(30)
    for n in range(1, 6):
        x = (rng.standard_normal((4, C, 2, 3)) * n + n).astype(dtype)
        if channels_last:
            x = np.moveaxis(x, 1, -1)
        y_layer = layer(x)
        y = bnfast.batch_norm(x, rm, rv, w, b, training=True, momentum=None, axis=axis,
                              num_batches_tracked=n)
        np.testing.assert_array_equal(y, y_layer)         # the same kernels and factor
        np.testing.assert_array_equal(rm, layer.running_mean)
        np.testing.assert_array_equal(rv, layer.running_var)
    # the layer's 0-d counter is accepted as is
    x = rng.standard_normal(x.shape).astype(dtype)
    layer(x)
    bnfast.batch_norm(x, rm, rv, w, b, True, None, axis=axis,
                      num_batches_tracked=layer.num_batches_tracked)
    np.testing.assert_array_equal(rm, layer.running_mean)
    # eval mode: running statistics (the count is checked, and unused)
    layer.eval()
    np.testing.assert_array_equal(
        bnfast.batch_norm(x, rm, rv, w, b, momentum=None, axis=axis, num_batches_tracked=1),
        layer(x))


def test_functional_cumulative_average_errors():
    x = rng_(31).standard_normal((4, 2))
    rm, rv = np.zeros(2), np.ones(2)
    for kw in (dict(training=True), dict(training=False), dict(running_mean=None,
                                                                running_var=None)):
        args = {"running_mean": rm, "running_var": rv, **kw}   # in every mode, as momentum
        with pytest.raises(ValueError, match="momentum=None .* needs num_batches_tracked"):
            bnfast.batch_norm(x, momentum=None, **args)
    np.testing.assert_array_equal(rm, np.zeros(2))
    for bad in (0, -1):
        with pytest.raises(ValueError, match="num_batches_tracked must be >= 1"):
            bnfast.batch_norm(x, rm, rv, training=True, momentum=None,
                              num_batches_tracked=bad)
    for bad in (1.0, True, "1", np.array([1])):
        with pytest.raises(TypeError, match="num_batches_tracked must be an int"):
            bnfast.batch_norm(x, rm, rv, training=True, momentum=None,
                              num_batches_tracked=bad)
    with pytest.raises(ValueError, match="only used with momentum=None"):
        bnfast.batch_norm(x, rm, rv, training=True, momentum=0.1, num_batches_tracked=1)
    # no running statistics to update: batch statistics
    np.testing.assert_array_equal(
        bnfast.batch_norm(x, momentum=None, training=True, num_batches_tracked=3),
        bnfast.batch_norm(x, training=True))
    # a count of 1 replaces the running statistics by the batch's (unbiased variance)
    bnfast.batch_norm(x, rm, rv, training=True, momentum=None, num_batches_tracked=1)
    np.testing.assert_allclose(rm, x.mean(axis=0), rtol=1e-14)
    np.testing.assert_allclose(rv, x.var(axis=0, ddof=1), rtol=1e-14)


# ---------------------------------------------------------------------------- plot_history

def test_plot_history():
    plt = pytest.importorskip("matplotlib.pyplot")
    from bnfast.train import plot_history
    rng = rng_(40)
    X = rng.standard_normal((120, 4), dtype=np.float32)
    y = (X[:, 0] > 0).astype(np.int64)
    net = nn.Sequential(nn.Linear(4, 8, rng=0), nn.BatchNorm1d(8), nn.ReLU(),
                        nn.Linear(8, 2, rng=0))
    hist = fit(net, nn.CrossEntropyLoss(), optim.SGD(net.parameters(), lr=0.1), (X, y),
               epochs=3, batch_size=30, val_data=(X, y), progress=False, rng=0)
    fig = plot_history(hist)
    try:
        assert [ax.get_title() for ax in fig.axes] == ["loss", "accuracy"]
        lines = fig.axes[0].get_lines()
        assert [ln.get_label() for ln in lines] == ["train", "validation"]
        np.testing.assert_array_equal(lines[0].get_xdata(), [1, 2, 3])
        np.testing.assert_array_equal(lines[1].get_ydata(), hist["val_loss"])
    finally:
        plt.close(fig)
    fig, axes = plt.subplots(1, 2)
    try:
        assert plot_history(hist, ["lr", "val_loss"], axes=axes) is fig
        assert axes[0].get_title() == "lr" and axes[1].get_title() == "val_loss"
        assert plot_history({"loss": [3, 2]}, axes=axes[0]) is fig    # x: 1, 2
        with pytest.raises(ValueError, match="1 axes for 2 panels"):
            plot_history(hist, axes=[axes[0]])
    finally:
        plt.close(fig)
    open_before = plt.get_fignums()
    for bad, err, msg in ((hist, ValueError, "'nope' is not in the history"),
                          ({"epoch": [1], "time": [0.1]}, ValueError, "nothing to plot"),
                          ({"epoch": [1, 2], "loss": [1.0]}, ValueError,
                           "'loss' has 1 values but there are 2 epochs"),
                          ([1, 2], TypeError, "history must be a dict")):
        with pytest.raises(err, match=msg):
            plot_history(bad, ["nope"] if bad is hist else None)
    with pytest.raises(TypeError, match="not a str"):
        plot_history(hist, "loss")
    assert plt.get_fignums() == open_before          # errors are raised before drawing


def test_plot_history_without_matplotlib(monkeypatch):
    import sys
    from bnfast.train import plot_history
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    with pytest.raises(ImportError, match=r'pip install matplotlib \(or pip install '
                                          r'"bnfast\[paper\]"'):
        plot_history({"loss": [1.0, 0.5]})
