/*
 * Per-channel vector helpers for the Cython bindings (bnfast/_core.pyx), in C so that they
 * are compiled at -O3 and vectorised (the bindings' own code is compiled at -O1, which does
 * not vectorise).  Plain C of the baseline instruction set.  The float32 -> float64
 * widening of parameter vectors is in the kernel tables instead (bnfast.h: widen_f32), with
 * each variant's vectors, and so is the inference's check of var (bn_train.h: infer_coeffs).
 */
#ifndef BN_VECTORS_H
#define BN_VECTORS_H
#include <stddef.h>

/* The backward kernels' per-channel scale and shift: a[c] = invstd[c] * weight[c] (invstd[c]
 * when weight is NULL), shift[c] = bias[c] (0 when bias is NULL). */
void bn_scale_shift(const double *invstd, const double *weight, const double *bias,
                    double *a, double *shift, ptrdiff_t n);

#endif
