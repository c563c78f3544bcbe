/*
 * bnfast: batch-normalisation kernels.
 *
 * The kernels never touch the Python API.  They work on C-contiguous data viewed as
 * (N, C, S): N outer rows, C channels, S inner elements per channel and row.  Channels-first
 * (N, C, H, W) has S = H*W; channels-last (N, H, W, C) is (N*H*W, C, 1).
 *
 * Every kernel returns a status code (BN_OK on success).
 *
 * Numerics: all arithmetic is done in double precision, whatever the storage type.
 * Statistics are computed per fixed block (two passes over a cache-resident block, then
 * Chan et al.'s pairwise update to combine blocks in a fixed order), so results do not
 * depend on the number of threads.  Every instruction-set variant uses the same lane
 * structure and the build disables floating-point contraction, so the variants give
 * bit-identical results too.
 */
#ifndef BNFAST_H
#define BNFAST_H

#include <stddef.h>
#include <stdint.h>
#include "bn_plan.h"

#ifdef __cplusplus
extern "C" {
#endif

enum {
    BN_OK = 0,
    BN_ENOMEM = 1,   /* scratch allocation failed */
    BN_EINVAL = 2,   /* invalid argument (should have been caught in Python) */
    BN_ENOISA = 3,   /* requested instruction set not supported by this CPU/build */
    BN_DECLINED = 4, /* backward_fused: the plan does not fuse this call (nothing written) */
    BN_EVAR = 5      /* infer: var rejected, nothing written (the fast path's fallback) */
};

enum { BN_ISA_BASELINE = 0, BN_ISA_AVX2 = 1, BN_ISA_AVX512 = 2, BN_ISA_COUNT = 3 };

/* Flags for the forward and backward kernels. */
enum {
    BN_FLAG_RELU = 1,      /* fused ReLU on the output / its gradient */
    BN_FLAG_EVAL = 2       /* backward: statistics are constants (eval mode) */
};

/*
 * moments: per-channel mean and biased variance (double outputs, length C).
 */
typedef int (*bn_moments_fn)(const void *x, ptrdiff_t N, ptrdiff_t C, ptrdiff_t S,
                             double *mean, double *var, int nthreads);

/*
 * backward_reduce: sum_dy[c] = sum g, sum_dyxmu[c] = sum g * (x - mean[c]),
 * with g = dy, or with BN_FLAG_RELU, g = dy where (x - mean)*scale + shift > 0 else 0.
 * NaN sums are the canonical quiet NaN.
 */
typedef int (*bn_backward_reduce_fn)(const void *dy, const void *x, ptrdiff_t N,
                                     ptrdiff_t C, ptrdiff_t S, const double *mean,
                                     const double *scale, const double *shift,
                                     double *sum_dy, double *sum_dyxmu, int flags,
                                     int nthreads);

/*
 * backward_dx: dx = k_dy[c] * g + k_x[c] * (x - mean[c]) + k_0[c], g as above.
 * dx may equal dy or x.
 */
typedef int (*bn_backward_dx_fn)(const void *dy, const void *x, void *dx, ptrdiff_t N,
                                 ptrdiff_t C, ptrdiff_t S, const double *mean,
                                 const double *scale, const double *shift,
                                 const double *k_dy, const double *k_x, const double *k_0,
                                 int flags, int nthreads);

/*
 * train_forward: statistics and normalisation in one call.  Writes mean, var (biased) and
 * invstd = 1/sqrt(var + eps) (length C) and y = (x - mean) * invstd * weight + bias
 * (weight/bias may be NULL for 1/0), optional ReLU.  y may equal x; the per-channel
 * vectors must not overlap y (bias is read while y is written).
 */
typedef int (*bn_train_forward_fn)(const void *x, void *y, ptrdiff_t N, ptrdiff_t C,
                                   ptrdiff_t S, const double *weight, const double *bias,
                                   double eps, double *mean, double *var, double *invstd,
                                   int flags, int nthreads);

/*
 * backward_coeffs: from the sums sd = sum(g), sx = sum(g * (x - mean)) over cnt values per
 * channel, dweight = sx * invstd (canonical NaN) and dx's coefficients with a = weight *
 * invstd: kx = -(a * invstd) * (dweight / cnt), k0 = -a * (sd / cnt) when training and
 * cnt > 0, else 0 (weight may be NULL for 1).  Returns 1 if a channel is degenerate (a
 * non-finite weight, invstd, sum(g) or dweight), else 0.  The same for both dtypes.
 */
typedef int (*bn_backward_coeffs_fn)(ptrdiff_t C, const double *sd, const double *sx,
                                     const double *invstd, const double *weight, double cnt,
                                     int training, double *dweight, double *kx, double *k0);

/*
 * widen_f32: dst[i] = (double)src[i] for i < n (exact, so every variant gives the same
 * values): the bindings' float32 per-channel vectors (mean, var, weight, bias, ...) in the
 * float64 the kernels take.  In the table so that it runs with the variant's vectors
 * (vectors.c's SSE2 loop was 19 % of the perf samples of a 5.9 us inference of (1, 2048)
 * with float32 parameters, four vectors of 2,048 channels; benchmarks/README.md item 61).
 */
typedef void (*bn_widen_fn)(const float *src, double *dst, ptrdiff_t n);

/*
 * infer: the inference, y = (x - mean[c]) * scale[c] + shift[c], then optional ReLU, with
 * the training forward's coefficients scale[c] = (1 / sqrt(var[c] + eps)) * weight[c]
 * (IEEE operations in double) and shift[c] = bias[c], from mean, var, weight and bias each
 * float32 (its BN_PAR_* bit set in f32) or float64; weight and bias may be NULL (1 and 0).
 * Every element is computed as the training forward normalises it (double arithmetic, or
 * float32 where the plan says: bn_plan.ew_f32).  Returns BN_OK; BN_EVAR, having written
 * nothing to y, if some var[c] is NaN or negative or var[c] + eps is 0; BN_ENOMEM; or
 * BN_EINVAL for arguments no caller passes (negative sizes, an unknown variant).  y
 * may equal x; the per-channel vectors must not overlap y.
 */
enum { BN_PAR_MEAN = 1, BN_PAR_VAR = 2, BN_PAR_WEIGHT = 4, BN_PAR_BIAS = 8 };
typedef int (*bn_infer_fn)(const void *x, void *y, ptrdiff_t N, ptrdiff_t C, ptrdiff_t S,
                           const void *mean, const void *var, const void *weight,
                           const void *bias, int f32, double eps, int flags, int nthreads);

/*
 * backward_fused: backward_reduce (with scale = weight * invstd and shift = bias, weight
 * and bias may be NULL for 1 and 0), backward_coeffs (with invstd, weight and cnt = N * S;
 * training unless BN_FLAG_EVAL) and backward_dx (with k_dy = scale) in one call, both
 * passes channel by channel, where the plan fuses the backward (plan.fused) and dx is
 * neither dy nor x; otherwise it returns BN_DECLINED having written nothing.  Writes what
 * those three write -- sum_dy, sum_dyxmu, dweight, k_x, k_0 and dx, the same bits -- and
 * *degenerate as backward_coeffs returns it (dx is then not to be used: the caller
 * recomputes the call, whose inputs dx did not overwrite).
 */
typedef int (*bn_backward_fused_fn)(const void *dy, const void *x, void *dx, ptrdiff_t N,
                                    ptrdiff_t C, ptrdiff_t S, const double *mean,
                                    const double *invstd, const double *weight,
                                    const double *bias, double *sum_dy, double *sum_dyxmu,
                                    double *dweight, double *k_x, double *k_0, int flags,
                                    int nthreads, int *degenerate);

typedef struct {
    const char *name;
    bn_moments_fn moments[2];                 /* [0] float32, [1] float64 */
    bn_infer_fn infer[2];                     /* per-channel vectors of either type */
    bn_backward_reduce_fn backward_reduce[2];
    bn_backward_dx_fn backward_dx[2];
    bn_train_forward_fn train_forward[2];
    bn_backward_coeffs_fn backward_coeffs[2];
    bn_widen_fn widen_f32;                    /* float32 -> float64 vectors */
    bn_backward_fused_fn backward_fused[2];
} bn_kernel_table;

/* Dispatch (dispatch.c). */
int bn_isa_compiled(int isa);            /* compiled into this build? */
int bn_isa_supported(int isa);           /* compiled and supported by this CPU? */
int bn_isa_default(void);                /* the default variant: best supported */
const char *bn_isa_name(int isa);
int bn_set_isa(int isa);                 /* BN_OK or BN_ENOISA */
int bn_get_isa(void);
const bn_kernel_table *bn_active(void);

/* Running statistics update (running_stats.c): r = (1 - m) r + m * batch, var unbiased. */
int bn_update_running_f32(float *rmean, float *rvar, ptrdiff_t rm_stride, ptrdiff_t rv_stride,
                          const double *mean, const double *var, ptrdiff_t C, double count,
                          double momentum);
int bn_update_running_f64(double *rmean, double *rvar, ptrdiff_t rm_stride, ptrdiff_t rv_stride,
                          const double *mean, const double *var, ptrdiff_t C, double count,
                          double momentum);

/* bench_copy.c: multithreaded copy in 1 MiB chunks (the benchmark's memory-bandwidth floor), with
 * non-temporal stores where the kernels would use them (see below). */
int bn_copy(const void *src, void *dst, size_t nbytes, int nthreads);

/* Build information. */
const char *bn_compiler(void);
int bn_openmp_version(void);             /* _OPENMP macro, 0 without OpenMP */
int bn_omp_max_threads(void);            /* omp_get_max_threads(), 1 without OpenMP */

#ifdef __cplusplus
}
#endif
#endif
