"""Cost of synchronized batch norm over MPI, and weak scaling of data-parallel training.

Usage::

    pip install ".[mpi]"
    python benchmarks/bench_distributed.py                 # both tables, ranks 1, 2, 4
    python benchmarks/bench_distributed.py --ranks 1 --ranks 2 --json results/dist.json
    python benchmarks/bench_distributed.py --only sync     # or --only weak

The script runs itself under ``mpiexec -n P`` (the ``mpiexec`` beside the Python
interpreter, else the one on PATH) for each rank count and prints Markdown tables.

1. **Synchronization cost per call.**  Every rank holds a (128, C) float32 part of the
   batch.  For C from 64 to 2048 it times, per call: the local kernels on that part
   (``batch_norm_train`` forward, ``batch_norm_backward``), the synchronized calls
   (``sync_batch_norm_train``, ``sync_batch_norm_backward``, with the default
   ``check=True``, and the forward with ``check=False`` as the layers make it after their
   first call), and the exchange alone (the ``Allgather`` of ``2C + 6`` doubles and the
   rank-order merge).  All
   ranks start each call together (a barrier, not timed); the figure is the median over
   the repeats of the slowest rank's time, the implementations taking turns.
2. **Weak scaling.**  The paper's MNIST network (784-100-100-100-10, sigmoid, batch norm
   on every hidden layer) with 60 examples per rank (the paper's batch; and 600): one rank
   trains with a global batch of 60, two ranks with 120 (synchronized batch norm and
   summed gradients).  The figure is
   the median time of a training step (forward, loss, backward with the gradient
   exchange, SGD update) over blocks of steps; efficiency = time on 1 rank / time on P.

Threads: each rank runs its kernels and BLAS on one thread (``OMP_NUM_THREADS=1``), so
P ranks use P cores; with more ranks than cores they are oversubscribed (and MPICH's
ranks busy-wait in collectives, so an oversubscribed rank that waits takes CPU time from
one that computes).
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

CHANNELS = (64, 128, 256, 512, 1024, 2048)
ROWS = 128                      # rows per rank in the synchronization benchmark
PER_RANK_BATCHES = (60, 600)    # examples per rank in the weak-scaling benchmark


# ---------------------------------------------------------------------------- workers

def _timed(comm, fn, reps):
    """Median over `reps` of the slowest rank's time of fn() (all ranks start together)."""
    out = np.empty(reps)
    mine = np.empty(1)
    slowest = np.empty(1)
    from mpi4py import MPI
    for i in range(reps):
        comm.Barrier()
        t0 = time.perf_counter()
        fn()
        mine[0] = time.perf_counter() - t0
        comm.Allreduce(mine, slowest, op=MPI.MAX)
        out[i] = slowest[0]
    return out


def worker_sync(comm, reps):
    import bnfast
    from bnfast import distributed as dist

    rank = comm.Get_rank()
    rows = []
    rng = np.random.default_rng(rank)
    for C in CHANNELS:
        x = rng.standard_normal((ROWS, C), dtype=np.float32)
        dy = rng.standard_normal((ROWS, C), dtype=np.float32)
        w, b = np.ones(C, np.float32), np.zeros(C, np.float32)
        y, mean, invstd = dist.sync_batch_norm_train(x, w, b, comm=comm)
        header = dist._header(dist._OP_MOMENTS, C, x.dtype, x.ndim, 1)
        m2 = np.ones(C)

        def exchange():
            return dist._merge(dist._exchange(comm, header, ROWS, mean, m2, False, "bench"),
                               C)

        fns = {
            "local forward": lambda: bnfast.batch_norm_train(x, w, b),
            "sync forward": lambda: dist.sync_batch_norm_train(x, w, b, comm=comm),
            "sync forward, check=False": lambda: dist.sync_batch_norm_train(
                x, w, b, comm=comm, check=False),
            "exchange": exchange,
            "local backward": lambda: bnfast.batch_norm_backward(dy, x, mean, invstd, w),
            "sync backward": lambda: dist.sync_batch_norm_backward(dy, x, mean, invstd, w,
                                                                   comm=comm),
        }
        for fn in fns.values():                 # warm up
            fn()
        samples = {k: [] for k in fns}
        for _ in range(5):                      # interleaved blocks
            for k, fn in fns.items():
                samples[k].append(_timed(comm, fn, max(reps // 5, 1)))
        med = {k: float(np.median(np.concatenate(v))) for k, v in samples.items()}
        rows.append({"C": C, **{k: v * 1e6 for k, v in med.items()}})
    return rows


def worker_weak(comm, steps, per_rank):
    from bnfast import distributed as dist
    from bnfast import nn, optim
    from bnfast.paper.mnist_fig1 import build_mlp

    P = comm.Get_size()
    rng = np.random.default_rng(0)
    n = 6000
    X = rng.random((n, 784), dtype=np.float32)
    y = rng.integers(0, 10, n)
    B = per_rank * P
    out = {}
    for key, bn in (("without BN", False), ("with BN", True)):
        model = dist.DistributedDataParallel(dist.convert_sync_batchnorm(build_mlp(bn), comm),
                                             comm)
        opt = optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        loss_fn = nn.CrossEntropyLoss()
        sampler = dist.DistributedSampler(n, B, comm, seed=0, drop_last=True)
        batches = [idx for idx in sampler]
        times = []
        block = 50
        for s in range(0, steps, block):
            comm.Barrier()
            t0 = time.perf_counter()
            for k in range(s, s + block):
                idx = batches[k % len(batches)]
                opt.zero_grad()
                loss_fn(model(X[idx]), y[idx])
                model.backward(loss_fn.backward())
                opt.step()
            times.append((time.perf_counter() - t0) / block)
        slowest = comm.allgather(float(np.median(times)))
        out[key] = max(slowest) * 1e3
    return out


def worker(args):
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    if args.only in (None, "sync"):
        res = {"sync": worker_sync(comm, args.reps)}
    else:
        res = {}
    if args.only in (None, "weak") and comm.Get_size() <= 2:
        res["weak"] = {str(b): worker_weak(comm, args.steps if b < 100 else args.steps // 5, b)
                       for b in PER_RANK_BATCHES}
    if comm.Get_rank() == 0:
        with open(args.worker, "w") as f:
            json.dump(res, f)


# ---------------------------------------------------------------------------- driver

def _mpiexec():
    here = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    exe = here if os.path.exists(here) else shutil.which("mpiexec")
    if exe is None:
        sys.exit("bench_distributed: no mpiexec (pip install \".[mpi]\")")
    return exe


def machine():
    import platform

    from mpi4py import MPI

    from bnfast._bench import machine_info    # lscpu's model name, as bnfast bench records
    return {"cpu": machine_info()["model"], "cores": os.cpu_count(),
            "python": platform.python_version(),
            "mpi": MPI.Get_library_version().splitlines()[0].strip()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", type=int, action="append", help="rank counts (default 1 2 4)")
    p.add_argument("--reps", type=int, default=200, help="timed calls per figure")
    p.add_argument("--steps", type=int, default=1000, help="training steps per network")
    p.add_argument("--only", choices=["sync", "weak"])
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args)
    ranks = args.ranks or [1, 2, 4]
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1",
               MKL_NUM_THREADS="1")
    results = {"machine": machine(), "command": " ".join([sys.executable] + sys.argv),
               "by_ranks": {}}
    cores = os.cpu_count()
    for P in ranks:
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "res.json")
            cmd = [_mpiexec(), "-n", str(P), sys.executable, os.path.abspath(__file__),
                   "--worker", out, "--reps", str(args.reps), "--steps", str(args.steps)]
            if args.only:
                cmd += ["--only", args.only]
            subprocess.run(cmd, env=env, check=True, timeout=1800)
            with open(out) as f:
                results["by_ranks"][str(P)] = json.load(f)
    m = results["machine"]
    print(f"Machine: {m['cpu']}, {m['cores']} cores; {m['mpi']}; Python {m['python']}")
    if args.only in (None, "sync"):
        print(f"\nSynchronization cost per call, float32 ({ROWS}, C) per rank, microseconds "
              f"(median of the slowest rank):\n")
        print("| ranks | C | local fwd | sync fwd | exchange | sync fwd, no check "
              "| local bwd | sync bwd |")
        print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        for P in ranks:
            note = " (oversubscribed)" if P > cores else ""
            for r in results["by_ranks"][str(P)]["sync"]:
                print(f"| {P}{note} | {r['C']} | {r['local forward']:.1f} "
                      f"| {r['sync forward']:.1f} | {r['exchange']:.1f} "
                      f"| {r['sync forward, check=False']:.1f} | {r['local backward']:.1f} "
                      f"| {r['sync backward']:.1f} |")
    weak = {P: results["by_ranks"][str(P)].get("weak") for P in ranks}
    weak = {P: w for P, w in weak.items() if w}
    if weak:
        print("\nWeak scaling, MNIST MLP, ms per training step (efficiency = time on 1 rank "
              "/ time on P):\n")
        print("| per rank | ranks | global batch | without BN | with BN "
              "| efficiency without / with BN |")
        print("| ---: | ---: | ---: | ---: | ---: | ---: |")
        for b in PER_RANK_BATCHES:
            base = weak.get(1, {}).get(str(b))
            for P, w in weak.items():
                w = w[str(b)]
                eff = (f"{base['without BN'] / w['without BN']:.2f} / "
                       f"{base['with BN'] / w['with BN']:.2f}" if base else "")
                print(f"| {b} | {P} | {b * P} | {w['without BN']:.3f} | {w['with BN']:.3f} "
                      f"| {eff} |")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
