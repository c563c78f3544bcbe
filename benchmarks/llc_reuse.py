"""Does a second pass over a tensor larger than the last-level cache find any of it cached?
(benchmarks/README.md, item 53.)

1. After the statistics of a 72 MiB float32 tensor, the statistics of its last rows (read
   last, the most likely to be still cached) against those of its first rows.
2. A training forward as two passes (bnfast.batch_norm_train) against one channel at a
   time (its statistics, then its normalisation while its 1.15 MiB are cached), emulated
   with bnfast's own calls on a channel-major copy of the same data, and a copy.

    BNFAST_STREAM_MIN_BYTES=1048576 python benchmarks/llc_reuse.py

(the threshold lowered so that the per-channel calls, 1.15 MiB each, write with streaming
stores as the two-pass call does).  Run it on an idle machine; it prints medians (and
minima), on all of bnfast's threads.
"""
import time

import numpy as np

import bnfast

N, C, H, W = 32, 64, 96, 96
S = H * W


def med(f, rounds=7, min_time=0.15):
    out = []
    for _ in range(rounds):
        f()
        n, t = 0, time.perf_counter()
        while time.perf_counter() - t < min_time:
            f()
            n += 1
        out.append((time.perf_counter() - t) / n * 1e3)
    return float(np.median(out)), min(out)


def main():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((N, C, H, W), dtype=np.float32)
    print(f"{x.nbytes / 2**20:.0f} MiB, {bnfast.get_num_threads()} threads, "
          f"variant {bnfast.get_isa()}")

    # 1. the last rows against the first rows, each after a full pass
    for k in (4, 8, 12):
        for name, part in (("last", x[-k:]), ("first", x[:k])):
            ts = []
            for _ in range(30):
                bnfast.moments(x)
                t = time.perf_counter()
                bnfast.moments(part)
                ts.append(time.perf_counter() - t)
            print(f"  statistics of the {name:5s} {k:2d} rows ({part.nbytes / 2**20:4.1f} MiB) "
                  f"after a full pass: {np.median(ts) * 1e3:.3f} ms")
        rep = []
        for _ in range(30):
            bnfast.moments(x[-k:])
            t = time.perf_counter()
            bnfast.moments(x[-k:])
            rep.append(time.perf_counter() - t)
        print(f"  the same {k:2d} rows read twice in a row (second read): "
              f"{np.median(rep) * 1e3:.3f} ms")

    # 2. two passes against one channel at a time
    y = np.empty_like(x)
    xc = np.ascontiguousarray(x.reshape(N, C, S).transpose(1, 0, 2)).reshape(C, N, 1, S)
    yc = np.empty_like(xc)
    dst = np.empty_like(x)

    def two_passes():
        bnfast.batch_norm_train(x, out=y)

    def per_channel():
        for c in range(C):
            m, v = bnfast.moments(xc[c])
            bnfast.batch_norm_infer(xc[c], m, v, out=yc[c])

    def copy():
        np.copyto(dst, x)

    for name, f in (("training forward, two passes", two_passes),
                    ("one channel at a time", per_channel), ("np.copyto", copy)):
        m, lo = med(f)
        print(f"  {name:30s} {m:6.2f} ms (min {lo:.2f})")


if __name__ == "__main__":
    main()
