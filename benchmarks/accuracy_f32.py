"""Float32 accuracy of bnfast and PyTorch against the float64 twin (bnfast.reference).

For channel sets of float32 data far from and near zero, with small and large spreads and
dy with a mean of 0 to 30 times its spread, compute the training forward (y) and the
backward's dx in float32 with bnfast and with PyTorch's CPU batch norm (its own float32
statistics, autograd), and the same from the float64 twin on the same float32 inputs.
Each set's error is the largest |result - twin| over its channels, in units of
FLT_EPSILON times the channel's largest |twin| value (y or dx); the script prints the
minimum, median and maximum of that over the sets, per implementation and output.

    python benchmarks/accuracy_f32.py [--sets 40] [--seed 0]

docs/user_guide/semantics.md ("float32 outputs") and benchmarks/README.md (items 57, 63)
quote its output.  Needs PyTorch (``pip install torch``).
"""
import argparse
import sys

import numpy as np

import bnfast
from bnfast import reference as ref

EPS32 = float(np.finfo(np.float32).eps)


def channel_sets(n_sets, seed):
    """(x, dy, weight, bias) float32 sets of shape (N, C) = (256, 8): the offsets, spreads
    and dy means cycle through the listed values, the scales drawn at random."""
    rng = np.random.default_rng(seed)
    offsets = [0.0, 1.0, -3.0, 10.0, 1e2, 1e3]
    dy_means = [0.0, 0.1, 1.0, 3.0, 30.0]
    for k in range(n_sets):
        loc = offsets[k % len(offsets)]
        spread = 10 ** rng.uniform(-2, 1)
        x = (loc + spread * rng.standard_normal((256, 8))).astype(np.float32)
        gs = 10 ** rng.uniform(-3, 1)
        dy = (gs * (rng.standard_normal((256, 8)) + dy_means[k % len(dy_means)]))
        w = (1.0 + 0.5 * rng.standard_normal(8)).astype(np.float32)
        b = (0.1 * rng.standard_normal(8)).astype(np.float32)
        yield x, dy.astype(np.float32), w, b


def rel_err(got, want):
    """The largest |got - want| over each channel, in FLT_EPSILON x the channel's max|want|;
    the largest over the channels."""
    got = np.asarray(got, np.float64)
    err = np.abs(got - want).max(0)
    top = np.abs(want).max(0)
    return float((err / (EPS32 * np.where(top > 0, top, 1.0))).max())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sets", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        sys.exit("accuracy_f32.py needs PyTorch: pip install torch")
    errs = {(impl, out): [] for impl in ("bnfast", "torch") for out in ("y", "dx")}
    for x, dy, w, b in channel_sets(args.sets, args.seed):
        y64, mean64, invstd64 = ref.batch_norm_train(x, w, b)
        dx64 = ref.batch_norm_backward(dy, x, mean64, invstd64, w)[0]
        y, mean, invstd = bnfast.batch_norm_train(x, w, b)
        dx = bnfast.batch_norm_backward(dy, x, mean, invstd, w)[0]
        errs["bnfast", "y"].append(rel_err(y, y64))
        errs["bnfast", "dx"].append(rel_err(dx, dx64))
        tx = torch.from_numpy(x).requires_grad_(True)
        ty = F.batch_norm(tx, None, None, torch.from_numpy(w), torch.from_numpy(b),
                          training=True)
        (tdx,) = torch.autograd.grad(ty, tx, torch.from_numpy(dy))
        errs["torch", "y"].append(rel_err(ty.detach().numpy(), y64))
        errs["torch", "dx"].append(rel_err(tdx.numpy(), dx64))
    print(f"bnfast {bnfast.__version__} (variant {bnfast.get_isa()}), PyTorch "
          f"{torch.__version__}; {args.sets} sets of (256, 8) float32, seed {args.seed}")
    print("error against the float64 twin, FLT_EPSILON x the channel's max|twin|, "
          "over the sets: min / median / max")
    for (impl, out), v in errs.items():
        print(f"  {impl:6s} {out:2s}: {min(v):10.3g} / {np.median(v):10.3g} / {max(v):10.3g}")
    return errs


if __name__ == "__main__":
    main()
