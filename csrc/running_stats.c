/* The running-statistics update of a training forward: r = (1 - m) r + m * batch, with the
 * variance made unbiased (count / (count - 1)).  Scalar and in double, so the same bits in
 * every variant. */
#include <stddef.h>
#include "bnfast.h"

#define BN_UPDATE_RUNNING(T)  /* the body of both functions, for element type T */                                                              \
    for (ptrdiff_t c = 0; c < C; c++) {                                                   \
        double unbiased = count > 1.0 ? var[c] * (count / (count - 1.0)) : var[c];        \
        T *pm = rmean + c * rm_stride, *pv = rvar + c * rv_stride;                        \
        *pm = (T)((1.0 - momentum) * (double)*pm + momentum * mean[c]);                   \
        *pv = (T)((1.0 - momentum) * (double)*pv + momentum * unbiased);                  \
    }                                                                                     \
    return BN_OK;

int bn_update_running_f32(float *rmean, float *rvar, ptrdiff_t rm_stride, ptrdiff_t rv_stride,
                          const double *mean, const double *var, ptrdiff_t C, double count,
                          double momentum)
{
    BN_UPDATE_RUNNING(float)
}

int bn_update_running_f64(double *rmean, double *rvar, ptrdiff_t rm_stride, ptrdiff_t rv_stride,
                          const double *mean, const double *var, ptrdiff_t C, double count,
                          double momentum)
{
    BN_UPDATE_RUNNING(double)
}

