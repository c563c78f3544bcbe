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

/* ---- the fused training forward (plan.fused) ---- */

/* One channel's statistics, a segment at a time: moments_rows's segments (BN_SEG of each
 * row), merged into the row group's partial in row order (row_moments_item) and the groups
 * into the channel's total in group order (moments_rows), so the same operations in the
 * same order and the same bits.  (row_moments_item's one-segment-per-row form makes the
 * same operations as bn_chan_merge.) */
typedef struct {
    const T *x;
    ptrdiff_t N, C, S, rpg, c;
    ptrdiff_t n, s0, i;    /* the segment at row n, offset s0; read up to its element i */
    double K;              /* the channel's shift */
    BN_FN(seg_accs) acc;   /* the segment's sums so far */
    double gn, gm, gq;     /* the current row group: count, mean(x - K), M2 */
    double tn, tm, tq;     /* the groups merged so far */
} BN_FN(chan_stats);

static void BN_FN(chan_stats_init)(BN_FN(chan_stats) *u, const bn_plan *p, const T *x,
                                   ptrdiff_t c)
{
    u->x = x;
    u->N = p->N;
    u->C = p->C;
    u->S = p->S;
    u->rpg = p->rows_per_group;
    u->c = c;
    u->n = u->s0 = u->i = 0;
    BN_FN(seg_accs_zero)(&u->acc);
    u->K = BN_FN(shift_of)(x, p->S, c);
    u->gn = u->gm = u->gq = u->tn = u->tm = u->tq = 0.0;
}

/* Elements of the channel read so far (N * S when done). */
static inline ptrdiff_t BN_FN(chan_stats_done)(const BN_FN(chan_stats) *u)
{
    return u->n * u->S + u->s0 + u->i;
}

/* Read up to BN_FUSE_CHUNK more elements of the current segment (seg_sums; a multiple of
 * 16 except at its end), and at its end finish it (seg_finish) and merge it. */
static void BN_FN(chan_stats_step)(BN_FN(chan_stats) *u)
{
    const ptrdiff_t S = u->S, L = S - u->s0 < BN_SEG ? S - u->s0 : BN_SEG;
    const ptrdiff_t L16 = L & ~(ptrdiff_t)15;
    const T *seg = u->x + (u->n * u->C + u->c) * S + u->s0;
    const ptrdiff_t i1 = L16 - u->i > BN_FUSE_CHUNK ? u->i + BN_FUSE_CHUNK : L16;
    BN_FN(seg_sums)(seg, u->i, i1, u->K, &u->acc);
    u->i = i1;
    if (i1 < L16) return;
    double bm, bq;
    BN_FN(seg_finish)(seg, L, u->K, &u->acc, &bm, &bq);
    BN_FN(seg_accs_zero)(&u->acc);
    u->i = 0;
    bn_chan_merge(&u->gn, &u->gm, &u->gq, (double)L, bm, bq);
    u->s0 += L;
    if (u->s0 < S) return;
    u->s0 = 0;
    u->n++;
    if (u->n % u->rpg == 0 || u->n == u->N) {   /* the end of a row group */
        bn_chan_merge(&u->tn, &u->tm, &u->tq, u->gn, u->gm, u->gq);
        u->gn = u->gm = u->gq = 0.0;
    }
}

/* The channel's mean and variance, as moments_planned gives them (its fixup and canonical
 * NaNs), then its coefficients as coeffs gives them (the scalar form: sqrt and division
 * are correctly rounded), into mean, var, invstd (index c) and *scale, *shift. */
static void BN_FN(chan_finish)(const BN_FN(chan_stats) *u, const double *weight,
                               const double *bias, double eps, double *mean, double *var,
                               double *invstd, double *scale, double *shift)
{
    const ptrdiff_t c = u->c;
    mean[c] = u->K + u->tm;
    var[c] = u->tq / u->tn;
    if (!(isfinite(mean[c]) && isfinite(var[c]))) {
        BN_FN(moments_fixup_chan)(u->x, u->N, u->C, u->S, c, mean, var);
        if (mean[c] != mean[c]) mean[c] = NAN;
        if (var[c] != var[c]) var[c] = NAN;
    }
    const double iv = 1.0 / sqrt(var[c] + eps);
    invstd[c] = iv == iv ? iv : NAN;
    *scale = weight ? iv * weight[c] : iv;
    *shift = bias ? bias[c] : 0.0;
}

/* Elements [s0, s0 + L) of row n of channel c normalised with its parameters (m, a, b in
 * double; q its float32 ones where the plan's arithmetic is float32): each element as the
 * two-pass normalisation computes it, whatever the span. */
static inline __attribute__((always_inline)) void BN_FN(fused_norm)(
    const bn_plan *p, const T *x, T *y, ptrdiff_t n, ptrdiff_t c, ptrdiff_t s0, ptrdiff_t L,
    const double *prm, const float *q, const int f32, const int relu, const int defer,
    int nts)
{
    const ptrdiff_t o = (n * p->C + c) * p->S + s0;
#if BN_IS_F32
    if (f32) {
        /* fb: one channel (Cp = S maps every position to index 0 of prm) */
        const BN_FN(nfb) fb = {prm, prm + 1, prm + 2, prm + 2, p->S, p->S};
        const BN_FN(fq) fq = {q, q + 1, q + 2, q + 2};
        BN_FN(f32_span)(BN_F32_NORM, NULL, x + o, y + o, L, fq, 0, &fb, s0, relu, defer, nts);
        return;
    }
#else
    (void)q;
    (void)f32;
    (void)defer;
#endif
    BN_FN(norm_span_s)(x + o, y + o, L, prm[0], prm[1], prm[2], relu, nts);
}

/* Channels [c0, c1) on one thread: the statistics of c0, then for each channel its
 * normalisation, BN_FUSE_CHUNK elements at a time, each followed by the next channel's
 * statistics up to the same count. */
static inline __attribute__((always_inline)) void BN_FN(fused_range_case)(
    const bn_plan *p, const T *x, T *y, ptrdiff_t c0, ptrdiff_t c1, const double *weight,
    const double *bias, double eps, double *mean, double *var, double *invstd, int nts,
    const int f32, const int relu, const int defer)
{
    const ptrdiff_t N = p->N, S = p->S;
    BN_FN(chan_stats) cur, nxt;
    if (c0 >= c1) return;
    BN_FN(chan_stats_init)(&cur, p, x, c0);
    while (cur.n < N) BN_FN(chan_stats_step)(&cur);
    for (ptrdiff_t c = c0; c < c1; c++) {
        double prm[3];
        float q[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        prm[0] = 0.0;
        BN_FN(chan_finish)(&cur, weight, bias, eps, mean, var, invstd, prm + 1, prm + 2);
        prm[0] = mean[c];
#if BN_IS_F32
        if (f32) BN_FN(f32_params)(1, BN_F32_NORM, prm, prm + 1, prm + 2, prm + 2, q, q + 1,
                                   q + 2, q + 3);
#endif
        const int more = c + 1 < c1;
        if (more) BN_FN(chan_stats_init)(&nxt, p, x, c + 1);
        for (ptrdiff_t n = 0; n < N; n++) {
            for (ptrdiff_t s0 = 0; s0 < S; s0 += BN_FUSE_CHUNK) {
                const ptrdiff_t L = S - s0 < BN_FUSE_CHUNK ? S - s0 : BN_FUSE_CHUNK;
                BN_FN(fused_norm)(p, x, y, n, c, s0, L, prm, q, f32, relu, defer, nts);
                if (more)
                    while (nxt.n < N && BN_FN(chan_stats_done)(&nxt) < n * S + s0 + L)
                        BN_FN(chan_stats_step)(&nxt);
            }
        }
        if (more) {
            while (nxt.n < N) BN_FN(chan_stats_step)(&nxt);
            cur = nxt;
        }
    }
    bn_stream_fence(nts);
}

static void BN_FN(fused_range)(const bn_plan *p, const T *x, T *y, ptrdiff_t c0, ptrdiff_t c1,
                               const double *weight, const double *bias, double eps,
                               double *mean, double *var, double *invstd, int nts, int f32,
                               int relu, int defer)
{
    if (f32)
        BN_BY_FLAGS(BN_FN(fused_range_case), relu, defer, p, x, y, c0, c1, weight, bias, eps,
                    mean, var, invstd, nts, 1);
    else
        BN_BY_FLAGS(BN_FN(fused_range_case), relu, 0, p, x, y, c0, c1, weight, bias, eps,
                    mean, var, invstd, nts, 0);
}

/* The training forward with plan.fused: the channels split into one contiguous range per
 * thread (any split gives the same bits: each channel is computed alone). */
static int BN_FN(train_fused)(const bn_plan *p, const T *x, T *y, const double *weight,
                              const double *bias, double eps, double *mean, double *var,
                              double *invstd, int relu)
{
    const ptrdiff_t C = p->C;
    const int nt = p->nthreads;
    const int nts = p->stream && ((uintptr_t)y & 15) == 0 && !bn_stream_alias(y, x, NULL);
    const int f32 = BN_IS_F32 && (relu ? p->ew_f32_relu : p->ew_f32);
    const int defer = x != y;
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1)
    for (int t = 0; t < nt; t++)
        BN_FN(fused_range)(p, x, y, C * t / nt, C * (t + 1) / nt, weight, bias, eps, mean,
                           var, invstd, nts, f32, relu, defer);
    return BN_OK;
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
    if (p.fused)
        return BN_FN(train_fused)(&p, (const T *)xv, (T *)yv, weight, bias, eps, mean, var,
                                  invstd, (flags & BN_FLAG_RELU) != 0);
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

/* ---- the fused backward (plan.fused) ---- */

/* One channel's backward sums, a piece at a time: backward_reduce's rows layout (each row's
 * sums by bwd_span_s added to its row group's, from zero, and the groups' added in order,
 * from zero), so the same bits. */
typedef struct {
    const T *dy, *x;
    ptrdiff_t N, C, S, rpg, c;
    ptrdiff_t n, i;          /* row n, read up to its element i */
    double m, a, b;          /* mean, scale and shift (the ReLU's mask) */
    int relu;
    BN_FN(bwd_accs) acc;     /* the row's vector sums so far */
    double gd, gx, td, tx;   /* the row group's sums; the groups' */
} BN_FN(chan_bsums);

static void BN_FN(chan_bsums_init)(BN_FN(chan_bsums) *u, const bn_plan *p, const T *dy,
                                   const T *x, ptrdiff_t c, double m, double a, double b,
                                   int relu)
{
    u->dy = dy;
    u->x = x;
    u->N = p->N;
    u->C = p->C;
    u->S = p->S;
    u->rpg = p->rows_per_group;
    u->c = c;
    u->n = u->i = 0;
    u->m = m;
    u->a = a;
    u->b = b;
    u->relu = relu;
    u->acc.d0 = u->acc.x0 = bn_acc_zero();
    u->gd = u->gx = u->td = u->tx = 0.0;
}

/* Read up to BN_FUSE_CHUNK more elements of the current row (a multiple of 8 except at its
 * end), and at its end finish it and add it up. */
static void BN_FN(chan_bsums_step)(BN_FN(chan_bsums) *u)
{
    const ptrdiff_t S = u->S, S8 = S & ~(ptrdiff_t)7, off = (u->n * u->C + u->c) * S;
    const ptrdiff_t i1 = S8 - u->i > BN_FUSE_CHUNK ? u->i + BN_FUSE_CHUNK : S8;
    BN_FN(bwd_sums)(u->dy + off, u->x + off, u->i, i1, u->m, u->a, u->b, u->relu, &u->acc);
    u->i = i1;
    if (i1 < S8) return;
    BN_FN(bwd_finish)(u->dy + off, u->x + off, S, u->m, u->a, u->b, u->relu, &u->acc, &u->gd,
                      &u->gx);
    u->acc.d0 = u->acc.x0 = bn_acc_zero();
    u->i = 0;
    u->n++;
    if (u->n % u->rpg == 0 || u->n == u->N) {   /* the end of a row group */
        u->td += u->gd;
        u->tx += u->gx;
        u->gd = u->gx = 0.0;
    }
}

static inline ptrdiff_t BN_FN(chan_bsums_done)(const BN_FN(chan_bsums) *u)
{
    return u->n * u->S + u->i;
}

typedef struct {
    const bn_plan *p;
    const T *dy, *x;
    T *dx;
    const double *mean, *invstd, *weight, *bias;
    double *sd, *sx, *dweight, *kx, *k0;
    int relu, eval, nts;
} BN_FN(bwd_fused_ctx);

/* Channel c's sums as backward_reduce leaves them (canonical NaNs), then its coefficients
 * as backward_coeffs computes them (its scalar form, the same operations as its vectors);
 * returns whether the channel is degenerate. */
static int BN_FN(chan_bwd_finish)(const BN_FN(bwd_fused_ctx) *k, const BN_FN(chan_bsums) *u)
{
    const ptrdiff_t c = u->c;
    const double cnt = (double)k->p->N * (double)k->p->S;
    const double sd = u->td == u->td ? u->td : NAN, sx = u->tx == u->tx ? u->tx : NAN;
    k->sd[c] = sd;
    k->sx[c] = sx;
    const double iv = k->invstd[c], w = k->weight ? k->weight[c] : 0.0;
    const double a = k->weight ? iv * w : iv, dw = sx * iv;
    const int coef = !k->eval && cnt > 0;
    k->dweight[c] = dw == dw ? dw : NAN;
    k->kx[c] = coef ? -(a * iv) * (dw / cnt) : 0.0;
    k->k0[c] = coef ? -a * (sd / cnt) : 0.0;
    return !(((dw - dw) + (sd - sd) + (iv - iv) + (k->weight ? w - w : 0.0)) == 0.0);
}

/* Elements [s0, s0 + L) of row n of channel c: dx as backward_dx computes each element. */
static inline __attribute__((always_inline)) void BN_FN(fused_dx)(
    const BN_FN(bwd_fused_ctx) *k, ptrdiff_t n, ptrdiff_t c, ptrdiff_t s0, ptrdiff_t L,
    const double *prm, const float *q, const int f32, const int relu, const int eval)
{
    const ptrdiff_t o = (n * k->p->C + c) * k->p->S + s0;
#if BN_IS_F32
    if (f32) {   /* prm: m, kd, kx (kd in eval), k0 (kd in eval); fb: one channel */
        const BN_FN(nfb) fb = {prm, prm + 1, prm + 2, prm + 3, k->p->S, k->p->S};
        const BN_FN(fq) fq = {q, q + 1, q + 2, q + 3};
        BN_FN(f32_span)(eval ? BN_F32_DXE : BN_F32_DX, k->dy + o, k->x + o, k->dx + o, L, fq, 0,
                        &fb, s0, 0, 1, k->nts);
        return;
    }
#else
    (void)q;
    (void)f32;
#endif
    /* prm: m, kd, kx, k0, a, b */
    BN_FN(dx_span)(k->dy + o, k->x + o, k->dx + o, L, prm, prm + 4, prm + 5, prm + 1, prm + 2,
                   prm + 3, 0, relu, eval, k->nts);
}

/* Channels [c0, c1) on one thread, as fused_range_case: the sums of c0, then for each
 * channel its dx, BN_FUSE_CHUNK elements at a time, each followed by the next channel's
 * sums up to the same count.  Returns whether a channel was degenerate. */
static inline __attribute__((always_inline)) int BN_FN(bwd_range_case)(
    const BN_FN(bwd_fused_ctx) *k, ptrdiff_t c0, ptrdiff_t c1, const int f32, const int relu,
    const int eval)
{
    const bn_plan *p = k->p;
    const ptrdiff_t N = p->N, S = p->S;
    BN_FN(chan_bsums) cur, nxt;
    int degenerate = 0;
    if (c0 >= c1) return 0;
#define BN_BSUMS_INIT(u, c)                                                                 \
    BN_FN(chan_bsums_init)(u, p, k->dy, k->x, c, k->mean[c],                                \
                           k->weight ? k->invstd[c] * k->weight[c] : k->invstd[c],          \
                           k->bias ? k->bias[c] : 0.0, relu)
    BN_BSUMS_INIT(&cur, c0);
    while (cur.n < N) BN_FN(chan_bsums_step)(&cur);
    for (ptrdiff_t c = c0; c < c1; c++) {
        degenerate |= BN_FN(chan_bwd_finish)(k, &cur);
        /* m, kd, kx, k0, a, b (bn_scale_shift's a and shift; kd = a) */
        double prm[6] = {cur.m, cur.a, k->kx[c], k->k0[c], cur.a, cur.b};
        float q[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        if (eval) prm[2] = prm[3] = prm[1];
#if BN_IS_F32
        if (f32) {
            BN_FN(f32_params)(1, eval ? BN_F32_DXE : BN_F32_DX, prm, prm + 1, prm + 2, prm + 3, q,
                              q + 1, q + 2, q + 3);
            if (eval) q[0] = q[2] = q[3] = q[1];   /* ew_f32: one array for eval's formula */
        }
#endif
        const int more = c + 1 < c1;
        if (more) BN_BSUMS_INIT(&nxt, c + 1);
        for (ptrdiff_t n = 0; n < N; n++) {
            for (ptrdiff_t s0 = 0; s0 < S; s0 += BN_FUSE_CHUNK) {
                const ptrdiff_t L = S - s0 < BN_FUSE_CHUNK ? S - s0 : BN_FUSE_CHUNK;
                BN_FN(fused_dx)(k, n, c, s0, L, prm, q, f32, relu, eval);
                if (more)
                    while (nxt.n < N && BN_FN(chan_bsums_done)(&nxt) < n * S + s0 + L)
                        BN_FN(chan_bsums_step)(&nxt);
            }
        }
        if (more) {
            while (nxt.n < N) BN_FN(chan_bsums_step)(&nxt);
            cur = nxt;
        }
    }
#undef BN_BSUMS_INIT
    bn_stream_fence(k->nts);
    return degenerate;
}

static int BN_FN(bwd_range)(const BN_FN(bwd_fused_ctx) *k, ptrdiff_t c0, ptrdiff_t c1, int f32)
{
    if (f32)   /* float32 dx has no ReLU form (the mask is the double y's) */
        return k->eval ? BN_FN(bwd_range_case)(k, c0, c1, 1, 0, 1)
                       : BN_FN(bwd_range_case)(k, c0, c1, 1, 0, 0);
    if (k->relu)
        return k->eval ? BN_FN(bwd_range_case)(k, c0, c1, 0, 1, 1)
                       : BN_FN(bwd_range_case)(k, c0, c1, 0, 1, 0);
    return k->eval ? BN_FN(bwd_range_case)(k, c0, c1, 0, 0, 1)
                   : BN_FN(bwd_range_case)(k, c0, c1, 0, 0, 0);
}

static int BN_FN(backward_fused)(const void *dyv, const void *xv, void *dxv, ptrdiff_t N,
                                 ptrdiff_t C, ptrdiff_t S, const double *mean,
                                 const double *invstd, const double *weight,
                                 const double *bias, double *sum_dy, double *sum_dyxmu,
                                 double *dweight, double *k_x, double *k_0, int flags,
                                 int nthreads, int *degenerate)
{
    bn_plan p;
    if (bn_plan_make(&p, BN_OP_BACKWARD, N, C, S, (int)sizeof(T), BN_ISA, nthreads) != BN_OK)
        return BN_EINVAL;
    *degenerate = 0;
    if (!p.fused || dxv == dyv || dxv == xv) return BN_DECLINED;
    const int relu = (flags & BN_FLAG_RELU) != 0, eval = (flags & BN_FLAG_EVAL) != 0;
    const int nts = p.stream && ((uintptr_t)dxv & 15) == 0 && !bn_stream_alias(dxv, dyv, xv);
    const int f32 = BN_IS_F32 && (relu ? p.ew_f32_relu : p.ew_f32);
    const BN_FN(bwd_fused_ctx) k = {&p, (const T *)dyv, (const T *)xv, (T *)dxv, mean, invstd,
                                    weight, bias, sum_dy, sum_dyxmu, dweight, k_x, k_0, relu,
                                    eval, nts};
    const int nt = p.nthreads;
    int bad = 0;
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1) reduction(| : bad)
    for (int t = 0; t < nt; t++) bad |= BN_FN(bwd_range)(&k, C * t / nt, C * (t + 1) / nt, f32);
    *degenerate = bad != 0;
    return BN_OK;
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
