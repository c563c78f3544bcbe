"""bnfast.distributed: synchronized batch norm and data-parallel training.

Two kinds of tests:

- in this process (one rank; they run with or without mpi4py): the synchronized functions
  and layers equal the ordinary ones, conversion keeps parameters and state, argument
  errors, the sampler, data-parallel training on one rank equals plain training;
- under ``mpiexec -n 2`` and ``-n 3`` (oversubscribed on a 2-core machine is fine): the
  scripts in tests/apps/mpi_scripts/ compare every rank's results with one process on the
  concatenated batch (uneven parts, one rank empty; float64 to 1e-12; statistics
  bit-identical on every rank; a 3-epoch training run), check that ranks that disagree on
  channels, dtype or layout all get a ValueError, and that a rank that raises ends the job
  non-zero within seconds.  They need mpi4py and an ``mpiexec`` of the same MPI
  (``pip install ".[test,mpi]"``) and are skipped otherwise.
"""
import os
import re
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

import bnfast
from bnfast import distributed as dist
from bnfast import nn, optim
from bnfast.train import fit

SCRIPTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "mpi_scripts")


# ------------------------------------------------------------------ one process

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape, axis", [((7, 3), 1), ((5, 4, 3, 2), 1), ((5, 3, 2, 4), -1)])
@pytest.mark.parametrize("relu", [False, True])
def test_one_rank_equals_the_kernels(dtype, shape, axis, relu):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(shape) * 2 + 1).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    C = shape[axis]
    w, b = rng.standard_normal(C).astype(dtype), rng.standard_normal(C).astype(dtype)
    rm1, rv1, rm2, rv2 = np.zeros(C, dtype), np.ones(C, dtype), np.zeros(C, dtype), \
        np.ones(C, dtype)
    y1, m1, i1 = bnfast.batch_norm_train(x, w, b, axis=axis, running_mean=rm1,
                                         running_var=rv1, relu=relu)
    y2, m2, i2 = dist.sync_batch_norm_train(x, w, b, axis=axis, running_mean=rm2,
                                            running_var=rv2, relu=relu)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == np.float64 else dict(rtol=2e-6, atol=2e-6)
    np.testing.assert_allclose(y2, y1, **tol)
    np.testing.assert_allclose(m2, m1, rtol=1e-13, atol=1e-14)
    np.testing.assert_allclose(i2, i1, rtol=1e-13)
    np.testing.assert_allclose(rm2, rm1, **tol)
    np.testing.assert_allclose(rv2, rv1, **tol)
    d1 = bnfast.batch_norm_backward(dy, x, m1, i1, w, bias=b, relu=relu, axis=axis)
    d2 = dist.sync_batch_norm_backward(dy, x, m2, i2, w, bias=b, relu=relu, axis=axis)
    for a, c in zip(d2, d1):
        assert a.dtype == c.dtype and a.shape == c.shape
        np.testing.assert_allclose(a, c, **(tol if dtype == np.float64
                                            else dict(rtol=1e-4, atol=1e-5)))


@pytest.mark.parametrize("shape, axis, view", [((70, 64, 4, 4), 1, False),
                                               ((70, 4, 4, 64), -1, False),
                                               ((70, 4, 4, 64), -1, True),
                                               ((64, 1400), 0, False)])
def test_large_backward_equals_the_kernels(shape, axis, view):
    """Parts of several hundred KiB in every layout (one rank: bit-identical); `view`: a
    channels-last view of channels-first memory (not C-contiguous)."""
    rng = np.random.default_rng(3)
    x, dy = rng.standard_normal(shape), rng.standard_normal(shape)
    if view:
        x = np.ascontiguousarray(x.transpose(0, 3, 1, 2)).transpose(0, 2, 3, 1)
        assert not x.flags.c_contiguous
    C = shape[axis]
    w, b = rng.standard_normal(C), rng.standard_normal(C)
    assert x.nbytes > 512 << 10
    y, mean, invstd = bnfast.batch_norm_train(x, w, b, axis=axis)
    for relu in (False, True):
        want = bnfast.batch_norm_backward(dy, x, mean, invstd, w, bias=b, relu=relu, axis=axis)
        got = dist.sync_batch_norm_backward(dy, x, mean, invstd, w, bias=b, relu=relu,
                                            axis=axis)
        for a, c in zip(got, want):
            np.testing.assert_array_equal(a, c)


def test_sync_moments_and_out():
    x = np.arange(12.0).reshape(6, 2)
    mean, var, n = dist.sync_moments(x)
    assert n == 6.0 and mean.tolist() == [5.0, 6.0]
    np.testing.assert_allclose(var, x.var(axis=0), rtol=1e-15)
    out = np.empty_like(x)
    y, _, _ = dist.sync_batch_norm_train(x, out=out)
    assert y is out
    dy = np.ones_like(x)
    dx, _, _ = dist.sync_batch_norm_backward(dy, x, mean, 1 / np.sqrt(var + 1e-5), out=dy)
    assert dx is dy


@pytest.mark.parametrize("call, err, match", [
    (lambda: dist.sync_batch_norm_train(np.ones((4, 3), np.int32)), TypeError, "dtype"),
    (lambda: dist.sync_batch_norm_train(np.ones(4)), ValueError, "2 dimensions"),
    (lambda: dist.sync_batch_norm_train(np.ones((4, 3)), axis=2), ValueError, "axis"),
    (lambda: dist.sync_batch_norm_train(np.ones((4, 3)), axis=1.0), TypeError, "axis"),
    (lambda: dist.sync_batch_norm_train(np.ones((4, 3)), eps=-1), ValueError, "eps"),
    (lambda: dist.sync_batch_norm_train(np.ones((4, 3)), momentum=2), ValueError, "momentum"),
    (lambda: dist.sync_batch_norm_train(np.ones((4, 3)), np.ones(2)), ValueError, "weight"),
    (lambda: dist.sync_batch_norm_train(np.ones((4, 3)), running_mean=np.zeros(3)),
     ValueError, "both"),
    (lambda: dist.sync_batch_norm_train(np.ones((4, 3)), running_mean=[0.0] * 3,
                                        running_var=np.ones(3)), TypeError, "running_mean"),
    (lambda: dist.sync_batch_norm_train(np.ones((4, 3)), out=np.ones((4, 2))), ValueError,
     "out"),
    (lambda: dist.sync_batch_norm_train(np.ones((1, 3))), ValueError, "more than 1 value"),
    (lambda: dist.sync_batch_norm_train(np.ones((0, 3))), ValueError, "more than 1 value"),
    (lambda: dist.sync_batch_norm_train(np.ones((4, 3)), check=1), TypeError, "check"),
    (lambda: dist.sync_batch_norm_train(np.ones((4, 3)), comm="world"), TypeError, "comm"),
    (lambda: dist.sync_moments(np.ones((0, 3))), ValueError, "empty"),
    (lambda: dist.sync_batch_norm_backward(np.ones((4, 3)), np.ones((4, 3)), np.zeros(2),
                                           np.ones(3)), ValueError, "mean"),
    (lambda: dist.sync_batch_norm_backward(np.ones((4, 3)), np.ones((4, 3)), np.zeros(3),
                                           np.ones(3), out=np.ones((4, 3))[:, :]),
     None, None),
])
def test_argument_errors(call, err, match):
    if err is None:
        call()
        return
    with pytest.raises(err, match=match):
        call()


@pytest.mark.parametrize("over", ["x", "dy"])
def test_backward_in_place_over_x_or_dy(over):
    # one element-wise pass: dx may overwrite x or dy, as in bnfast.batch_norm_backward
    rng = np.random.default_rng(3)
    x, dy = rng.standard_normal((6, 2, 5)), rng.standard_normal((6, 2, 5))
    _, mean, invstd = bnfast.batch_norm_train(x)
    expect = bnfast.batch_norm_backward(dy, x, mean, invstd)
    target = x if over == "x" else dy
    dx, dw, db = dist.sync_batch_norm_backward(dy, x, mean, invstd, out=target)
    assert dx is target
    np.testing.assert_array_equal(dx, expect[0])
    np.testing.assert_array_equal(db, expect[2])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("relu", [False, True])
def test_one_rank_backward_is_bit_identical_to_the_kernel(dtype, relu):
    rng = np.random.default_rng(4)
    x = rng.standard_normal((16, 4, 9)).astype(dtype)
    dy = rng.standard_normal(x.shape).astype(dtype)
    w, b = rng.uniform(0.5, 2, 4), rng.standard_normal(4)
    _, mean, invstd = bnfast.batch_norm_train(x, w, b, relu=relu)
    e = bnfast.batch_norm_backward(dy, x, mean, invstd, w, bias=b, relu=relu)
    r = dist.sync_batch_norm_backward(dy, x, mean, invstd, w, bias=b, relu=relu)
    for got, want in zip(r, e):
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)


def test_convert_keeps_parameters_buffers_and_modes():
    net = nn.Sequential(nn.Conv2d(2, 3, 3, rng=0), nn.BatchNorm2d(3, channels_last=False),
                        nn.ReLU(), nn.Flatten(), nn.Linear(3 * 16, 5, rng=0),
                        nn.BatchNorm1d(5, momentum=None, relu=True),
                        nn.Residual(nn.Sequential(nn.Linear(5, 5, rng=0), nn.BatchNorm1d(5))))
    net.eval()
    x = np.random.default_rng(0).standard_normal((4, 2, 6, 6)).astype(np.float32)
    before = net.state_dict()
    y0 = net(x)
    params = net.parameters()
    opt = optim.SGD(params, lr=0.1)
    out = dist.convert_sync_batchnorm(net)
    assert out is net
    kinds = [type(m).__name__ for _, m in net.named_modules()]
    assert kinds.count("SyncBatchNorm2d") == 1 and kinds.count("SyncBatchNorm1d") == 2
    assert "BatchNorm1d" not in kinds and "BatchNorm2d" not in kinds
    assert all(a is b for a, b in zip(net.parameters(), params))
    assert list(net.state_dict()) == list(before)
    assert net[5].momentum is None and net[5].relu and not net[5].training
    np.testing.assert_array_equal(net(x), y0)
    net.train()
    y = net(x)
    net.backward(np.ones_like(y))
    opt.step()
    assert int(net[1].num_batches_tracked) == 1
    bn = nn.BatchNorm1d(4)
    assert isinstance(dist.convert_sync_batchnorm(bn), dist.SyncBatchNorm1d)
    with pytest.raises(TypeError, match="Module"):
        dist.convert_sync_batchnorm("net")


def test_sync_layer_equals_batchnorm_and_copies():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((16, 4, 3, 3)).astype(np.float32)
    ref, sync = nn.BatchNorm2d(4, relu=True), dist.SyncBatchNorm2d(4, relu=True)
    assert sync.state_dict().keys() == ref.state_dict().keys()
    assert sync._check_now()                   # channel counts compared on the first call
    np.testing.assert_allclose(sync(x), ref(x), rtol=1e-5, atol=1e-6)
    assert not sync._check_now()
    np.testing.assert_allclose(sync.backward(x), ref.backward(x), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(sync.running_var, ref.running_var, rtol=1e-6)
    twin = sync.copy()
    assert twin.comm is sync.comm and twin.running_mean is not sync.running_mean
    assert "ranks=1" in repr(sync)
    # population statistics go through the synchronized moments
    net = nn.Sequential(dist.SyncBatchNorm1d(3))
    batches = np.split(rng.standard_normal((40, 3)).astype(np.float32), 4)
    nn.compute_population_stats(net, batches)
    np.testing.assert_allclose(net[0].running_mean, np.mean([b.mean(0) for b in batches], 0),
                               rtol=1e-5, atol=1e-6)


def _net(seed, bn=nn.BatchNorm1d):
    r = np.random.default_rng(seed)
    return nn.Sequential(nn.Linear(6, 10, rng=r, dtype=np.float64), bn(10, dtype=np.float64),
                         nn.Sigmoid(), nn.Linear(10, 3, rng=r, dtype=np.float64))


def test_data_parallel_on_one_rank_equals_plain_training():
    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((90, 6)), rng.integers(0, 3, 90)
    plain = _net(3)
    h1 = fit(plain, nn.CrossEntropyLoss(), optim.SGD(plain.parameters(), lr=0.2, momentum=0.9),
             (X, y), epochs=2, batch_size=20, val_data=(X, y), progress=False, rng=4)
    model = dist.DistributedDataParallel(dist.convert_sync_batchnorm(_net(3)), bucket_bytes=64)
    assert len(model._buckets()) > 2
    h2 = fit(model, nn.CrossEntropyLoss(), optim.SGD(model.parameters(), lr=0.2, momentum=0.9),
             (X, y), epochs=2, batch_size=20, val_data=(X, y), progress=False, rng=4)
    for (k, a), (k2, b) in zip(plain.state_dict().items(), model.state_dict().items()):
        assert k2 == "module." + k
        np.testing.assert_allclose(b, a, rtol=1e-12, atol=1e-13, err_msg=k)
    for k in ("loss", "accuracy", "val_loss", "val_accuracy"):
        np.testing.assert_allclose(h2[k], h1[k], rtol=1e-12)


def test_data_parallel_details():
    model = dist.DistributedDataParallel(_net(0), reduction="sum")
    with pytest.raises(RuntimeError, match="before forward"):
        model.backward(np.ones((2, 3)))
    out = model(np.ones((4, 6)))
    model.module[0].weight.requires_grad = False
    model.backward(np.ones_like(out))
    assert model.module[0].weight.grad is None          # no gradient anywhere: stays None
    assert model.module[3].weight.grad.shape == (3, 10)
    assert model.module[0].bias.grad.dtype == np.float64
    with pytest.raises(ValueError, match="reduction"):
        dist.DistributedDataParallel(_net(0), reduction="avg")
    with pytest.raises(ValueError, match="bucket_bytes"):
        dist.DistributedDataParallel(_net(0), bucket_bytes=0)
    with pytest.raises(TypeError, match="Module"):
        dist.DistributedDataParallel(object())
    assert model.copy().comm is model.comm


def test_sampler():
    s = dist.DistributedSampler(10, 4, shuffle=True, seed=1)
    first = [b.tolist() for b in s]
    assert sorted(sum(first, [])) == list(range(10))
    assert [b.tolist() for b in s] == first
    s.set_epoch(1)
    assert [b.tolist() for b in s] != first
    assert len(dist.DistributedSampler(10, 4, drop_last=True)) == 2
    with pytest.raises(ValueError, match="batch_size"):
        dist.DistributedSampler(10, 0)
    with pytest.raises(ValueError, match="n must"):
        dist.DistributedSampler(-1, 2)


def test_single_process_stand_in(monkeypatch):
    """Without mpi4py: one rank, unless a launcher announced several processes."""
    monkeypatch.setattr(dist, "_mpi", lambda: None)
    for var in dist._LAUNCHER_SIZE_VARS:
        monkeypatch.delenv(var, raising=False)
    comm = dist.get_comm()
    assert (comm.Get_rank(), comm.Get_size()) == (0, 1)
    x = np.arange(12.0).reshape(6, 2)
    y, mean, _ = dist.sync_batch_norm_train(x)
    assert mean.tolist() == [5.0, 6.0]
    dist.sync_batch_norm_backward(np.ones_like(x), x, mean, np.ones(2))
    model = dist.DistributedDataParallel(_net(0))
    out = model(np.ones((4, 6)))
    model.backward(np.ones_like(out))
    assert model.module[0].weight.grad is not None
    monkeypatch.setenv("PMI_SIZE", "4")
    with pytest.raises(ImportError, match="mpi4py is not installed"):
        dist.get_comm()


# ------------------------------------------------------------------ under mpiexec

def _mpiexec():
    pytest.importorskip("mpi4py", reason="the MPI tests need mpi4py (pip install '.[mpi]')")
    here = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    exe = here if os.path.exists(here) else shutil.which("mpiexec")
    if exe is None:
        pytest.skip("no mpiexec on PATH (pip install '.[mpi]' installs MPICH's)")
    return exe


def _run(n, script, *args, timeout):
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1",
               MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [_mpiexec(), "-n", str(n), sys.executable, os.path.join(SCRIPTS, script), *args]
    t0 = time.perf_counter()
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env,
                           stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{' '.join(cmd)} did not finish within {timeout} s (a hang):\n"
                    f"{e.stdout}\n{e.stderr}")
    return r, time.perf_counter() - t0


@pytest.mark.parametrize("n", [2, 3])
def test_under_mpiexec_equals_one_process_on_the_concatenated_batch(n):
    r, _ = _run(n, "check_sync.py", str(n), timeout=120)
    assert r.returncode == 0, f"exit {r.returncode}\n{r.stdout}\n{r.stderr}"
    # the launcher may interleave the ranks' lines: match, don't split
    ok = dict(re.findall(r"rank (\d+) OK (\d+)", r.stdout))
    assert sorted(ok) == [str(i) for i in range(n)], r.stdout + r.stderr
    assert len(set(ok.values())) == 1, ok            # the same checks on every rank


@pytest.mark.parametrize("how", ["layer", "function", "fit"])
def test_a_rank_that_raises_ends_the_job(how):
    r, seconds = _run(3, "raise_on_one_rank.py", how, timeout=30)
    assert r.returncode != 0
    assert "deliberate failure" in r.stderr
    assert "unreachable" not in r.stdout
    assert seconds < 30


def test_convert_named_containers_and_3d():
    from collections import OrderedDict
    net = nn.Sequential(OrderedDict([("conv", nn.Conv2d(2, 3, 3, rng=0)),
                                     ("bn", nn.BatchNorm2d(3)),
                                     ("act", nn.ReLU())]))
    blocks = nn.ModuleList([nn.BatchNorm1d(4), nn.BatchNorm3d(2, channels_last=True)])
    holder = nn.Sequential(net)
    holder.add_module("blocks", blocks)
    w = blocks[1].weight
    dist.convert_sync_batchnorm(holder)
    assert type(net.bn).__name__ == "SyncBatchNorm2d"
    assert type(blocks[0]).__name__ == "SyncBatchNorm1d"
    assert type(blocks[1]).__name__ == "SyncBatchNorm3d"
    assert blocks[1].weight is w and blocks[1].channels_last


@pytest.mark.parametrize("channels_last", [False, True])
def test_sync_batchnorm3d_one_rank_equals_batchnorm3d(channels_last):
    rng = np.random.default_rng(5)
    shape = (3, 4, 2, 3, 5) if not channels_last else (3, 2, 3, 5, 4)
    x = rng.standard_normal(shape)
    g = rng.standard_normal(shape)
    a = nn.BatchNorm3d(4, channels_last=channels_last, dtype=np.float64)
    b = dist.SyncBatchNorm3d(4, channels_last=channels_last, dtype=np.float64)
    ya, yb = a(x), b(x)
    np.testing.assert_allclose(yb, ya, rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(b.backward(g), a.backward(g), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(b.running_var, a.running_var, rtol=1e-13)
