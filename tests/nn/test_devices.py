"""Devices and array modules of bnfast.nn, optim and train (bnfast._xp), without a GPU.

The NumPy path is tested for real; CuPy's is tested through its dispatch: a tiny fake
``cupy`` module (arrays of a class defined "in cupy", holding a NumPy array) stands in
for CuPy where only moving arrays is involved, and ``sys.modules["cupy"] = None`` stands
for a machine without CuPy.  The GPU computations themselves are tested by the GPU suite.
"""
import pickle
import sys
import types

import numpy as np
import pytest

from bnfast import _xp, nn, optim
from bnfast.train import Trainer, _model_device, _to_model_device, accuracy, fit


# ------------------------------------------------------------------ a fake CuPy

class FakeDevice:
    def __init__(self, id=None):
        self.id = 0 if id is None else id

    def __enter__(self):
        FakeCupy.current = self.id
        return self

    def __exit__(self, *exc):
        FakeCupy.current = 0
        return False


class FakeArray:
    """Stands for a cupy.ndarray: its type is defined "in cupy"."""

    __module__ = "cupy._core.core"

    def __init__(self, a, device=0):
        self.a = np.array(a)                 # a copy, as a host-to-device transfer
        self.device = FakeDevice(device)

    dtype = property(lambda self: self.a.dtype)
    shape = property(lambda self: self.a.shape)

    def astype(self, dtype):
        return FakeArray(self.a.astype(dtype), self.device.id)

    def copy(self):
        return FakeArray(self.a, self.device.id)

    def get(self):
        return self.a.copy()


class FakeCupy:
    current = 0
    devices = 2


def fake_cupy(devices=2):
    cp = types.ModuleType("cupy")
    cp.ndarray = FakeArray
    FakeCupy.devices = devices

    def count():
        if FakeCupy.devices is None:
            raise RuntimeError("cudaErrorNoDevice: no CUDA-capable device is detected")
        return FakeCupy.devices

    def asarray(a):
        if isinstance(a, FakeArray) and a.device.id == FakeCupy.current:
            return a
        return FakeArray(a.get() if isinstance(a, FakeArray) else a, FakeCupy.current)

    cp.asarray = asarray
    cp.cuda = types.SimpleNamespace(Device=FakeDevice,
                                    runtime=types.SimpleNamespace(getDeviceCount=count))
    return cp


@pytest.fixture
def cupy(monkeypatch):
    cp = fake_cupy()
    monkeypatch.setitem(sys.modules, "cupy", cp)
    return cp


@pytest.fixture
def no_cupy(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)        # `import cupy` raises ImportError


def small_net(dtype=np.float32):
    return nn.Sequential(nn.Linear(3, 4, rng=0, dtype=dtype), nn.BatchNorm1d(4, dtype=dtype),
                         nn.ReLU(), nn.Linear(4, 2, rng=1, dtype=dtype))


def arrays_of(model):
    return ([p.data for p in model.parameters()] + [p.grad for p in model.parameters()]
            + model.buffers())


# ------------------------------------------------------------------ bnfast._xp

def test_array_module_dispatch(no_cupy, monkeypatch):
    a = np.zeros(3)
    assert _xp.array_module() is np
    assert _xp.array_module(a, None, 1.0, [1, 2]) is np      # no CuPy import tried
    assert not _xp.is_cupy(a) and _xp.is_array(a) and not _xp.is_array([1.0])
    fake = FakeArray([1.0])
    assert _xp.is_cupy(fake) and _xp.is_array(fake) and _xp.device_of(fake) == "cuda:0"
    with pytest.raises(ImportError, match=r"needs CuPy.*pip install \"bnfast\[gpu\]\""):
        _xp.array_module(a, fake)
    cp = fake_cupy()
    monkeypatch.setitem(sys.modules, "cupy", cp)
    assert _xp.array_module(a, fake) is cp
    assert _xp.array_module(fake, a) is cp
    assert _xp.asarray(fake) is fake and _xp.asarray(a) is a
    assert np.array_equal(_xp.asnumpy(fake), [1.0])


def test_is_cupy_reads_the_type_module_only():
    Cls = type("ndarray", (), {"__module__": "cupy"})
    Other = type("ndarray", (), {"__module__": "cupyx_lookalike.core"})
    assert _xp.is_cupy(Cls()) and not _xp.is_cupy(Other()) and not _xp.is_cupy(None)


@pytest.mark.parametrize("name, want", [("cpu", ("cpu", None)), ("cuda", ("cuda", None)),
                                        ("cuda:0", ("cuda", 0)), ("cuda:12", ("cuda", 12)),
                                        (" cuda:1 ", ("cuda", 1))])
def test_parse_device(name, want):
    assert _xp.parse_device(name) == want


@pytest.mark.parametrize("name", ["gpu", "cpu:0", "cuda:", "cuda:-1", "cuda:x", "CUDA", ""])
def test_parse_device_rejects_unknown_names(name):
    with pytest.raises(ValueError, match="unknown device .*expected 'cpu', 'cuda' or 'cuda:N'"):
        _xp.parse_device(name)


def test_parse_device_type_error():
    with pytest.raises(TypeError, match="device must be a str"):
        _xp.parse_device(0)


def test_to_device(cupy):
    a = np.arange(3.0)
    assert _xp.to_device(a, "cpu") is a
    g = _xp.to_device(a, "cuda")
    assert isinstance(g, FakeArray) and g.device.id == 0 and np.array_equal(g.a, a)
    assert _xp.to_device(g, "cuda:0") is g                  # already there
    g1 = _xp.to_device(g, "cuda:1")
    assert g1.device.id == 1 and _xp.device_of(g1) == "cuda:1"
    back = _xp.to_device(g1, "cpu")
    assert type(back) is np.ndarray and np.array_equal(back, a)
    with pytest.raises(RuntimeError, match=r"'cuda:2' does not exist: CuPy sees 2 GPUs"):
        _xp.to_device(a, "cuda:2")
    FakeCupy.devices = None
    with pytest.raises(RuntimeError, match="no CUDA device is available to CuPy"):
        _xp.to_device(a, "cuda")


def test_to_device_without_cupy(no_cupy):
    with pytest.raises(ImportError, match="the GPU .device 'cuda'. needs CuPy, which is not "
                                          "installed"):
        _xp.to_device(np.zeros(2), "cuda")
    with pytest.raises(ValueError, match="unknown device"):   # the name is checked first
        _xp.to_device(np.zeros(2), "tpu")


def test_as_strided_is_a_read_only_view():
    a = np.arange(6.0)
    v = _xp.as_strided(a, (2, 3), (24, 8))
    assert np.array_equal(v, a.reshape(2, 3)) and not v.flags.writeable
    assert np.shares_memory(v, a)


# ------------------------------------------------------------------ Module.to and devices

def test_to_cpu_of_a_numpy_model_changes_nothing():
    net = small_net()
    x = np.random.default_rng(0).standard_normal((5, 3), dtype=np.float32)
    net.backward(np.ones_like(net(x)))
    before = arrays_of(net)
    assert net.to("cpu") is net and net.cpu() is net and net.to() is net
    assert all(a is b for a, b in zip(arrays_of(net), before))


def test_to_device_and_dtype_arguments():
    net = small_net()
    w = net[0].weight
    assert net.to(np.float64) is net and w.dtype == np.float64 and net[0].dtype == np.float64
    assert net.to("float32")[1].running_var.dtype == np.float32          # a dtype name
    assert net.to("cpu", np.float64)[0].weight is w and w.dtype == np.float64
    assert net.to(device="cpu", dtype=np.float32)[1].dtype == np.float32
    assert net[1].num_batches_tracked.dtype == np.int64
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        net.to("tpu")
    with pytest.raises(TypeError, match="device must be a str"):
        net.to(3)
    with pytest.raises(TypeError, match="dtype must be float32 or float64"):
        net.to("cpu", np.int32)
    with pytest.raises(TypeError, match="dtype must be float32 or float64"):
        net.to(np.float16)


def test_to_cuda_without_cupy_is_a_clear_error(no_cupy):
    net = small_net()
    w = net[0].weight.data
    for move in (lambda: net.to("cuda"), lambda: net.cuda(), lambda: net.to("cuda:1")):
        with pytest.raises(ImportError, match=r"needs CuPy.*pip install \"bnfast\[gpu\]\""):
            move()
    assert net[0].weight.data is w                   # nothing moved
    with pytest.raises(ImportError, match="needs CuPy"):
        net.to("cuda", np.float64)
    assert net[0].weight.data is w                   # nor converted
    with pytest.raises(ValueError, match="unknown device 'cuda:x'"):
        net.to("cuda:x")


def test_to_cuda_without_a_gpu_is_a_clear_error(cupy):
    net = small_net()
    with pytest.raises(RuntimeError, match="'cuda:5' does not exist"):
        net.to("cuda:5", np.float64)
    assert net[0].weight.dtype == np.float32
    FakeCupy.devices = None
    with pytest.raises(RuntimeError, match="no CUDA device is available to CuPy"):
        small_net().to("cuda")
    with pytest.raises(RuntimeError, match="no CUDA device is available to CuPy"):
        _xp.check_device("cuda:0")
    _xp.check_device("cpu")


def test_to_moves_parameters_gradients_and_buffers(cupy):
    net = small_net()
    x = np.random.default_rng(0).standard_normal((5, 3), dtype=np.float32)
    net.backward(np.ones_like(net(x)))
    params = net.parameters()
    host = {k: v.copy() for k, v in net.state_dict().items()}
    grads = [p.grad.copy() for p in params]
    assert net.to("cuda") is net
    assert net.parameters() == params                    # the same Parameter objects
    assert all(isinstance(a, FakeArray) and a.device.id == 0 for a in arrays_of(net))
    assert _model_device(net) == "cuda:0"
    on_gpu = arrays_of(net)
    assert all(a is b for a, b in zip(arrays_of(net.to("cuda:0")), on_gpu))   # stays
    assert _model_device(net.cuda(1)) == "cuda:1"
    assert all(a.device.id == 1 for a in arrays_of(net))
    sd = net.state_dict()                                 # copies, on the device
    assert all(isinstance(v, FakeArray) for v in sd.values())
    assert net.cpu() is net
    assert all(type(a) is np.ndarray for a in arrays_of(net))
    for (k, v), (k2, v2) in zip(net.state_dict().items(), host.items()):
        assert k == k2 and v.dtype == v2.dtype and np.array_equal(v, v2)
    for p, g in zip(params, grads):
        assert np.array_equal(p.grad, g)
    assert _model_device(net) == "cpu"


def test_to_device_with_dtype_drops_gradients(cupy):
    net = small_net()
    net.backward(np.ones_like(net(np.ones((4, 3), np.float32))))
    net.to("cuda", np.float64)
    assert all(p.grad is None and p.dtype == np.float64 for p in net.parameters())
    assert net[1].running_mean.dtype == np.float64 and net[1].num_batches_tracked.dtype == np.int64
    assert isinstance(net[1].num_batches_tracked, FakeArray)


def test_load_state_dict_and_load_into_a_model_on_a_device(cupy, tmp_path):
    src = small_net()
    src(np.ones((4, 3), np.float32))
    dst = nn.Sequential(nn.Linear(3, 4, rng=5), nn.BatchNorm1d(4), nn.ReLU(),
                        nn.Linear(4, 2, rng=6)).to("cuda")
    targets = arrays_of(dst)
    dst.to("cpu")
    dst.load_state_dict(src.state_dict())
    for a, b in zip(dst.state_dict().values(), src.state_dict().values()):
        assert np.array_equal(a, b)
    src.to("cuda")
    nn.save(src, tmp_path / "m")                         # GPU arrays are written from the host
    with np.load(tmp_path / "m.npz") as f:
        assert sorted(f.files) == sorted(src.state_dict())
    assert len(targets) == len(arrays_of(dst))


def test_inputs_on_another_device_are_refused(cupy):
    lin = nn.Linear(3, 2, rng=0)
    with pytest.raises(TypeError, match=r"Linear has its parameters on cpu but got an input "
                                        r"on cuda:0; .*model.to\('cuda:0'\)"):
        lin(FakeArray(np.ones((2, 3), np.float32)))
    bn = nn.BatchNorm1d(3).to("cuda")
    with pytest.raises(TypeError, match=r"BatchNorm1d has its parameters on cuda:0 but got an "
                                        r"input on cpu; .*model.to\('cpu'\)"):
        bn(np.ones((2, 3), np.float32))
    with pytest.raises(ValueError, match="on cuda:0 but got an input on cuda:1"):
        bn(FakeArray(np.ones((2, 3), np.float32), device=1))
    with pytest.raises(TypeError, match="float32 parameters but got a float64 input"):
        bn(FakeArray(np.ones((2, 3))))                   # the dtype is checked first


def test_fit_moves_batches_to_the_model_device(cupy):
    x, y = np.ones((4, 3), np.float32), np.arange(4)
    assert _to_model_device((x, y), "cpu")[0] is x       # on the CPU: no copy
    xb, yb = _to_model_device((x, y), "cuda")
    assert isinstance(xb, FakeArray) and isinstance(yb, FakeArray)
    assert _to_model_device((x, [1, 2]), "cuda")[1] == [1, 2]       # not an array: as is
    assert _model_device(nn.ReLU()) == "cpu"                        # nothing to tell
    assert _model_device(nn.BatchNorm1d(2, affine=False).to("cuda")) == "cuda:0"


# ------------------------------------------------------------------ the NumPy path

def test_fit_on_cpu_passes_the_data_arrays_themselves():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((32, 3), dtype=np.float32)
    y = (X[:, 0] > 0).astype(np.int64)
    net = nn.Sequential(nn.Linear(3, 2, rng=0))
    seen = []

    class Spy(nn.Module):
        def forward(self, x):
            seen.append(x)
            return net(x)

        def backward(self, grad):
            return net.backward(grad)

    model = Spy()
    model.lin = net
    batches = [(X[:16], y[:16]), (X[16:], y[16:])]
    fit(model, nn.CrossEntropyLoss(), optim.SGD(model.parameters(), lr=0.1), batches,
        progress=False)
    assert seen[0] is batches[0][0] and seen[1] is batches[1][0]
    trainer = Trainer(model, nn.CrossEntropyLoss(), optim.SGD(model.parameters(), lr=0.1))
    seen.clear()
    trainer.evaluate(batches)
    assert seen[0] is batches[0][0]
    assert np.array_equal(trainer.predict(X), net(X))


def test_accuracy_takes_arrays_and_lists():
    assert accuracy([[0.1, 0.9], [0.8, 0.2]], [1, 1]) == 0.5
    assert accuracy(np.eye(3), np.eye(3)) == 1.0


def test_the_forward_cache_is_one_attribute():
    """Every layer keeps what backward needs in `_cache` only; copies and pickles drop it."""
    rng = np.random.default_rng(0)
    img = rng.standard_normal((2, 3, 6, 6), dtype=np.float32)
    flat = rng.standard_normal((4, 3), dtype=np.float32)
    cases = [(nn.Linear(3, 2, rng=0), flat), (nn.Conv2d(3, 2, 3, rng=0), img),
             (nn.MaxPool2d(2), img), (nn.AvgPool2d(2), img), (nn.Flatten(), img),
             (nn.ReLU(), flat), (nn.Sigmoid(), flat), (nn.Tanh(), flat),
             (nn.Dropout(0.5, rng=0), flat), (nn.BatchNorm1d(3), flat),
             (nn.BatchNorm2d(3, channels_last=True), img.transpose(0, 2, 3, 1))]
    for layer, x in cases:
        before = set(vars(layer))
        assert layer._cache is None
        y = layer(x)
        assert set(vars(layer)) == before, type(layer).__name__
        assert layer._cache is not None
        assert layer.copy()._cache is None
        assert pickle.loads(pickle.dumps(layer))._cache is None
        layer.backward(np.ones_like(y))
    for loss, t in ((nn.CrossEntropyLoss(), np.array([0, 1, 0, 1])), (nn.MSELoss(), flat)):
        before = set(vars(loss))
        loss(flat if isinstance(loss, nn.MSELoss) else flat[:, :2], t)
        assert set(vars(loss)) == before and loss._cache is not None
        assert loss.copy()._cache is None


def test_collect_population_stats_of_one_layer():
    rng = np.random.default_rng(1)
    batches = rng.standard_normal((4, 16, 3)).astype(np.float32) * 3 + 1
    bn = nn.BatchNorm1d(3)
    ref = nn.compute_population_stats(nn.Sequential(nn.BatchNorm1d(3)), list(batches))[0]
    with bn.collect_population_stats() as same:
        assert same is bn
        for xb in batches:
            bn(xb)
        assert int(bn.num_batches_tracked) == 0 and np.all(bn.running_mean == 0)
    assert np.array_equal(bn.running_mean, ref.running_mean)
    assert np.array_equal(bn.running_var, ref.running_var)
    assert bn._population is None and bn._cache is None
    old = bn.running_mean.copy()
    with pytest.raises(KeyError):
        with bn.collect_population_stats():
            bn(batches[0] * 5)
            raise KeyError("stop")
    assert np.array_equal(bn.running_mean, old) and bn._population is None
    with pytest.raises(ValueError, match="track_running_stats=False"):
        with nn.BatchNorm1d(3, track_running_stats=False).collect_population_stats():
            pass


def test_freeze_bn_stats_reaches_nested_layers_only():
    class Frozenish(nn.Module):              # a `frozen` attribute alone is not a BN layer
        def __init__(self):
            super().__init__()
            self.frozen = "mine"
            self.running_mean = None

    net = nn.Sequential(nn.Linear(3, 3, rng=0), nn.Residual(nn.BatchNorm1d(3)), Frozenish())
    net.freeze_bn_stats()
    assert net[1].body.frozen is True and net[2].frozen == "mine"
    net.unfreeze_bn_stats()
    assert net[1].body.frozen is False


def test_save_and_load_are_one_function_each():
    from bnfast.nn import module, utils
    assert nn.save is utils.save is module.save
    assert nn.load is utils.load is module.load
    assert nn.StateDictError is utils.StateDictError is module.StateDictError


def test_state_names_come_from_one_walk():
    net = nn.Sequential(nn.Linear(3, 4, rng=0),
                        nn.Residual(nn.Sequential(nn.Linear(4, 4, rng=1), nn.BatchNorm1d(4))))
    params = [k for k, _ in net.named_parameters()]
    buffers = [k for k, _ in net.named_buffers()]
    assert params == ["0.weight", "0.bias", "1.body.0.weight", "1.body.0.bias",
                      "1.body.1.weight", "1.body.1.bias"]
    assert buffers == ["1.body.1.running_mean", "1.body.1.running_var",
                       "1.body.1.num_batches_tracked"]
    keys = list(net.state_dict())
    assert sorted(keys) == sorted(params + buffers)
    assert list(net.state_dict(prefix="m.")) == ["m." + k for k in keys]
    assert list(net[1].state_dict(prefix="1.")) == [k for k in keys if k.startswith("1.")]
    assert list(net._state_targets()) == keys
