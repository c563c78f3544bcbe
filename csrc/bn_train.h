/*
 * The forward in one call, for one storage type T: training (statistics, coefficients,
 * normalisation under one plan) and inference (coefficients and normalisation).  One
 * crossing from Python each, one scratch allocation for the coefficients.
 */

/* The coefficients' loop: invstd[c] = 1 / sqrt(var[c] + eps) (into inv when has_inv) and
 * the normalisation's scale[c] = invstd[c] * weight[c] (invstd without weight: has_w 0),
 * 8 channels per vector (sqrt and division are correctly rounded, so the bits are those of
 * the scalar form) -- this was 3.5 ns per channel in scalar code.  With check, returns
 * whether every var[c] >= 0 and var[c] + eps > 0 (NaN fails; eps >= 0): with var >= 0,
 * var + eps is 0 exactly where invstd is infinite, and a NaN var gives a NaN invstd, so
 * the test is that no invstd is NaN or infinite (invstd - invstd is then NaN) and no var is
 * below 0 (-0 is not), both collected in a bn_nanacc.  Each case is a loop of its own
 * with no test between an 8-double value's definition and its use: a compare of the
 * 8-double type, or such a value live across a branch, GCC keeps in memory on AVX2 and
 * SSE2 (2,048 channels took 13-25 us instead of 2.3). */
static inline __attribute__((always_inline)) int BN_FN(coeffs_loop)(
    ptrdiff_t C, const double *var, double eps, const double *weight, double *inv,
    double *scale, const int has_w, const int has_inv, const int check)
{
    const bn_vd ev = bn_splat(eps), one = bn_splat(1.0);
    bn_nanacc bad = bn_nanacc_zero();
    ptrdiff_t c = 0;
    for (; c + 8 <= C; c += 8) {
        const bn_vd v = bn_ldd(var + c);
        const bn_vd iv = one / bn_vsqrt(v + ev);
        if (check) bad = bn_nanacc_neg(bn_nanacc_add(bad, iv - iv), v);
        if (has_inv) bn_std(inv + c, iv);
        bn_std(scale + c, has_w ? iv * bn_ldd(weight + c) : iv);
    }
    int good = !bn_nanacc_any(bad);
    for (; c < C; c++) {
        const double iv = 1.0 / sqrt(var[c] + eps);
        if (check) good &= (var[c] >= 0.0) & (var[c] + eps > 0.0);
        if (has_inv) inv[c] = iv;
        scale[c] = has_w ? iv * weight[c] : iv;
    }
    return good;
}

/* The coefficients (coeffs_loop) of the training forward.  Returns the
 * shift: bias itself, or shift filled with 0 without bias (copying the bias was 14 % of
 * this function's perf samples in an inference of (1, 2048), about 0.25 us). */
static const double *BN_FN(coeffs)(ptrdiff_t C, const double *var, double eps,
                                   const double *weight, const double *bias, double *inv,
                                   double *scale, double *shift)
{
    if (weight)
        inv ? BN_FN(coeffs_loop)(C, var, eps, weight, inv, scale, 1, 1, 0)
            : BN_FN(coeffs_loop)(C, var, eps, weight, inv, scale, 1, 0, 0);
    else
        inv ? BN_FN(coeffs_loop)(C, var, eps, weight, inv, scale, 0, 1, 0)
            : BN_FN(coeffs_loop)(C, var, eps, weight, inv, scale, 0, 0, 0);
    if (bias) return bias;
    for (ptrdiff_t c = 0; c < C; c++) shift[c] = 0.0;
    return shift;
}

/* n values of a per-channel vector, float32 widened exactly (a loop GCC vectorises). */
static void BN_FN(widen_par)(const float *src, double *dst, ptrdiff_t n)
{
    for (ptrdiff_t i = 0; i < n; i++) dst[i] = (double)src[i];
}

/* The inference's per-channel parameters (for infer): float32 mean and bias
 * widened into mean64 and shift, then the coefficients with the check, BN_PAR_BLOCK
 * channels at a time, float32 var and weight widened into that many doubles on the stack
 * (in L1) first, and the check of var in the same loop.  Widening the four float32
 * vectors into four allocations and a pass of its own for the check (bn_var_ok, gone) took
 * 2.0 of the 7.3 us of an inference of (1, 2048) from Python on Zen 3 (avx2), where the
 * divider alone takes 2.3 us for 2,048 channels (benchmarks/README.md item 76). */
#define BN_PAR_BLOCK 256
static int BN_FN(infer_coeffs)(ptrdiff_t C, const void *mean, const void *var,
                               const void *weight, const void *bias, int f32, double eps,
                               double *mean64, double *scale, double *shift)
{
    if (f32 & BN_PAR_MEAN) BN_FN(widen_par)((const float *)mean, mean64, C);
    if (!bias)
        for (ptrdiff_t c = 0; c < C; c++) shift[c] = 0.0;
    else if (f32 & BN_PAR_BIAS)
        BN_FN(widen_par)((const float *)bias, shift, C);
    const int vf = (f32 & BN_PAR_VAR) != 0, wf = weight && (f32 & BN_PAR_WEIGHT);
    double vb[BN_PAR_BLOCK], wb[BN_PAR_BLOCK];
    int good = 1;
    for (ptrdiff_t c0 = 0; c0 < C; c0 += BN_PAR_BLOCK) {
        const ptrdiff_t n = C - c0 < BN_PAR_BLOCK ? C - c0 : BN_PAR_BLOCK;
        const double *v = vb, *w = wb;
        if (vf)
            BN_FN(widen_par)((const float *)var + c0, vb, n);
        else
            v = (const double *)var + c0;
        if (!weight)
            w = NULL;
        else if (wf)
            BN_FN(widen_par)((const float *)weight + c0, wb, n);
        else
            w = (const double *)weight + c0;
        good &= weight ? BN_FN(coeffs_loop)(n, v, eps, w, NULL, scale + c0, 1, 0, 1)
                       : BN_FN(coeffs_loop)(n, v, eps, NULL, NULL, scale + c0, 0, 0, 1);
    }
    return good ? BN_OK : BN_EVAR;
}

/* The direct walk (plan.ew_walk BN_WALK_DIRECT, one element per channel): whether every
 * var[c] >= 0 and var[c] + eps > 0 (NaN fails), all of var checked before y, which may be
 * x, is written.  With var >= 0 and eps >= 0, var + eps is 0 only where both are, so the
 * test is var >= 0, or var > 0 when eps is 0: one compare per value in its own type (the
 * conversion is exact), a loop GCC vectorises (the literal test in double took 0.5 us for
 * 2,048 float32 values on Zen 3). */
static int BN_FN(var_ok)(ptrdiff_t C, const void *var, int vf, double eps)
{
    if (!(eps >= 0.0)) return 0;
    const int pos = eps == 0.0;   /* var > 0 needed */
    int bad = 0;
    if (vf) {
        const float *v = (const float *)var;
        if (pos)
            for (ptrdiff_t c = 0; c < C; c++) bad |= !(v[c] > 0.0f);
        else
            for (ptrdiff_t c = 0; c < C; c++) bad |= !(v[c] >= 0.0f);
    } else {
        const double *v = (const double *)var;
        if (pos)
            for (ptrdiff_t c = 0; c < C; c++) bad |= !(v[c] > 0.0);
        else
            for (ptrdiff_t c = 0; c < C; c++) bad |= !(v[c] >= 0.0);
    }
    return !bad;
}

/* n channels of the direct walk, parameters of type T (native) or double:
 * y[c] = (x[c] - m[c]) * ((1 / sqrt(v[c] + eps)) * w[c]) + b[c], optional ReLU -- the
 * operations of infer_coeffs and of the spans walk, so the same bits.  One loop per case:
 * an 8-double value live across a branch would go through memory (coeffs_loop). */
#define BN_DIRECT_LD(p, i)                                                                \
    (native ? BN_FN(ld)((const T *)(p) + (i)) : bn_ldd((const double *)(p) + (i)))
#define BN_DIRECT_S(p, i) (native ? (double)((const T *)(p))[i] : ((const double *)(p))[i])
static inline __attribute__((always_inline)) void BN_FN(direct_case)(
    const T *x, T *y, ptrdiff_t n, const void *m, const void *v, const void *w, const void *b,
    double eps, const int native, const int relu)
{
    const bn_vd ev = bn_splat(eps), one = bn_splat(1.0);
    bn_nanacc acc = bn_nanacc_zero();
    ptrdiff_t c = 0;
    if (relu) {
        for (; c + 8 <= n; c += 8) {
            const bn_vd sc = one / bn_vsqrt(BN_DIRECT_LD(v, c) + ev) * BN_DIRECT_LD(w, c);
            BN_FN(stx)(y + c, bn_vrelu((BN_FN(ld)(x + c) - BN_DIRECT_LD(m, c)) * sc +
                                       BN_DIRECT_LD(b, c)), 0, &acc);
        }
    } else {
        for (; c + 8 <= n; c += 8) {
            const bn_vd sc = one / bn_vsqrt(BN_DIRECT_LD(v, c) + ev) * BN_DIRECT_LD(w, c);
            BN_FN(stx)(y + c, (BN_FN(ld)(x + c) - BN_DIRECT_LD(m, c)) * sc +
                                  BN_DIRECT_LD(b, c), 0, &acc);
        }
    }
    if (bn_nanacc_any(acc)) BN_FN(canon_mem)(y, c);
    T tmp[8];
    for (ptrdiff_t k = 0; k < n - c; k++) {
        const double sc = 1.0 / sqrt(BN_DIRECT_S(v, c + k) + eps) * BN_DIRECT_S(w, c + k);
        tmp[k] = BN_FN(norm_one)(x[c + k], BN_DIRECT_S(m, c + k), sc, BN_DIRECT_S(b, c + k),
                                 relu);
    }
    BN_FN(store_tail)(y + c, tmp, n - c, 0);
}
#undef BN_DIRECT_LD
#undef BN_DIRECT_S

typedef struct {
    const T *x;
    T *y;
    const void *m, *v, *w, *b;
    int f32;
    double eps;
    int relu;
} BN_FN(direct_ctx);

/* Channels [c0, c1) of the direct walk, BN_PAR_BLOCK at a time: the parameters as given
 * where all are of type T (absent weight and bias read as blocks of 1 and 0: v * 1 and
 * v + 0 are what the other walks compute), else each float32 one widened (in L1). */
static void BN_FN(direct_range)(const void *ctx, ptrdiff_t c0, ptrdiff_t c1)
{
    const BN_FN(direct_ctx) *k = ctx;
    static const T ones_t[BN_PAR_BLOCK] = {[0 ... BN_PAR_BLOCK - 1] = 1},
                   zeros_t[BN_PAR_BLOCK];
    static const double ones_d[BN_PAR_BLOCK] = {[0 ... BN_PAR_BLOCK - 1] = 1.0},
                        zeros_d[BN_PAR_BLOCK];
    /* the vectors given (BN_PAR_* bits), and whether all of them are of type T */
    const int given = BN_PAR_MEAN | BN_PAR_VAR | (k->w ? BN_PAR_WEIGHT : 0) |
                      (k->b ? BN_PAR_BIAS : 0);
    const int native = BN_IS_F32 ? (k->f32 & given) == given : (k->f32 & given) == 0;
    double buf[4][BN_PAR_BLOCK];
    for (ptrdiff_t j = c0; j < c1; j += BN_PAR_BLOCK) {
        const ptrdiff_t n = c1 - j < BN_PAR_BLOCK ? c1 - j : BN_PAR_BLOCK;
        const void *q[4] = {k->m, k->v, k->w, k->b};   /* q[i]: BN_PAR_* bit 1 << i */
        for (int i = 0; i < 4; i++) {
            if (!q[i])         /* weight (i = 2) or bias (3) absent */
                q[i] = native ? (i == 2 ? (const void *)ones_t : (const void *)zeros_t)
                              : (i == 2 ? (const void *)ones_d : (const void *)zeros_d);
            else if (native || !(k->f32 & (1 << i)))
                q[i] = (const char *)q[i] + j * (native ? (ptrdiff_t)sizeof(T) : 8);
            else {
                BN_FN(widen_par)((const float *)q[i] + j, buf[i], n);
                q[i] = buf[i];
            }
        }
        if (BN_IS_F32 && native)
            k->relu ? BN_FN(direct_case)(k->x + j, k->y + j, n, q[0], q[1], q[2], q[3], k->eps,
                                         1, 1)
                    : BN_FN(direct_case)(k->x + j, k->y + j, n, q[0], q[1], q[2], q[3], k->eps,
                                         1, 0);
        else
            k->relu ? BN_FN(direct_case)(k->x + j, k->y + j, n, q[0], q[1], q[2], q[3], k->eps,
                                         0, 1)
                    : BN_FN(direct_case)(k->x + j, k->y + j, n, q[0], q[1], q[2], q[3], k->eps,
                                         0, 0);
    }
}

/* The inference (bnfast.h: infer) under its plan: the direct walk, or the coefficients
 * (infer_coeffs, which checks var) into one allocation and then the normalisation. */
static int BN_FN(infer)(const void *xv, void *yv, ptrdiff_t N, ptrdiff_t C, ptrdiff_t S,
                        const void *mean, const void *var, const void *weight,
                        const void *bias, int f32, double eps, int flags, int nthreads)
{
    bn_plan p;
    if (bn_plan_make(&p, BN_OP_INFER, N, C, S, (int)sizeof(T), BN_ISA, nthreads) != BN_OK)
        return BN_EINVAL;
    const int relu = (flags & BN_FLAG_RELU) != 0;
    if (p.layout == BN_LAYOUT_COLUMNS && p.ew_walk == BN_WALK_DIRECT) {
        if (!BN_FN(var_ok)(C, var, (f32 & BN_PAR_VAR) != 0, eps)) return BN_EVAR;
        const BN_FN(direct_ctx) k = {(const T *)xv, (T *)yv, mean, var, weight, bias, f32,
                                     eps, relu};
        BN_FN(run_ew_items)(&p, BN_FN(direct_range), &k);
        return BN_OK;
    }
    double *buf = (double *)malloc(sizeof(double) * 3 * (size_t)(C > 0 ? C : 1));
    if (!buf) return BN_ENOMEM;
    int st = BN_FN(infer_coeffs)(C, mean, var, weight, bias, f32, eps, buf, buf + C,
                                 buf + 2 * C);
    if (st == BN_OK)
        st = BN_FN(normalize_planned)(
            &p, (const T *)xv, (T *)yv, (f32 & BN_PAR_MEAN) ? buf : (const double *)mean,
            buf + C, !bias || (f32 & BN_PAR_BIAS) ? buf + 2 * C : (const double *)bias, relu);
    free(buf);
    return st;
}

/* ---- the fused training forward (plan.fused) ---- */

/*
 * Both passes channel by channel: the threads share each channel, thread t of nt taking
 * the rows of row groups [G t / nt, G (t + 1) / nt), and each normalises its rows of
 * channel c, 1024 elements at a time, while it reads as many of its rows of channel c + 1
 * for their statistics; a barrier per channel, then every thread merges the groups'
 * partials of c + 1 in group order.  A thread rereads what it read one channel before: its
 * share of a channel, which its L2 (1 MiB a core here) can still hold.  (Whole channels
 * per thread, tried first, left the reuse to the shared L3, and a quarter of the processes
 * ran 10-20 % slower than the two passes: benchmarks/README.md item 71.)  The segments,
 * the merges in their order, the fixup and every element's formula are those of the two
 * passes.
 */

/* One channel's statistics over rows [n0, n1) (whole row groups), a piece at a time:
 * moments_rows's segments (BN_SEG of each row), merged into the row group's partial in row
 * order (row_moments_item; its one-segment-per-row form makes bn_chan_merge's operations),
 * each group's partial stored at part + 3 g (count, mean(x - K), M2). */
typedef struct {
    const T *x;
    ptrdiff_t C, S, rpg, c, n1;
    ptrdiff_t n, s0, i;    /* the segment at row n, offset s0; read up to its element i */
    double K;              /* the channel's shift */
    BN_FN(seg_accs) acc;   /* the segment's sums so far */
    double gn, gm, gq;     /* the current row group's partial */
    double *part;
} BN_FN(chan_stats);

static void BN_FN(chan_stats_init)(BN_FN(chan_stats) *u, const bn_plan *p, const T *x,
                                   ptrdiff_t c, ptrdiff_t n0, ptrdiff_t n1, double *part)
{
    u->x = x;
    u->C = p->C;
    u->S = p->S;
    u->rpg = p->rows_per_group;
    u->c = c;
    u->n = n0;
    u->n1 = n1;
    u->s0 = u->i = 0;
    u->K = BN_FN(shift_of)(x, p->S, c);
    BN_FN(seg_accs_zero)(&u->acc);
    u->gn = u->gm = u->gq = 0.0;
    u->part = part;
}

/* Elements of rows [n0, n1) read so far, counted from row 0. */
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
    BN_FN(seg_sums)(seg, u->i, i1, u->K, &u->acc, 1);   /* from DRAM (fused): prefetch */
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
    if (u->n % u->rpg == 0 || u->n == u->n1) {   /* the end of a row group */
        double *g = u->part + 3 * ((u->n - 1) / u->rpg);
        g[0] = u->gn;
        g[1] = u->gm;
        g[2] = u->gq;
        u->gn = u->gm = u->gq = 0.0;
    }
}

/* Channel c's mean and variance from its G groups' partials and its shift K, as
 * moments_planned gives them (the groups merged in order, its fixup, canonical NaNs), then
 * its coefficients by coeffs (one channel: its scalar form, whose correctly rounded sqrt
 * and division give its vectors' bits): prm = {mean, scale, shift}, *var and *invstd.  x is read only by the fixup of
 * a result that is not finite, after a barrier (the same on every thread: the partials
 * are shared), and before another (an output may be x itself: no thread normalises the
 * channel before every thread has read it). */
static void BN_FN(chan_finish)(const bn_plan *p, const T *x, ptrdiff_t c, double K,
                               const double *part, const double *weight, const double *bias,
                               double eps, double *prm, double *var, double *invstd)
{
    double n = 0.0, m = 0.0, q = 0.0;
    for (ptrdiff_t g = 0; g < p->row_groups; g++)
        bn_chan_merge(&n, &m, &q, part[3 * g], part[3 * g + 1], part[3 * g + 2]);
    double mc = K + m, vc = q / n;
    if (!(isfinite(mc) && isfinite(vc))) {
        BN_FN(moments_fixup_chan)(x, p->N, p->C, p->S, c, &mc, &vc);
        if (mc != mc) mc = NAN;
        if (vc != vc) vc = NAN;
#pragma omp barrier
    }
    double iv;
    prm[0] = mc;
    prm[2] = *BN_FN(coeffs)(1, &vc, eps, weight ? weight + c : NULL, bias ? bias + c : NULL,
                            &iv, prm + 1, prm + 2);
    bn_canon_vec(&iv, 1);
    *var = vc;
    *invstd = iv;
}

/* Elements [s0, s0 + L) of row n of channel c normalised with its parameters (prm: m, a, b
 * in double; q: its float32 ones where the plan's arithmetic is float32): each element as
 * the two-pass normalisation computes it, whatever the span. */
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

/* Thread t of nt takes the rows [*n0, *n1) of row groups [G t / nt, G (t + 1) / nt) (none
 * where G < nt: it still meets every barrier). */
static inline void BN_FN(fused_share)(const bn_plan *p, int t, int nt, ptrdiff_t *n0,
                                      ptrdiff_t *n1)
{
    const ptrdiff_t G = p->row_groups, rpg = p->rows_per_group;
    const ptrdiff_t g0 = G * t / nt, g1 = G * (t + 1) / nt;
    *n0 = g0 * rpg;
    *n1 = g1 * rpg < p->N ? g1 * rpg : p->N;
}

/* Both fused passes' loop over a thread's rows [n0, n1) of channel c: each piece of
 * BN_FUSE_CHUNK elements (row n, offset s0, length L) written by the statement given last,
 * then the cursor u of channel c + 1 (where `more`) read up to the same count with DONE
 * and STEP; then the rest of u. */
#define BN_FUSED_PIPELINE(DONE, STEP, ...)                                                  \
    do {                                                                                    \
        for (ptrdiff_t n = n0; n < n1; n++) {                                               \
            for (ptrdiff_t s0 = 0; s0 < S; s0 += BN_FUSE_CHUNK) {                           \
                const ptrdiff_t L = S - s0 < BN_FUSE_CHUNK ? S - s0 : BN_FUSE_CHUNK;        \
                __VA_ARGS__;                                                                \
                if (more)                                                                   \
                    while (u.n < n1 && DONE(&u) < n * S + s0 + L) STEP(&u);                 \
            }                                                                               \
        }                                                                                   \
        if (more)                                                                           \
            while (u.n < n1) STEP(&u);                                                      \
    } while (0)

typedef struct {
    const bn_plan *p;
    const T *x;
    T *y;
    const double *weight, *bias;
    double eps, *mean, *var, *invstd;
    double *part;            /* two sets of 3 G group partials, for channels c and c + 1 */
    int nts;
} BN_FN(fused_ctx);

/* The rows [n0, n1) of every channel on one of the threads (thread 0 writes the
 * per-channel outputs), the flags constant. */
static inline __attribute__((always_inline)) void BN_FN(fused_rows_case)(
    const BN_FN(fused_ctx) *k, int t, ptrdiff_t n0, ptrdiff_t n1, const int f32,
    const int relu, const int defer)
{
    const bn_plan *p = k->p;
    const ptrdiff_t C = p->C, S = p->S, G = p->row_groups;
    BN_FN(chan_stats) u;
    BN_FN(chan_stats_init)(&u, p, k->x, 0, n0, n1, k->part);
    while (u.n < n1) BN_FN(chan_stats_step)(&u);
#pragma omp barrier
    for (ptrdiff_t c = 0; c < C; c++) {
        double prm[3], v, iv;
        float q[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        BN_FN(chan_finish)(p, k->x, c, u.K, k->part + 3 * G * (c & 1), k->weight, k->bias,
                           k->eps, prm, &v, &iv);
        if (t == 0) {
            k->mean[c] = prm[0];
            k->var[c] = v;
            k->invstd[c] = iv;
        }
#if BN_IS_F32
        if (f32) BN_FN(f32_params)(1, BN_F32_NORM, prm, prm + 1, prm + 2, prm + 2, q, q + 1,
                                   q + 2, q + 3);
#endif
        const int more = c + 1 < C;
        if (more) BN_FN(chan_stats_init)(&u, p, k->x, c + 1, n0, n1,
                                         k->part + 3 * G * ((c + 1) & 1));
        BN_FUSED_PIPELINE(BN_FN(chan_stats_done), BN_FN(chan_stats_step),
                          BN_FN(fused_norm)(p, k->x, k->y, n, c, s0, L, prm, q, f32, relu,
                                            defer, k->nts));
#pragma omp barrier
    }
    bn_stream_fence(k->nts);
}

/* This thread's share (fused_share), the flags as constants. */
static void BN_FN(fused_rows)(const BN_FN(fused_ctx) *k, int t, int nt, int f32, int relu,
                              int defer)
{
    ptrdiff_t n0, n1;
    BN_FN(fused_share)(k->p, t, nt, &n0, &n1);
    if (f32)
        BN_BY_FLAGS(BN_FN(fused_rows_case), relu, defer, k, t, n0, n1, 1);
    else
        BN_BY_FLAGS(BN_FN(fused_rows_case), relu, 0, k, t, n0, n1, 0);
}

/* The training forward with plan.fused. */
static int BN_FN(train_fused)(const bn_plan *p, const T *x, T *y, const double *weight,
                              const double *bias, double eps, double *mean, double *var,
                              double *invstd, int relu)
{
    double *part = (double *)malloc(sizeof(double) * 6 * (size_t)p->row_groups);
    if (!part) return BN_ENOMEM;
    const int nts = p->stream && ((uintptr_t)y & 15) == 0 && !bn_stream_alias(y, x, NULL);
    const int f32 = BN_IS_F32 && (relu ? p->ew_f32_relu : p->ew_f32);
    const BN_FN(fused_ctx) k = {p, x, y, weight, bias, eps, mean, var, invstd, part, nts};
    const int nt = p->nthreads;
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
        int t = 0, team = 1;
#ifdef _OPENMP
        t = omp_get_thread_num();
        team = omp_get_num_threads();
#endif
        BN_FN(fused_rows)(&k, t, team, f32, relu, x != y);
    }
    free(part);
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

/* ---- the fused backward (plan.fused) ---- */

/* One channel's backward sums over rows [n0, n1) (whole row groups), a piece at a time:
 * backward_reduce's rows layout (each row's sums by bwd_span_s added to its row group's,
 * from zero), each group's sums stored at part + 2 g; the groups are added in order, from
 * zero, by chan_bwd_finish. */
typedef struct {
    const T *dy, *x;
    ptrdiff_t C, S, rpg, c, n1;
    ptrdiff_t n, i;          /* row n, read up to its element i */
    double m, a, b;          /* mean, scale and shift (the ReLU's mask) */
    int relu;
    BN_FN(bwd_accs) acc;     /* the row's vector sums so far */
    double gd, gx;           /* the row group's sums */
    double *part;
} BN_FN(chan_bsums);

static void BN_FN(chan_bsums_init)(BN_FN(chan_bsums) *u, const bn_plan *p, const T *dy,
                                   const T *x, ptrdiff_t c, ptrdiff_t n0, ptrdiff_t n1,
                                   double m, double a, double b, int relu, double *part)
{
    u->dy = dy;
    u->x = x;
    u->C = p->C;
    u->S = p->S;
    u->rpg = p->rows_per_group;
    u->c = c;
    u->n = n0;
    u->n1 = n1;
    u->i = 0;
    u->m = m;
    u->a = a;
    u->b = b;
    u->relu = relu;
    u->acc.d0 = u->acc.x0 = bn_acc_zero();
    u->gd = u->gx = 0.0;
    u->part = part;
}

/* Read up to BN_FUSE_CHUNK more elements of the current row (a multiple of 8 except at its
 * end), and at its end finish it and add it to its group's sums. */
static void BN_FN(chan_bsums_step)(BN_FN(chan_bsums) *u)
{
    const ptrdiff_t S = u->S, S8 = S & ~(ptrdiff_t)7, off = (u->n * u->C + u->c) * S;
    const ptrdiff_t i1 = S8 - u->i > BN_FUSE_CHUNK ? u->i + BN_FUSE_CHUNK : S8;
    BN_FN(bwd_sums)(u->dy + off, u->x + off, u->i, i1, u->m, u->a, u->b, u->relu, &u->acc,
                    1);   /* from DRAM (the plan fuses beyond the cache only): prefetch */
    u->i = i1;
    if (i1 < S8) return;
    BN_FN(bwd_finish)(u->dy + off, u->x + off, S, u->m, u->a, u->b, u->relu, &u->acc, &u->gd,
                      &u->gx);
    u->acc.d0 = u->acc.x0 = bn_acc_zero();
    u->i = 0;
    u->n++;
    if (u->n % u->rpg == 0 || u->n == u->n1) {   /* the end of a row group */
        double *g = u->part + 2 * ((u->n - 1) / u->rpg);
        g[0] = u->gd;
        g[1] = u->gx;
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
    double *part;            /* two sets of 2 G group sums, for channels c and c + 1 */
    int relu, eval, nts;
} BN_FN(bwd_fused_ctx);

/* Channel c's sums from its groups' (in order, from zero; canonical NaNs, as
 * backward_reduce leaves them), then its coefficients by backward_coeffs (one channel: its
 * scalar form, the same operations as its vectors): prm = {m, kd, kx, k0, a, b} (kx and k0
 * kd in eval mode, as ew_f32 reads them), written out by thread 0; returns whether the
 * channel is degenerate. */
static int BN_FN(chan_bwd_finish)(const BN_FN(bwd_fused_ctx) *k, ptrdiff_t c,
                                  const double *part, int t, double *prm)
{
    const bn_plan *p = k->p;
    double sd = 0.0, sx = 0.0, dw, kx, k0;
    for (ptrdiff_t g = 0; g < p->row_groups; g++) {
        sd += part[2 * g];
        sx += part[2 * g + 1];
    }
    bn_canon_vec(&sd, 1);
    bn_canon_vec(&sx, 1);
    const int bad = BN_FN(backward_coeffs)(1, &sd, &sx, k->invstd + c,
                                           k->weight ? k->weight + c : NULL,
                                           (double)p->N * (double)p->S, !k->eval, &dw, &kx,
                                           &k0);
    if (t == 0) {
        k->sd[c] = sd;
        k->sx[c] = sx;
        k->dweight[c] = dw;
        k->kx[c] = kx;
        k->k0[c] = k0;
    }
    const double a = k->weight ? k->invstd[c] * k->weight[c] : k->invstd[c];
    prm[0] = k->mean[c];
    prm[1] = a;
    prm[2] = k->eval ? a : kx;
    prm[3] = k->eval ? a : k0;
    prm[4] = a;
    prm[5] = k->bias ? k->bias[c] : 0.0;
    return bad;
}

/* Elements [s0, s0 + L) of row n of channel c: dx as backward_dx computes each element. */
static inline __attribute__((always_inline)) void BN_FN(fused_dx)(
    const BN_FN(bwd_fused_ctx) *k, ptrdiff_t n, ptrdiff_t c, ptrdiff_t s0, ptrdiff_t L,
    const double *prm, const float *q, const int f32, const int relu, const int eval)
{
    const ptrdiff_t o = (n * k->p->C + c) * k->p->S + s0;
#if BN_IS_F32
    if (f32) {   /* fb: one channel */
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
    BN_FN(dx_span)(k->dy + o, k->x + o, k->dx + o, L, prm, prm + 4, prm + 5, prm + 1, prm + 2,
                   prm + 3, 0, relu, eval, k->nts);
}

/* The rows [n0, n1) of every channel on one of the threads, as fused_rows_case: its sums
 * of channel c + 1 read while it writes its dx of channel c.  Returns whether a channel was
 * degenerate (the same on every thread). */
static inline __attribute__((always_inline)) int BN_FN(bwd_rows_case)(
    const BN_FN(bwd_fused_ctx) *k, int t, ptrdiff_t n0, ptrdiff_t n1, const int f32,
    const int relu, const int eval)
{
    const bn_plan *p = k->p;
    const ptrdiff_t C = p->C, S = p->S, G = p->row_groups;
    BN_FN(chan_bsums) u;
    int degenerate = 0;
#define BN_BSUMS_INIT(c)                                                                    \
    BN_FN(chan_bsums_init)(&u, p, k->dy, k->x, c, n0, n1, k->mean[c],                       \
                           k->weight ? k->invstd[c] * k->weight[c] : k->invstd[c],          \
                           k->bias ? k->bias[c] : 0.0, relu, k->part + 2 * G * ((c) & 1))
    BN_BSUMS_INIT(0);
    while (u.n < n1) BN_FN(chan_bsums_step)(&u);
#pragma omp barrier
    for (ptrdiff_t c = 0; c < C; c++) {
        double prm[6];
        float q[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        degenerate |= BN_FN(chan_bwd_finish)(k, c, k->part + 2 * G * (c & 1), t, prm);
#if BN_IS_F32
        if (f32) {
            BN_FN(f32_params)(1, eval ? BN_F32_DXE : BN_F32_DX, prm, prm + 1, prm + 2, prm + 3, q,
                              q + 1, q + 2, q + 3);
            if (eval) q[0] = q[2] = q[3] = q[1];   /* ew_f32: one array for eval's formula */
        }
#endif
        const int more = c + 1 < C;
        if (more) BN_BSUMS_INIT(c + 1);
        BN_FUSED_PIPELINE(BN_FN(chan_bsums_done), BN_FN(chan_bsums_step),
                          BN_FN(fused_dx)(k, n, c, s0, L, prm, q, f32, relu, eval));
#pragma omp barrier
    }
#undef BN_BSUMS_INIT
    bn_stream_fence(k->nts);
    return degenerate;
}

static int BN_FN(bwd_rows)(const BN_FN(bwd_fused_ctx) *k, int t, int nt, int f32)
{
    ptrdiff_t n0, n1;
    BN_FN(fused_share)(k->p, t, nt, &n0, &n1);
    if (f32)   /* float32 dx has no ReLU form (the mask is the double y's) */
        return k->eval ? BN_FN(bwd_rows_case)(k, t, n0, n1, 1, 0, 1)
                       : BN_FN(bwd_rows_case)(k, t, n0, n1, 1, 0, 0);
    if (k->relu)
        return k->eval ? BN_FN(bwd_rows_case)(k, t, n0, n1, 0, 1, 1)
                       : BN_FN(bwd_rows_case)(k, t, n0, n1, 0, 1, 0);
    return k->eval ? BN_FN(bwd_rows_case)(k, t, n0, n1, 0, 0, 1)
                   : BN_FN(bwd_rows_case)(k, t, n0, n1, 0, 0, 0);
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
    double *part = (double *)malloc(sizeof(double) * 4 * (size_t)p.row_groups);
    if (!part) return BN_ENOMEM;
    const int relu = (flags & BN_FLAG_RELU) != 0, eval = (flags & BN_FLAG_EVAL) != 0;
    const int nts = p.stream && ((uintptr_t)dxv & 15) == 0 && !bn_stream_alias(dxv, dyv, xv);
    const int f32 = BN_IS_F32 && (relu ? p.ew_f32_relu : p.ew_f32);
    const BN_FN(bwd_fused_ctx) k = {&p, (const T *)dyv, (const T *)xv, (T *)dxv, mean, invstd,
                                    weight, bias, sum_dy, sum_dyxmu, dweight, k_x, k_0, part,
                                    relu, eval, nts};
    const int nt = p.nthreads;
    int bad = 0;
#pragma omp parallel num_threads(nt) if (nt > 1) reduction(| : bad)
    {
        int t = 0, team = 1;
#ifdef _OPENMP
        t = omp_get_thread_num();
        team = omp_get_num_threads();
#endif
        bad |= BN_FN(bwd_rows)(&k, t, team, f32);
    }
    free(part);
    *degenerate = bad != 0;
    return BN_OK;
}
