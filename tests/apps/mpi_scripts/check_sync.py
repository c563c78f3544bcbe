"""Run under mpiexec by tests/apps/test_distributed.py: synchronized batch norm and data-parallel
training against one process on the concatenated batch.

Every rank computes the single-process result itself (on the whole batch, which every rank
generates from the same seed) and compares its own part with it.  Prints one line
``rank R OK <n checks>`` per rank on success; any failure raises, which aborts the job
(bnfast.distributed.abort_on_exception).
"""
import sys

import numpy as np
from mpi4py import MPI

import bnfast
from bnfast import distributed as dist
from bnfast import nn, optim
from bnfast.train import fit, iterate_minibatches

comm = MPI.COMM_WORLD
rank, size = comm.Get_rank(), comm.Get_size()
dist.abort_on_exception(comm)
expected = int(sys.argv[1])
if size != expected:
    raise SystemExit(f"rank {rank}: expected {expected} ranks, got {size}: mpiexec and "
                     f"mpi4py belong to different MPI installations")
checks = 0


def close(a, b, what, rtol=1e-12, atol=1e-12):
    global checks
    np.testing.assert_allclose(a, b, rtol=rtol, atol=atol, err_msg=f"rank {rank}: {what}")
    checks += 1


def same_on_every_rank(a, what):
    """Bit-identical on every rank."""
    global checks
    a = np.ascontiguousarray(a)
    every = comm.allgather(a.tobytes())
    assert all(e == every[0] for e in every), f"{what} differs between ranks"
    checks += 1


def parts(n, empty_last=False):
    """Uneven row counts per rank summing to n (weights size, ..., 2, 1); with
    `empty_last`, the last rank gets none."""
    if size == 1:
        return [n]
    w = np.arange(1, size + 1, dtype=float)[::-1]
    if empty_last:
        w[-1] = 0
    k = np.floor(n * w / w.sum()).astype(int)
    k[0] += n - k.sum()
    assert (k > 0).sum() == size - empty_last, k
    return k.tolist()


def my_rows(counts):
    s = sum(counts[:rank])
    return slice(s, s + counts[rank])


# ------------------------------------------------------------ functional, float64
rng = np.random.default_rng(42)
for shape, axis in (((23, 5), 1), ((11, 4, 3, 2), 1), ((9, 3, 2, 6), -1), ((10, 3, 7), 1)):
    for relu in (False, True):
        X = rng.standard_normal(shape) * 3 + 1.5       # the global batch, on every rank
        DY = rng.standard_normal(shape)
        C = shape[axis]
        w, b = rng.standard_normal(C), rng.standard_normal(C)
        counts = parts(shape[0], empty_last=relu)
        x, dy = X[my_rows(counts)], DY[my_rows(counts)]
        # one process, concatenated batch
        rm1, rv1 = np.zeros(C), np.ones(C)
        Y1, mean1, inv1 = bnfast.batch_norm_train(X, w, b, axis=axis, running_mean=rm1,
                                                  running_var=rv1, momentum=0.3, relu=relu)
        DX1, DW1, DB1 = bnfast.batch_norm_backward(DY, X, mean1, inv1, w, bias=b, relu=relu,
                                                   axis=axis)
        # synchronized
        rm, rv = np.zeros(C), np.ones(C)
        y, mean, inv = dist.sync_batch_norm_train(x, w, b, comm=comm, axis=axis,
                                                  running_mean=rm, running_var=rv,
                                                  momentum=0.3, relu=relu)
        dx, dw, db = dist.sync_batch_norm_backward(dy, x, mean, inv, w, comm=comm, bias=b,
                                                   relu=relu, axis=axis)
        what = f"shape {shape} axis {axis} relu {relu}"
        close(y, Y1[my_rows(counts)], f"y, {what}")
        close(mean, mean1, f"mean, {what}")
        close(inv, inv1, f"invstd, {what}")
        close(rm, rm1, f"running_mean, {what}")
        close(rv, rv1, f"running_var, {what}")
        close(dx, DX1[my_rows(counts)], f"dx, {what}")
        close(sum(comm.allgather(dw)), DW1, f"dweight summed over ranks, {what}")
        close(sum(comm.allgather(db)), DB1, f"dbias summed over ranks, {what}")
        for a, name in ((mean, "mean"), (inv, "invstd"), (rm, "running_mean"),
                        (rv, "running_var")):
            same_on_every_rank(a, f"{name}, {what}")
        m, v, n = dist.sync_moments(x, comm=comm, axis=axis)
        close(n, X.size // C, f"count, {what}", atol=0)
        close(m, mean1, f"sync_moments mean, {what}")
        same_on_every_rank(np.concatenate([m, v]), f"sync_moments, {what}")

# ------------------------------------------------------------ float32 layers
X = rng.standard_normal((40, 6, 3, 3)).astype(np.float32)
DY = rng.standard_normal(X.shape).astype(np.float32)
counts = parts(40)
ref = nn.BatchNorm2d(6)
ref.weight.data[...] = rng.random(6) + 0.5
sync = dist.SyncBatchNorm2d(6, comm=comm)
sync.load_state_dict(ref.state_dict())
Y1 = ref(X)
y = sync(X[my_rows(counts)])
close(y, Y1[my_rows(counts)], "float32 SyncBatchNorm2d forward", rtol=1e-5, atol=1e-5)
close(sync.running_var, ref.running_var, "float32 running_var", rtol=1e-6, atol=0)
DX1 = ref.backward(DY)
dx = sync.backward(DY[my_rows(counts)])
close(dx, DX1[my_rows(counts)], "float32 SyncBatchNorm2d backward", rtol=1e-4, atol=1e-5)
close(sum(comm.allgather(sync.weight.grad)), ref.weight.grad, "float32 dweight", rtol=1e-5,
      atol=1e-4)
same_on_every_rank(sync.running_mean, "float32 running_mean")

# ------------------------------------------------------------ disagreeing ranks
for case, make in (
        ("number of channels", lambda: np.ones((4, 3 + (rank % 2))))
        , ("dtype", lambda: np.ones((4, 3), np.float32 if rank % 2 else np.float64))
        , ("layout", lambda: np.ones((4, 3, 2, 2)) if rank % 2 else np.ones((4, 3, 2)))):
    if size == 1:
        break
    # check=False: no agreement collective, the header travels with the rows (only a
    # channel-count mismatch needs the separate check)
    for check in (True, False) if case != "number of channels" else (True,):
        for fn in ("forward", "backward"):
            try:
                if fn == "forward":
                    dist.sync_batch_norm_train(make(), comm=comm, check=check)
                else:
                    a = make()
                    C = a.shape[1]
                    dist.sync_batch_norm_backward(a, a, np.zeros(C), np.ones(C), comm=comm,
                                                  check=check)
            except ValueError as e:
                assert f"the ranks disagree on the {case}" in str(e), str(e)
                assert "rank 0" in str(e) and "rank 1" in str(e), str(e)
                checks += 1
            else:
                raise AssertionError(f"rank {rank}: no error for disagreeing {case}")

if size > 1:
    # a forward on some ranks meeting a backward on others
    x = np.ones((4, 3))
    try:
        if rank % 2:
            dist.sync_batch_norm_train(x, comm=comm, check=False)
        else:
            dist.sync_batch_norm_backward(x, x, np.zeros(3), np.ones(3), comm=comm,
                                          check=False)
    except ValueError as e:
        assert "not in the same operation" in str(e), str(e)
        checks += 1
    else:
        raise AssertionError("no error for ranks in different operations")
    # layers: the channel counts are compared on their first synchronized call
    bn = dist.SyncBatchNorm1d(3 + rank % 2, comm=comm)
    try:
        bn(np.ones((4, 3 + rank % 2), np.float32))
    except ValueError as e:
        assert "the ranks disagree on the number of channels" in str(e), str(e)
        checks += 1
    else:
        raise AssertionError("no error for layers with different channel counts")

# ------------------------------------------------------------ training: 1 rank == N ranks
def make_net(seed, layer1, layer2):
    r = np.random.default_rng(seed)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1, rng=r, dtype=np.float64), layer1(4),
        nn.ReLU(), nn.Flatten(),
        nn.Linear(4 * 5 * 5, 8, rng=r, dtype=np.float64), layer2(8), nn.Tanh(),
        nn.Linear(8, 3, rng=r, dtype=np.float64))


data = np.random.default_rng(7)
Xt = data.standard_normal((102, 2, 5, 5))          # the last global batch has 2 rows:
yt = data.integers(0, 3, 102)                       # one rank gets none with 3 ranks
plain = make_net(1, lambda c: nn.BatchNorm2d(c, dtype=np.float64),
                 lambda c: nn.BatchNorm1d(c, dtype=np.float64))
h1 = fit(plain, nn.CrossEntropyLoss(), optim.SGD(plain.parameters(), lr=0.1, momentum=0.9),
         (Xt, yt), epochs=3, batch_size=25, val_data=(Xt, yt), progress=False, rng=5)

net = dist.convert_sync_batchnorm(
    make_net(1, lambda c: nn.BatchNorm2d(c, dtype=np.float64),
             lambda c: nn.BatchNorm1d(c, dtype=np.float64)), comm)
if rank:                      # rank 0's weights must reach every rank
    for p in net.parameters():
        p.data[...] = 0
model = dist.DistributedDataParallel(net, comm)
hN = fit(model, nn.CrossEntropyLoss(), optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
         (Xt, yt), epochs=3, batch_size=25, val_data=(Xt, yt), progress=False, rng=5)
for (k, a), (_, b) in zip(plain.state_dict().items(), model.module.state_dict().items()):
    close(b, a, f"trained {k}", rtol=1e-9, atol=1e-11)
    same_on_every_rank(b, f"trained {k}")
for k in ("loss", "accuracy", "val_loss", "val_accuracy"):
    close(hN[k], h1[k], f"history {k}", rtol=1e-9, atol=1e-12)
    same_on_every_rank(np.array(hN[k]), f"history {k}")

# fit's progress bar: on rank 0 only
import tqdm.auto  # noqa: E402

bars = []
real_tqdm = tqdm.auto.tqdm


def counting_tqdm(*args, **kwargs):
    bars.append(1)
    kwargs["disable"] = True
    return real_tqdm(*args, **kwargs)


tqdm.auto.tqdm = counting_tqdm
fit(model, nn.CrossEntropyLoss(), optim.SGD(model.parameters(), lr=0.1), (Xt, yt), epochs=2,
    batch_size=25, progress=True, rng=1)
tqdm.auto.tqdm = real_tqdm
assert comm.allgather(len(bars)) == [2] + [0] * (size - 1), comm.allgather(len(bars))
checks += 1

# the sampler gives the same global batches as one process
sampler = dist.DistributedSampler(37, 8, comm, seed=3)
sampler.set_epoch(2)
mine = list(sampler)
every = comm.allgather(mine)
whole = list(iterate_minibatches(np.arange(37), None, 8, shuffle=True,
                                 rng=np.random.default_rng([3, 2])))
for k, batch in enumerate(whole):
    assert np.array_equal(np.concatenate([e[k] for e in every]), batch)
checks += 1

# the paper's MNIST experiment: data-parallel curves == one process's
from bnfast.paper import common, mnist_fig1  # noqa: E402

r = np.random.default_rng(11)
mn = common.MnistArrays(r.random((240, 784), dtype=np.float32), r.integers(0, 10, 240),
                        r.random((50, 784), dtype=np.float32), r.integers(0, 10, 50))
kw = dict(steps=30, eval_every=10, batch_size=24, hidden=(16, 16), pop_batches=3, lr=0.1,
          progress=False)
one = mnist_fig1.run(mn, **kw)
par = mnist_fig1.run(mn, comm=comm, **kw)
assert par["config"]["ranks"] == size
for net in ("nobn", "bn"):
    for k, v in one["curves"][net].items():
        w = par["curves"][net][k]
        if k == "train_loss":
            v, w = v[1:], w[1:]
        close(w, v, f"paper curve {net} {k}", rtol=1e-4, atol=1e-4)
        same_on_every_rank(np.array(w, dtype=float), f"paper curve {net} {k}")

print(f"rank {rank} OK {checks}", flush=True)
