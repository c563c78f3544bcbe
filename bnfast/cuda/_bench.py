"""The GPU benchmark: ``bnfast bench --device cuda``.

bnfast's CUDA kernels against PyTorch CUDA -- cuDNN's batch norm and PyTorch's native
kernels (cuDNN disabled) -- and against a device-to-device copy of the same tensor (the
memory-bandwidth floor), in one process, on the CPU benchmark's shapes plus tensors of
1 GiB and more, channels-first and channels-last, float32.  Each case is timed with CUDA
events around a run of calls long enough to dwarf the launch latency; the figure is the
median over `repeat` samples.  Writes ``bench_cuda.json`` (every sample's median, the
device and the versions) and prints a table.  bnfast's times include the host reads its
checks need (the backward's degenerate-channel flag, the variance check of inference):
each waits for the stream, which is part of a call's cost.
"""
import json
import os
import statistics
import sys
import time

# the CPU benchmark's float32 shapes, then tensors of 1 GiB (float32)
SHAPES = [(64, 128), (256, 1024), (4096, 4096), (8, 32, 32, 32), (32, 64, 56, 56),
          (64, 256, 28, 28), (16, 512, 14, 14), (128, 64, 112, 112),
          (262144, 1024), (64, 256, 128, 128)]
QUICK_SHAPES = [(256, 1024), (32, 64, 56, 56), (64, 256, 128, 128)]
OPS = ("train", "infer", "backward")


def _torch():
    try:
        import torch
    except Exception:
        return None
    return torch if torch.cuda.is_available() else None


def _timer(cp, sync_events):
    """time(fn) -> median seconds per call, CUDA events on the current stream."""
    def time_fn(fn, repeat):
        fn()                                   # warm up: compilation, allocation
        cp.cuda.get_current_stream().synchronize()
        t0 = time.perf_counter()
        fn()
        cp.cuda.get_current_stream().synchronize()
        one = max(time.perf_counter() - t0, 1e-6)
        inner = max(1, min(1000, int(5e-3 / one)))   # about 5 ms per sample
        samples = []
        for _ in range(repeat):
            start, stop = sync_events()
            start.record()
            for _ in range(inner):
                fn()
            stop.record()
            stop.synchronize()
            samples.append(cp.cuda.get_elapsed_time(start, stop) / 1e3 / inner)
        return statistics.median(samples)
    return time_fn


def run(quick=False, out_dir="results", repeat=None, log=print):
    """Run the GPU benchmark; returns the rows written to ``bench_cuda.json``."""
    import cupy as cp

    import bnfast
    from . import info

    torch = _torch()
    repeat = repeat or (5 if quick else 11)
    dev = info()
    log(f"GPU benchmark on {dev.get('device')}: CuPy {dev.get('cupy')}, driver "
        f"{dev.get('driver')}, runtime {dev.get('runtime')}; PyTorch "
        f"{torch.__version__ if torch else 'not available (CUDA build needed)'}")
    time_fn = _timer(cp, lambda: (cp.cuda.Event(), cp.cuda.Event()))
    rows = []
    for shape in (QUICK_SHAPES if quick else SHAPES):
        for layout in (("cf",) if len(shape) == 2 else ("cf", "cl")):
            rows += _case(cp, torch, bnfast, shape, layout, time_fn, repeat, log)
            cp.get_default_memory_pool().free_all_blocks()
            if torch is not None:
                torch.cuda.empty_cache()
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "bench_cuda.json")
    with open(path, "w") as f:
        json.dump({"device": dev, "torch": torch.__version__ if torch else None,
                   "repeat": repeat, "rows": rows}, f, indent=1)
    log(f"\nwrote {path}")
    return rows


def _case(cp, torch, bnfast, shape, layout, time_fn, repeat, log):
    rng = cp.random.default_rng(0)
    C = shape[1]
    if layout == "cl":                         # the same tensor, channels-last in memory
        x = rng.standard_normal((shape[0],) + shape[2:] + (C,), dtype=cp.float32)
        axis = -1
    else:
        x = rng.standard_normal(shape, dtype=cp.float32)
        axis = 1
    dy = rng.standard_normal(x.shape, dtype=cp.float32)
    y, dx, copy_dst = cp.empty_like(x), cp.empty_like(x), cp.empty_like(x)
    w, b = cp.ones(C, cp.float32), cp.zeros(C, cp.float32)
    rm, rv = cp.zeros(C, cp.float32), cp.ones(C, cp.float32)
    _, mean, invstd = bnfast.batch_norm_train(x, w, b, axis=axis)
    nbytes = x.nbytes
    t_copy = time_fn(lambda: copy_dst.data.copy_from_device_async(x.data, nbytes), repeat)
    fns = {
        ("train", "bnfast"): lambda: bnfast.batch_norm_train(
            x, w, b, axis=axis, running_mean=rm, running_var=rv, out=y),
        ("infer", "bnfast"): lambda: bnfast.batch_norm_infer(x, rm, rv, w, b, axis=axis,
                                                             out=y),
        ("backward", "bnfast"): lambda: bnfast.batch_norm_backward(dy, x, mean, invstd, w,
                                                                   axis=axis, out=dx),
    }
    if torch is not None:
        fns.update(_torch_fns(torch, x, dy, w, b, layout))
    rows = []
    errors = {}
    label = "x".join(map(str, shape))
    for op in OPS:
        times = {}
        for impl in ("bnfast", "cudnn", "native"):
            fn = fns.get((op, impl))
            if fn is None:
                continue
            try:
                if impl == "native":
                    with torch.backends.cudnn.flags(enabled=False):
                        times[impl] = time_fn(fn, repeat)
                else:
                    times[impl] = time_fn(fn, repeat)
            except Exception as exc:        # recorded, and the other cases still run
                if impl == "bnfast":
                    raise
                log(f"   {impl} {op} failed: {type(exc).__name__}: {exc}")
                errors[f"{op}/{impl}"] = f"{type(exc).__name__}: {exc}"
        row = {"shape": list(shape), "layout": layout, "op": op, "bytes": nbytes,
               "copy_s": t_copy, **{f"{k}_s": v for k, v in times.items()},
               "errors": {k: v for k, v in errors.items() if k.startswith(op + "/")}}
        rows.append(row)
        ratio = " ".join(f"{k} {v * 1e3:8.3f} ms" for k, v in times.items())
        log(f"{label:>18s} {layout} {op:8s} copy {t_copy * 1e3:8.3f} ms  {ratio}  "
            f"bnfast/copy {times['bnfast'] / t_copy:5.2f}")
    return rows


def _torch_fns(torch, x, dy, w, b, layout):
    """PyTorch CUDA's batch norm on the same memory: forward, inference and backward
    (autograd), run with cuDNN enabled ("cudnn") and disabled ("native")."""
    F = torch.nn.functional
    tx = torch.as_tensor(x, device="cuda")
    tdy = torch.as_tensor(dy, device="cuda")
    if layout == "cl":                          # NHWC memory as an NCHW tensor
        perm = (0, tx.ndim - 1) + tuple(range(1, tx.ndim - 1))
        tx, tdy = tx.permute(perm), tdy.permute(perm)
    tw, tb = torch.as_tensor(w, device="cuda"), torch.as_tensor(b, device="cuda")
    trm, trv = torch.zeros_like(tw), torch.ones_like(tw)
    xg = tx.detach().requires_grad_(True)
    wg, bg = tw.detach().requires_grad_(True), tb.detach().requires_grad_(True)
    graphs = {}

    def backward(kind):
        def fn():
            if kind not in graphs:
                graphs[kind] = F.batch_norm(xg, None, None, wg, bg, training=True)
            torch.autograd.grad(graphs[kind], (xg, wg, bg), tdy, retain_graph=True)
        return fn

    out = {}
    for impl in ("cudnn", "native"):
        out[("train", impl)] = lambda: F.batch_norm(tx, trm, trv, tw, tb, training=True)
        out[("infer", impl)] = lambda: F.batch_norm(tx, trm, trv, tw, tb, training=False)
        out[("backward", impl)] = backward(impl)
    return out


def main(args):
    """``bnfast bench --device cuda``: exit status 2 with one line when there is no GPU."""
    from . import why_unavailable

    reason = why_unavailable()
    if reason is not None:
        print(f"bnfast bench --device cuda: the GPU backend is unavailable: {reason}",
              file=sys.stderr)
        return 2
    run(quick=args.quick, out_dir=args.out, repeat=args.repeat)
    return 0


if __name__ == "__main__":  # python -m bnfast.cuda._bench [--quick]
    import argparse

    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default="results")
    p.add_argument("--repeat", type=int, default=None)
    sys.exit(main(p.parse_args()))
