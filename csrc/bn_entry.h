/*
 * Exported entry points of the per-dtype translation units.
 *
 * setup.py compiles each (variant, dtype) pair as its own unit, kernels_<isa>_f32.c and
 * kernels_<isa>_f64.c, so that the six compile in parallel.  Such a unit defines
 * BN_ONLY_DTYPE (32 or 64) and includes kernels_<isa>.c, whose bn_kernels.h then builds that
 * one dtype and includes this file at its end: each kernel (a static function, e.g.
 * moments_f32_avx2) gets an exported entry point of the same name with a "bn_" prefix
 * (bn_moments_f32_avx2) that calls it.  The kernels are the same code as in the one-unit
 * build (kernels_<isa>.c alone); kernel_tables.c puts the entry points in the tables that
 * dispatch.c selects from.
 *
 * The declarations use the function-pointer types of bnfast.h, so a definition below that
 * no longer matches them is a compile error, not a silent mismatch at link time.
 */
#ifndef BN_ENTRY_H
#define BN_ENTRY_H
#include "bnfast.h"

#define BN_ENTRY_TYPE(fnptr) __typeof__(*(fnptr)0)
#define BN_ENTRY_DECLARE_(sfx, isa)                                                       \
    extern BN_ENTRY_TYPE(bn_moments_fn) bn_moments_##sfx##_##isa;                         \
    extern BN_ENTRY_TYPE(bn_infer_fn) bn_infer_##sfx##_##isa;                             \
    extern BN_ENTRY_TYPE(bn_backward_reduce_fn) bn_backward_reduce_##sfx##_##isa;         \
    extern BN_ENTRY_TYPE(bn_backward_dx_fn) bn_backward_dx_##sfx##_##isa;                 \
    extern BN_ENTRY_TYPE(bn_train_forward_fn) bn_train_forward_##sfx##_##isa;            \
    extern BN_ENTRY_TYPE(bn_backward_coeffs_fn) bn_backward_coeffs_##sfx##_##isa;       \
    extern BN_ENTRY_TYPE(bn_backward_fused_fn) bn_backward_fused_##sfx##_##isa;
#define BN_ENTRY_DECLARE(sfx, isa) BN_ENTRY_DECLARE_(sfx, isa)
#endif /* BN_ENTRY_H */

#ifdef BN_ONLY_DTYPE   /* included from bn_kernels.h in a per-dtype unit: define them */
#if BN_ONLY_DTYPE == 32
#define BN_ENTRY_SFX f32
#elif BN_ONLY_DTYPE == 64
#define BN_ENTRY_SFX f64
#else
#error "BN_ONLY_DTYPE must be 32 or 64"
#endif
#define BN_KERNEL(name) BN_CAT(BN_CAT(name, BN_ENTRY_SFX), BN_SUFFIX)
#define BN_ENTRY(name) BN_CAT(bn, BN_KERNEL(name))

BN_ENTRY_DECLARE(BN_ENTRY_SFX, BN_SUFFIX)

int BN_ENTRY(moments)(const void *x, ptrdiff_t N, ptrdiff_t C, ptrdiff_t S, double *mean,
                      double *var, int nthreads)
{
    return BN_KERNEL(moments)(x, N, C, S, mean, var, nthreads);
}

int BN_ENTRY(infer)(const void *x, void *y, ptrdiff_t N, ptrdiff_t C, ptrdiff_t S,
                    const void *mean, const void *var, const void *weight, const void *bias,
                    int f32, double eps, int flags, int nthreads)
{
    return BN_KERNEL(infer)(x, y, N, C, S, mean, var, weight, bias, f32, eps, flags, nthreads);
}

int BN_ENTRY(backward_reduce)(const void *dy, const void *x, ptrdiff_t N, ptrdiff_t C,
                              ptrdiff_t S, const double *mean, const double *scale,
                              const double *shift, double *sum_dy, double *sum_dyxmu,
                              int flags, int nthreads)
{
    return BN_KERNEL(backward_reduce)(dy, x, N, C, S, mean, scale, shift, sum_dy, sum_dyxmu,
                                      flags, nthreads);
}

int BN_ENTRY(backward_dx)(const void *dy, const void *x, void *dx, ptrdiff_t N, ptrdiff_t C,
                          ptrdiff_t S, const double *mean, const double *scale,
                          const double *shift, const double *k_dy, const double *k_x,
                          const double *k_0, int flags, int nthreads)
{
    return BN_KERNEL(backward_dx)(dy, x, dx, N, C, S, mean, scale, shift, k_dy, k_x, k_0,
                                  flags, nthreads);
}

int BN_ENTRY(train_forward)(const void *x, void *y, ptrdiff_t N, ptrdiff_t C, ptrdiff_t S,
                            const double *weight, const double *bias, double eps,
                            double *mean, double *var, double *invstd, int flags,
                            int nthreads)
{
    return BN_KERNEL(train_forward)(x, y, N, C, S, weight, bias, eps, mean, var, invstd,
                                    flags, nthreads);
}

int BN_ENTRY(backward_coeffs)(ptrdiff_t C, const double *sd, const double *sx,
                              const double *invstd, const double *weight, double cnt,
                              int training, double *dweight, double *kx, double *k0)
{
    return BN_KERNEL(backward_coeffs)(C, sd, sx, invstd, weight, cnt, training, dweight, kx,
                                      k0);
}

int BN_ENTRY(backward_fused)(const void *dy, const void *x, void *dx, ptrdiff_t N,
                             ptrdiff_t C, ptrdiff_t S, const double *mean, const double *invstd,
                             const double *weight, const double *bias, double *sum_dy,
                             double *sum_dyxmu, double *dweight, double *k_x, double *k_0,
                             int flags, int nthreads, int *degenerate)
{
    return BN_KERNEL(backward_fused)(dy, x, dx, N, C, S, mean, invstd, weight, bias, sum_dy,
                                     sum_dyxmu, dweight, k_x, k_0, flags, nthreads,
                                     degenerate);
}

#if BN_ONLY_DTYPE == 32
/* bn_widen_f32_<isa> (bnfast.h: widen_f32), in the float32 unit only: widen_par
 * (bn_train.h), whose loop GCC vectorises with the variant's vectors. */
extern BN_ENTRY_TYPE(bn_widen_fn) BN_ENTRY(widen);   /* a mismatch is a compile error */
void BN_ENTRY(widen)(const float *src, double *dst, ptrdiff_t n)
{
    BN_KERNEL(widen_par)(src, dst, n);
}
#endif

#endif /* BN_ONLY_DTYPE */
