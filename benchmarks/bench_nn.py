"""Time one training step (forward, loss, backward, SGD update) of bnfast.nn networks against
the same networks in PyTorch eager mode on the CPU, with the same thread count.

Usage::

    python benchmarks/bench_nn.py                  # thread count: bnfast.get_num_threads()
    python benchmarks/bench_nn.py --threads 2 --threads 1 --json results/nn.json
    python benchmarks/bench_nn.py --omp-wait-policy passive   # see the note below

Networks:

- ``mlp``: the paper's MNIST network (Section 4.1): 784-100-100-100-10, sigmoid hidden units,
  batch norm on every hidden layer, softmax cross-entropy, batch 60.
- ``conv``: conv3x3(1->16)-BN-ReLU-maxpool2 - conv3x3(16->32)-BN-ReLU-maxpool2 - linear(1568->10)
  on (64, 1, 28, 28) input (``conv`` fuses each ReLU into its batch norm with
  ``relu=True``; ``conv-unfused`` uses separate ReLU layers).

Both frameworks get the same weights and data, use float32 and SGD (lr 0.01, momentum 0.9),
and are limited to the same number of threads (bnfast's kernels, NumPy's BLAS through
threadpoolctl, and ``torch.set_num_threads``).  bnfast's first layer skips the gradient of
the input (``needs_input_grad = False``), which PyTorch does not compute either.  Steps of the two are timed in alternating
blocks; the table gives the median of the per-step times (the JSON also has the 10th and
90th percentiles and the minimum).

Note: on a machine with few cores, bnfast's OpenMP threads spinning after a batch-norm kernel
compete with OpenBLAS's threads in the next matrix product; ``OMP_WAIT_POLICY=passive``
(read when the OpenMP runtime starts, hence the re-execution) avoids that.
"""
import argparse
import contextlib
import json
import os
import sys
import time

import numpy as np

import bnfast
from bnfast import nn, optim


# ---------------------------------------------------------------------------- networks

def mlp_bnfast(rng):
    layers = []
    for i, o in ((784, 100), (100, 100), (100, 100)):
        layers += [nn.Linear(i, o, rng=rng), nn.BatchNorm1d(o), nn.Sigmoid()]
    return nn.Sequential(*layers, nn.Linear(100, 10, rng=rng))


def conv_bnfast(rng, fused=True):
    def block(i, o):
        if fused:
            return [nn.Conv2d(i, o, 3, padding=1, bias=False, rng=rng),
                    nn.BatchNorm2d(o, relu=True), nn.Identity(), nn.MaxPool2d(2)]
        return [nn.Conv2d(i, o, 3, padding=1, bias=False, rng=rng), nn.BatchNorm2d(o),
                nn.ReLU(), nn.MaxPool2d(2)]
    return nn.Sequential(*block(1, 16), *block(16, 32), nn.Flatten(),
                         nn.Linear(32 * 7 * 7, 10, rng=rng))


def mlp_torch(torch):
    tnn = torch.nn
    layers = []
    for i, o in ((784, 100), (100, 100), (100, 100)):
        layers += [tnn.Linear(i, o), tnn.BatchNorm1d(o), tnn.Sigmoid()]
    return tnn.Sequential(*layers, tnn.Linear(100, 10))


def conv_torch(torch):
    tnn = torch.nn

    def block(i, o):
        return [tnn.Conv2d(i, o, 3, padding=1, bias=False), tnn.BatchNorm2d(o), tnn.ReLU(),
                tnn.MaxPool2d(2)]
    return tnn.Sequential(*block(1, 16), *block(16, 32), tnn.Flatten(),
                          tnn.Linear(32 * 7 * 7, 10))


CASES = {
    "mlp": dict(make=mlp_bnfast, make_torch=mlp_torch, shape=(60, 784), steps=3000),
    "conv": dict(make=lambda rng: conv_bnfast(rng, True), make_torch=conv_torch,
                 shape=(64, 1, 28, 28), steps=200),
    "conv-unfused": dict(make=lambda rng: conv_bnfast(rng, False), make_torch=conv_torch,
                         shape=(64, 1, 28, 28), steps=200),
}


# ---------------------------------------------------------------------------- timing

def _bnfast_step(model, loss_fn, opt, x, y):
    def step():
        opt.zero_grad()
        loss = loss_fn(model.forward(x), y)
        model.backward(loss_fn.backward())
        opt.step()
        return loss
    return step


def _torch_step(torch, model, x, y):
    loss_fn = torch.nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step():
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        return loss
    return step


def _time_blocks(steps, n, block):
    """Run the step functions in alternating blocks; return per-step times (s) of each."""
    times = [[] for _ in steps]
    done = 0
    while done < n:
        k = min(block, n - done)
        for fn, out in zip(steps, times):
            for _ in range(k):
                t0 = time.perf_counter()
                fn()
                out.append(time.perf_counter() - t0)
        done += k
    return [np.array(t) for t in times]


def run_case(name, threads, steps=None, torch=None, seed=0):
    case = CASES[name]
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(case["shape"], dtype=np.float32)
    y = rng.integers(0, 10, case["shape"][0])
    model = case["make"](rng)
    model[0].needs_input_grad = False        # as torch: the input needs no gradient
    opt = optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    fns = [_bnfast_step(model, nn.CrossEntropyLoss(), opt, x, y)]
    if torch is not None:
        tmodel = case["make_torch"](torch)
        tmodel.load_state_dict({k: torch.from_numpy(v) for k, v in model.state_dict().items()})
        tmodel.train()
        fns.append(_torch_step(torch, tmodel, torch.from_numpy(x), torch.from_numpy(y)))
        # same network: the first losses agree
        l0, l1 = fns[0](), fns[1]().item()
        if not np.isclose(l0, l1, rtol=1e-4):
            raise RuntimeError(f"{name}: bnfast loss {l0} != torch loss {l1}")
    n = steps or case["steps"]
    warm = max(10, n // 10)
    _time_blocks(fns, warm, warm)
    times = _time_blocks(fns, n, max(1, n // 10))
    row = {"case": name, "threads": threads, "steps": n}
    for label, t in zip(("bnfast", "torch"), times):
        row[label] = {"median_ms": float(np.median(t) * 1e3),
                      "p10_ms": float(np.percentile(t, 10) * 1e3),
                      "p90_ms": float(np.percentile(t, 90) * 1e3),
                      "min_ms": float(t.min() * 1e3)}
    return row


@contextlib.contextmanager
def limit_threads(n, torch):
    try:
        from threadpoolctl import threadpool_limits
        blas = threadpool_limits(limits=n)
    except ImportError:  # pragma: no cover
        blas = contextlib.nullcontext()
    old_torch = torch.get_num_threads() if torch is not None else None
    with blas, bnfast.num_threads(n):
        if torch is not None:
            torch.set_num_threads(bnfast.get_num_threads())
        try:
            yield
        finally:
            if torch is not None:
                torch.set_num_threads(old_torch)


def format_table(rows):
    head = (f"{'network':14s} {'threads':>7s} {'bnfast ms':>10s} {'torch ms':>10s} "
            f"{'torch/bnfast':>12s}")
    lines = [head, "-" * len(head)]
    for r in rows:
        b = r["bnfast"]["median_ms"]
        t = r.get("torch", {}).get("median_ms", float("nan"))
        lines.append(f"{r['case']:14s} {r['threads']:7d} {b:10.3f} {t:10.3f} {t / b:12.2f}")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, action="append", default=None,
                    help="thread count (repeatable); default bnfast.get_num_threads()")
    ap.add_argument("--case", action="append", choices=sorted(CASES), default=None)
    ap.add_argument("--steps", type=int, default=None, help="timed steps per case")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--json", default=None, help="write the results to this JSON file")
    ap.add_argument("--omp-wait-policy", choices=["active", "passive"], default=None,
                    help="rerun with OMP_WAIT_POLICY set (it is read when OpenMP starts); "
                         "applies to bnfast's and PyTorch's OpenMP runtimes alike")
    args = ap.parse_args(argv)
    if args.omp_wait_policy and os.environ.get("OMP_WAIT_POLICY") != args.omp_wait_policy:
        env = dict(os.environ, OMP_WAIT_POLICY=args.omp_wait_policy)
        os.execve(sys.executable, [sys.executable, os.path.abspath(__file__)] + sys.argv[1:],
                  env)
    torch = None
    if not args.no_torch:
        try:
            import torch
        except ImportError:
            print("PyTorch is not installed: timing bnfast only")
    threads = args.threads or [bnfast.get_num_threads()]
    cases = args.case or ["mlp", "conv", "conv-unfused"]
    print(f"bnfast {bnfast.__version__} ({bnfast.get_isa()}), NumPy {np.__version__}"
          + (f", torch {torch.__version__}" if torch is not None else "")
          + f"; OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}")
    rows = []
    for n in threads:
        with limit_threads(n, torch):
            for name in cases:
                rows.append(run_case(name, bnfast.get_num_threads(), args.steps, torch))
                print(format_table(rows[-1:]).splitlines()[-1], flush=True)
    print()
    print("median time per training step (forward, loss, backward, SGD update)")
    print(format_table(rows))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"config": bnfast.get_config(),
                       "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
                       "results": rows}, f, indent=2, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
