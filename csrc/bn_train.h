/*
 * The forward in one call, for one storage type T: training (statistics, coefficients,
 * normalisation under one plan) and inference (coefficients and normalisation).  One
 * crossing from Python each, one scratch allocation for the coefficients.
 */

/* invstd[c] = 1 / sqrt(var[c] + eps) (into inv, which may be NULL), the normalisation's
 * scale[c] = invstd[c] * weight[c] (invstd without weight) and shift[c] = bias[c] (0
 * without bias): 8 channels per vector (sqrt and division are correctly rounded, so the
 * bits are those of the scalar form) -- this was 3.5 ns per channel in scalar code. */
static void BN_FN(coeffs)(ptrdiff_t C, const double *var, double eps, const double *weight,
                          const double *bias, double *inv, double *scale, double *shift)
{
    const bn_vd ev = bn_splat(eps), one = bn_splat(1.0);
    ptrdiff_t c = 0;
    for (; c + 8 <= C; c += 8) {
        const bn_vd iv = one / bn_vsqrt(bn_ldd(var + c) + ev);
        if (inv) bn_std(inv + c, iv);
        bn_std(scale + c, weight ? iv * bn_ldd(weight + c) : iv);
    }
    for (; c < C; c++) {
        const double iv = 1.0 / sqrt(var[c] + eps);
        if (inv) inv[c] = iv;
        scale[c] = weight ? iv * weight[c] : iv;
    }
    for (c = 0; c < C; c++) shift[c] = bias ? bias[c] : 0.0;
}

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
    BN_FN(coeffs)(C, var, eps, weight, bias, invstd, sc, sh);
    bn_canon_vec(invstd, C);
    st = BN_FN(normalize_planned)(&p, (const T *)xv, (T *)yv, mean, sc, sh,
                                  (flags & BN_FLAG_RELU) != 0);
    free(buf);
    return st;
}

static int BN_FN(infer_forward)(const void *xv, void *yv, ptrdiff_t N, ptrdiff_t C,
                                ptrdiff_t S, const double *mean, const double *var,
                                const double *weight, const double *bias, double eps,
                                int flags, int nthreads)
{
    bn_plan p;
    if (bn_plan_make(&p, BN_OP_INFER, N, C, S, (int)sizeof(T), BN_ISA, nthreads) != BN_OK)
        return BN_EINVAL;
    if (C == 0) return BN_OK;
    double *buf = (double *)malloc(sizeof(double) * 2 * (size_t)C);
    if (!buf) return BN_ENOMEM;
    BN_FN(coeffs)(C, var, eps, weight, bias, NULL, buf, buf + C);
    const int st = BN_FN(normalize_planned)(&p, (const T *)xv, (T *)yv, mean, buf, buf + C,
                                            (flags & BN_FLAG_RELU) != 0);
    free(buf);
    return st;
}
