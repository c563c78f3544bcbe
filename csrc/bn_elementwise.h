/*
 * The element-wise passes for one storage type T: normalize (y = (x - m) * a + b, optional
 * ReLU) and backward_dx (dx = kd * g + kx * (x - m) + k0, g = dy or the ReLU-masked dy).
 * All arithmetic is in double, except the normalisation of float32 data where the plan
 * says float32 (bn_plan.ew_f32: normalize_f32 below).  Both run on the element-wise skeleton of bn_common.h
 * (items of rows, or of whole periods of the columns layout, then a partial period) and
 * follow the plan (bn_plan.h) for the layout, the walk and streaming stores.
 *
 * Canonical NaNs: each span notes whether it stored a NaN (bn_nanacc) and rewrites them
 * in memory afterwards (canon_mem); tails go through store_tail.
 */

/* Rewrite the NaNs among the n stored values at p as the canonical NaN.  After streaming
 * stores too: an ordinary load sees this thread's own streaming stores. */
static void BN_FN(canon_mem)(T *p, ptrdiff_t n)
{
    for (ptrdiff_t k = 0; k < n; k++)
        if (p[k] != p[k]) p[k] = (T)NAN;
}

/* ================================================================= normalize */

/* One element of y (the scalar form of the vector lanes). */
static inline T BN_FN(norm_one)(T x, double m, double a, double b, int relu)
{
    const double v = ((double)x - m) * a + b;
    return (T)(relu ? bn_srelu(v) : v);
}

/* y[i] = (x[i] - m) * a + b over a span, with scalar parameters.  A span of 8 or more
 * elements whose length is not a multiple of 8 (rows of S = 49, 25, ...) ends with one
 * vector over its last 8 elements, overlapping the one before, instead of a scalar tail:
 * it is computed before the other vectors are stored, so an output that is the input
 * (in place) gets the same values, and it stores exactly what those lanes' own vectors
 * store.  Not with streaming stores (whole aligned pieces only). */
static inline __attribute__((always_inline)) void BN_FN(norm_span_s)(
    const T *x, T *y, ptrdiff_t L, double m, double a, double b, const int relu, int nts)
{
    const bn_vd mv = bn_splat(m), av = bn_splat(a), bv = bn_splat(b);
    ptrdiff_t i = 0;
    T tmp[8];
    bn_nanacc acc = bn_nanacc_zero();
    const int last = !nts && L > 8 && (L & 7) != 0;
    if (last) {   /* into tmp: a vector live across the loops would live in memory */
        if (relu)
            BN_FN(stx)(tmp, bn_vrelu((BN_FN(ld)(x + L - 8) - mv) * av + bv), 0, &acc);
        else
            BN_FN(stx)(tmp, (BN_FN(ld)(x + L - 8) - mv) * av + bv, 0, &acc);
    }
    if (relu) {
        for (; i + 8 <= L; i += 8)
            BN_FN(stx)(y + i, bn_vrelu((BN_FN(ld)(x + i) - mv) * av + bv), nts, &acc);
    } else {
        for (; i + 8 <= L; i += 8)
            BN_FN(stx)(y + i, (BN_FN(ld)(x + i) - mv) * av + bv, nts, &acc);
    }
    if (last) {
        memcpy(y + L - 8, tmp, sizeof tmp);
        if (bn_nanacc_any(acc)) BN_FN(canon_mem)(y, L);
        return;
    }
    if (bn_nanacc_any(acc)) BN_FN(canon_mem)(y, i);
    for (ptrdiff_t k = 0; k < L - i; k++) tmp[k] = BN_FN(norm_one)(x[i + k], m, a, b, relu);
    BN_FN(store_tail)(y + i, tmp, L - i, nts);
}

/* The same with per-element parameter arrays m[i], a[i], b[i]. */
static void BN_FN(norm_span_v)(const T *x, T *y, ptrdiff_t L, const double *m,
                               const double *a, const double *b, int relu, int nts)
{
    ptrdiff_t i = 0;
    T tmp[8];
    bn_nanacc acc = bn_nanacc_zero();
    if (relu) {
        for (; i + 8 <= L; i += 8)
            BN_FN(stx)(y + i, bn_vrelu((BN_FN(ld)(x + i) - bn_ldd(m + i)) * bn_ldd(a + i) +
                                       bn_ldd(b + i)), nts, &acc);
    } else {
        for (; i + 8 <= L; i += 8)
            BN_FN(stx)(y + i, (BN_FN(ld)(x + i) - bn_ldd(m + i)) * bn_ldd(a + i) + bn_ldd(b + i),
                       nts, &acc);
    }
    if (bn_nanacc_any(acc)) BN_FN(canon_mem)(y, i);
    for (ptrdiff_t k = 0; k < L - i; k++)
        tmp[k] = BN_FN(norm_one)(x[i + k], m[i + k], a[i + k], b[i + k], relu);
    BN_FN(store_tail)(y + i, tmp, L - i, nts);
}

/* Period-64 walk: np consecutive periods of 64 elements, the parameters in registers. */
static void BN_FN(norm_periods64)(const T *x, T *y, ptrdiff_t np, const double *m,
                                  const double *a, const double *b, int relu, int nts)
{
    bn_vd mv[8], av[8], bv[8];
    for (int t = 0; t < 8; t++) {
        mv[t] = bn_ldd(m + 8 * t);
        av[t] = bn_ldd(a + 8 * t);
        bv[t] = bn_ldd(b + 8 * t);
    }
    bn_nanacc acc = bn_nanacc_zero();
    if (relu) {
        for (ptrdiff_t k = 0; k < np; k++) {
#pragma GCC unroll 8
            for (int t = 0; t < 8; t++) {
                const ptrdiff_t i = 64 * k + 8 * t;
                BN_FN(stx)(y + i, bn_vrelu((BN_FN(ld)(x + i) - mv[t]) * av[t] + bv[t]), nts,
                           &acc);
            }
        }
    } else {
        for (ptrdiff_t k = 0; k < np; k++) {
#pragma GCC unroll 8
            for (int t = 0; t < 8; t++) {
                const ptrdiff_t i = 64 * k + 8 * t;
                BN_FN(stx)(y + i, (BN_FN(ld)(x + i) - mv[t]) * av[t] + bv[t], nts, &acc);
            }
        }
    }
    if (bn_nanacc_any(acc)) BN_FN(canon_mem)(y, 64 * np);
}

typedef struct {
    const bn_plan *p;
    const T *x;
    T *y;
    const double *m, *a, *b;   /* rows: per channel; columns: per element of a period */
    int relu, nts;
} BN_FN(norm_ctx);

/* Rows layout: rows [r0, r1), each with its channel's scalar parameters. */
static void BN_FN(norm_rows)(const void *ctx, ptrdiff_t r0, ptrdiff_t r1)
{
    const BN_FN(norm_ctx) *k = ctx;
    const ptrdiff_t C = k->p->C, S = k->p->S;
    ptrdiff_t c = r0 % C;   /* counted, not r % C per row; one loop per relu case */
    if (k->relu)
        for (ptrdiff_t r = r0; r < r1; r++) {
            BN_FN(norm_span_s)(k->x + r * S, k->y + r * S, S, k->m[c], k->a[c], k->b[c], 1,
                               k->nts);
            if (++c == C) c = 0;
        }
    else
        for (ptrdiff_t r = r0; r < r1; r++) {
            BN_FN(norm_span_s)(k->x + r * S, k->y + r * S, S, k->m[c], k->a[c], k->b[c], 0,
                               k->nts);
            if (++c == C) c = 0;
        }
    bn_stream_fence(k->nts);
}

/* Columns layout: whole periods [p0, p1). */
static void BN_FN(norm_periods)(const void *ctx, ptrdiff_t p0, ptrdiff_t p1)
{
    const BN_FN(norm_ctx) *k = ctx;
    const ptrdiff_t P = k->p->period;
    const T *x = k->x + p0 * P;
    T *y = k->y + p0 * P;
    if (k->p->ew_walk == BN_WALK_PERIOD64)
        BN_FN(norm_periods64)(x, y, p1 - p0, k->m, k->a, k->b, k->relu, k->nts);
    else
        for (ptrdiff_t i = 0; i < p1 - p0; i++)
            BN_FN(norm_span_v)(x + i * P, y + i * P, P, k->m, k->a, k->b, k->relu, k->nts);
    bn_stream_fence(k->nts);
}

/* Tiles walk (columns layout): column tiles [t0, t1) of BN_EW_TILE, each down all N rows
 * (rows of P = Cp elements), the tile's parameters in L1. */
static void BN_FN(norm_tiles)(const void *ctx, ptrdiff_t t0, ptrdiff_t t1)
{
    const BN_FN(norm_ctx) *k = ctx;
    const ptrdiff_t P = k->p->period, N = k->p->N;
    for (ptrdiff_t t = t0; t < t1; t++) {
        const ptrdiff_t j0 = t * BN_EW_TILE, w = P - j0 < BN_EW_TILE ? P - j0 : BN_EW_TILE;
        for (ptrdiff_t r = 0; r < N; r++)
            BN_FN(norm_span_v)(k->x + r * P + j0, k->y + r * P + j0, w, k->m + j0, k->a + j0,
                               k->b + j0, k->relu, k->nts);
    }
    bn_stream_fence(k->nts);
}

#if BN_IS_F32
/* ======================================================= normalize in float32 arithmetic */

/*
 * float32 data may be normalised in float32 arithmetic (bn_plan.ew_f32; the bound and the
 * measurements are in docs/user_guide/semantics.md).  Per channel, in double: mh = (float)m,
 * af = (float)a and bf = (float)(b - (m - mh) * a) -- the mean's rounding is folded into
 * the shift, so data far from zero (the 1e6-offset case) loses nothing to it.  Per
 * element: t = (x - mh) * af + bf, three float32 operations each rounded once.  The error
 * against the exact (x - m) * a + b is at most 2 FLT_EPSILON S (+ FLT_EPSILON^2 (|m a| +
 * 2 S)) with S = |a| max|x - m| + |b|, the channel's terms: five roundings (x - mh, a, the
 * product, the sum, bf) of at most half an ulp each.
 *
 * An element whose t (before the ReLU) is not finite -- a NaN or infinite x, or a float32
 * overflow that double would not have -- is computed in double instead (norm_one, the
 * float64 path's value, canonical NaNs), and so is every element of a channel whose
 * parameters float32 cannot carry: mh, af or bf not finite (t is then never finite), or
 * af subnormal (f32_params makes it NaN).  Each element's value depends on that element and its channel alone, so every
 * walk, partition, thread count and variant stores the same bits.
 */
typedef struct {
    const double *m, *a, *b;   /* per channel: the double path's parameters */
    ptrdiff_t Cp, S;           /* element j of a period belongs to channel (j % Cp) / S */
} BN_FN(nfb);

/* Per-channel float32 parameters.  A channel whose af is subnormal (|a| < FLT_MIN, where
 * float32 would lose precision) gets af = NaN, so that all its elements take the double
 * formula.  No other test is needed: where mh, af or bf is not finite (m beyond float32's
 * range, a NaN or huge scale or shift), every t of the channel is not finite either and
 * falls back element by element.  Branch-free, so that GCC vectorises it (with scalar
 * tests it took 1.6 ns per channel, a sixth of the inference of (32, 8192)). */
static void BN_FN(f32_params)(ptrdiff_t C, const double *m, const double *a, const double *b,
                              float *mh, float *af, float *bf)
{
    for (ptrdiff_t c = 0; c < C; c++) {
        const float h = (float)m[c], A = (float)a[c];
        uint32_t ua;
        memcpy(&ua, &A, 4);
        const uint32_t sub = ((ua & 0x7f800000u) == 0) & ((ua & 0x7fffffffu) != 0);
        ua = sub ? 0x7fc00000u : ua;   /* NaN where subnormal */
        mh[c] = h;
        memcpy(af + c, &ua, 4);
        bf[c] = (float)(b[c] - (m[c] - (double)h) * a[c]);
    }
}

/* One element (the scalar form of the vector lanes): x at period position j. */
static inline float BN_FN(normf_one)(float x, float mh, float af, float bf,
                                     const BN_FN(nfb) *fb, ptrdiff_t j, int relu)
{
    const float t = (x - mh) * af + bf;
    if (!(t - t == 0.0f)) {
        const ptrdiff_t c = (j % fb->Cp) / fb->S;
        const float v = BN_FN(norm_one)(x, fb->m[c], fb->a[c], fb->b[c], relu);
        return v == v ? v : (float)NAN;
    }
    return relu ? (t <= 0.0f ? 0.0f : t) : t;
}

/* The L elements at y rewritten from x one by one (a vector or span with a value that is
 * not finite). */
static __attribute__((noinline, cold)) void BN_FN(normf_fix_span)(
    const float *x, float *y, ptrdiff_t L, const float *mh, const float *af, const float *bf,
    ptrdiff_t inc, const BN_FN(nfb) *fb, ptrdiff_t j0, int relu)
{
    for (ptrdiff_t k = 0; k < L; k++)
        y[k] = BN_FN(normf_one)(x[k], mh[inc * k], af[inc * k], bf[inc * k], fb, j0 + k, relu);
}

/* One vector: t for the eight elements at x, stored at y.  defer: its non-finite lanes
 * are only noted in *acc (the span is fixed afterwards: normf_span); else they are fixed
 * before the store (in place, where x is gone once y is stored). */
static inline __attribute__((always_inline)) void BN_FN(normf8)(
    const float *x, float *y, bn_f8 m, bn_f8 a, bn_f8 b, const float *mh, const float *af,
    const float *bf, const ptrdiff_t inc, const BN_FN(nfb) *fb, ptrdiff_t j, const int relu,
    const int defer, bn_f8 *acc, int nts)
{
    bn_f8 t = bn_f8_norm(bn_f8_ld(x), m, a, b);
    if (defer) {
        *acc = bn_f8_flag(*acc, t);
        if (relu) t = bn_f8_relu(t);
    } else if (__builtin_expect(bn_f8_bad(t), 0)) {
        float tmp[8];
        BN_FN(normf_fix_span)(x, tmp, 8, mh, af, bf, inc, fb, j, relu);
        t = bn_f8_ld(tmp);
    } else if (relu) {
        t = bn_f8_relu(t);
    }
    bn_f8_st(y, t, nts);
}

/* y over a span of L elements starting at period position j0, parameters per element
 * (inc == 1) or scalars (inc == 0).  As norm_span_s, a span of more than 8 elements whose
 * length is not a multiple of 8 ends with one vector over its last 8 elements, computed
 * before the others are stored (in place gives the same values).  With defer (y is not x)
 * the test for non-finite values is one OR per vector and one test per span, and a span
 * with one is rewritten element by element (a test and branch per vector is slower: on
 * AVX2 from L1, benchmarks/loops_f32.c "defer" against "f32"); in place, each vector is
 * tested and fixed before its store. */
static inline __attribute__((always_inline)) void BN_FN(normf_span)(
    const float *x, float *y, ptrdiff_t L, const float *mh, const float *af, const float *bf,
    const ptrdiff_t inc, const BN_FN(nfb) *fb, ptrdiff_t j0, const int relu, const int defer,
    int nts)
{
    ptrdiff_t i = 0;
    float tmp[8];
    bn_f8 acc = bn_f8_zero();
    const int last = !nts && L > 8 && (L & 7) != 0;
    if (inc == 0) {
        const bn_f8 mv = bn_f8_splat(*mh), av = bn_f8_splat(*af), bv = bn_f8_splat(*bf);
        if (last)
            BN_FN(normf8)(x + L - 8, tmp, mv, av, bv, mh, af, bf, 0, fb, j0 + L - 8, relu,
                          defer, &acc, 0);
        for (; i + 8 <= L; i += 8)
            BN_FN(normf8)(x + i, y + i, mv, av, bv, mh, af, bf, 0, fb, j0 + i, relu, defer,
                          &acc, nts);
    } else {
        const ptrdiff_t e = L - 8;
        if (last)
            BN_FN(normf8)(x + e, tmp, bn_f8_ld(mh + e), bn_f8_ld(af + e), bn_f8_ld(bf + e),
                          mh + e, af + e, bf + e, 1, fb, j0 + e, relu, defer, &acc, 0);
        for (; i + 8 <= L; i += 8)
            BN_FN(normf8)(x + i, y + i, bn_f8_ld(mh + i), bn_f8_ld(af + i), bn_f8_ld(bf + i),
                          mh + i, af + i, bf + i, 1, fb, j0 + i, relu, defer, &acc, nts);
    }
    if (last) {
        memcpy(y + L - 8, tmp, sizeof tmp);
    } else {
        for (ptrdiff_t k = 0; k < L - i; k++)
            tmp[k] = BN_FN(normf_one)(x[i + k], mh[inc * (i + k)], af[inc * (i + k)],
                                      bf[inc * (i + k)], fb, j0 + i + k, relu);
        BN_FN(store_tail)(y + i, tmp, L - i, nts);
    }
    if (defer && __builtin_expect(bn_f8_flagged(acc), 0))
        BN_FN(normf_fix_span)(x, y, L, mh, af, bf, inc, fb, j0, relu);
}

/* The span in its ReLU and defer cases (one loop each, no per-vector test). */
static void BN_FN(normf_span_v)(const float *x, float *y, ptrdiff_t L, const float *mh,
                                const float *af, const float *bf, const BN_FN(nfb) *fb,
                                ptrdiff_t j0, int relu, int defer, int nts)
{
    if (relu && defer)
        BN_FN(normf_span)(x, y, L, mh, af, bf, 1, fb, j0, 1, 1, nts);
    else if (relu)
        BN_FN(normf_span)(x, y, L, mh, af, bf, 1, fb, j0, 1, 0, nts);
    else if (defer)
        BN_FN(normf_span)(x, y, L, mh, af, bf, 1, fb, j0, 0, 1, nts);
    else
        BN_FN(normf_span)(x, y, L, mh, af, bf, 1, fb, j0, 0, 0, nts);
}

typedef struct {
    const bn_plan *p;
    const float *x;
    float *y;
    const float *mh, *af, *bf;   /* rows: per channel; columns: per element of a period */
    BN_FN(nfb) fb;
    int relu, defer, nts;   /* defer: y is not x (normf_span) */
} BN_FN(normf_ctx);

static inline __attribute__((always_inline)) void BN_FN(normf_rows_case)(
    const BN_FN(normf_ctx) *k, ptrdiff_t r0, ptrdiff_t r1, const int relu, const int defer)
{
    const ptrdiff_t C = k->p->C, S = k->p->S;
    ptrdiff_t c = r0 % C;
    for (ptrdiff_t r = r0; r < r1; r++) {
        const BN_FN(nfb) fb = {k->fb.m + c, k->fb.a + c, k->fb.b + c, 1, 1};
        BN_FN(normf_span)(k->x + r * S, k->y + r * S, S, k->mh + c, k->af + c, k->bf + c, 0,
                          &fb, 0, relu, defer, k->nts);
        if (++c == C) c = 0;
    }
}

/*
 * A walk over units [u0, u1) (rows, periods or column tiles) in the ReLU and defer case of
 * its context, each case a loop of its own (NAME_case with constants), then the fence of
 * its streaming stores.
 */
#define BN_NORMF_WALK(name)                                                                 \
    static void BN_FN(name)(const void *ctx, ptrdiff_t u0, ptrdiff_t u1)                    \
    {                                                                                       \
        const BN_FN(normf_ctx) *k = ctx;                                                    \
        if (k->relu && k->defer)                                                            \
            BN_FN(name##_case)(k, u0, u1, 1, 1);                                            \
        else if (k->relu)                                                                   \
            BN_FN(name##_case)(k, u0, u1, 1, 0);                                            \
        else if (k->defer)                                                                  \
            BN_FN(name##_case)(k, u0, u1, 0, 1);                                            \
        else                                                                                \
            BN_FN(name##_case)(k, u0, u1, 0, 0);                                            \
        bn_stream_fence(k->nts);                                                            \
    }

/* Rows (the rows layout, or the columns layout's rows walk). */
BN_NORMF_WALK(normf_rows)

/* Whole periods [p0, p1) (the spans walk), the ReLU and defer cases outside the loop (a
 * call per period that chose its case: one thread, avx512, inference of (256, 64, 3, 3)
 * with the channel axis last, C = 3 and periods of 72, 38 -> 26 us; (65536, 64) forced to
 * spans 966 -> 818 us). */
static inline __attribute__((always_inline)) void BN_FN(normf_periods_case)(
    const BN_FN(normf_ctx) *k, ptrdiff_t p0, ptrdiff_t p1, const int relu, const int defer)
{
    const ptrdiff_t P = k->p->period;
    for (ptrdiff_t q = p0; q < p1; q++)
        BN_FN(normf_span)(k->x + q * P, k->y + q * P, P, k->mh, k->af, k->bf, 1, &k->fb, 0,
                          relu, defer, k->nts);
}

BN_NORMF_WALK(normf_periods)

/* Period-64 walk: np periods of 64 elements with the 24 parameter vectors in registers
 * (AVX-512 has 32; AVX2 and SSE2 spill some: measured below, plan.c), each span's test
 * deferred to the end of the item's periods unless in place. */
static inline __attribute__((always_inline)) void BN_FN(normf_periods64_case)(
    const BN_FN(normf_ctx) *k, ptrdiff_t p0, ptrdiff_t p1, const int relu, const int defer)
{
    const float *x = k->x + 64 * p0, *mh = k->mh, *af = k->af, *bf = k->bf;
    float *y = k->y + 64 * p0;
    const ptrdiff_t np = p1 - p0;
    bn_f8 mv[8], av[8], bv[8];
    for (int t = 0; t < 8; t++) {
        mv[t] = bn_f8_ld(mh + 8 * t);
        av[t] = bn_f8_ld(af + 8 * t);
        bv[t] = bn_f8_ld(bf + 8 * t);
    }
    bn_f8 acc = bn_f8_zero();
    for (ptrdiff_t q = 0; q < np; q++) {
#pragma GCC unroll 8
        for (int t = 0; t < 8; t++)
            BN_FN(normf8)(x + 64 * q + 8 * t, y + 64 * q + 8 * t, mv[t], av[t], bv[t],
                          mh + 8 * t, af + 8 * t, bf + 8 * t, 1, &k->fb, 8 * t, relu, defer,
                          &acc, k->nts);
    }
    if (defer && __builtin_expect(bn_f8_flagged(acc), 0))
        for (ptrdiff_t q = 0; q < np; q++)
            BN_FN(normf_fix_span)(x + 64 * q, y + 64 * q, 64, mh, af, bf, 1, &k->fb, 0, relu);
}

BN_NORMF_WALK(normf_periods64)

/* Column tiles [t0, t1) down all rows, the ReLU and defer cases outside the loops. */
static inline __attribute__((always_inline)) void BN_FN(normf_tiles_case)(
    const BN_FN(normf_ctx) *k, ptrdiff_t t0, ptrdiff_t t1, const int relu, const int defer)
{
    const ptrdiff_t P = k->p->period, N = k->p->N;
    for (ptrdiff_t t = t0; t < t1; t++) {
        const ptrdiff_t j0 = t * BN_EW_TILE, w = P - j0 < BN_EW_TILE ? P - j0 : BN_EW_TILE;
        for (ptrdiff_t r = 0; r < N; r++)
            BN_FN(normf_span)(k->x + r * P + j0, k->y + r * P + j0, w, k->mh + j0, k->af + j0,
                              k->bf + j0, 1, &k->fb, j0, relu, defer, k->nts);
    }
}

BN_NORMF_WALK(normf_tiles)

/* Per-element float32 parameters of one period from per-channel ones (BN_FN(expand)). */
static void BN_FN(expandf)(float *e, const float *v, ptrdiff_t P, ptrdiff_t Cp, ptrdiff_t S)
{
    const ptrdiff_t C = Cp / S;
    for (ptrdiff_t c = 0; c < C; c++)
        for (ptrdiff_t s = 0; s < S; s++) e[c * S + s] = v[c];
    for (ptrdiff_t j = Cp; j < P; j++) e[j] = e[j - Cp];
}

static int BN_FN(normalize_f32)(const bn_plan *p, const float *x, float *y, const double *mean,
                                const double *scale, const double *shift, int relu, int nts)
{
    const ptrdiff_t N = p->N, C = p->C, S = p->S, Cp = C * S;
    const int ew_rows = p->layout == BN_LAYOUT_ROWS || p->ew_walk == BN_WALK_ROWS;
    const int direct = ew_rows || bn_params_direct(p->period, Cp, S);
    const ptrdiff_t P = ew_rows ? 0 : p->period;
    float *buf = (float *)malloc(sizeof(float) * 3 * (size_t)(C + (direct ? 0 : P)));
    if (!buf) return BN_ENOMEM;
    float *mh = buf, *af = buf + C, *bf = buf + 2 * C;
    BN_FN(f32_params)(C, mean, scale, shift, mh, af, bf);
    BN_FN(normf_ctx) k = {p, x, y, mh, af, bf, {mean, scale, shift, Cp, S}, relu, x != y, nts};
    if (ew_rows) {
        BN_FN(run_ew_items)(p, BN_FN(normf_rows), &k);
        free(buf);
        return BN_OK;
    }
    if (!direct) {
        float *e = buf + 3 * C;
        BN_FN(expandf)(e, mh, P, Cp, S);
        BN_FN(expandf)(e + P, af, P, Cp, S);
        BN_FN(expandf)(e + 2 * P, bf, P, Cp, S);
        k.mh = e;
        k.af = e + P;
        k.bf = e + 2 * P;
    }
    BN_FN(run_ew_items)(p, p->ew_walk == BN_WALK_TILES      ? BN_FN(normf_tiles)
                           : p->ew_walk == BN_WALK_PERIOD64 ? BN_FN(normf_periods64)
                                                            : BN_FN(normf_periods), &k);
    const ptrdiff_t done = p->ew_walk == BN_WALK_TILES ? N * Cp : p->ew_units * P,
                    rem = N * Cp - done;
    if (rem) {
        BN_FN(normf_span_v)(x + done, y + done, rem, k.mh, k.af, k.bf, &k.fb, 0, relu, x != y,
                            nts);
        bn_stream_fence(nts);
    }
    free(buf);
    return BN_OK;
}
#endif /* BN_IS_F32 */

static int BN_FN(normalize_planned)(const bn_plan *p, const T *x, T *y, const double *mean,
                                    const double *scale, const double *shift, int relu)
{
    const ptrdiff_t N = p->N, C = p->C, S = p->S;
    if (N == 0 || C == 0 || S == 0) return BN_OK;
    const int nts = p->stream && ((uintptr_t)y & 15) == 0 && !bn_stream_alias(y, x, NULL);
#if BN_IS_F32
    if (p->ew_f32) return BN_FN(normalize_f32)(p, x, y, mean, scale, shift, relu, nts);
#endif
    if (p->layout == BN_LAYOUT_ROWS || p->ew_walk == BN_WALK_ROWS) {
        BN_FN(norm_ctx) k = {p, x, y, mean, scale, shift, relu, nts};
        BN_FN(run_ew_items)(p, BN_FN(norm_rows), &k);
        return BN_OK;
    }
    const ptrdiff_t Cp = C * S, P = p->period;
    double *buf = NULL;
    if (!bn_params_direct(P, Cp, S) || !mean || !scale || !shift) {
        buf = (double *)malloc(sizeof(double) * 3 * (size_t)P);
        if (!buf) return BN_ENOMEM;
    }
    BN_FN(norm_ctx) k = {p, x, y, BN_FN(params)(buf, mean, P, Cp, S),
                         BN_FN(params)(buf + P, scale, P, Cp, S),
                         BN_FN(params)(buf + 2 * P, shift, P, Cp, S), relu, nts};
    BN_FN(run_ew_items)(p, p->ew_walk == BN_WALK_TILES ? BN_FN(norm_tiles)
                                                         : BN_FN(norm_periods), &k);
    const ptrdiff_t done = p->ew_walk == BN_WALK_TILES ? N * Cp : p->ew_units * P,
                    rem = N * Cp - done;
    if (rem) {
        BN_FN(norm_span_v)(x + done, y + done, rem, k.m, k.a, k.b, relu, nts);
        bn_stream_fence(nts);
    }
    free(buf);
    return BN_OK;
}

static int BN_FN(normalize)(const void *xv, void *yv, ptrdiff_t N, ptrdiff_t C, ptrdiff_t S,
                            const double *mean, const double *scale, const double *shift,
                            int flags, int nthreads)
{
    bn_plan p;
    if (bn_plan_make(&p, BN_OP_INFER, N, C, S, (int)sizeof(T), BN_ISA, nthreads) != BN_OK)
        return BN_EINVAL;
    return BN_FN(normalize_planned)(&p, (const T *)xv, (T *)yv, mean, scale, shift,
                                    (flags & BN_FLAG_RELU) != 0);
}

/* ================================================================= backward dx */

/* One element of dx (the scalar form of dx_span's vector lanes; parameters at index j). */
static inline T BN_FN(dx_one)(const T *dy, const T *x, ptrdiff_t i, ptrdiff_t j,
                              const double *m, const double *a, const double *b,
                              const double *kd, const double *kx, const double *k0, int relu,
                              int eval)
{
    double g = (double)dy[i];
    double xm = (double)x[i] - m[j];
    if (relu) g = bn_smask(g, xm * a[j] + b[j]);
    return (T)(eval ? kd[j] * g : (kd[j] * g + kx[j] * xm) + k0[j]);
}

/* dx over a span; parameters per element when inc == 1, scalars when inc == 0. */
/* The vector part of dx_span: the elements [0, L - L % 8), with relu and eval constants
 * (dx_span instantiates the four cases, so no loop tests them per vector). */
static inline __attribute__((always_inline)) ptrdiff_t BN_FN(dx_vectors)(
    const T *dy, const T *x, T *dx, ptrdiff_t L, const double *m, const double *a,
    const double *b, const double *kd, const double *kx, const double *k0, ptrdiff_t inc,
    const int relu, const int eval, int nts, bn_nanacc *acc)
{
    ptrdiff_t i = 0;
    if (inc == 0) {
        const bn_vd mv = bn_splat(*m), av = bn_splat(*a), bv = bn_splat(*b);
        const bn_vd kdv = bn_splat(*kd), kxv = bn_splat(*kx), k0v = bn_splat(*k0);
        for (; i + 8 <= L; i += 8)
            BN_FN(stx_dx)(dx + i, BN_FN(ld)(dy + i), BN_FN(ld)(x + i) - mv, av, bv, kdv, kxv,
                          k0v, relu, eval, nts, acc);
    } else {
        for (; i + 8 <= L; i += 8)
            BN_FN(stx_dx_p)(dx + i, dy + i, x + i, m + i, a + i, b + i, kd + i, kx + i, k0 + i,
                            relu, eval, nts, acc);
    }
    return i;
}

static void BN_FN(dx_span)(const T *dy, const T *x, T *dx, ptrdiff_t L, const double *m,
                           const double *a, const double *b, const double *kd,
                           const double *kx, const double *k0, ptrdiff_t inc, int relu,
                           int eval, int nts)
{
    ptrdiff_t i;
    T tmp[8];
    bn_nanacc acc = bn_nanacc_zero();
    if (relu && eval)
        i = BN_FN(dx_vectors)(dy, x, dx, L, m, a, b, kd, kx, k0, inc, 1, 1, nts, &acc);
    else if (relu)
        i = BN_FN(dx_vectors)(dy, x, dx, L, m, a, b, kd, kx, k0, inc, 1, 0, nts, &acc);
    else if (eval)
        i = BN_FN(dx_vectors)(dy, x, dx, L, m, a, b, kd, kx, k0, inc, 0, 1, nts, &acc);
    else
        i = BN_FN(dx_vectors)(dy, x, dx, L, m, a, b, kd, kx, k0, inc, 0, 0, nts, &acc);
    if (bn_nanacc_any(acc)) BN_FN(canon_mem)(dx, i);
    for (ptrdiff_t k = 0; k < L - i; k++)
        tmp[k] = BN_FN(dx_one)(dy, x, i + k, (i + k) * inc, m, a, b, kd, kx, k0, relu, eval);
    BN_FN(store_tail)(dx + i, tmp, L - i, nts);
}

typedef struct {
    const bn_plan *p;
    const T *dy, *x;
    T *dx;
    const double *m, *a, *b, *kd, *kx, *k0;   /* rows: per channel; columns: per element */
    int relu, eval, nts;
} BN_FN(dx_ctx);

/* Rows [r0, r1) with relu and eval constants: each row's vectors and scalar tail inline
 * (a call of dx_span per row, its parameters on the stack, cost a fifth of the dx of
 * (8, 1000, 7, 7) on AVX2). */
static inline __attribute__((always_inline)) void BN_FN(dx_rows_case)(
    const BN_FN(dx_ctx) *k, ptrdiff_t r0, ptrdiff_t r1, const int relu, const int eval)
{
    const ptrdiff_t C = k->p->C, S = k->p->S;
    const int nts = k->nts;
    ptrdiff_t c = r0 % C;
    for (ptrdiff_t r = r0; r < r1; r++) {
        const ptrdiff_t off = r * S;
        const double m = k->m[c], a = k->a ? k->a[c] : 0.0, b = k->b ? k->b[c] : 0.0;
        const double kd = k->kd[c], kx = k->kx ? k->kx[c] : 0.0, k0 = k->k0 ? k->k0[c] : 0.0;
        const T *dy = k->dy + off, *x = k->x + off;
        T *dx = k->dx + off;
        bn_nanacc acc = bn_nanacc_zero();
        T tmp[8];
        const ptrdiff_t i = BN_FN(dx_vectors)(dy, x, dx, S, &m, &a, &b, &kd, &kx, &k0, 0, relu,
                                              eval, nts, &acc);
        if (bn_nanacc_any(acc)) BN_FN(canon_mem)(dx, i);
        if (i < S) {
            for (ptrdiff_t j = 0; j < S - i; j++)
                tmp[j] = BN_FN(dx_one)(dy, x, i + j, 0, &m, &a, &b, &kd, &kx, &k0, relu, eval);
            BN_FN(store_tail)(dx + i, tmp, S - i, nts);
        }
        if (++c == C) c = 0;
    }
}

/* Rows layout: rows [r0, r1), each with its channel's scalar coefficients. */
static void BN_FN(dx_rows)(const void *ctx, ptrdiff_t r0, ptrdiff_t r1)
{
    const BN_FN(dx_ctx) *k = ctx;
    if (k->relu && k->eval)
        BN_FN(dx_rows_case)(k, r0, r1, 1, 1);
    else if (k->relu)
        BN_FN(dx_rows_case)(k, r0, r1, 1, 0);
    else if (k->eval)
        BN_FN(dx_rows_case)(k, r0, r1, 0, 1);
    else
        BN_FN(dx_rows_case)(k, r0, r1, 0, 0);
    bn_stream_fence(k->nts);
}

/* Columns layout: whole periods [p0, p1), in column tiles of BN_EW_TILE so that a tile's
 * six parameter arrays stay in L1 over the periods. */
static void BN_FN(dx_periods)(const void *ctx, ptrdiff_t p0, ptrdiff_t p1)
{
    const BN_FN(dx_ctx) *k = ctx;
    const ptrdiff_t P = k->p->period;
    for (ptrdiff_t j0 = 0; j0 < P; j0 += BN_EW_TILE) {
        const ptrdiff_t w = P - j0 < BN_EW_TILE ? P - j0 : BN_EW_TILE;
        for (ptrdiff_t q = p0; q < p1; q++) {
            const ptrdiff_t o = q * P + j0;
            BN_FN(dx_span)(k->dy + o, k->x + o, k->dx + o, w, k->m + j0, k->a + j0, k->b + j0,
                           k->kd + j0, k->kx + j0, k->k0 + j0, 1, k->relu, k->eval, k->nts);
        }
    }
    bn_stream_fence(k->nts);
}

/* Tiles walk (columns layout): column tiles [t0, t1), each down all N rows. */
static void BN_FN(dx_tiles)(const void *ctx, ptrdiff_t t0, ptrdiff_t t1)
{
    const BN_FN(dx_ctx) *k = ctx;
    const ptrdiff_t P = k->p->period, N = k->p->N;
    for (ptrdiff_t t = t0; t < t1; t++) {
        const ptrdiff_t j0 = t * BN_EW_TILE, w = P - j0 < BN_EW_TILE ? P - j0 : BN_EW_TILE;
        for (ptrdiff_t r = 0; r < N; r++) {
            const ptrdiff_t o = r * P + j0;
            BN_FN(dx_span)(k->dy + o, k->x + o, k->dx + o, w, k->m + j0, k->a + j0, k->b + j0,
                           k->kd + j0, k->kx + j0, k->k0 + j0, 1, k->relu, k->eval, k->nts);
        }
    }
    bn_stream_fence(k->nts);
}

static int BN_FN(backward_dx_planned)(const bn_plan *p, const T *dy, const T *x, T *dx,
                                      const double *mean, const double *scale,
                                      const double *shift, const double *k_dy,
                                      const double *k_x, const double *k_0, int relu, int eval)
{
    const ptrdiff_t N = p->N, C = p->C, S = p->S;
    if (N == 0 || C == 0 || S == 0) return BN_OK;
    const int nts = p->stream && ((uintptr_t)dx & 15) == 0 && !bn_stream_alias(dx, dy, x);
    if (p->layout == BN_LAYOUT_ROWS || p->ew_walk == BN_WALK_ROWS) {
        BN_FN(dx_ctx) k = {p, dy, x, dx, mean, scale, shift, k_dy, k_x, k_0, relu, eval, nts};
        BN_FN(run_ew_items)(p, BN_FN(dx_rows), &k);
        return BN_OK;
    }
    const ptrdiff_t Cp = C * S, P = p->period;
    double *buf = NULL;
    if (!bn_params_direct(P, Cp, S) || !mean || !scale || !shift || !k_dy || !k_x || !k_0) {
        buf = (double *)malloc(sizeof(double) * 6 * (size_t)P);
        if (!buf) return BN_ENOMEM;
    }
    /* Only the parameters the case reads are expanded (scale and shift for the ReLU's
     * mask, k_x and k_0 unless eval); the others point at an expanded array that is
     * never read (serial on any thread count; one thread, backward without ReLU of
     * (32, 256, 5, 5): 153 -> 148 us AVX2, 276 -> 263 baseline). */
    const double *me = BN_FN(params)(buf, mean, P, Cp, S);
    const double *kde = BN_FN(params)(buf + 3 * P, k_dy, P, Cp, S);
    BN_FN(dx_ctx) k = {p, dy, x, dx, me,
                       relu ? BN_FN(params)(buf + P, scale, P, Cp, S) : me,
                       relu ? BN_FN(params)(buf + 2 * P, shift, P, Cp, S) : me, kde,
                       eval ? kde : BN_FN(params)(buf + 4 * P, k_x, P, Cp, S),
                       eval ? kde : BN_FN(params)(buf + 5 * P, k_0, P, Cp, S), relu, eval, nts};
    BN_FN(run_ew_items)(p, p->ew_walk == BN_WALK_TILES ? BN_FN(dx_tiles) : BN_FN(dx_periods),
                        &k);
    const ptrdiff_t done = p->ew_walk == BN_WALK_TILES ? N * Cp : p->ew_units * P,
                    rem = N * Cp - done;
    if (rem) {
        BN_FN(dx_span)(dy + done, x + done, dx + done, rem, k.m, k.a, k.b, k.kd, k.kx, k.k0, 1,
                       relu, eval, nts);
        bn_stream_fence(nts);
    }
    free(buf);
    return BN_OK;
}

static int BN_FN(backward_dx)(const void *dyv, const void *xv, void *dxv, ptrdiff_t N,
                              ptrdiff_t C, ptrdiff_t S, const double *mean,
                              const double *scale, const double *shift, const double *k_dy,
                              const double *k_x, const double *k_0, int flags, int nthreads)
{
    bn_plan p;
    if (bn_plan_make(&p, BN_OP_BACKWARD, N, C, S, (int)sizeof(T), BN_ISA, nthreads) != BN_OK)
        return BN_EINVAL;
    return BN_FN(backward_dx_planned)(&p, (const T *)dyv, (const T *)xv, (T *)dxv, mean, scale,
                                      shift, k_dy, k_x, k_0, (flags & BN_FLAG_RELU) != 0,
                                      (flags & BN_FLAG_EVAL) != 0);
}
