/*
 * Per-channel vector helpers for the Cython bindings (bnfast/_core.pyx), in C so that they
 * are compiled at -O3 and vectorised (the bindings' own code is compiled at -O1, which does
 * not vectorise: widening four float32 vectors of 2,048 channels took 3 us there).  Plain C
 * of the baseline instruction set; exact (float32 -> float64 is exact), so every variant
 * sees the same values.
 */
#ifndef BN_VECTORS_H
#define BN_VECTORS_H
#include <stddef.h>

/* dst[i] = (double)src[i] for i < n. */
void bn_widen_f32(const float *src, double *dst, ptrdiff_t n);

/* 1 when every v[i] >= 0 and v[i] + eps > 0 (no NaN), else 0: the variances that the
 * inference fast path accepts. */
int bn_var_ok(const double *v, ptrdiff_t n, double eps);

/* The backward kernels' per-channel scale and shift: a[c] = invstd[c] * weight[c] (invstd[c]
 * when weight is NULL), shift[c] = bias[c] (0 when bias is NULL). */
void bn_scale_shift(const double *invstd, const double *weight, const double *bias,
                    double *a, double *shift, ptrdiff_t n);

#endif
