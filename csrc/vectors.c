/* Per-channel vector helpers of the bindings (bn_vectors.h). */
#include "bn_vectors.h"
void bn_scale_shift(const double *invstd, const double *weight, const double *bias,
                    double *a, double *shift, ptrdiff_t n)
{
    if (weight)
        for (ptrdiff_t i = 0; i < n; i++) a[i] = invstd[i] * weight[i];
    else
        for (ptrdiff_t i = 0; i < n; i++) a[i] = invstd[i];
    if (bias)
        for (ptrdiff_t i = 0; i < n; i++) shift[i] = bias[i];
    else
        for (ptrdiff_t i = 0; i < n; i++) shift[i] = 0.0;
}
