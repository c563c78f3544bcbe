/*
 * Inner-loop microbenchmark behind benchmarks/README.md item 52: the columns layout's
 * register strip of the statistics (csrc/bn_stats.h: col_sums_reg, 64 columns of float32
 * in eight 8-double vectors down nr rows, shifted sums and sums of squares) as the kernel
 * compiles it for AVX-512 ("add"), against the same sums with the additions of the
 * accumulators issued as fma(v, 1, acc) ("fma-unit": the same bits, since v * 1 is exact;
 * on Zen 4 additions and multiply-adds run on different pipes).  x86-64 with AVX-512 (an
 * analysis tool, not part of the package):
 *
 *     gcc -O3 -mavx512f -ffp-contract=off benchmarks/strip_fma.c -o /tmp/sf && /tmp/sf 32 6272
 *
 * Arguments: rows, columns (a multiple of 64); (32, 6272) is (32, 128, 7, 7) seen as
 * columns, 800 KiB (L2).
 */
#include <immintrin.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
typedef double vd __attribute__((vector_size(64)));
static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + 1e-9 * t.tv_nsec;
}
static inline vd ld(const float *p) { return (vd)_mm512_cvtps_pd(_mm256_loadu_ps(p)); }
static inline vd fadd(vd v, vd acc)
{
    return (vd)_mm512_fmadd_pd((__m512d)v, _mm512_set1_pd(1.0), (__m512d)acc);
}
__attribute__((noinline)) static void strip(const float *blk, long nr, long Cp, const double *kc,
                                            double *s, double *q, int fma_unit)
{
    vd kv[8], sv[8], qv[8];
    for (int t = 0; t < 8; t++) {
        memcpy(&kv[t], kc + 8 * t, 64);
        sv[t] = (vd){0};
        qv[t] = (vd){0};
    }
    for (long r = 0; r < nr; r++) {
        const float *row = blk + r * Cp;
#pragma GCC unroll 8
        for (int t = 0; t < 8; t++) {
            vd d = ld(row + 8 * t) - kv[t];
            if (fma_unit) {
                sv[t] = fadd(d, sv[t]);
                qv[t] = (t & 1) ? fadd(d * d, qv[t]) : qv[t] + d * d;
            } else {
                sv[t] += d;
                qv[t] += d * d;
            }
        }
    }
    for (int t = 0; t < 8; t++) {
        memcpy(s + 8 * t, &sv[t], 64);
        memcpy(q + 8 * t, &qv[t], 64);
    }
}
int main(int argc, char **argv)
{
    long N = argc > 1 ? atol(argv[1]) : 32, Cp = argc > 2 ? atol(argv[2]) : 6272;
    Cp -= Cp % 64;
    float *x = aligned_alloc(64, (size_t)(N * Cp) * 4 + 64);
    double *kc = aligned_alloc(64, Cp * 8), *s = aligned_alloc(64, Cp * 8),
           *q = aligned_alloc(64, Cp * 8);
    for (long i = 0; i < N * Cp; i++) x[i] = (float)((i * 7) % 13) * 0.1f;
    for (long i = 0; i < Cp; i++) kc[i] = 0.5;
    const char *names[2] = {"add", "fma-unit"};
    for (int round = 0; round < 3; round++)
        for (int mode = 0; mode < 2; mode++) {
            double best = 1e9;
            for (int rep = 0; rep < 200; rep++) {
                double t = now();
                for (long c0 = 0; c0 < Cp; c0 += 64)
                    strip(x + c0, N, Cp, kc + c0, s + c0, q + c0, mode);
                t = now() - t;
                if (t < best) best = t;
            }
            printf("rows %ld, columns %ld, %-8s: %7.1f us, %.2f G elements/s\n", N, Cp,
                   names[mode], best * 1e6, N * Cp / best / 1e9);
        }
    return 0;
}
