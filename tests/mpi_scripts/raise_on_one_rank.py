"""Run under mpiexec by tests/test_distributed.py: the last rank raises while the others
wait in a synchronized forward pass; the job must end (non-zero) instead of hanging."""
import numpy as np
from mpi4py import MPI

from bnfast import distributed as dist

comm = MPI.COMM_WORLD
bn = dist.SyncBatchNorm1d(4, comm=comm)         # installs the abort-on-exception hook
if comm.Get_rank() == comm.Get_size() - 1:
    raise RuntimeError("deliberate failure on the last rank")
bn(np.ones((8, 4), np.float32))                 # the other ranks wait here
print("unreachable: the job should have been aborted", flush=True)
