"""Run under mpiexec by tests/apps/test_distributed.py: the last rank raises while the others
wait in a collective; the job must end (non-zero) instead of hanging.

Argument: ``layer`` (the others wait in a SyncBatchNorm1d forward), ``function`` (in
sync_batch_norm_train, no layer ever built) or ``fit`` (the last rank raises in its
fourth training step, inside bnfast.train.fit)."""
import sys

import numpy as np
from mpi4py import MPI

from bnfast import distributed as dist
from bnfast import nn, optim
from bnfast.train import fit

comm = MPI.COMM_WORLD
last = comm.Get_rank() == comm.Get_size() - 1
how = sys.argv[1]
x = np.ones((8, 4), np.float32)
if how == "layer":
    bn = dist.SyncBatchNorm1d(4, comm=comm)     # the hook is installed from here on
    if last:
        raise RuntimeError("deliberate failure on the last rank")
    bn(x)
elif how == "function":
    if last:
        dist.get_comm(comm)                    # any use of the module installs the hook
        raise RuntimeError("deliberate failure on the last rank")
    dist.sync_batch_norm_train(x, comm=comm)
else:
    class Fails(nn.Module):
        calls = 0

        def forward(self, x):
            Fails.calls += 1
            if last and Fails.calls == 4:
                raise RuntimeError("deliberate failure on the last rank")
            return x

        def backward(self, grad):
            return grad

    net = nn.Sequential(nn.Linear(4, 3, rng=0), Fails(), nn.BatchNorm1d(3))
    model = dist.DistributedDataParallel(dist.convert_sync_batchnorm(net, comm), comm)
    X, y = np.ones((60, 4), np.float32), np.arange(60) % 3
    fit(model, nn.CrossEntropyLoss(), optim.SGD(model.parameters(), lr=0.1), (X, y),
        epochs=2, batch_size=12, progress=False, rng=0)
print("unreachable: the job should have been aborted", flush=True)
