/*
 * The forward in one call, for one storage type T: training (statistics, coefficients,
 * normalisation under one plan) and inference (coefficients and normalisation).  One
 * crossing from Python each, one scratch allocation for the coefficients.
 */

/* invstd[c] = 1 / sqrt(var[c] + eps) (into inv, which may be NULL) and the normalisation's
 * scale[c] = invstd[c] * weight[c] (invstd without weight): 8 channels per vector (sqrt and
 * division are correctly rounded, so the bits are those of the scalar form) -- this was
 * 3.5 ns per channel in scalar code.  Returns the shift: bias itself, or shift filled with
 * 0 without bias (copying the bias was 14 % of this function's perf samples in an
 * inference of (1, 2048), about 0.25 us; with the widening of bnfast.h: 5.6 -> 5.2 us). */
static const double *BN_FN(coeffs)(ptrdiff_t C, const double *var, double eps,
                                   const double *weight, const double *bias, double *inv,
                                   double *scale, double *shift)
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
    if (bias) return bias;
    for (c = 0; c < C; c++) shift[c] = 0.0;
    return shift;
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
    double *sc = buf;
    const double *sh = BN_FN(coeffs)(C, var, eps, weight, bias, invstd, sc, buf + C);
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
    const double *sh = BN_FN(coeffs)(C, var, eps, weight, bias, NULL, buf, buf + C);
    const int st = BN_FN(normalize_planned)(&p, (const T *)xv, (T *)yv, mean, buf, sh,
                                            (flags & BN_FLAG_RELU) != 0);
    free(buf);
    return st;
}

/* The backward's per-channel coefficients (bnfast.h: backward_coeffs), 8 channels per
 * vector with the scalar form's IEEE operations (same bits).  Finiteness is summed, not
 * tested: v - v is 0 for a finite v and NaN otherwise, added up in a native accumulator
 * (bn_acc: a loop-carried 8-double vector lives in memory on AVX2 and SSE2); dweight's NaNs
 * become canonical afterwards.  In Cython (scalar, two divisions per channel) this was 8%
 * of the backward of (32, 8192). */
static inline __attribute__((always_inline)) int BN_FN(bwd_coeffs_case)(
    ptrdiff_t C, const double *sd, const double *sx, const double *inv, const double *weight,
    double cnt, double *dweight, double *kx, double *k0, const int coef, const int has_w)
{
    const bn_vd cv = bn_splat(cnt), zero = bn_splat(0.0);
    bn_acc fin = bn_acc_zero();
    ptrdiff_t c = 0;
    for (; c + 8 <= C; c += 8) {
        const bn_vd iv = bn_ldd(inv + c), s1 = bn_ldd(sd + c);
        const bn_vd wv = has_w ? bn_ldd(weight + c) : zero;
        const bn_vd a = has_w ? iv * wv : iv;
        const bn_vd dw = bn_ldd(sx + c) * iv;
        bn_std(dweight + c, dw);
        bn_std(kx + c, coef ? -(a * iv) * (dw / cv) : zero);
        bn_std(k0 + c, coef ? -a * (s1 / cv) : zero);
        fin = bn_acc_add(fin, ((dw - dw) + (s1 - s1)) + ((iv - iv) + (wv - wv)));
    }
    double f = bn_acc_hsum(fin);
    for (; c < C; c++) {
        const double a = has_w ? inv[c] * weight[c] : inv[c];
        const double dw = sx[c] * inv[c];
        dweight[c] = dw;
        kx[c] = coef ? -(a * inv[c]) * (dw / cnt) : 0.0;
        k0[c] = coef ? -a * (sd[c] / cnt) : 0.0;
        f += (dw - dw) + (sd[c] - sd[c]) + (inv[c] - inv[c]) +
             (has_w ? weight[c] - weight[c] : 0.0);
    }
    bn_canon_vec(dweight, C);
    return !(f == 0.0);
}

static int BN_FN(backward_coeffs)(ptrdiff_t C, const double *sd, const double *sx,
                                  const double *inv, const double *weight, double cnt,
                                  int training, double *dweight, double *kx, double *k0)
{
    const int coef = training && cnt > 0;
    if (coef)
        return weight ? BN_FN(bwd_coeffs_case)(C, sd, sx, inv, weight, cnt, dweight, kx, k0,
                                               1, 1)
                      : BN_FN(bwd_coeffs_case)(C, sd, sx, inv, weight, cnt, dweight, kx, k0,
                                               1, 0);
    return weight ? BN_FN(bwd_coeffs_case)(C, sd, sx, inv, weight, cnt, dweight, kx, k0, 0, 1)
                  : BN_FN(bwd_coeffs_case)(C, sd, sx, inv, weight, cnt, dweight, kx, k0, 0, 0);
}
