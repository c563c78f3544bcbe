/*
 * The element-wise passes for one storage type T: normalize (y = (x - m) * a + b, optional
 * ReLU) and backward_dx (dx = kd * g + kx * (x - m) + k0, g = dy or the ReLU-masked dy).
 * All arithmetic is in double, except for float32 data where the plan says float32
 * (bn_plan.ew_f32, ew_f32_relu: ew_f32 below, one set of loops for the normalisation and
 * dx without the ReLU).  Both run on the element-wise skeleton of bn_common.h
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

/* fn(args..., f1, f2) with the two flags as constants: one loop per case, no test of them
 * per element (the walks' dispatch; a flag given as the constant 0 leaves two cases). */
#define BN_BY_FLAGS(fn, f1, f2, ...)                                                        \
    do {                                                                                    \
        if ((f1) && (f2))                                                                   \
            fn(__VA_ARGS__, 1, 1);                                                          \
        else if (f1)                                                                        \
            fn(__VA_ARGS__, 1, 0);                                                          \
        else if (f2)                                                                        \
            fn(__VA_ARGS__, 0, 1);                                                          \
        else                                                                                \
            fn(__VA_ARGS__, 0, 0);                                                          \
    } while (0)

#if BN_IS_F32
/* ============================================ element-wise passes in float32 arithmetic */

/*
 * float32 data's element-wise passes may run in float32 arithmetic (bn_plan.ew_f32 and
 * ew_f32_relu; the bounds and the measurements are in docs/user_guide/semantics.md).  Three
 * formulas, op (a constant in every loop) telling which, each operation rounded once:
 *
 *   BN_F32_NORM   y  = (x - q0) * q1 + q2            q0 = mh, q1 = af, q2 = bf
 *   BN_F32_DX     dx = (g * q1 + q3) + (x - q0) * q2  q0 = mh, q1 = kdf, q2 = kxf, q3 = k0f
 *   BN_F32_DXE    dx = g * q1                        (eval mode: q1 = kdf)
 *
 * with g = dy.  Per channel, in double: mh = (float)m, af = (float)a, kdf = (float)kd,
 * kxf = (float)kx, and the mean's rounding folded into the shift, bf = (float)(b - (m - mh)
 * * a), k0f = (float)(k0 + kx * (mh - m)), so data far from zero (the 1e6-offset case)
 * loses nothing to it.  The error against the exact value is at most 2 FLT_EPSILON S plus
 * second-order terms, S the channel's terms: |a| max|x - m| + |b| for y (five roundings of
 * half an ulp at most: x - mh, af, the product, the sum, bf), |kd| max|g| + |kx| max|x - m|
 * + |k0| for dx (x - mh, kxf and their product on the x term; kdf and its product on the g
 * term; k0f; the sum of the g term and k0f; the last sum: 3 + 3 + 2 of the terms and one
 * of the result, at most 4 half-ulps of the terms as computed, which exceed S by at most
 * |kx| |m - mh|: + FLT_EPSILON^2 (2 |kx m| + 5 S) for dx).  Adding the two products first
 * would round the x term four times and give 2.5 FLT_EPSILON S.
 *
 * An element whose t (before the ReLU) is not finite -- a NaN or infinite input, or a
 * float32 overflow that double would not have -- is computed in double instead (norm_one,
 * dx_one: the float64 path's value, canonical NaNs), and so is every element of a channel
 * whose parameters float32 cannot carry: a parameter that is not finite (t is then never
 * finite), or a scale (af, kdf, kxf) that float32 holds only as a subnormal or zero
 * (f32_scale makes it NaN).  Each element's value depends on that element and its channel
 * alone, so every walk, partition, thread count and variant stores the same bits.
 */
enum { BN_F32_NORM = 0, BN_F32_DX = 1, BN_F32_DXE = 2 };

typedef struct {
    const double *d0, *d1, *d2, *d3;   /* per channel, the double path's parameters:
                                           normalize m, a, b (d3 unused); dx m, kd, kx, k0 */
    ptrdiff_t Cp, S;                   /* element j of a period belongs to channel
                                           (j % Cp) / S */
} BN_FN(nfb);

typedef struct {
    const float *q0, *q1, *q2, *q3;   /* the float32 parameters (per channel or element) */
} BN_FN(fq);

/* (float)v, or NaN where float32 holds v only as a subnormal or as zero (|v| < FLT_MIN,
 * v != 0): a scale float32 would lose precision on.  Branch-free (see f32_params). */
static inline float BN_FN(f32_scale)(double v)
{
    const float f = (float)v;
    uint32_t u;
    memcpy(&u, &f, 4);
    const uint32_t lost = ((u & 0x7f800000u) == 0) & (v != 0.0);
    u = lost ? 0x7fc00000u : u;
    float r;
    memcpy(&r, &u, 4);
    return r;
}

/* Per-channel float32 parameters of formula op from the double ones (d0..d3 as in nfb):
 * those the formula reads (normalize q0..q2, dx q0..q3, eval dx q1; ew_f32 points the
 * others at one of them).  No other test is needed: where a parameter is not finite (m
 * beyond float32's range, a NaN or huge scale or shift), every t of the channel is not
 * finite either and falls back element by element.  Branch-free, so that GCC vectorises it
 * (with scalar tests it took 1.6 ns per channel, a sixth of the inference of (32, 8192);
 * -fopt-info-vec: both loops vectorised). */
static void BN_FN(f32_params)(ptrdiff_t C, const int op, const double *d0, const double *d1,
                              const double *d2, const double *d3, float *q0, float *q1,
                              float *q2, float *q3)
{
    if (op == BN_F32_DXE) {
        for (ptrdiff_t c = 0; c < C; c++) q1[c] = BN_FN(f32_scale)(d1[c]);
        return;
    }
    for (ptrdiff_t c = 0; c < C; c++) {
        const float h = (float)d0[c];
        q0[c] = h;
        q1[c] = BN_FN(f32_scale)(d1[c]);
        if (op == BN_F32_NORM) {
            q2[c] = (float)(d2[c] - (d0[c] - (double)h) * d1[c]);
        } else {
            q2[c] = BN_FN(f32_scale)(d2[c]);
            q3[c] = (float)(d3[c] + d2[c] * ((double)h - d0[c]));
        }
    }
}

/* One element (the scalar form of the vector lanes): g, x at period position j, with the
 * parameters q0..q3. */
static inline float BN_FN(f32_one)(const int op, float g, float x, float q0, float q1, float q2,
                                   float q3, const BN_FN(nfb) *fb, ptrdiff_t j, int relu)
{
    const float t = op == BN_F32_NORM ? (x - q0) * q1 + q2
                    : op == BN_F32_DX ? (g * q1 + q3) + (x - q0) * q2
                                      : g * q1;
    if (!(t - t == 0.0f)) {
        const ptrdiff_t c = (j % fb->Cp) / fb->S;
        const float v = op == BN_F32_NORM
                            ? BN_FN(norm_one)(x, fb->d0[c], fb->d1[c], fb->d2[c], relu)
                            : BN_FN(dx_one)(&g, &x, 0, c, fb->d0, NULL, NULL, fb->d1, fb->d2,
                                            fb->d3, 0, op == BN_F32_DXE);
        return v == v ? v : (float)NAN;
    }
    return relu ? (t <= 0.0f ? 0.0f : t) : t;
}

/* The L elements at y rewritten from g and x one by one (a vector or span with a value
 * that is not finite); parameters per element (inc == 1) or scalars (inc == 0). */
static __attribute__((noinline, cold)) void BN_FN(f32_fix_span)(
    int op, const float *g, const float *x, float *y, ptrdiff_t L, BN_FN(fq) q, ptrdiff_t inc,
    const BN_FN(nfb) *fb, ptrdiff_t j0, int relu)
{
    for (ptrdiff_t k = 0; k < L; k++)
        y[k] = BN_FN(f32_one)(op, op == BN_F32_NORM ? 0.0f : g[k], x[k], q.q0[inc * k],
                              q.q1[inc * k], q.q2[inc * k], q.q3[inc * k], fb, j0 + k, relu);
}

/* One vector's t for the eight elements at g and x with its non-finite lanes noted in
 * *acc and the ReLU applied (the defer case of f32_vec, kept in a register). */
static inline __attribute__((always_inline)) bn_f8 BN_FN(f32_val)(
    const int op, const float *g, const float *x, bn_f8 v0, bn_f8 v1, bn_f8 v2, bn_f8 v3,
    const int relu, bn_f8 *acc)
{
    bn_f8 t = op == BN_F32_NORM ? bn_f8_norm(bn_f8_ld(x), v0, v1, v2)
              : op == BN_F32_DX ? bn_f8_dx(bn_f8_ld(g), bn_f8_ld(x), v0, v1, v2, v3)
                                : bn_f8_mul(bn_f8_ld(g), v1);
    *acc = bn_f8_flag(*acc, t);
    return relu ? bn_f8_relu(t) : t;
}

/* One vector: t for the eight elements at g and x, stored at y.  defer: its non-finite
 * lanes are only noted in *acc (the span is fixed afterwards: f32_span); else they are
 * fixed before the store (in place, where an input is gone once y is stored).  v0..v3:
 * the parameters as vectors; q: where they are in memory (the fix reads them). */
static inline __attribute__((always_inline)) void BN_FN(f32_vec)(
    const int op, const float *g, const float *x, float *y, bn_f8 v0, bn_f8 v1, bn_f8 v2,
    bn_f8 v3, BN_FN(fq) q, const ptrdiff_t inc, const BN_FN(nfb) *fb, ptrdiff_t j,
    const int relu, const int defer, bn_f8 *acc, int nts)
{
    if (defer) {
        bn_f8_st(y, BN_FN(f32_val)(op, g, x, v0, v1, v2, v3, relu, acc), nts);
        return;
    }
    bn_f8 t = op == BN_F32_NORM ? bn_f8_norm(bn_f8_ld(x), v0, v1, v2)
              : op == BN_F32_DX ? bn_f8_dx(bn_f8_ld(g), bn_f8_ld(x), v0, v1, v2, v3)
                                : bn_f8_mul(bn_f8_ld(g), v1);
    if (__builtin_expect(bn_f8_bad(t), 0)) {
        float tmp[8];
        BN_FN(f32_fix_span)(op, g, x, tmp, 8, q, inc, fb, j, relu);
        t = bn_f8_ld(tmp);
    } else if (relu) {
        t = bn_f8_relu(t);
    }
    bn_f8_st(y, t, nts);
}

/* The parameters q advanced by k elements (per-element parameters). */
static inline BN_FN(fq) BN_FN(fq_at)(BN_FN(fq) q, ptrdiff_t k)
{
    BN_FN(fq) r = {q.q0 + k, q.q1 + k, q.q2 + k, q.q3 + k};
    return r;
}

/* A streaming span's prefetch from DRAM, once per 64 bytes of x (and of g: dx), as the
 * reductions prefetch (bn_prefetch_ahead). */
static inline void BN_FN(f32_prefetch)(const float *x, const float *g)
{
    bn_prefetch_ahead(x, 0);
    if (g) bn_prefetch_ahead(g, 0);
}

/* y over a span of L elements starting at period position j0, parameters per element
 * (inc == 1) or scalars (inc == 0).  As norm_span_s, a span of more than 8 elements whose
 * length is not a multiple of 8 ends with one vector over its last 8 elements, computed
 * before the others are stored (in place gives the same values).  With defer (y is no
 * input) the test for non-finite values is one OR per vector and one test per span, and a
 * span with one is rewritten element by element (a test and branch per vector is slower:
 * on AVX2 from L1, benchmarks/loops_f32.c "defer" against "f32"); in place, each vector
 * is tested and fixed before its store. */
static inline __attribute__((always_inline)) void BN_FN(f32_span)(
    const int op, const float *g, const float *x, float *y, ptrdiff_t L, BN_FN(fq) q,
    const ptrdiff_t inc, const BN_FN(nfb) *fb, ptrdiff_t j0, const int relu, const int defer,
    int nts)
{
    ptrdiff_t i = 0;
    float tmp[8];
    bn_f8 acc = bn_f8_zero(), tl = acc;   /* tl: the last vector (defer, inc == 1) */
    const int last = !nts && L > 8 && (L & 7) != 0;
    const int hasg = op != BN_F32_NORM;
    if (inc == 0) {
        const bn_f8 v0 = bn_f8_splat(*q.q0), v1 = bn_f8_splat(*q.q1), v2 = bn_f8_splat(*q.q2),
                    v3 = bn_f8_splat(*q.q3);
        /* rows (inc == 0) reach here only in place, streaming or shorter than 8 elements:
         * f32_rows_fast takes the others, so a deferred last vector never occurs here */
        if (last)
            BN_FN(f32_vec)(op, hasg ? g + L - 8 : g, x + L - 8, tmp, v0, v1, v2, v3, q, 0, fb,
                           j0 + L - 8, relu, defer, &acc, 0);
        for (; i + 8 <= L; i += 8) {
            if (nts && !(i & 15)) BN_FN(f32_prefetch)(x + i, hasg ? g + i : NULL);
            BN_FN(f32_vec)(op, hasg ? g + i : g, x + i, y + i, v0, v1, v2, v3, q, 0, fb, j0 + i,
                           relu, defer, &acc, nts);
        }
    } else {
        const ptrdiff_t e = L - 8;
        if (last && defer)
            tl = BN_FN(f32_val)(op, hasg ? g + e : g, x + e, bn_f8_ld(q.q0 + e),
                                bn_f8_ld(q.q1 + e), bn_f8_ld(q.q2 + e), bn_f8_ld(q.q3 + e),
                                relu, &acc);
        else if (last)
            BN_FN(f32_vec)(op, hasg ? g + e : g, x + e, tmp, bn_f8_ld(q.q0 + e),
                           bn_f8_ld(q.q1 + e), bn_f8_ld(q.q2 + e), bn_f8_ld(q.q3 + e),
                           BN_FN(fq_at)(q, e), 1, fb, j0 + e, relu, defer, &acc, 0);
        for (; i + 8 <= L; i += 8) {
            if (nts && !(i & 15)) BN_FN(f32_prefetch)(x + i, hasg ? g + i : NULL);
            BN_FN(f32_vec)(op, hasg ? g + i : g, x + i, y + i, bn_f8_ld(q.q0 + i),
                           bn_f8_ld(q.q1 + i), bn_f8_ld(q.q2 + i), bn_f8_ld(q.q3 + i),
                           BN_FN(fq_at)(q, i), 1, fb, j0 + i, relu, defer, &acc, nts);
        }
    }
    if (last && defer && inc) {
        bn_f8_st(y + L - 8, tl, 0);
    } else if (last) {
        memcpy(y + L - 8, tmp, sizeof tmp);
    } else {
        for (ptrdiff_t k = 0; k < L - i; k++) {
            const ptrdiff_t o = inc * (i + k);
            tmp[k] = BN_FN(f32_one)(op, hasg ? g[i + k] : 0.0f, x[i + k], q.q0[o], q.q1[o],
                                    q.q2[o], q.q3[o], fb, j0 + i + k, relu);
        }
        BN_FN(store_tail)(y + i, tmp, L - i, nts);
    }
    if (defer && __builtin_expect(bn_f8_flagged(acc), 0))
        BN_FN(f32_fix_span)(op, g, x, y, L, q, inc, fb, j0, relu);
}

typedef struct {
    const bn_plan *p;
    const float *g, *x;   /* g: dy (dx), NULL (normalize) */
    float *y;
    BN_FN(fq) q;          /* rows: per channel; columns: per element of a period */
    BN_FN(nfb) fb;
    int op, relu, defer, nts;   /* defer: y is no input (f32_span) */
} BN_FN(f32_ctx);

/* The span at element offset o of the tensor and period position j0, parameters from k->q
 * at index jq (per element), in the case of the enclosing walk (its op, relu and defer). */
#define BN_F32_SPAN_AT(k, o, L, jq, j0)                                                     \
    BN_FN(f32_span)(op, op == BN_F32_NORM ? NULL : (k)->g + (o), (k)->x + (o), (k)->y + (o), \
                    L, BN_FN(fq_at)((k)->q, jq), 1, &(k)->fb, j0, relu, defer, (k)->nts)

/* One row of f32_rows_fast: S >= 8 elements at g (dx) and x, y, the parameters of its
 * channel q0..q3: ceil(S / 8) vectors, the last over its last 8 elements (computed first,
 * stored last), non-finite lanes noted in *acc before the ReLU (f32_val); with store 0
 * only *acc. */
static inline __attribute__((always_inline)) void BN_FN(f32_row)(
    const int op, const float *g, const float *x, float *y, ptrdiff_t S, float q0, float q1,
    float q2, float q3, const int relu, const int store, bn_f8 *acc)
{
    const ptrdiff_t e = S - 8;
    const int hasg = op != BN_F32_NORM;
    const bn_f8 v0 = bn_f8_splat(q0), v1 = bn_f8_splat(q1), v2 = bn_f8_splat(q2),
                v3 = op == BN_F32_DX ? bn_f8_splat(q3) : v2;
    const bn_f8 tl = BN_FN(f32_val)(op, hasg ? g + e : g, x + e, v0, v1, v2, v3, relu, acc);
    for (ptrdiff_t i = 0; i < e; i += 8) {
        const bn_f8 t = BN_FN(f32_val)(op, hasg ? g + i : g, x + i, v0, v1, v2, v3, relu, acc);
        if (store) bn_f8_st(y + i, t, 0);
    }
    if (store) bn_f8_st(y + e, tl, 0);
}

/* The rows [r0, r1) of f32_rows_fast once its non-finite flag is set: each row's flag
 * computed again (out of place: x is intact), and only the rows that have a non-finite
 * value rewritten element by element.  Rewriting every row of the item made one NaN in
 * an inference of (1, 512, 7, 7) cost 6.0 -> 35.5 us (benchmarks/README.md item 83). */
static __attribute__((noinline, cold)) void BN_FN(f32_rows_fix)(
    const BN_FN(f32_ctx) *k, ptrdiff_t r0, ptrdiff_t r1, int op, int relu)
{
    const ptrdiff_t C = k->p->C, S = k->p->S;
    const int hasg = op != BN_F32_NORM;
    for (ptrdiff_t r = r0; r < r1; r++) {
        const ptrdiff_t c = r % C;
        const float *x = k->x + r * S, *g = hasg ? k->g + r * S : NULL;
        bn_f8 acc = bn_f8_zero();
        BN_FN(f32_row)(op, g, x, NULL, S, k->q.q0[c], k->q.q1[c], k->q.q2[c], k->q.q3[c], 0,
                       0, &acc);
        if (bn_f8_flagged(acc))
            BN_FN(f32_fix_span)(op, g, x, k->y + r * S, S, BN_FN(fq_at)(k->q, c), 0, &k->fb,
                                c * S, relu);
    }
}

/* Rows out of place (defer, no streaming) of S >= 8 elements, formula op: each row as
 * f32_row, and one test of the non-finite flag for all rows [r0, r1), whose rows with a
 * non-finite value are then rewritten (f32_rows_fix; a test per row and f32_span's general
 * form cost about 9 cycles a row: inference of (1, 512, 7, 7), benchmarks/README.md item
 * 64). */
static inline __attribute__((always_inline)) void BN_FN(f32_rows_fast)(
    const BN_FN(f32_ctx) *k, ptrdiff_t r0, ptrdiff_t r1, const int op, const int relu)
{
    const ptrdiff_t C = k->p->C, S = k->p->S;
    const float *q0 = k->q.q0, *q1 = k->q.q1, *q2 = k->q.q2, *q3 = k->q.q3;
    const int hasg = op != BN_F32_NORM;
    bn_f8 acc = bn_f8_zero();
    ptrdiff_t c = r0 % C;
    for (ptrdiff_t r = r0; r < r1; r++) {
        BN_FN(f32_row)(op, hasg ? k->g + r * S : NULL, k->x + r * S, k->y + r * S, S, q0[c],
                       q1[c], q2[c], q3[c], relu, 1, &acc);
        if (++c == C) c = 0;
    }
    if (__builtin_expect(bn_f8_flagged(acc), 0)) BN_FN(f32_rows_fix)(k, r0, r1, op, relu);
}

static inline __attribute__((always_inline)) void BN_FN(f32_rows_case)(
    const BN_FN(f32_ctx) *k, ptrdiff_t r0, ptrdiff_t r1, const int op, const int relu,
    const int defer)
{
    const ptrdiff_t C = k->p->C, S = k->p->S;
    if (defer && !k->nts && S >= 8) {
        BN_FN(f32_rows_fast)(k, r0, r1, op, relu);
        return;
    }
    ptrdiff_t c = r0 % C;
    for (ptrdiff_t r = r0; r < r1; r++) {   /* row r: period position c * S of k->fb */
        BN_FN(f32_span)(op, op == BN_F32_NORM ? NULL : k->g + r * S, k->x + r * S,
                        k->y + r * S, S, BN_FN(fq_at)(k->q, c), 0, &k->fb, c * S, relu,
                        defer, k->nts);
        if (++c == C) c = 0;
    }
}

/*
 * A walk over units [u0, u1) (rows, periods or column tiles) in the formula, ReLU and defer
 * case of its context, each case a loop of its own (NAME_case with constants; the backward
 * has no float32 form with the ReLU), then the fence of its streaming stores.
 */
#define BN_F32_WALK(name)                                                                   \
    static void BN_FN(name)(const void *ctx, ptrdiff_t u0, ptrdiff_t u1)                    \
    {                                                                                       \
        const BN_FN(f32_ctx) *k = ctx;                                                      \
        if (k->op == BN_F32_DX)                                                             \
            BN_BY_FLAGS(BN_FN(name##_case), 0, k->defer, k, u0, u1, BN_F32_DX);             \
        else if (k->op == BN_F32_DXE)                                                       \
            BN_BY_FLAGS(BN_FN(name##_case), 0, k->defer, k, u0, u1, BN_F32_DXE);            \
        else                                                                                \
            BN_BY_FLAGS(BN_FN(name##_case), k->relu, k->defer, k, u0, u1, BN_F32_NORM);     \
        bn_stream_fence(k->nts);                                                            \
    }

/* Rows (the rows layout, or the columns layout's rows walk). */
BN_F32_WALK(f32_rows)

/* Whole periods [p0, p1) (the spans walk), the cases outside the loop (a call per period
 * that chose its case: one thread, avx512, inference of (256, 64, 3, 3) with the channel
 * axis last, C = 3 and periods of 72, 38 -> 26 us; (65536, 64) forced to spans 966 ->
 * 818 us). */
static inline __attribute__((always_inline)) void BN_FN(f32_periods_case)(
    const BN_FN(f32_ctx) *k, ptrdiff_t p0, ptrdiff_t p1, const int op, const int relu,
    const int defer)
{
    const ptrdiff_t P = k->p->period;
    for (ptrdiff_t q = p0; q < p1; q++) BN_F32_SPAN_AT(k, q * P, P, 0, 0);
}

BN_F32_WALK(f32_periods)

/* Column tiles [t0, t1) down all rows. */
static inline __attribute__((always_inline)) void BN_FN(f32_tiles_case)(
    const BN_FN(f32_ctx) *k, ptrdiff_t t0, ptrdiff_t t1, const int op, const int relu,
    const int defer)
{
    const ptrdiff_t P = k->p->period, N = k->p->N;
    for (ptrdiff_t t = t0; t < t1; t++) {
        const ptrdiff_t j0 = t * BN_EW_TILE, w = P - j0 < BN_EW_TILE ? P - j0 : BN_EW_TILE;
        for (ptrdiff_t r = 0; r < N; r++) BN_F32_SPAN_AT(k, r * P + j0, w, j0, j0);
    }
}

BN_F32_WALK(f32_tiles)

/* The np periods of 64 at x and y of f32_periods64 once its non-finite flag is set (out
 * of place): each period's flag computed again, and only the periods with a non-finite
 * value rewritten element by element (as f32_rows_fix). */
static __attribute__((noinline, cold)) void BN_FN(f32_periods64_fix)(
    const BN_FN(f32_ctx) *k, const float *x, float *y, ptrdiff_t np, int relu)
{
    for (ptrdiff_t q = 0; q < np; q++) {
        bn_f8 acc = bn_f8_zero();
        for (int t = 0; t < 8; t++) {
            const bn_f8 v2 = bn_f8_ld(k->q.q2 + 8 * t);
            (void)BN_FN(f32_val)(BN_F32_NORM, NULL, x + 64 * q + 8 * t,
                                 bn_f8_ld(k->q.q0 + 8 * t), bn_f8_ld(k->q.q1 + 8 * t), v2, v2,
                                 0, &acc);
        }
        if (bn_f8_flagged(acc))
            BN_FN(f32_fix_span)(BN_F32_NORM, NULL, x + 64 * q, y + 64 * q, 64, k->q, 1,
                                &k->fb, 0, relu);
    }
}

/* Period-64 walk (normalize only): np periods of 64 elements with the 24 parameter vectors
 * in registers (AVX-512 has 32; AVX2 and SSE2 spill some: measured below, plan.c), each
 * span's test deferred to the end of the item's periods unless in place. */
static inline __attribute__((always_inline)) void BN_FN(f32_periods64_case)(
    const BN_FN(f32_ctx) *k, ptrdiff_t p0, ptrdiff_t p1, const int relu, const int defer)
{
    const float *x = k->x + 64 * p0;
    float *y = k->y + 64 * p0;
    const ptrdiff_t np = p1 - p0;
    bn_f8 mv[8], av[8], bv[8];
    for (int t = 0; t < 8; t++) {
        mv[t] = bn_f8_ld(k->q.q0 + 8 * t);
        av[t] = bn_f8_ld(k->q.q1 + 8 * t);
        bv[t] = bn_f8_ld(k->q.q2 + 8 * t);
    }
    bn_f8 acc = bn_f8_zero();
    const int pf = k->nts;   /* from DRAM (streaming): prefetch as the rows walk (item 77) */
    for (ptrdiff_t q = 0; q < np; q++) {
        if (pf)
            for (int b = 0; b < 256; b += 64) bn_prefetch_ahead(x + 64 * q, b);
#pragma GCC unroll 8
        for (int t = 0; t < 8; t++)
            BN_FN(f32_vec)(BN_F32_NORM, NULL, x + 64 * q + 8 * t, y + 64 * q + 8 * t, mv[t],
                           av[t], bv[t], bv[t], BN_FN(fq_at)(k->q, 8 * t), 1, &k->fb, 8 * t,
                           relu, defer, &acc, k->nts);
    }
    if (defer && __builtin_expect(bn_f8_flagged(acc), 0))
        BN_FN(f32_periods64_fix)(k, x, y, np, relu);
}

static void BN_FN(f32_periods64)(const void *ctx, ptrdiff_t u0, ptrdiff_t u1)
{
    const BN_FN(f32_ctx) *k = ctx;
    BN_BY_FLAGS(BN_FN(f32_periods64_case), k->relu, k->defer, k, u0, u1);
    bn_stream_fence(k->nts);
}

/* Per-element float32 parameters of one period from per-channel ones (BN_FN(expand)). */
static void BN_FN(expandf)(float *e, const float *v, ptrdiff_t P, ptrdiff_t Cp, ptrdiff_t S)
{
    const ptrdiff_t C = Cp / S;
    for (ptrdiff_t c = 0; c < C; c++)
        for (ptrdiff_t s = 0; s < S; s++) e[c * S + s] = v[c];
    for (ptrdiff_t j = Cp; j < P; j++) e[j] = e[j - Cp];
}

/* The element-wise pass op of float32 data in float32 arithmetic, y from g (dx: dy) and x,
 * with the double per-channel parameters d0..d3 (nfb), under plan p. */
static int BN_FN(ew_f32)(const bn_plan *p, const int op, const float *g, const float *x,
                         float *y, const double *d0, const double *d1, const double *d2,
                         const double *d3, int relu, int defer, int nts)
{
    const ptrdiff_t N = p->N, C = p->C, S = p->S, Cp = C * S;
    const int ew_rows = p->layout == BN_LAYOUT_ROWS || p->ew_walk == BN_WALK_ROWS;
    const int direct = ew_rows || bn_params_direct(p->period, Cp, S);
    const ptrdiff_t P = ew_rows ? 0 : p->period;
    /* The parameters the formula reads (nq of them, first at q[1] for eval dx); the others
     * point at one of those: their values are never used, but the scalar forms load them. */
    const int nq = op == BN_F32_DX ? 4 : op == BN_F32_NORM ? 3 : 1;
    float *buf = (float *)malloc(sizeof(float) * (size_t)nq * (size_t)(C + (direct ? 0 : P)));
    if (!buf) return BN_ENOMEM;
    float *q[4];
    for (int v = 0; v < 4; v++) q[v] = buf + (op == BN_F32_DXE ? 0 : v < nq ? v : nq - 1) * C;
    BN_FN(f32_params)(C, op, d0, d1, d2, d3, q[0], q[1], q[2], q[3]);
    BN_FN(f32_ctx) k = {p, g, x, y, {q[0], q[1], q[2], q[3]}, {d0, d1, d2, d3, Cp, S}, op,
                        relu, defer, nts};
    if (ew_rows) {
        BN_FN(run_ew_items)(p, BN_FN(f32_rows), &k);
        free(buf);
        return BN_OK;
    }
    if (!direct) {   /* per element of a period: each distinct array expanded once */
        float *e = buf + nq * C, *qe[4];
        for (int v = 0; v < nq; v++) BN_FN(expandf)(e + v * P, buf + v * C, P, Cp, S);
        for (int v = 0; v < 4; v++) qe[v] = e + (q[v] - buf) / C * P;
        const BN_FN(fq) qp = {qe[0], qe[1], qe[2], qe[3]};
        k.q = qp;
    }
    BN_FN(run_ew_items)(p, p->ew_walk == BN_WALK_TILES ? BN_FN(f32_tiles)
                           : p->ew_walk == BN_WALK_PERIOD64 && op == BN_F32_NORM
                               ? BN_FN(f32_periods64)
                               : BN_FN(f32_periods), &k);
    const ptrdiff_t done = p->ew_walk == BN_WALK_TILES ? N * Cp : p->ew_units * P,
                    rem = N * Cp - done;
    if (rem) {   /* less than a period: one span, the formula chosen per vector */
        BN_FN(f32_span)(op, op == BN_F32_NORM ? NULL : g + done, x + done, y + done, rem, k.q,
                        1, &k.fb, 0, relu, defer, nts);
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
    if (relu ? p->ew_f32_relu : p->ew_f32)
        return BN_FN(ew_f32)(p, BN_F32_NORM, NULL, x, y, mean, scale, shift, shift, relu, x != y,
                             nts);
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

/* ================================================================= backward dx */


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
    BN_BY_FLAGS(BN_FN(dx_rows_case), k->relu, k->eval, k, r0, r1);
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
#if BN_IS_F32
    if (relu ? p->ew_f32_relu : p->ew_f32)   /* k_x and k_0 unread in eval mode, mean too */
        return BN_FN(ew_f32)(p, eval ? BN_F32_DXE : BN_F32_DX, dy, x, dx, mean ? mean : k_dy,
                             k_dy, eval ? k_dy : k_x, eval ? k_dy : k_0, 0,
                             dx != dy && dx != x, nts);
#endif
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
