/*
 * The training forward for one storage type T: statistics, the per-channel coefficients
 * and the normalisation in one call (one crossing from Python, one plan, one scratch
 * allocation for the coefficients).
 */
static int BN_FN(train_forward)(const void *xv, void *yv, ptrdiff_t N, ptrdiff_t C,
                                ptrdiff_t S, const double *weight, const double *bias,
                                double eps, double *mean, double *var, double *invstd,
                                int flags, int nthreads)
{
    bn_plan p;
    if (bn_plan_make(&p, BN_OP_TRAIN, N, C, S, (int)sizeof(T), BN_ISA, nthreads) != BN_OK)
        return BN_EINVAL;
    if (C == 0) return BN_OK;
    int st = BN_FN(moments_planned)(&p, (const T *)xv, mean, var);
    if (st != BN_OK) return st;
    double *buf = (double *)malloc(sizeof(double) * 2 * (size_t)C);
    if (!buf) return BN_ENOMEM;
    double *sc = buf, *sh = buf + C;
    for (ptrdiff_t c = 0; c < C; c++) {
        invstd[c] = 1.0 / sqrt(var[c] + eps);
        sc[c] = weight ? invstd[c] * weight[c] : invstd[c];
        sh[c] = bias ? bias[c] : 0.0;
    }
    bn_canon_vec(invstd, C);
    st = BN_FN(normalize_planned)(&p, (const T *)xv, (T *)yv, mean, sc, sh,
                                  (flags & BN_FLAG_RELU) != 0);
    free(buf);
    return st;
}
