/*
 * The reduction passes for one storage type T: per-channel statistics (moments) and the
 * backward sums (backward_reduce).  All arithmetic is in double.  Each traversal is a
 * named function; both passes share the partition skeletons of bn_common.h and follow
 * the plan (bn_plan.h) for layout and walk.  Every walk of a pass performs the same
 * additions in the same order (each column adds its rows in order, from zero), so the
 * walk never changes a bit.
 */

/* ======================================================================= statistics */

/*
 * Mean and M2 of a contiguous, cache-resident segment of L > 0 elements, in coordinates
 * shifted by K (the channel's first value): returns mean(x - K) and M2.
 *
 * One pass accumulates s1 = sum(d) and s2 = sum(d^2) of d = x - K in double; then
 * M2 = s2 - s1 * m, whose relative rounding error is about u * (1 + 2 m^2 / var) with
 * m = s1 / L.  While m^2 <= BN_SHIFT_COND * var (16) that is below 2^-47 (the shift keeps m
 * small: K is a value of the same channel).  Otherwise (K far from this segment's values,
 * or a constant segment away from K) a second pass computes the corrected two-pass
 * M2 = sum((d - m)^2) - (sum(d - m))^2 / L, exact up to a few ulps.  The choice depends on
 * the data only, so results stay deterministic.
 */
/* The shifted sums' accumulators of a segment (seg_moments), kept between calls by the
 * fused training forward, which reads a segment in pieces (bn_train.h: chan_stats). */
typedef struct {
    bn_acc a0, a1, b0, b1;
} BN_FN(seg_accs);

/* seg_moments's first loop over the 16-element blocks of [i0, i1) (i0 and i1 - i0
 * multiples of 16, or i1 the segment's end): the same additions, whatever the pieces. */
static inline __attribute__((always_inline)) void BN_FN(seg_sums)(
    const T *x, ptrdiff_t i0, ptrdiff_t i1, double K, BN_FN(seg_accs) *acc, const int pf)
{
    const bn_vd kv = bn_splat(K);
    bn_acc a0 = acc->a0, a1 = acc->a1, b0 = acc->b0, b1 = acc->b1;
    for (ptrdiff_t i = i0; i + 16 <= i1; i += 16) {
        if (pf)   /* from DRAM */
            for (int b = 0; b < 16 * (int)sizeof(T); b += 64) bn_prefetch_ahead(x + i, b);
        bn_vd d0 = BN_FN(ld)(x + i) - kv;
        bn_vd d1 = BN_FN(ld)(x + i + 8) - kv;
        a0 = bn_acc_add(a0, d0);
        a1 = bn_acc_add(a1, d1);
        b0 = bn_acc_add(b0, d0 * d0);
        b1 = bn_acc_add(b1, d1 * d1);
    }
    acc->a0 = a0;
    acc->a1 = a1;
    acc->b0 = b0;
    acc->b1 = b1;
}

/* The shifted sums s1 = sum(d), s2 = sum(d^2) of a segment from its accumulators and the
 * elements after its 16-element blocks (i = L rounded down to 16). */
static inline __attribute__((always_inline)) void BN_FN(seg_s12)(
    const T *x, ptrdiff_t L, double K, const BN_FN(seg_accs) *acc, double *s1p, double *s2p)
{
    const bn_vd kv = bn_splat(K);
    bn_acc a0 = acc->a0, a1 = acc->a1, b0 = acc->b0, b1 = acc->b1;
    ptrdiff_t i = L & ~(ptrdiff_t)15;
    if (i + 8 <= L) {
        bn_vd d0 = BN_FN(ld)(x + i) - kv;
        a0 = bn_acc_add(a0, d0);
        b0 = bn_acc_add(b0, d0 * d0);
        i += 8;
    }
    double s1, s2;
    bn_acc_hsum2(bn_acc_plus(a0, a1), bn_acc_plus(b0, b1), &s1, &s2);
    for (; i < L; i++) {
        double d = (double)x[i] - K;
        s1 += d;
        s2 += d * d;
    }
    *s1p = s1;
    *s2p = s2;
}

/* The second pass of an ill-conditioned segment (mean m of x - K): M2 = sum((d - m)^2) -
 * (sum(d - m))^2 / L. */
static __attribute__((noinline)) double BN_FN(seg_two_pass)(const T *x, ptrdiff_t L, double K,
                                                           double m)
{
    const bn_vd kv = bn_splat(K), mv = bn_splat(m);
    bn_acc q0 = bn_acc_zero(), q1 = bn_acc_zero(), k0 = bn_acc_zero(), k1 = bn_acc_zero();
    ptrdiff_t i = 0;
    for (; i + 16 <= L; i += 16) {
        bn_vd d0 = (BN_FN(ld)(x + i) - kv) - mv;
        bn_vd d1 = (BN_FN(ld)(x + i + 8) - kv) - mv;
        q0 = bn_acc_add(q0, d0 * d0);
        q1 = bn_acc_add(q1, d1 * d1);
        k0 = bn_acc_add(k0, d0);
        k1 = bn_acc_add(k1, d1);
    }
    if (i + 8 <= L) {
        bn_vd d0 = (BN_FN(ld)(x + i) - kv) - mv;
        q0 = bn_acc_add(q0, d0 * d0);
        k0 = bn_acc_add(k0, d0);
        i += 8;
    }
    double q, k;
    bn_acc_hsum2(bn_acc_plus(q0, q1), bn_acc_plus(k0, k1), &q, &k);
    for (; i < L; i++) {
        double d = ((double)x[i] - K) - m;
        q += d * d;
        k += d;
    }
    return q - k * k / (double)L;
}

/* A segment's M2 from its mean m of x - K, the shifted sums' r = s2 - s1 * m and r / L:
 * r or, where that is ill-conditioned, a second pass over its L values at x; at least 0. */
static inline __attribute__((always_inline)) double BN_FN(seg_m2)(
    const T *x, ptrdiff_t L, double K, double m, double r, double rL)
{
    if (!(m * m <= BN_SHIFT_COND * rL)) r = BN_FN(seg_two_pass)(x, L, K, m);
    return r < 0.0 ? 0.0 : r;
}

/* A segment's mean and M2 from its shifted sums s1, s2 (seg_s12; seg_m2). */
static inline __attribute__((always_inline)) void BN_FN(seg_stats)(
    const T *x, ptrdiff_t L, double K, double s1, double s2, double *mean, double *m2)
{
    const double m = s1 / (double)L, r = s2 - s1 * m;
    *mean = m;
    *m2 = BN_FN(seg_m2)(x, L, K, m, r, r / (double)L);
}

/* The rest of seg_moments after its 16-element blocks: the mean and M2 (seg_stats). */
static inline __attribute__((always_inline)) void BN_FN(seg_finish)(
    const T *x, ptrdiff_t L, double K, const BN_FN(seg_accs) *acc, double *mean, double *m2)
{
    double s1, s2;
    BN_FN(seg_s12)(x, L, K, acc, &s1, &s2);
    BN_FN(seg_stats)(x, L, K, s1, s2, mean, m2);
}

static inline void BN_FN(seg_accs_zero)(BN_FN(seg_accs) *acc)
{
    acc->a0 = acc->a1 = acc->b0 = acc->b1 = bn_acc_zero();
}

/* The shifted sums s1, s2 of a whole segment of L values at x (seg_sums, then seg_s12).
 * pf: prefetch ahead (the input is not cache-resident: BN_PF_BYTES). */
static inline __attribute__((always_inline)) void BN_FN(seg_sums_all)(
    const T *x, ptrdiff_t L, double K, double *s1, double *s2, const int pf)
{
    BN_FN(seg_accs) acc;
    BN_FN(seg_accs_zero)(&acc);
    if (pf)
        BN_FN(seg_sums)(x, 0, L, K, &acc, 1);
    else
        BN_FN(seg_sums)(x, 0, L, K, &acc, 0);
    BN_FN(seg_s12)(x, L, K, &acc, s1, s2);
}

static inline __attribute__((always_inline)) void BN_FN(seg_moments)(
    const T *x, ptrdiff_t L, double K, double *mean, double *m2, const int pf)
{
    double s1, s2;
    BN_FN(seg_sums_all)(x, L, K, &s1, &s2, pf);
    BN_FN(seg_stats)(x, L, K, s1, s2, mean, m2);
}

/* The shift of channel c: its first value, or 0 if that is not finite. */
static inline double BN_FN(shift_of)(const T *x, ptrdiff_t S, ptrdiff_t c)
{
    double K = (double)x[c * S];
    return isfinite(K) ? K : 0.0;
}

/* ---- rows layout ---- */

typedef struct {
    const bn_plan *p;
    const T *x;
    double *pn, *pm, *pq;   /* per row group and channel: count, mean(x - K), M2 */
} BN_FN(row_stats_ctx);

/* A row's segment (mean bm, M2 bq of S values) merged into its channel's running mean and
 * M2 after cnt values (f1 = S / (cnt + S), f2 = cnt * S / (cnt + S): bn_chan_merge's
 * operations). */
static inline void BN_FN(row_merge)(double cnt, double f1, double f2, double bm, double bq,
                                    double *mean, double *m2)
{
    if (cnt == 0) {
        *mean = bm;
        *m2 = bq;
    } else {
        const double delta = bm - *mean;
        *mean += delta * f1;
        *m2 += bq + delta * delta * f2;
    }
}

/*
 * Statistics of channels [c0, c1) (at most BN_ROW_CHUNK) over the rows of a row group,
 * walked in memory order; each channel merges its segments in row order.
 */
static void BN_FN(row_moments_item)(const void *ctx, ptrdiff_t it)
{
    const BN_FN(row_stats_ctx) *k = ctx;
    const bn_row_item r = bn_row_item_of(k->p, it);
    const ptrdiff_t C = k->p->C, S = k->p->S, w = r.c1 - r.c0;
    const T *x = k->x;
    const int pf = !k->p->resident;   /* from DRAM: prefetch (BN_PF_BYTES ahead) */
    double n[BN_ROW_CHUNK], mean[BN_ROW_CHUNK], m2[BN_ROW_CHUNK], K[BN_ROW_CHUNK];
    for (ptrdiff_t j = 0; j < w; j++) {
        K[j] = BN_FN(shift_of)(x, S, r.c0 + j);
        n[j] = mean[j] = m2[j] = 0.0;
    }
    if (S <= BN_SEG) {
        /* One segment per row: every channel has merged the same count before each row,
         * so bn_chan_merge's two divisions are made once per row for all channels (the
         * same operations, the same bits; per segment they were a quarter of the
         * statistics of (16, 512, 14, 14), S = 196). */
        /* And four channels' segments finish together: their two divisions by S (the
         * mean, and M2 / S for the conditioning test) as vector divisions, lane by lane
         * the same IEEE operations; one at a time they were 17 % of the statistics of
         * (1, 512, 7, 7) (benchmarks/README.md item 80). */
        double cnt = 0.0;
        const double L = (double)S;
        const bn_v4 Lv = {L, L, L, L};
        for (ptrdiff_t row = r.n0; row < r.n1; row++) {
            const double nn = cnt + L, f1 = L / nn, f2 = cnt * L / nn;
            const T *xr = x + (row * C + r.c0) * S;
            ptrdiff_t j = 0;
            for (; j + 4 <= w; j += 4) {
                bn_v4 s1, s2;
                for (int u = 0; u < 4; u++) {
                    double a, b;
                    BN_FN(seg_sums_all)(xr + (j + u) * S, S, K[j + u], &a, &b, pf);
                    s1[u] = a;
                    s2[u] = b;
                }
                const bn_v4 bm = s1 / Lv, rr = s2 - s1 * bm, t = rr / Lv;
                for (int u = 0; u < 4; u++) {
                    const double bq = BN_FN(seg_m2)(xr + (j + u) * S, S, K[j + u], bm[u],
                                                    rr[u], t[u]);
                    BN_FN(row_merge)(cnt, f1, f2, bm[u], bq, &mean[j + u], &m2[j + u]);
                    n[j + u] = nn;
                }
            }
            for (; j < w; j++) {
                double bm, bq;
                BN_FN(seg_moments)(xr + j * S, S, K[j], &bm, &bq, pf);
                BN_FN(row_merge)(cnt, f1, f2, bm, bq, &mean[j], &m2[j]);
                n[j] = nn;
            }
            cnt = nn;
        }
    } else {
        for (ptrdiff_t row = r.n0; row < r.n1; row++) {
            for (ptrdiff_t j = 0; j < w; j++) {
                const T *seg = x + (row * C + r.c0 + j) * S;
                for (ptrdiff_t s0 = 0; s0 < S; s0 += BN_SEG) {
                    ptrdiff_t L = S - s0 < BN_SEG ? S - s0 : BN_SEG;
                    double bm, bq;
                    BN_FN(seg_moments)(seg + s0, L, K[j], &bm, &bq, pf);
                    bn_chan_merge(&n[j], &mean[j], &m2[j], (double)L, bm, bq);
                }
            }
        }
    }
    double *pn = k->pn + r.g * C, *pm = k->pm + r.g * C, *pq = k->pq + r.g * C;
    for (ptrdiff_t j = 0; j < w; j++) {
        pn[r.c0 + j] = n[j];
        pm[r.c0 + j] = mean[j];
        pq[r.c0 + j] = m2[j];
    }
}

static int BN_FN(moments_rows)(const bn_plan *p, const T *x, double *mean, double *var)
{
    const ptrdiff_t C = p->C, S = p->S, G = p->row_groups;
    double *buf = (double *)malloc(sizeof(double) * 3 * (size_t)(G * C));
    if (!buf) return BN_ENOMEM;
    BN_FN(row_stats_ctx) k = {p, x, buf, buf + G * C, buf + 2 * G * C};
    BN_FN(run_reduce_items)(p, p->row_items, BN_FN(row_moments_item), &k);
    /* Each channel merges its row-group partials in group order. */
    for (ptrdiff_t c = 0; c < C; c++) {
        double n = 0.0, m = 0.0, q = 0.0;
        for (ptrdiff_t g = 0; g < G; g++)
            bn_chan_merge(&n, &m, &q, k.pn[g * C + c], k.pm[g * C + c], k.pq[g * C + c]);
        mean[c] = BN_FN(shift_of)(x, S, c) + m;
        var[c] = q / n;
    }
    free(buf);
    return BN_OK;
}

/* ---- columns layout ---- */

/*
 * Shifted column sums of a block: s[j] = sum_r (x[r, j] - kc[j]), q[j] = sum_r (...)^2 over
 * nr rows of columns (row stride Cp), each column adding its rows in order.
 */

/* Rows ahead that a register strip of `cols` columns prefetches when its input comes from
 * DRAM (not p->resident): about BN_PF_BYTES of the strip ahead; 0 (none) from the cache. */
#define BN_PF_ROWS(p, cols)                                                                 \
    ((p)->resident ? (ptrdiff_t)0                                                          \
                   : (ptrdiff_t)((BN_PF_BYTES / (ptrdiff_t)sizeof(T) + (cols) - 1) / (cols)))

/* Register walk: nv * 8 columns with their sums in registers (nv a constant after
 * inlining, so the arrays stay in registers); pf > 0: prefetch the row pf rows ahead. */
static inline __attribute__((always_inline)) void BN_FN(col_sums_reg)(
    const T *blk, ptrdiff_t nr, ptrdiff_t Cp, const double *kc, double *s, double *q,
    const int nv, const ptrdiff_t pf)
{
    bn_vd kv[8];
    bn_acc sv[8], qv[8];
    for (int t = 0; t < nv; t++) {
        kv[t] = bn_ldd(kc + 8 * t);
        sv[t] = qv[t] = bn_acc_zero();
    }
    for (ptrdiff_t r = 0; r < nr; r++) {
        const T *row = blk + r * Cp;
        if (pf && r + pf < nr)   /* from DRAM: the strip's row pf rows ahead, per line */
            for (int t = 0; t < nv; t += 64 / (8 * (int)sizeof(T)))
                __builtin_prefetch(row + pf * Cp + 8 * t);
#pragma GCC unroll 8
        for (int t = 0; t < nv; t++) {
            bn_vd d = BN_FN(ld)(row + 8 * t) - kv[t];
            sv[t] = bn_acc_add(sv[t], d);
            qv[t] = bn_acc_add(qv[t], d * d);
        }
    }
    for (int t = 0; t < nv; t++) {
        bn_acc_st(s + 8 * t, sv[t]);
        bn_acc_st(q + 8 * t, qv[t]);
    }
}

/* One register strip of nv (1..8) vectors of columns: a strip of 8 vectors, or the binary
 * decomposition of nv (4, 2, 1), so that four widths are compiled instead of eight (each
 * column's sum is the same whatever strip holds it). */
static void BN_FN(col_sums_strip)(const T *blk, ptrdiff_t nr, ptrdiff_t Cp, const double *kc,
                                  double *s, double *q, int nv, ptrdiff_t pf)
{
    if (nv >= 8) {
        BN_FN(col_sums_reg)(blk, nr, Cp, kc, s, q, 8, pf);
        return;
    }
    int t = 0;
    if (nv & 4) {
        BN_FN(col_sums_reg)(blk, nr, Cp, kc, s, q, 4, pf);
        t = 4;
    }
    if (nv & 2) {
        BN_FN(col_sums_reg)(blk + 8 * t, nr, Cp, kc + 8 * t, s + 8 * t, q + 8 * t, 2, pf);
        t += 2;
    }
    if (nv & 1)
        BN_FN(col_sums_reg)(blk + 8 * t, nr, Cp, kc + 8 * t, s + 8 * t, q + 8 * t, 1, pf);
}

/* Memory walk: row by row, the sums of the w8 vector columns in s and q (L1). */
static void BN_FN(col_sums_mem)(const T *blk, ptrdiff_t nr, ptrdiff_t Cp, ptrdiff_t w,
                                ptrdiff_t w8, const double *kc, double *s, double *q)
{
    /* Accumulators in memory hold back the out-of-order window, so the hardware
     * prefetchers fall behind on DRAM-resident data: prefetch about 8 KiB ahead. */
    const ptrdiff_t pfr = (8192 / (ptrdiff_t)sizeof(T) + w - 1) / (w > 0 ? w : 1);
    ptrdiff_t j;
    for (j = 0; j < w8; j++) s[j] = q[j] = 0.0;
    for (ptrdiff_t r = 0; r < nr; r++) {
        const T *row = blk + r * Cp;
        for (j = 0; j < w; j += 64 / (ptrdiff_t)sizeof(T)) __builtin_prefetch(row + pfr * Cp + j);
        for (j = 0; j < w8; j += 8) {
            bn_vd d = BN_FN(ld)(row + j) - bn_ldd(kc + j);
            bn_std(s + j, bn_ldd(s + j) + d);
            bn_std(q + j, bn_ldd(q + j) + d * d);
        }
    }
}

static void BN_FN(col_sums)(const T *blk, ptrdiff_t nr, ptrdiff_t Cp, ptrdiff_t w,
                            const double *kc, double *s, double *q, const bn_plan *p)
{
    const ptrdiff_t w8 = w & ~(ptrdiff_t)7;
    if (p->reduce_walk == BN_WALK_REGISTER) {
        const ptrdiff_t pf = BN_PF_ROWS(p, p->strip_cols);
        for (ptrdiff_t j0 = 0; j0 < w8; j0 += p->strip_cols) {
            const ptrdiff_t cols = w8 - j0 < p->strip_cols ? w8 - j0 : p->strip_cols;
            BN_FN(col_sums_strip)(blk + j0, nr, Cp, kc + j0, s + j0, q + j0, (int)(cols / 8),
                                  pf);
        }
    } else {
        BN_FN(col_sums_mem)(blk, nr, Cp, w, w8, kc, s, q);
    }
    /* The last w % 8 columns one by one. */
    for (ptrdiff_t j = w8; j < w; j++) {
        double sj = 0.0, qj = 0.0;
        for (ptrdiff_t r = 0; r < nr; r++) {
            double d = (double)blk[r * Cp + j] - kc[j];
            sj += d;
            qj += d * d;
        }
        s[j] = sj;
        q[j] = qj;
    }
}

typedef struct {
    const bn_plan *p;
    const T *x;
    const double *kcol;     /* per column: its channel's shift */
    double *pm, *pq;        /* per group and column ((g * S + s) * CS + c): mean(x - K), M2 */
} BN_FN(col_stats_ctx);

/* Statistics of the columns of one tile over the row blocks of one group. */
static void BN_FN(col_moments_item)(const void *ctx, ptrdiff_t it)
{
    const BN_FN(col_stats_ctx) *k = ctx;
    const bn_plan *p = k->p;
    const bn_col_item ci = bn_col_item_of(p, it);
    const ptrdiff_t Cp = p->col.Cp, c0 = ci.c0, w = ci.w;
    const T *x = k->x;
    double mean[BN_TILE], m2[BN_TILE], s[BN_TILE], q[BN_TILE], kk[BN_TILE], m1[BN_TILE];
    int bad[BN_TILE];
    const double *kc = k->kcol + c0;
    double n = 0.0;
    for (ptrdiff_t r0 = ci.r0; r0 < ci.r1; r0 += p->col.rb) {
        const ptrdiff_t r1 = r0 + p->col.rb < ci.r1 ? r0 + p->col.rb : ci.r1;
        const double nb = (double)(r1 - r0);
        ptrdiff_t j;
        BN_FN(col_sums)(x + r0 * Cp + c0, r1 - r0, Cp, w, kc, s, q, p);
        /* One pass (shifted sums) unless a column is ill-conditioned (see seg_moments);
         * the second pass runs over the vectors of 8 columns that hold such a column (and
         * the last w % 8 columns) and is used only for those columns, so a column's result
         * never depends on its neighbours' data.  (Over the whole tile, one channel whose
         * shift -- its first value -- lies 3.8 standard deviations out cost the baseline
         * training forward of channels-last (32, 7, 7, 512) a second pass on 8 of its 26
         * blocks: benchmarks/README.md item 86.) */
        const ptrdiff_t w8 = w & ~(ptrdiff_t)7;
        ptrdiff_t nbv = 0, bv[BN_TILE / 8];   /* the vectors with an ill-conditioned column */
        int tail_bad = 0;
        for (j = 0; j < w; j++) {
            const double mj = s[j] / nb;
            kk[j] = q[j] - s[j] * mj;   /* M2 from the shifted sums */
            s[j] = mj;
            bad[j] = !(mj * mj <= BN_SHIFT_COND * (kk[j] / nb));
        }
        for (j = 0; j < w8; j += 8) {
            int any = 0;
            for (int l = 0; l < 8; l++) any |= bad[j + l];
            if (any) bv[nbv++] = j;
        }
        for (j = w8; j < w; j++) tail_bad |= bad[j];
        const ptrdiff_t t0 = tail_bad ? w8 : w;   /* the scalar columns walked: [t0, w) */
        if (nbv || tail_bad) {
            /* q (free now: kk holds the one-pass M2) and m1 sum d^2 and d over the walked
             * columns only; the ill-conditioned ones then take M2 = q - m1^2 / nb. */
            for (ptrdiff_t i = 0; i < nbv; i++)
                for (int l = 0; l < 8; l++) q[bv[i] + l] = m1[bv[i] + l] = 0.0;
            for (j = t0; j < w; j++) q[j] = m1[j] = 0.0;
            for (ptrdiff_t r = r0; r < r1; r++) {
                const T *row = x + r * Cp + c0;
                for (ptrdiff_t i = 0; i < nbv; i++) {
                    j = bv[i];
                    bn_vd d = (BN_FN(ld)(row + j) - bn_ldd(kc + j)) - bn_ldd(s + j);
                    bn_std(q + j, bn_ldd(q + j) + d * d);
                    bn_std(m1 + j, bn_ldd(m1 + j) + d);
                }
                for (j = t0; j < w; j++) {
                    double d = ((double)row[j] - kc[j]) - s[j];
                    q[j] += d * d;
                    m1[j] += d;
                }
            }
            for (j = 0; j < w; j++)
                if (bad[j]) kk[j] = q[j] - m1[j] * m1[j] / nb;
        }
        /* kk[j] now holds the block's M2 of column j. */
        if (n == 0.0) {
            for (j = 0; j < w; j++) {
                double r = kk[j];
                mean[j] = s[j];
                m2[j] = r < 0.0 ? 0.0 : r;
            }
        } else {
            const double nn = n + nb, f1 = nb / nn, f2 = n * nb / nn;
            for (j = 0; j < w; j++) {
                double r = kk[j];
                if (r < 0.0) r = 0.0;
                double delta = s[j] - mean[j];
                mean[j] += delta * f1;
                m2[j] += r + delta * delta * f2;
            }
        }
        n += nb;
    }
    /* Stored position-major (s * CS + c for column c * S + s), so that the merge below
     * reads 8 adjacent channels' partials of one position as one contiguous vector. */
    const ptrdiff_t S = p->S, CS = bn_col_part_stride(p->C);
    ptrdiff_t ch = c0 / S, pos = c0 % S;
    double *gpm = k->pm + ci.g * S * CS, *gpq = k->pq + ci.g * S * CS;
    for (ptrdiff_t j = 0; j < w; j++) {
        gpm[pos * CS + ch] = mean[j];
        gpq[pos * CS + ch] = m2[j];
        if (++pos == S) {
            pos = 0;
            ch++;
        }
    }
}

static int BN_FN(moments_columns)(const bn_plan *p, const T *x, double *mean, double *var)
{
    const ptrdiff_t N = p->N, C = p->C, S = p->S, Cp = p->col.Cp, G = p->col.ngroups;
    const ptrdiff_t CS = bn_col_part_stride(C), GP = G * S * CS;   /* partials per array */
    double *buf = (double *)malloc(sizeof(double) * (2 * (size_t)GP + (size_t)Cp));
    if (!buf) return BN_ENOMEM;
    double *kcol = buf + 2 * GP;
    if (S == 1)   /* a loop the compiler vectorises (2-D data: 8192 channels of (32, 8192)) */
        for (ptrdiff_t c = 0; c < C; c++) kcol[c] = BN_FN(shift_of)(x, 1, c);
    else
        for (ptrdiff_t c = 0; c < C; c++) {
            const double K = BN_FN(shift_of)(x, S, c);
            for (ptrdiff_t s = 0; s < S; s++) kcol[c * S + s] = K;
        }
    BN_FN(col_stats_ctx) k = {p, x, kcol, buf, buf + GP};
    BN_FN(run_reduce_items)(p, p->col_items, BN_FN(col_moments_item), &k);
    /* Each channel merges its columns' group partials, column by column, group by group
     * (bn_chan_merge's operations).  The counts are the same for every channel, so 8
     * channels merge side by side (independent chains the compiler may vectorise; one
     * channel at a time, the merges of (32, 8192) took a fifth of its training forward). */
    const ptrdiff_t rows_per_group = p->col.bpg * p->col.rb;
    /* Channels merge independently: on the plan's threads when there are many merges
     * (each channel's order is fixed, so the bits do not depend on the threads).  Two
     * threads, training forward, medians of 200 calls, 4 alternating processes: (32, 512,
     * 7, 7) (25,088 merges) 213 -> 198 us; below about 8,192 merges the parallel region
     * costs what it saves ((32, 7, 7, 512): 512 x 12 merges, 130 -> 136 us). */
    const int nt = p->nthreads > 1 && (double)C * (double)S * (double)G >= 8192.0
                       ? p->nthreads : 1;
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1)
    for (ptrdiff_t c0 = 0; c0 < C; c0 += 8) {
        const int w = C - c0 < 8 ? (int)(C - c0) : 8;
        double n = 0.0, m[8] = {0}, q[8] = {0};
        for (ptrdiff_t s = 0; s < S; s++) {
            for (ptrdiff_t g = 0; g < G; g++) {
                ptrdiff_t r0 = g * rows_per_group, r1 = r0 + rows_per_group;
                if (r1 > N) r1 = N;
                const double nb = (double)(r1 - r0);
                const double *pm = k.pm + (g * S + s) * CS + c0;
                const double *pq = k.pq + (g * S + s) * CS + c0;
                if (nb == 0) continue;
                if (n == 0) {
                    for (int j = 0; j < w; j++) {
                        m[j] = pm[j];
                        q[j] = pq[j];
                    }
                    n = nb;
                    continue;
                }
                const double nn = n + nb, f1 = nb / nn, f2 = n * nb / nn;
                for (int j = 0; j < w; j++) {
                    const double delta = pm[j] - m[j];
                    m[j] += delta * f1;
                    q[j] += pq[j] + delta * delta * f2;
                }
                n = nn;
            }
        }
        for (int j = 0; j < w; j++) {
            mean[c0 + j] = kcol[(c0 + j) * S] + m[j];
            var[c0 + j] = q[j] / n;
        }
    }
    free(buf);
    return BN_OK;
}

/*
 * Statistics of the channels whose blocked result is not finite although all their values
 * are, recomputed in scaled coordinates.  Finite float64 data near the largest double
 * (1.7e308 and -1.7e308 in one channel) overflows the shifted sums, x - K, of the blocked
 * algorithm: the mean of finite values is always finite, and the variance overflows only
 * when its true value exceeds the double range.  Here each value is multiplied by a power
 * of two sc (exact for normal numbers) chosen so that no sum can overflow; the mean is a
 * compensated (Neumaier) sum, so cancelling huge values keep the small ones exactly, and
 * so is the sum of squares; the deviations are scaled again by a power of two t so that
 * their squares stay at most 1.  The result is scaled back with ldexp (inf only when the
 * true variance is beyond the double range).  Channels holding inf or NaN get the
 * statistics IEEE arithmetic gives the exact sums: mean +-inf (NaN with a NaN or both
 * infinities) and variance NaN; the shifted sums could turn a lone +inf into a NaN mean.
 * Scalar code in a fixed order, so the same bits in every variant and for any thread
 * count; it runs only for channels whose result was not finite.
 */
static void BN_FN(moments_fixup_chan)(const T *x, ptrdiff_t N, ptrdiff_t C, ptrdiff_t S,
                                      ptrdiff_t c, double *mean, double *var)   /* channel c's */
{
    const double cnt = (double)N * (double)S;
    double amax = 0.0;
    int pinf = 0, ninf = 0, nan = 0;
    for (ptrdiff_t n = 0; n < N; n++) {
        const T *row = x + (n * C + c) * S;
        for (ptrdiff_t s = 0; s < S; s++) {
            const double v = (double)row[s];
            if (v != v) nan = 1;
            else if (v == INFINITY) pinf = 1;
            else if (v == -INFINITY) ninf = 1;
            else if (fabs(v) > amax) amax = fabs(v);
        }
    }
    if (nan | pinf | ninf) {
        /* IEEE arithmetic on the exact sums: the mean is +-inf, or NaN with NaN or both
         * infinities; the deviations include inf - inf, so the variance is NaN. */
        *mean = (nan || (pinf && ninf)) ? NAN : (pinf ? INFINITY : -INFINITY);
        *var = NAN;
        return;
    }
    int ea, ec;
    frexp(amax, &ea);           /* amax < 2^ea */
    frexp(cnt, &ec);            /* cnt < 2^ec */
    const int k = ea + ec > 1000 ? ea + ec - 1000 : 0;   /* sums stay below 2^1000 */
    const double sc = ldexp(1.0, -k);
    double s1 = 0.0, comp = 0.0;   /* Neumaier's compensated sum */
    for (ptrdiff_t n = 0; n < N; n++) {
        const T *row = x + (n * C + c) * S;
        for (ptrdiff_t s = 0; s < S; s++) {
            const double v = (double)row[s] * sc, t1 = s1 + v;
            comp += fabs(s1) >= fabs(v) ? (s1 - t1) + v : (v - t1) + s1;
            s1 = t1;
        }
    }
    const double m = (s1 + comp) / cnt;
    double dmax = 0.0;
    for (ptrdiff_t n = 0; n < N; n++) {
        const T *row = x + (n * C + c) * S;
        for (ptrdiff_t s = 0; s < S; s++) {
            const double d = fabs((double)row[s] * sc - m);
            if (d > dmax) dmax = d;
        }
    }
    int ed;
    frexp(dmax, &ed);           /* |deviation| < 2^ed */
    const double t = ldexp(1.0, -(ed + 1));
    double q = 0.0, qc = 0.0;      /* compensated too */
    for (ptrdiff_t n = 0; n < N; n++) {
        const T *row = x + (n * C + c) * S;
        for (ptrdiff_t s = 0; s < S; s++) {
            const double d = ((double)row[s] * sc - m) * t, d2 = d * d, q1 = q + d2;
            qc += q >= d2 ? (q - q1) + d2 : (d2 - q1) + q;
            q = q1;
        }
    }
    *mean = ldexp(m, k);
    *var = ldexp((q + qc) / cnt, 2 * (k + ed + 1));
}

static void BN_FN(moments_fixup)(const T *x, ptrdiff_t N, ptrdiff_t C, ptrdiff_t S,
                                 double *mean, double *var)
{
    for (ptrdiff_t c = 0; c < C; c++)
        if (!(isfinite(mean[c]) && isfinite(var[c])))
            BN_FN(moments_fixup_chan)(x, N, C, S, c, &mean[c], &var[c]);
}

/* Per-channel mean and biased variance under plan p: the blocked algorithm of the plan's
 * layout, the overflow fallback, and canonical NaNs. */
static int BN_FN(moments_planned)(const bn_plan *p, const T *x, double *mean, double *var)
{
    const ptrdiff_t N = p->N, C = p->C, S = p->S;
    if (C == 0) return BN_OK;
    if (N == 0 || S == 0) {
        for (ptrdiff_t c = 0; c < C; c++) mean[c] = var[c] = NAN;
        return BN_OK;
    }
    const int st = p->layout == BN_LAYOUT_ROWS ? BN_FN(moments_rows)(p, x, mean, var)
                                               : BN_FN(moments_columns)(p, x, mean, var);
    if (st != BN_OK) return st;
    if (bn_all_finite(mean, C) && bn_all_finite(var, C)) return BN_OK;
    BN_FN(moments_fixup)(x, N, C, S, mean, var);
    bn_canon_vec(mean, C);
    bn_canon_vec(var, C);
    return BN_OK;
}

static int BN_FN(moments)(const void *xv, ptrdiff_t N, ptrdiff_t C, ptrdiff_t S,
                          double *mean, double *var, int nthreads)
{
    bn_plan p;
    if (bn_plan_make(&p, BN_OP_MOMENTS, N, C, S, (int)sizeof(T), BN_ISA, nthreads) != BN_OK)
        return BN_EINVAL;
    return BN_FN(moments_planned)(&p, (const T *)xv, mean, var);
}

/* ==================================================================== backward sums */

/* One element's contribution to the backward sums: g = dy (ReLU-masked with relu), then
 * sd += g and sx += g * (x - m).  The scalar form of every vector walk below. */
static inline void BN_FN(bwd_one)(T dy, T x, double m, double a, double b, int relu,
                                  double *sd, double *sx)
{
    const double xm = (double)x - m;
    double g = (double)dy;
    if (relu) g = bn_smask(g, xm * a + b);
    *sd += g;
    *sx += g * xm;
}

/* The vector sums of bwd_span_s, kept between calls by the fused backward, which reads a
 * row in pieces (bn_train.h: chan_bsums). */
typedef struct {
    bn_acc d0, x0;
} BN_FN(bwd_accs);

/* bwd_span_s's vector loop over the 8-element blocks of [i0, i1) (i0 and i1 - i0
 * multiples of 8, or i1 the span's end): the same additions, whatever the pieces. */
static inline __attribute__((always_inline)) void BN_FN(bwd_sums)(
    const T *dy, const T *x, ptrdiff_t i0, ptrdiff_t i1, double m, double a, double b,
    int relu, BN_FN(bwd_accs) *acc, const int pf)
{
    const bn_vd mv = bn_splat(m), av = bn_splat(a), bv = bn_splat(b);
    bn_acc d0 = acc->d0, x0 = acc->x0;
    for (ptrdiff_t i = i0; i + 8 <= i1; i += 8) {
        if (pf && (((i - i0) * (ptrdiff_t)sizeof(T)) & 63) == 0) {
            bn_prefetch_ahead(dy + i, 0);   /* from DRAM: a line of each */
            bn_prefetch_ahead(x + i, 0);
        }
        bn_bwd_acc(&d0, &x0, BN_FN(ld)(dy + i), BN_FN(ld)(x + i) - mv, av, bv, relu);
    }
    acc->d0 = d0;
    acc->x0 = x0;
}

/* The rest of bwd_span_s after its vectors: the lanes, the scalar tail, added to *sd, *sx. */
static inline __attribute__((always_inline)) void BN_FN(bwd_finish)(
    const T *dy, const T *x, ptrdiff_t L, double m, double a, double b, int relu,
    const BN_FN(bwd_accs) *acc, double *sd, double *sx)
{
    double s1, s2;
    bn_acc_hsum2(acc->d0, acc->x0, &s1, &s2);
    for (ptrdiff_t i = L & ~(ptrdiff_t)7; i < L; i++)
        BN_FN(bwd_one)(dy[i], x[i], m, a, b, relu, &s1, &s2);
    *sd += s1;
    *sx += s2;
}

/* Rows layout: sums of g and g * (x - m) over a span with scalar parameters (fixed lane
 * order), added to *sd and *sx. */
static void BN_FN(bwd_span_s)(const T *dy, const T *x, ptrdiff_t L, double m, double a,
                              double b, int relu, double *sd, double *sx)
{
    BN_FN(bwd_accs) acc = {bn_acc_zero(), bn_acc_zero()};
    BN_FN(bwd_sums)(dy, x, 0, L, m, a, b, relu, &acc, 0);
    BN_FN(bwd_finish)(dy, x, L, m, a, b, relu, &acc, sd, sx);
}

typedef struct {
    const bn_plan *p;
    const T *dy, *x;
    const double *mean, *scale, *shift;   /* rows: per channel; columns: per column */
    int relu;
    double *pd, *px;                      /* partial sums per group */
} BN_FN(bwd_ctx);

/* Rows layout: backward sums of channels [c0, c1) over the rows of a row group, in
 * memory order; each channel adds its rows in order. */
static void BN_FN(row_bwd_item)(const void *ctx, ptrdiff_t it)
{
    const BN_FN(bwd_ctx) *k = ctx;
    const bn_row_item r = bn_row_item_of(k->p, it);
    const ptrdiff_t C = k->p->C, S = k->p->S;
    double sd[BN_ROW_CHUNK], sx[BN_ROW_CHUNK];
    for (ptrdiff_t c = r.c0; c < r.c1; c++) sd[c - r.c0] = sx[c - r.c0] = 0.0;
    for (ptrdiff_t row = r.n0; row < r.n1; row++)
        for (ptrdiff_t c = r.c0; c < r.c1; c++) {
            const ptrdiff_t off = (row * C + c) * S;
            const double a = k->scale ? k->scale[c] : 0.0, b = k->shift ? k->shift[c] : 0.0;
            BN_FN(bwd_span_s)(k->dy + off, k->x + off, S, k->mean[c], a, b, k->relu,
                              &sd[c - r.c0], &sx[c - r.c0]);
        }
    for (ptrdiff_t c = r.c0; c < r.c1; c++) {
        k->pd[r.g * C + c] = sd[c - r.c0];
        k->px[r.g * C + c] = sx[c - r.c0];
    }
}

/* Register walk: the sums of nv * 8 columns over nr rows, in registers from zero. */
static inline __attribute__((always_inline)) void BN_FN(bwd_sums_reg)(
    const T *dblk, const T *xblk, ptrdiff_t nr, ptrdiff_t Cp, const double *m,
    const double *a, const double *b, int relu, double *sd, double *sx, const int nv,
    const ptrdiff_t pf)
{
    bn_vd mv[8];
    bn_acc dv[8], xv[8];
    for (int t = 0; t < nv; t++) {
        mv[t] = bn_ldd(m + 8 * t);
        dv[t] = xv[t] = bn_acc_zero();
    }
    for (ptrdiff_t r = 0; r < nr; r++) {
        if (pf && r + pf < nr)   /* from DRAM (col_sums_reg) */
            for (int t = 0; t < nv; t += 64 / (8 * (int)sizeof(T))) {
                __builtin_prefetch(dblk + (r + pf) * Cp + 8 * t);
                __builtin_prefetch(xblk + (r + pf) * Cp + 8 * t);
            }
#pragma GCC unroll 8
        for (int t = 0; t < nv; t++)
            bn_bwd_acc(&dv[t], &xv[t], BN_FN(ld)(dblk + r * Cp + 8 * t),
                       BN_FN(ld)(xblk + r * Cp + 8 * t) - mv[t], bn_ldd(a + 8 * t),
                       bn_ldd(b + 8 * t), relu);
    }
    for (int t = 0; t < nv; t++) {
        bn_acc_st(sd + 8 * t, dv[t]);
        bn_acc_st(sx + 8 * t, xv[t]);
    }
}

/* One register strip of nv (1..8) vectors of columns: 8 vectors, or the binary
 * decomposition of nv (as col_sums_strip). */
static void BN_FN(bwd_sums_strip)(const T *dblk, const T *xblk, ptrdiff_t nr, ptrdiff_t Cp,
                                  const double *m, const double *a, const double *b, int relu,
                                  double *sd, double *sx, int nv, ptrdiff_t pf)
{
    if (nv >= 8) {
        BN_FN(bwd_sums_reg)(dblk, xblk, nr, Cp, m, a, b, relu, sd, sx, 8, pf);
        return;
    }
    int t = 0;
    if (nv & 4) {
        BN_FN(bwd_sums_reg)(dblk, xblk, nr, Cp, m, a, b, relu, sd, sx, 4, pf);
        t = 4;
    }
    if (nv & 2) {
        BN_FN(bwd_sums_reg)(dblk + 8 * t, xblk + 8 * t, nr, Cp, m + 8 * t, a + 8 * t, b + 8 * t,
                            relu, sd + 8 * t, sx + 8 * t, 2, pf);
        t += 2;
    }
    if (nv & 1)
        BN_FN(bwd_sums_reg)(dblk + 8 * t, xblk + 8 * t, nr, Cp, m + 8 * t, a + 8 * t, b + 8 * t,
                            relu, sd + 8 * t, sx + 8 * t, 1, pf);
}

/* The scalar columns [j0, w) of a block of nr rows, added to ad[j], ax[j]. */
static void BN_FN(bwd_cols_scalar)(const T *dblk, const T *xblk, ptrdiff_t nr, ptrdiff_t Cp,
                                   ptrdiff_t j0, ptrdiff_t w, const double *m, const double *a,
                                   const double *b, int relu, double *ad, double *ax)
{
    for (ptrdiff_t j = j0; j < w; j++) {
        double sd = ad[j], sx = ax[j];
        for (ptrdiff_t r = 0; r < nr; r++)
            BN_FN(bwd_one)(dblk[r * Cp + j], xblk[r * Cp + j], m[j], a[j], b[j], relu, &sd,
                           &sx);
        ad[j] = sd;
        ax[j] = sx;
    }
}

/* Register walk over a tile: strips of strip_cols columns down all nr rows. */
static void BN_FN(bwd_cols_register)(const T *dblk, const T *xblk, ptrdiff_t nr,
                                     ptrdiff_t Cp, ptrdiff_t w, const double *m,
                                     const double *a, const double *b, int relu,
                                     ptrdiff_t strip, ptrdiff_t pf, double *ad, double *ax)
{
    const ptrdiff_t w8 = w & ~(ptrdiff_t)7;
    for (ptrdiff_t j0 = 0; j0 < w8; j0 += strip) {
        const ptrdiff_t cols = w8 - j0 < strip ? w8 - j0 : strip;
        BN_FN(bwd_sums_strip)(dblk + j0, xblk + j0, nr, Cp, m + j0, a + j0, b + j0, relu,
                              ad + j0, ax + j0, (int)(cols / 8), pf);
    }
    for (ptrdiff_t j = w8; j < w; j++) ad[j] = ax[j] = 0.0;
    BN_FN(bwd_cols_scalar)(dblk, xblk, nr, Cp, w8, w, m, a, b, relu, ad, ax);
}

/* Memory walk over a tile: row by row, vectors across the row, sums in memory (L1). */
static void BN_FN(bwd_cols_mem)(const T *dblk, const T *xblk, ptrdiff_t nr, ptrdiff_t Cp,
                                 ptrdiff_t w, const double *m, const double *a,
                                 const double *b, int relu, double *ad, double *ax)
{
    ptrdiff_t j;
    for (j = 0; j < w; j++) ad[j] = ax[j] = 0.0;
    for (ptrdiff_t r = 0; r < nr; r++) {
        const T *dr = dblk + r * Cp, *xr = xblk + r * Cp;
        for (j = 0; j + 8 <= w; j += 8) {
            bn_acc sd = bn_acc_ld(ad + j), sx = bn_acc_ld(ax + j);
            bn_bwd_acc(&sd, &sx, BN_FN(ld)(dr + j), BN_FN(ld)(xr + j) - bn_ldd(m + j),
                       bn_ldd(a + j), bn_ldd(b + j), relu);
            bn_acc_st(ad + j, sd);
            bn_acc_st(ax + j, sx);
        }
        for (; j < w; j++) BN_FN(bwd_one)(dr[j], xr[j], m[j], a[j], b[j], relu, &ad[j], &ax[j]);
    }
}

/* Blocks walk over a tile: block by block (cache-resident), strips of 8 columns with their
 * sums in registers. */
static void BN_FN(bwd_cols_blocks)(const T *dblk, const T *xblk, ptrdiff_t nr, ptrdiff_t Cp,
                                   ptrdiff_t w, ptrdiff_t rb, const double *m,
                                   const double *a, const double *b, int relu, double *ad,
                                   double *ax)
{
    const ptrdiff_t w8 = w & ~(ptrdiff_t)7;
    for (ptrdiff_t j = 0; j < w; j++) ad[j] = ax[j] = 0.0;
    for (ptrdiff_t rb0 = 0; rb0 < nr; rb0 += rb) {
        const ptrdiff_t nb = nr - rb0 < rb ? nr - rb0 : rb;
        const T *db = dblk + rb0 * Cp, *xb = xblk + rb0 * Cp;
        for (ptrdiff_t j = 0; j < w8; j += 8) {
            const bn_vd mv = bn_ldd(m + j), av = bn_ldd(a + j), bv = bn_ldd(b + j);
            bn_acc sd = bn_acc_ld(ad + j), sx = bn_acc_ld(ax + j);
            for (ptrdiff_t r = 0; r < nb; r++)
                bn_bwd_acc(&sd, &sx, BN_FN(ld)(db + r * Cp + j), BN_FN(ld)(xb + r * Cp + j) - mv,
                           av, bv, relu);
            bn_acc_st(ad + j, sd);
            bn_acc_st(ax + j, sx);
        }
        BN_FN(bwd_cols_scalar)(db, xb, nb, Cp, w8, w, m, a, b, relu, ad, ax);
    }
}

/* Columns layout: per-column sums of one tile over the rows of one group. */
static void BN_FN(col_bwd_item)(const void *ctx, ptrdiff_t it)
{
    const BN_FN(bwd_ctx) *k = ctx;
    const bn_plan *p = k->p;
    const bn_col_item ci = bn_col_item_of(p, it);
    const ptrdiff_t Cp = p->col.Cp, c0 = ci.c0, w = ci.w, nr = ci.r1 - ci.r0;
    /* Accumulate on the stack: neighbouring items' partials share cache lines. */
    double ad[BN_TILE], ax[BN_TILE];
    const double *m = k->mean + c0, *a = k->scale + c0, *b = k->shift + c0;
    const T *dblk = k->dy + ci.r0 * Cp + c0, *xblk = k->x + ci.r0 * Cp + c0;
    if (p->reduce_walk == BN_WALK_REGISTER)
        BN_FN(bwd_cols_register)(dblk, xblk, nr, Cp, w, m, a, b, k->relu, p->strip_cols,
                                 BN_PF_ROWS(p, p->strip_cols), ad, ax);
    else if (p->reduce_walk == BN_WALK_MEMORY)
        BN_FN(bwd_cols_mem)(dblk, xblk, nr, Cp, w, m, a, b, k->relu, ad, ax);
    else
        BN_FN(bwd_cols_blocks)(dblk, xblk, nr, Cp, w, p->col.rb, m, a, b, k->relu, ad, ax);
    for (ptrdiff_t j = 0; j < w; j++) {
        k->pd[ci.g * Cp + c0 + j] = ad[j];
        k->px[ci.g * Cp + c0 + j] = ax[j];
    }
}

/* The columns layout's final merge for w <= 8 channels: each channel adds its columns'
 * group partials (pd, px: column j * S + s of group g at g * Cp + j * S + s), column by
 * column, group by group, from zero.  Whole blocks pass w = 8 as a constant: with a
 * variable w, GCC turned the copy into sum_dy into two memcpy calls per 8 channels (15% of
 * the backward of (2, 2048), 5% of (32, 8192)). */
static inline __attribute__((always_inline)) void BN_FN(bwd_merge)(
    const double *pd0, const double *px0, ptrdiff_t S, ptrdiff_t G, ptrdiff_t Cp, const int w,
    double *sum_dy, double *sum_dyxmu)
{
    double sd[8] = {0}, sx[8] = {0};
    for (ptrdiff_t s = 0; s < S; s++)
        for (ptrdiff_t g = 0; g < G; g++) {
            const double *pd = pd0 + g * Cp + s, *px = px0 + g * Cp + s;
            for (int j = 0; j < w; j++) {
                sd[j] += pd[j * S];
                sx[j] += px[j * S];
            }
        }
    for (int j = 0; j < w; j++) {
        sum_dy[j] = sd[j];
        sum_dyxmu[j] = sx[j];
    }
}

/* sum_dy[c] = sum g, sum_dyxmu[c] = sum g * (x - mean[c]), partials added in group order
 * (and, in the columns layout, column by column within a channel). */
static int BN_FN(backward_reduce_planned)(const bn_plan *p, const T *dy, const T *x,
                                          const double *mean, const double *scale,
                                          const double *shift, double *sum_dy,
                                          double *sum_dyxmu, int relu)
{
    const ptrdiff_t C = p->C, S = p->S;
    for (ptrdiff_t c = 0; c < C; c++) sum_dy[c] = sum_dyxmu[c] = 0.0;
    if (p->N == 0 || C == 0 || S == 0) return BN_OK;
    if (p->layout == BN_LAYOUT_ROWS) {
        const ptrdiff_t G = p->row_groups;
        double *buf = (double *)malloc(sizeof(double) * 2 * (size_t)(G * C));
        if (!buf) return BN_ENOMEM;
        BN_FN(bwd_ctx) k = {p, dy, x, mean, scale, shift, relu, buf, buf + G * C};
        BN_FN(run_reduce_items)(p, p->row_items, BN_FN(row_bwd_item), &k);
        for (ptrdiff_t c = 0; c < C; c++)
            for (ptrdiff_t g = 0; g < G; g++) {
                sum_dy[c] += k.pd[g * C + c];
                sum_dyxmu[c] += k.px[g * C + c];
            }
        free(buf);
        return BN_OK;
    }
    const ptrdiff_t Cp = p->col.Cp, G = p->col.ngroups;
    double *buf = (double *)malloc(sizeof(double) * (2 * (size_t)(G * Cp) + 3 * (size_t)Cp));
    if (!buf) return BN_ENOMEM;
    double *me = buf + 2 * G * Cp, *ae = me + Cp, *be = ae + Cp;
    /* scale and shift are read only by the ReLU's mask: expanded only then */
    const double *mc = BN_FN(params)(me, mean, Cp, Cp, S);
    BN_FN(bwd_ctx) k = {p, dy, x, mc, relu ? BN_FN(params)(ae, scale, Cp, Cp, S) : mc,
                        relu ? BN_FN(params)(be, shift, Cp, Cp, S) : mc, relu, buf,
                        buf + G * Cp};
    BN_FN(run_reduce_items)(p, p->col_items, BN_FN(col_bwd_item), &k);
    /* 8 channels side by side, each in its own order (one channel at a time, the chain of
     * dependent additions took 9% of the backward of (32, 512, 7, 7)). */
    ptrdiff_t c0 = 0;
    for (; c0 + 8 <= C; c0 += 8)
        BN_FN(bwd_merge)(k.pd + c0 * S, k.px + c0 * S, S, G, Cp, 8, sum_dy + c0,
                         sum_dyxmu + c0);
    if (c0 < C)
        BN_FN(bwd_merge)(k.pd + c0 * S, k.px + c0 * S, S, G, Cp, (int)(C - c0), sum_dy + c0,
                         sum_dyxmu + c0);
    free(buf);
    return BN_OK;
}

static int BN_FN(backward_reduce)(const void *dyv, const void *xv, ptrdiff_t N, ptrdiff_t C,
                                  ptrdiff_t S, const double *mean, const double *scale,
                                  const double *shift, double *sum_dy, double *sum_dyxmu,
                                  int flags, int nthreads)
{
    bn_plan p;
    if (bn_plan_make(&p, BN_OP_BACKWARD, N, C, S, (int)sizeof(T), BN_ISA, nthreads) != BN_OK)
        return BN_EINVAL;
    const int st = BN_FN(backward_reduce_planned)(&p, (const T *)dyv, (const T *)xv, mean,
                                                  scale, shift, sum_dy, sum_dyxmu,
                                                  (flags & BN_FLAG_RELU) != 0);
    bn_canon_vec(sum_dy, C);      /* canonical NaNs, as every per-channel output */
    bn_canon_vec(sum_dyxmu, C);
    return st;
}
