"""bnfast.nn layers and networks against PyTorch: same weights, outputs, input gradients,
parameter gradients, and running statistics, in train and eval mode."""
import numpy as np
import pytest

from bnfast import nn, optim

torch = pytest.importorskip("torch")
tnn = torch.nn

DTYPES = [np.float32, np.float64]
TORCH_DT = {np.float32: torch.float32, np.float64: torch.float64}


def tol(dtype):
    return dict(rtol=2e-4, atol=2e-5) if dtype == np.float32 else dict(rtol=1e-9, atol=1e-11)


def close(a, b, dtype, what):
    b = b.detach().numpy() if hasattr(b, "detach") else np.asarray(b)
    a = np.asarray(a)
    assert a.shape == b.shape, f"{what}: shape {a.shape} != {b.shape}"
    scale = max(1.0, float(np.abs(b).max(initial=0.0)))
    t = tol(dtype)
    np.testing.assert_allclose(a, b, rtol=t["rtol"], atol=t["atol"] * scale, err_msg=what)


def compare(ours, theirs, x, dtype, *, steps=1, to_torch=None, from_torch=None, seed=0):
    """Load theirs' weights into ours; run forward/backward `steps` times and compare.

    `to_torch` maps our layout to torch's (e.g. channels-last -> NCHW), for the input and the
    output gradient; `from_torch` maps torch's outputs and input gradients back.
    """
    to_torch = to_torch or (lambda a: a)
    from_torch = from_torch or (lambda a: a)
    theirs = theirs.to(TORCH_DT[dtype])
    sd = theirs.state_dict()
    assert list(ours.state_dict()) == list(sd), "state-dict keys / order differ"
    ours.load_state_dict(sd)                     # tensors accepted directly
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]
    rng = np.random.default_rng(seed)
    for step in range(steps):
        xs = (x * (1 + 0.3 * step)).astype(dtype)
        xt = torch.tensor(to_torch(xs), requires_grad=True)
        ours.zero_grad()
        theirs.zero_grad()
        y = ours(xs)
        yt = theirs(xt)
        R = rng.standard_normal(y.shape).astype(dtype)
        (yt * torch.tensor(to_torch(R))).sum().backward()
        dx = ours.backward(R)
        close(y, from_torch(yt.detach().numpy()), dtype, f"output (step {step})")
        close(dx, from_torch(xt.grad.numpy()), dtype, f"input gradient (step {step})")
        tp = dict(theirs.named_parameters())
        for n, p in ours.named_parameters():
            close(p.grad, tp[n].grad, dtype, f"grad of {n} (step {step})")
        tb = dict(theirs.named_buffers())
        for n, b in ours.named_buffers():
            close(b, tb[n], dtype, f"buffer {n} (step {step})")
    return ours, theirs


NHWC_TO_NCHW = (lambda a: np.ascontiguousarray(a.transpose(0, 3, 1, 2)))
NCHW_TO_NHWC = (lambda a: a.transpose(0, 2, 3, 1))


# ---------------------------------------------------------------------------- layers

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [True, False])
def test_linear(dtype, bias):
    x = np.random.default_rng(0).standard_normal((7, 5))
    compare(nn.Linear(5, 4, bias, dtype=dtype), tnn.Linear(5, 4, bias), x, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k,s,p,bias", [(3, 1, 1, True), (3, 2, 0, False),
                                        ((3, 2), (1, 2), (1, 0), True),
                                        (1, 1, 0, True), (2, 2, 0, False), (5, 1, 2, True)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_conv2d(dtype, k, s, p, bias, channels_last):
    x = np.random.default_rng(1).standard_normal((3, 3, 9, 8))
    ours = nn.Conv2d(3, 4, k, s, p, bias, channels_last=channels_last, dtype=dtype)
    theirs = tnn.Conv2d(3, 4, k, s, p, bias=bias)
    if channels_last:
        compare(ours, theirs, NCHW_TO_NHWC(x), dtype, to_torch=NHWC_TO_NCHW,
                from_torch=NCHW_TO_NHWC)
    else:
        compare(ours, theirs, x, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k,s,p", [(2, None, 0), (3, 2, 1), (3, 1, 0), ((2, 3), (2, 1), (1, 1))])
@pytest.mark.parametrize("channels_last", [False, True])
def test_pooling(dtype, k, s, p, channels_last):
    x = np.random.default_rng(2).standard_normal((2, 3, 7, 8))
    pairs = [(nn.MaxPool2d(k, s, p, channels_last=channels_last), tnn.MaxPool2d(k, s, p)),
             (nn.AvgPool2d(k, s, p, channels_last=channels_last), tnn.AvgPool2d(k, s, p)),
             (nn.AvgPool2d(k, s, p, False, channels_last=channels_last),
              tnn.AvgPool2d(k, s, p, count_include_pad=False))]
    for ours, theirs in pairs:
        if channels_last:
            compare(ours, theirs, NCHW_TO_NHWC(x), dtype, to_torch=NHWC_TO_NCHW,
                    from_torch=NCHW_TO_NHWC)
        else:
            compare(ours, theirs, x, dtype)


def test_maxpool_ties_go_to_first_maximum():
    x = np.zeros((1, 1, 4, 4), np.float32)
    x[0, 0, 1, 1] = x[0, 0, 0, 1] = 1.0        # tie inside the first window
    compare(nn.MaxPool2d(2), tnn.MaxPool2d(2), x, np.float32)
    compare(nn.MaxPool2d(3, 1, 1), tnn.MaxPool2d(3, 1, 1), x, np.float32)


@pytest.mark.parametrize("dtype", DTYPES)
def test_activations_and_flatten(dtype):
    x = np.random.default_rng(3).standard_normal((4, 3, 2, 5)) * 3
    for ours, theirs in [(nn.ReLU(), tnn.ReLU()), (nn.Sigmoid(), tnn.Sigmoid()),
                         (nn.Tanh(), tnn.Tanh()), (nn.Flatten(), tnn.Flatten()),
                         (nn.Flatten(0, 2), tnn.Flatten(0, 2)), (nn.Identity(), tnn.Identity())]:
        compare(ours, theirs, x, dtype)
    compare(nn.Dropout(0.3).eval(), tnn.Dropout(0.3).eval(), x, dtype)


BN_KW = [dict(), dict(momentum=None), dict(momentum=0.3, eps=1e-3), dict(affine=False),
         dict(track_running_stats=False)]


def _kw_id(kw):
    return ",".join(f"{a}={b}" for a, b in kw.items()) or "default"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kw", BN_KW, ids=_kw_id)
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_batchnorm1d(dtype, kw, mode):
    rng = np.random.default_rng(4)
    for shape in ((8, 5), (4, 5, 3)):
        x = rng.standard_normal(shape) * 2 + 3
        ours, theirs = nn.BatchNorm1d(5, **kw, dtype=dtype), tnn.BatchNorm1d(5, **kw)
        _randomise_bn(theirs, rng)
        if mode == "eval":
            ours.eval()
            theirs.eval()
        compare(ours, theirs, x, dtype, steps=3)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kw", BN_KW, ids=_kw_id)
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_batchnorm2d(dtype, kw, mode, channels_last):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((4, 5, 3, 2)) * 2 - 1
    ours = nn.BatchNorm2d(5, **kw, channels_last=channels_last, dtype=dtype)
    theirs = tnn.BatchNorm2d(5, **kw)
    _randomise_bn(theirs, rng)
    if mode == "eval":
        ours.eval()
        theirs.eval()
    if channels_last:
        compare(ours, theirs, NCHW_TO_NHWC(x), dtype, steps=3, to_torch=NHWC_TO_NCHW,
                from_torch=NCHW_TO_NHWC)
    else:
        compare(ours, theirs, x, dtype, steps=3)


def _randomise_bn(m, rng):
    with torch.no_grad():
        if m.affine:
            m.weight.copy_(torch.tensor(rng.uniform(0.5, 2, m.num_features)))
            m.bias.copy_(torch.tensor(rng.standard_normal(m.num_features)))
        if m.track_running_stats:
            m.running_mean.copy_(torch.tensor(rng.standard_normal(m.num_features)))
            m.running_var.copy_(torch.tensor(rng.uniform(0.5, 2, m.num_features)))


def test_frozen_bn_equals_torch_bn_in_eval_within_training_network():
    """freeze_bn_stats() == putting only torch's BN layers in eval mode."""
    rng = np.random.default_rng(6)
    theirs = tnn.Sequential(tnn.Linear(4, 3), tnn.BatchNorm1d(3), tnn.Tanh())
    _randomise_bn(theirs[1], rng)
    theirs[1].eval()
    ours = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Tanh()).to(np.float64)
    ours.freeze_bn_stats()
    compare(ours, theirs, rng.standard_normal((6, 4)), np.float64, steps=2)


@pytest.mark.parametrize("dtype", DTYPES)
def test_losses(dtype):
    rng = np.random.default_rng(7)
    z = (rng.standard_normal((6, 4)) * 4).astype(dtype)
    idx = rng.integers(0, 4, 6)
    probs = rng.dirichlet(np.ones(4), 6).astype(dtype)
    for reduction in ("mean", "sum"):
        for target, ls in ((idx, 0.0), (idx, 0.1), (probs, 0.0), (probs, 0.2)):
            ours = nn.CrossEntropyLoss(reduction, label_smoothing=ls)
            zt = torch.tensor(z, requires_grad=True)
            lt = torch.nn.functional.cross_entropy(zt, torch.tensor(target), reduction=reduction,
                                                   label_smoothing=ls)
            lt.backward()
            assert np.isclose(ours(z, target), lt.item(), **tol(dtype))
            close(ours.backward(), zt.grad, dtype, f"CE grad {reduction} ls={ls}")
        t = rng.standard_normal(z.shape).astype(dtype)
        zt = torch.tensor(z, requires_grad=True)
        lt = torch.nn.functional.mse_loss(zt, torch.tensor(t), reduction=reduction)
        lt.backward()
        ours = nn.MSELoss(reduction)
        assert np.isclose(ours(z, t), lt.item(), **tol(dtype))
        close(ours.backward(), zt.grad, dtype, "MSE grad")


# ---------------------------------------------------------------------------- networks

def convnet_pair(dtype):
    ours = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1, bias=False, dtype=dtype), nn.BatchNorm2d(4, dtype=dtype),
        nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(4, 8, 3, stride=2, padding=1, dtype=dtype),
        nn.BatchNorm2d(8, relu=True, dtype=dtype), nn.AvgPool2d(2),
        nn.Flatten(), nn.Linear(8, 6, dtype=dtype), nn.BatchNorm1d(6, dtype=dtype),
        nn.Sigmoid(), nn.Linear(6, 3, dtype=dtype))
    theirs = tnn.Sequential(
        tnn.Conv2d(1, 4, 3, padding=1, bias=False), tnn.BatchNorm2d(4), tnn.ReLU(),
        tnn.MaxPool2d(2), tnn.Conv2d(4, 8, 3, stride=2, padding=1),
        # the fused BN+ReLU of ours is BN then ReLU; Sequential index 5 holds both
        _BNReLU(8), tnn.AvgPool2d(2), tnn.Flatten(), tnn.Linear(8, 6),
        tnn.BatchNorm1d(6), tnn.Sigmoid(), tnn.Linear(6, 3))
    return ours, theirs


class _BNReLU(tnn.BatchNorm2d):
    def forward(self, x):
        return torch.relu(super().forward(x))


@pytest.mark.parametrize("dtype", DTYPES)
def test_small_convnet_train_and_eval(dtype):
    rng = np.random.default_rng(8)
    x = rng.standard_normal((6, 1, 8, 8))
    ours, theirs = convnet_pair(dtype)
    compare(ours, theirs, x, dtype, steps=3)
    ours.eval()
    theirs.eval()
    compare(ours, theirs, x, dtype, steps=1)


@pytest.mark.parametrize("dtype", DTYPES)
def test_small_convnet_sgd_training_matches(dtype):
    """Several SGD steps: losses, weights and running statistics follow PyTorch's."""
    rng = np.random.default_rng(9)
    ours, theirs = convnet_pair(dtype)
    theirs = theirs.to(TORCH_DT[dtype])
    ours.load_state_dict(theirs.state_dict())
    opt = optim.SGD(ours.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3, nesterov=True)
    topt = torch.optim.SGD(theirs.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3,
                           nesterov=True)
    loss_fn, tloss = nn.CrossEntropyLoss(), tnn.CrossEntropyLoss()
    for step in range(4):
        x = rng.standard_normal((8, 1, 8, 8)).astype(dtype)
        y = rng.integers(0, 3, 8)
        opt.zero_grad()
        loss = loss_fn(ours(x), y)
        ours.backward(loss_fn.backward())
        opt.step()
        topt.zero_grad()
        lt = tloss(theirs(torch.tensor(x)), torch.tensor(y))
        lt.backward()
        topt.step()
        assert np.isclose(loss, lt.item(), **tol(dtype))
    tsd = theirs.state_dict()
    for k, v in ours.state_dict().items():
        close(v, tsd[k], dtype, f"{k} after 4 steps")


class TorchBasicBlock(tnn.Module):
    """torchvision.models.resnet.BasicBlock, written out (torchvision is not required)."""

    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1 = tnn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = tnn.BatchNorm2d(cout)
        self.relu = tnn.ReLU()
        self.conv2 = tnn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = tnn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = tnn.Sequential(tnn.Conv2d(cin, cout, 1, stride, bias=False),
                                             tnn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        s = x if self.downsample is None else self.downsample(x)
        return self.relu(out + s)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cin,cout,stride", [(4, 4, 1), (3, 6, 2)])
def test_basic_block(dtype, cin, cout, stride):
    x = np.random.default_rng(10).standard_normal((3, cin, 6, 6))
    compare(nn.BasicBlock(cin, cout, stride, dtype=dtype), TorchBasicBlock(cin, cout, stride),
            x, dtype, steps=2)


def test_residual_generic():
    x = np.random.default_rng(11).standard_normal((5, 4))

    class TRes(tnn.Module):
        def __init__(self):
            super().__init__()
            self.body = tnn.Sequential(tnn.Linear(4, 4), tnn.BatchNorm1d(4))

        def forward(self, x):
            return torch.tanh(self.body(x) + x)

    ours = nn.Residual(nn.Sequential(nn.Linear(4, 4, dtype=np.float64),
                                     nn.BatchNorm1d(4, dtype=np.float64)), activation=nn.Tanh())
    compare(ours, TRes(), x, np.float64, steps=2)


def test_import_pytorch_mnist_mlp_weights():
    """The documented import: a PyTorch model's state_dict() loads directly."""
    torch.manual_seed(0)
    tmodel = tnn.Sequential(tnn.Linear(784, 100), tnn.BatchNorm1d(100), tnn.Sigmoid(),
                            tnn.Linear(100, 10))
    tmodel.train()
    tmodel(torch.randn(60, 784))           # give the running statistics some values
    tmodel.eval()
    model = nn.Sequential(nn.Linear(784, 100), nn.BatchNorm1d(100), nn.Sigmoid(),
                          nn.Linear(100, 10))
    model.load_state_dict(tmodel.state_dict())
    model.eval()
    x = np.random.default_rng(12).standard_normal((16, 784)).astype(np.float32)
    with torch.no_grad():
        expected = tmodel(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(model(x), expected, rtol=1e-4, atol=1e-5)
    assert int(model[1].num_batches_tracked) == 1


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_channels_last_model_loads_pytorch_state_dict(dtype, mode):
    """Conv2d / BatchNorm2d / MaxPool2d with channels_last=True, then Flatten and Linear:
    PyTorch's (channels-first) state dict loads as is, and outputs, input gradients and
    parameter gradients match PyTorch's (Flatten flattens in PyTorch's (C, H, W) order)."""
    torch.manual_seed(3)
    theirs = tnn.Sequential(tnn.Conv2d(3, 4, 3, padding=1), tnn.BatchNorm2d(4), tnn.ReLU(),
                            tnn.MaxPool2d(2), tnn.Flatten(), tnn.Linear(4 * 3 * 3, 5),
                            tnn.Linear(5, 2)).to(TORCH_DT[dtype])
    cl = dict(channels_last=True, dtype=dtype)
    ours = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, **cl), nn.BatchNorm2d(4, **cl),
                         nn.ReLU(), nn.MaxPool2d(2, channels_last=True), nn.Flatten(),
                         nn.Linear(4 * 3 * 3, 5, dtype=dtype), nn.Linear(5, 2, dtype=dtype))
    rng = np.random.default_rng(13)
    with torch.no_grad():                      # non-trivial running statistics first
        theirs.train()(torch.tensor(rng.standard_normal((8, 3, 6, 6)), dtype=TORCH_DT[dtype]))
    ours.load_state_dict(theirs.state_dict())
    theirs.train(mode == "train")
    ours.train(mode == "train")
    x = rng.standard_normal((5, 3, 6, 6)).astype(dtype)               # NCHW
    xt = torch.tensor(x, requires_grad=True)
    yt = theirs(xt)
    y = ours(NCHW_TO_NHWC(x).copy())
    close(y, yt, dtype, "output")
    R = rng.standard_normal(y.shape).astype(dtype)
    (yt * torch.tensor(R)).sum().backward()
    dx = ours.backward(R)
    close(dx, NCHW_TO_NHWC(xt.grad.numpy()), dtype, "input gradient")
    tp = dict(theirs.named_parameters())
    for n, p in ours.named_parameters():
        close(p.grad, tp[n].grad, dtype, f"grad of {n}")
    tb = dict(theirs.named_buffers())
    for n, b in ours.named_buffers():
        close(b, tb[n], dtype, f"buffer {n}")


# ---------------------------------------------------------------------------- BatchNorm3d

NCDHW_TO_NDHWC = (lambda a: np.moveaxis(a, 1, -1))
NDHWC_TO_NCDHW = (lambda a: np.ascontiguousarray(np.moveaxis(a, -1, 1)))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kw", BN_KW, ids=_kw_id)
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_batchnorm3d(dtype, kw, mode, channels_last):
    """Forward, input and parameter gradients and running statistics over 3 steps."""
    rng = np.random.default_rng(6)
    x = rng.standard_normal((3, 5, 2, 3, 2)) * 2 - 1
    ours = nn.BatchNorm3d(5, **kw, channels_last=channels_last, dtype=dtype)
    theirs = tnn.BatchNorm3d(5, **kw)
    _randomise_bn(theirs, rng)
    if mode == "eval":
        ours.eval()
        theirs.eval()
    if channels_last:
        compare(ours, theirs, NCDHW_TO_NDHWC(x), dtype, steps=3, to_torch=NDHWC_TO_NCDHW,
                from_torch=NCDHW_TO_NDHWC)
    else:
        compare(ours, theirs, x, dtype, steps=3)


# ---------------------------------------------------------------------------- conveniences

def _twins(seed=0):
    """The same nested model in bnfast and in PyTorch (same keys), with equal weights."""
    ours = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(),
                         nn.Sequential(nn.Linear(6, 3), nn.BatchNorm1d(3)))
    theirs = tnn.Sequential(tnn.Linear(4, 6), tnn.BatchNorm1d(6), tnn.ReLU(),
                            tnn.Sequential(tnn.Linear(6, 3), tnn.BatchNorm1d(3)))
    torch.manual_seed(seed)
    for m in theirs.modules():
        if isinstance(m, tnn.BatchNorm1d):
            _randomise_bn(m, np.random.default_rng(seed))
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs


def test_apply_order_matches_torch():
    ours, theirs = _twins()
    a, b = [], []
    ours.apply(lambda m: a.append(type(m).__name__))
    theirs.apply(lambda m: b.append(type(m).__name__))
    assert a == b


def test_state_dict_prefix_matches_torch():
    ours, theirs = _twins()
    for prefix in ("", "model.", "x"):
        assert list(ours.state_dict(prefix=prefix)) == list(theirs.state_dict(prefix=prefix))
    assert list(ours[3].state_dict(prefix="3.")) == list(theirs[3].state_dict(prefix="3."))
    kept = ours.state_dict(keep_vars=True)
    tkept = theirs.state_dict(keep_vars=True)
    assert ([isinstance(v, nn.Parameter) for v in kept.values()]
            == [isinstance(v, tnn.Parameter) for v in tkept.values()])


def _torch_message(exc):
    """PyTorch's message with its shapes written as bnfast writes them (tuples)."""
    import re
    return re.sub(r"torch\.Size\(\[([^\]]*)\]\)",
                  lambda m: repr(tuple(int(v) for v in m.group(1).split(", ") if v)),
                  str(exc))


@pytest.mark.parametrize("case", ["missing", "unexpected", "both", "size", "all"])
def test_load_state_dict_errors_match_torch(case):
    ours, theirs = _twins()
    sd = theirs.state_dict()
    if case in ("missing", "both", "all"):
        del sd["0.bias"], sd["3.1.running_var"]
    if case in ("unexpected", "both", "all"):
        sd["4.weight"] = torch.zeros(2)
        sd["extra"] = torch.zeros(1)
    if case in ("size", "all"):
        sd["1.weight"] = torch.zeros(7)
        sd["3.0.weight"] = torch.zeros(3, 5)
    with pytest.raises(RuntimeError) as tinfo:
        theirs.load_state_dict(sd)
    with pytest.raises(nn.StateDictError) as info:
        ours.load_state_dict(sd)
    assert str(info.value) == _torch_message(tinfo.value)
    if case in ("missing", "unexpected", "both"):
        res, tres = ours.load_state_dict(sd, strict=False), theirs.load_state_dict(
            sd, strict=False)
        assert res == tuple(tres)
        assert res.missing_keys == tres.missing_keys
        assert res.unexpected_keys == tres.unexpected_keys
        assert repr(res) == repr(tres)
    else:                               # shape mismatches are errors with strict=False too
        with pytest.raises(RuntimeError) as tinfo:
            theirs.load_state_dict(sd, strict=False)
        with pytest.raises(nn.StateDictError) as info:
            ours.load_state_dict(sd, strict=False)
        assert str(info.value) == _torch_message(tinfo.value)
    ok = ours.load_state_dict(theirs.state_dict())
    assert repr(ok) == repr(theirs.load_state_dict(theirs.state_dict()))


def test_module_list_and_add_module_keys_match_torch():
    from collections import OrderedDict
    ours = nn.ModuleList([nn.Linear(2, 3), nn.BatchNorm1d(3)])
    theirs = tnn.ModuleList([tnn.Linear(2, 3), tnn.BatchNorm1d(3)])
    for m, lib in ((ours, nn), (theirs, tnn)):
        m.append(lib.Linear(3, 3))
        m.insert(1, lib.ReLU())
        m.extend([lib.Linear(3, 1), lib.BatchNorm1d(1)])
        del m[0]
        m += [lib.Tanh()]
        m.add_module("6", lib.Linear(1, 1))        # the next position: appended
        m.add_module("0", lib.ReLU())              # an existing one: replaced
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert [k for k, _ in ours.named_children()] == [k for k, _ in theirs.named_children()]
    assert list(ours[1:4].state_dict()) == list(theirs[1:4].state_dict())
    seq = nn.Sequential(OrderedDict([("fc", nn.Linear(2, 3)), ("bn", nn.BatchNorm1d(3))]))
    tseq = tnn.Sequential(OrderedDict([("fc", tnn.Linear(2, 3)), ("bn", tnn.BatchNorm1d(3))]))
    for m, lib in ((seq, nn), (tseq, tnn)):
        m.append(lib.ReLU())
        m.add_module("head", lib.Linear(3, 2))
    assert list(seq.state_dict()) == list(tseq.state_dict())
    assert list(seq[1:].state_dict()) == list(tseq[1:].state_dict())
    seq.load_state_dict(tseq.state_dict())
    x = np.random.default_rng(0).standard_normal((5, 2)).astype(np.float32)
    close(seq.eval()(x), tseq.eval()(torch.from_numpy(x)), np.float32, "named Sequential")
    root, troot = nn.Module(), tnn.Module()
    for m, lib in ((root, nn), (troot, tnn)):
        m.add_module("b", lib.Linear(2, 2))
        m.add_module("a", lib.BatchNorm1d(2))
        m.add_module("b", lib.Linear(2, 3))          # replaced in its place
    assert list(root.state_dict()) == list(troot.state_dict())
    for bad in ("", "a.b"):
        with pytest.raises(KeyError) as tinfo:
            troot.add_module(bad, tnn.ReLU())
        with pytest.raises(KeyError) as info:
            root.add_module(bad, nn.ReLU())
        assert str(info.value) == str(tinfo.value)
    with pytest.raises(KeyError, match="already exists"):
        troot.add_module("training", tnn.ReLU())
    with pytest.raises(KeyError, match="already exists"):
        root.add_module("training", nn.ReLU())


def test_reset_parameters_matches_torch():
    ours, theirs = nn.BatchNorm2d(4), tnn.BatchNorm2d(4)
    _randomise_bn(theirs, np.random.default_rng(1))
    theirs.num_batches_tracked.fill_(5)
    ours.load_state_dict(theirs.state_dict())
    ours.reset_parameters()
    theirs.reset_parameters()
    for k, v in ours.state_dict().items():
        np.testing.assert_array_equal(v, theirs.state_dict()[k].numpy(), err_msg=k)
    # Linear / Conv2d: the same uniform bound as torch's kaiming_uniform_(a=sqrt(5))
    torch.manual_seed(0)
    for ours, theirs in ((nn.Linear(30, 200), tnn.Linear(30, 200)),
                         (nn.Conv2d(3, 200, (3, 2)), tnn.Conv2d(3, 200, (3, 2)))):
        ours.reset_parameters(rng=0)
        theirs.reset_parameters()
        for n, p in ours.named_parameters():
            t = getattr(theirs, n).detach().numpy()
            bound = np.abs(t).max()
            assert np.abs(p.data).max() <= bound * 1.02 and np.abs(p.data).max() > 0.95 * bound
    assert hasattr(tnn.Linear(1, 1), "reset_parameters")
    assert not hasattr(tnn.Sequential(), "reset_parameters")
    assert not hasattr(nn.Sequential(), "reset_parameters")


def test_float_double_match_torch():
    ours, theirs = _twins()
    for conv in ("double", "float"):
        getattr(ours, conv)()
        getattr(theirs, conv)()
        for k, v in ours.state_dict().items():
            assert str(v.dtype) == str(theirs.state_dict()[k].dtype).replace("torch.", ""), k


@pytest.mark.parametrize("dtype", DTYPES)
def test_functional_cumulative_average_matches_torch_layer(dtype):
    """bnfast.batch_norm(momentum=None, num_batches_tracked=n) == a torch BN layer with
    momentum=None (which F.batch_norm itself cannot express)."""
    import bnfast
    C = 4
    theirs = tnn.BatchNorm1d(C, momentum=None).to(TORCH_DT[dtype])
    rm, rv = np.zeros(C, dtype), np.ones(C, dtype)
    rng = np.random.default_rng(7)
    for n in range(1, 6):
        x = (rng.standard_normal((6, C)) * n - n).astype(dtype)
        y = bnfast.batch_norm(x, rm, rv, training=True, momentum=None, num_batches_tracked=n)
        yt = theirs(torch.from_numpy(x))
        close(y, yt, dtype, f"output (batch {n})")
        close(rm, theirs.running_mean, dtype, f"running_mean (batch {n})")
        close(rv, theirs.running_var, dtype, f"running_var (batch {n})")
        assert int(theirs.num_batches_tracked) == n
