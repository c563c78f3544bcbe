/* The running-statistics update of a training forward: r = (1 - m) r + m * batch, with the
 * variance made unbiased (count / (count - 1)).  Scalar and in double, so the same bits in
 * every variant. */
#include <stddef.h>
#include "bnfast.h"

/* Channel c's new running mean and variance from the old ones (rm, rv) and the batch's. */
static inline void bn_running_step(double *rm, double *rv, double mean, double var,
                                   double count, double momentum)
{
    const double unbiased = count > 1.0 ? var * (count / (count - 1.0)) : var;
    *rm = (1.0 - momentum) * *rm + momentum * mean;
    *rv = (1.0 - momentum) * *rv + momentum * unbiased;
}

int bn_update_running_f32(float *rmean, float *rvar, ptrdiff_t rm_stride, ptrdiff_t rv_stride,
                          const double *mean, const double *var, ptrdiff_t C, double count,
                          double momentum)
{
    for (ptrdiff_t c = 0; c < C; c++) {
        double rm = (double)rmean[c * rm_stride], rv = (double)rvar[c * rv_stride];
        bn_running_step(&rm, &rv, mean[c], var[c], count, momentum);
        rmean[c * rm_stride] = (float)rm;
        rvar[c * rv_stride] = (float)rv;
    }
    return BN_OK;
}

int bn_update_running_f64(double *rmean, double *rvar, ptrdiff_t rm_stride, ptrdiff_t rv_stride,
                          const double *mean, const double *var, ptrdiff_t C, double count,
                          double momentum)
{
    for (ptrdiff_t c = 0; c < C; c++)
        bn_running_step(&rmean[c * rm_stride], &rvar[c * rv_stride], mean[c], var[c], count,
                        momentum);
    return BN_OK;
}
