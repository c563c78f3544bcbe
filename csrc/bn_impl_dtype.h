/*
 * Kernel bodies for one storage type T (float or double) and one instruction set.
 * Included from bn_impl.h; see there.  All arithmetic is in double.
 */

/* ---- loads and stores of eight elements as a double vector ---- */

static inline bn_vd BN_FN(ld)(const T *p)
{
#if BN_IS_F32
    /* Conversions are exact, so these give the same bits in every variant; the
     * intrinsics only avoid the compiler's split lowering of __builtin_convertvector. */
#if BN_ISA_LEVEL == 2
    return (bn_vd)_mm512_cvtps_pd(_mm256_loadu_ps(p));
#elif BN_ISA_LEVEL == 1
    union { bn_vd v; __m256d h[2]; } u;
    u.h[0] = _mm256_cvtps_pd(_mm_loadu_ps(p));
    u.h[1] = _mm256_cvtps_pd(_mm_loadu_ps(p + 4));
    return u.v;
#else
    bn_vf t;
    memcpy(&t, p, sizeof t);
    return __builtin_convertvector(t, bn_vd);
#endif
#else
    bn_vd t;
    memcpy(&t, p, sizeof t);
    return t;
#endif
}

/* Rewrite the NaNs among the n stored values at p as the canonical NaN (see bn_nanacc).
 * After streaming stores too: an ordinary load sees this thread's own streaming stores. */
static void BN_FN(canon_mem)(T *p, ptrdiff_t n)
{
    for (ptrdiff_t k = 0; k < n; k++)
        if (p[k] != p[k]) p[k] = (T)NAN;
}

static inline void BN_FN(st)(T *p, bn_vd v)
{
#if BN_IS_F32
#if BN_ISA_LEVEL == 2
    _mm256_storeu_ps(p, _mm512_cvtpd_ps((__m512d)v));
#elif BN_ISA_LEVEL == 1
    union { bn_vd v; __m256d h[2]; } u;
    u.v = v;
    _mm_storeu_ps(p, _mm256_cvtpd_ps(u.h[0]));
    _mm_storeu_ps(p + 4, _mm256_cvtpd_ps(u.h[1]));
#else
    bn_vf t = __builtin_convertvector(v, bn_vf);
    memcpy(p, &t, sizeof t);
#endif
#else
    memcpy(p, &v, sizeof v);
#endif
}

/*
 * Non-temporal ("streaming") store of eight elements at p, which must be 16-byte aligned:
 * the data goes to memory without first reading the line into the cache (no
 * read-for-ownership) and without evicting the inputs.  Used for outputs larger than the
 * cache (bn_get_stream_min_bytes); the stored bits are those of BN_FN(st).
 */
static inline void BN_FN(stnt)(T *p, bn_vd v)
{
#if BN_ISA_LEVEL > 0
#if BN_IS_F32 && BN_ISA_LEVEL == 2
    const __m256 f = _mm512_cvtpd_ps((__m512d)v);
    _mm_stream_ps(p, _mm256_castps256_ps128(f));
    _mm_stream_ps(p + 4, _mm256_extractf128_ps(f, 1));
#elif BN_IS_F32
    union { bn_vd v; __m256d h[2]; } u;
    u.v = v;
    _mm_stream_ps(p, _mm256_cvtpd_ps(u.h[0]));
    _mm_stream_ps(p + 4, _mm256_cvtpd_ps(u.h[1]));
#else
    union { bn_vd v; __m128d q[4]; } u;
    u.v = v;
    _mm_stream_pd(p, u.q[0]);
    _mm_stream_pd(p + 2, u.q[1]);
    _mm_stream_pd(p + 4, u.q[2]);
    _mm_stream_pd(p + 6, u.q[3]);
#endif
#else
    BN_FN(st)(p, v);
#endif
}

/* Store v at p (streaming with nts), noting in *acc whether any value is NaN. */
static inline void BN_FN(stx)(T *p, bn_vd v, int nts, bn_nanacc *acc)
{
#if BN_ISA_LEVEL == 1
    /* AVX2: one split of v into halves serves the NaN test and the store (splitting it
     * once for each made GCC move the column kernels' operands through the stack:
     * channels-last backward of (32, 64, 56, 56) float32 3.1 -> 12.5 ms). */
    bn_vd_halves u;
    u.v = v;
    *acc = _mm256_or_pd(*acc, _mm256_cmp_pd(u.h[0], u.h[1], _CMP_UNORD_Q));
#if BN_IS_F32
    const __m128 lo = _mm256_cvtpd_ps(u.h[0]), hi = _mm256_cvtpd_ps(u.h[1]);
    if (nts) {
        _mm_stream_ps(p, lo);
        _mm_stream_ps(p + 4, hi);
    } else {
        _mm_storeu_ps(p, lo);
        _mm_storeu_ps(p + 4, hi);
    }
#else
    if (nts) {
        _mm_stream_pd(p, _mm256_castpd256_pd128(u.h[0]));
        _mm_stream_pd(p + 2, _mm256_extractf128_pd(u.h[0], 1));
        _mm_stream_pd(p + 4, _mm256_castpd256_pd128(u.h[1]));
        _mm_stream_pd(p + 6, _mm256_extractf128_pd(u.h[1], 1));
    } else {
        _mm256_storeu_pd(p, u.h[0]);
        _mm256_storeu_pd(p + 4, u.h[1]);
    }
#endif
#else
    *acc = bn_nanacc_add(*acc, v);
    if (nts)
        BN_FN(stnt)(p, v);
    else
        BN_FN(st)(p, v);
#endif
}

/*
 * Streaming stores for a pass over `count` elements at y that reads and writes `tensors`
 * tensors of that size?  Only where that working set is large (bn_get_stream_min_bytes),
 * the variant has the instructions, and every store can be a whole, aligned 16-byte
 * piece: y 16-byte aligned and `run` elements (the length of the spans the pass writes,
 * each starting where the previous ended) a multiple of 16 bytes.  Mixing ordinary and
 * non-temporal stores on one cache line is very slow, so it is all or nothing.
 */
static inline int BN_FN(use_stream)(const T *y, double count, int tensors, ptrdiff_t run)
{
#if BN_ISA_LEVEL > 0
    return ((uintptr_t)y & 15) == 0 && ((size_t)run * sizeof(T)) % 16 == 0 &&
           count * (double)sizeof(T) * (double)tensors >= (double)bn_get_stream_min_bytes();
#else
    (void)y;
    (void)count;
    (void)tensors;
    (void)run;
    return 0;
#endif
}

/*
 * Store the n < 8 tail elements of a span, computed into tmp, at p.  With nts (p is then
 * 16-byte aligned) whole 16-byte pieces are streamed, and only a remainder (possible only at
 * the very end of an output) is stored normally.
 */
static inline void BN_FN(store_tail)(T *p, T *tmp, ptrdiff_t n, int nts)
{
    ptrdiff_t i = 0;
    for (ptrdiff_t k = 0; k < n; k++)
        if (tmp[k] != tmp[k]) tmp[k] = (T)NAN;   /* canonical NaN, see bn_nanacc */
#if BN_ISA_LEVEL > 0
    const ptrdiff_t step = 16 / (ptrdiff_t)sizeof(T);
    if (nts) {
        for (; i + step <= n; i += step) {
#if BN_IS_F32
            _mm_stream_ps(p + i, _mm_loadu_ps(tmp + i));
#else
            _mm_stream_pd(p + i, _mm_loadu_pd(tmp + i));
#endif
        }
    }
#else
    (void)nts;
#endif
    for (; i < n; i++) p[i] = tmp[i];
}

#ifndef BN_DOUBLE_HELPERS_DEFINED
#define BN_DOUBLE_HELPERS_DEFINED
/* F(k) with the compile-time constant k = nv, for nv in 1..8 (register-array kernels need
 * a constant count to keep their arrays in registers). */
#define BN_NV_SWITCH(nv, F)                                                               \
    switch (nv) {                                                                         \
    case 8: F(8); break;                                                                  \
    case 7: F(7); break;                                                                  \
    case 6: F(6); break;                                                                  \
    case 5: F(5); break;                                                                  \
    case 4: F(4); break;                                                                  \
    case 3: F(3); break;                                                                  \
    case 2: F(2); break;                                                                  \
    default: F(1); break;                                                                 \
    }

/* Order this thread's non-temporal stores before it leaves a parallel region. */
static inline void bn_stream_fence(int nts)
{
#if BN_ISA_LEVEL > 0
    if (nts) _mm_sfence();
#else
    (void)nts;
#endif
}

static inline bn_vd bn_ldd(const double *p)
{
    bn_vd t;
    memcpy(&t, p, sizeof t);
    return t;
}

static inline void bn_std(double *p, bn_vd v) { memcpy(p, &v, sizeof v); }

static inline double bn_srelu(double t) { return (t <= 0.0) ? 0.0 : t; }

/*
 * Period for the column strategy's element-wise passes: Cp itself when Cp >= 64 (any
 * length), else the smallest multiple of Cp of at least 64 elements that is a multiple of 8,
 * so narrow rows still fill whole vectors.
 */
static inline ptrdiff_t bn_period(ptrdiff_t Cp)
{
    if (Cp >= 64) return Cp;
    ptrdiff_t k = 1;
    while (k * Cp < 64 || (k * Cp) % 8 != 0) k++;
    return k * Cp;
}

/* Expand per-channel values v[C] to per-element values e[P] for columns of width S
 * (P is a multiple of Cp = C * S; v == NULL gives zeros). */
static inline void bn_expand(double *e, const double *v, ptrdiff_t P, ptrdiff_t Cp,
                             ptrdiff_t S)
{
    const ptrdiff_t C = Cp / S;
    for (ptrdiff_t c = 0; c < C; c++) {
        const double val = v ? v[c] : 0.0;
        for (ptrdiff_t s = 0; s < S; s++) e[c * S + s] = val;
    }
    for (ptrdiff_t j = Cp; j < P; j++) e[j] = e[j - Cp];
}
#endif

/* ---- statistics ---- */

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
static void BN_FN(seg_moments)(const T *x, ptrdiff_t L, double K, double *mean, double *m2)
{
    const bn_vd kv = bn_splat(K);
    bn_vd a0 = bn_splat(0.0), a1 = bn_splat(0.0), b0 = bn_splat(0.0), b1 = bn_splat(0.0);
    ptrdiff_t i = 0;
    for (; i + 16 <= L; i += 16) {
        bn_vd d0 = BN_FN(ld)(x + i) - kv;
        bn_vd d1 = BN_FN(ld)(x + i + 8) - kv;
        a0 += d0;
        a1 += d1;
        b0 += d0 * d0;
        b1 += d1 * d1;
    }
    if (i + 8 <= L) {
        bn_vd d0 = BN_FN(ld)(x + i) - kv;
        a0 += d0;
        b0 += d0 * d0;
        i += 8;
    }
    double s1 = bn_hsum(a0 + a1), s2 = bn_hsum(b0 + b1);
    for (; i < L; i++) {
        double d = (double)x[i] - K;
        s1 += d;
        s2 += d * d;
    }
    const double m = s1 / (double)L;
    double r = s2 - s1 * m;
    if (!(m * m <= BN_SHIFT_COND * (r / (double)L))) {
        const bn_vd mv = bn_splat(m);
        bn_vd q0 = bn_splat(0.0), q1 = bn_splat(0.0), k0 = bn_splat(0.0), k1 = bn_splat(0.0);
        i = 0;
        for (; i + 16 <= L; i += 16) {
            bn_vd d0 = (BN_FN(ld)(x + i) - kv) - mv;
            bn_vd d1 = (BN_FN(ld)(x + i + 8) - kv) - mv;
            q0 += d0 * d0;
            q1 += d1 * d1;
            k0 += d0;
            k1 += d1;
        }
        if (i + 8 <= L) {
            bn_vd d0 = (BN_FN(ld)(x + i) - kv) - mv;
            q0 += d0 * d0;
            k0 += d0;
            i += 8;
        }
        double q = bn_hsum(q0 + q1), k = bn_hsum(k0 + k1);
        for (; i < L; i++) {
            double d = ((double)x[i] - K) - m;
            q += d * d;
            k += d;
        }
        r = q - k * k / (double)L;
    }
    if (r < 0.0) r = 0.0;
    *mean = m;
    *m2 = r;
}

/* The shift of channel c: its first value, or 0 if that is not finite. */
static inline double BN_FN(shift_of)(const T *x, ptrdiff_t C, ptrdiff_t S, ptrdiff_t c)
{
    double K = (double)x[c * S];
    return isfinite(K) ? K : 0.0;
}

/*
 * Row strategy: statistics of channels [c0, c1) (at most BN_ROW_CHUNK) over rows [n0, n1),
 * walked in memory order; each channel merges its segments in row order.  Results go to
 * pn/pm/pq[c] (count, mean(x - K), M2).
 */
static void BN_FN(row_moments_item)(const T *x, ptrdiff_t n0, ptrdiff_t n1, ptrdiff_t C,
                                    ptrdiff_t S, ptrdiff_t c0, ptrdiff_t c1, double *pn,
                                    double *pm, double *pq)
{
    double n[BN_ROW_CHUNK], mean[BN_ROW_CHUNK], m2[BN_ROW_CHUNK], K[BN_ROW_CHUNK];
    const ptrdiff_t w = c1 - c0;
    for (ptrdiff_t k = 0; k < w; k++) {
        K[k] = BN_FN(shift_of)(x, C, S, c0 + k);
        n[k] = mean[k] = m2[k] = 0.0;
    }
    for (ptrdiff_t r = n0; r < n1; r++) {
        for (ptrdiff_t k = 0; k < w; k++) {
            const T *row = x + (r * C + c0 + k) * S;
            for (ptrdiff_t s0 = 0; s0 < S; s0 += BN_SEG) {
                ptrdiff_t L = S - s0 < BN_SEG ? S - s0 : BN_SEG;
                double bm, bq;
                BN_FN(seg_moments)(row + s0, L, K[k], &bm, &bq);
                bn_chan_merge(&n[k], &mean[k], &m2[k], (double)L, bm, bq);
            }
        }
    }
    for (ptrdiff_t k = 0; k < w; k++) {
        pn[c0 + k] = n[k];
        pm[c0 + k] = mean[k];
        pq[c0 + k] = m2[k];
    }
}

/*
 * Shifted column sums of a block: s[j] = sum_r (x[r, j] - kc[j]), q[j] = sum_r (...)^2 over
 * nr rows of w columns (row stride Cp), each column adding its rows in order.  Rows are
 * walked one after another (the data streams in memory order); the accumulators of up to
 * 64 columns stay in registers on AVX-512, otherwise they live in s and q (L1).  Every
 * traversal performs the same additions in the same order, so the bits do not depend on it.
 */
#if BN_ISA_LEVEL == 2
static inline __attribute__((always_inline)) void BN_FN(col_sums_reg)(
    const T *blk, ptrdiff_t nr, ptrdiff_t Cp, const double *kc, double *s, double *q,
    const int nv)
{
    bn_vd kv[8], sv[8], qv[8];
    for (int t = 0; t < nv; t++) {
        kv[t] = bn_ldd(kc + 8 * t);
        sv[t] = qv[t] = bn_splat(0.0);
    }
    for (ptrdiff_t r = 0; r < nr; r++) {
        const T *row = blk + r * Cp;
#pragma GCC unroll 8
        for (int t = 0; t < nv; t++) {
            bn_vd d = BN_FN(ld)(row + 8 * t) - kv[t];
            sv[t] += d;
            qv[t] += d * d;
        }
    }
    for (int t = 0; t < nv; t++) {
        bn_std(s + 8 * t, sv[t]);
        bn_std(q + 8 * t, qv[t]);
    }
}
#endif

static void BN_FN(col_sums)(const T *blk, ptrdiff_t nr, ptrdiff_t Cp, ptrdiff_t w,
                            const double *kc, double *s, double *q, int resident)
{
    const ptrdiff_t w8 = w & ~(ptrdiff_t)7;
    ptrdiff_t j;
#if BN_ISA_LEVEL == 2
    /* Cache-resident data, wide tiles: register strips of 64 columns down the block (from
     * DRAM the strided strips are slower than the row-by-row walk). */
    ptrdiff_t j0 = 0;
    if (w8 > 64 && resident)
        for (; j0 + 64 <= w8; j0 += 64)
            BN_FN(col_sums_reg)(blk + j0, nr, Cp, kc + j0, s + j0, q + j0, 8);
    if (j0 > 0) {
        /* The remaining columns (fewer than 64) as a narrow tile. */
        BN_FN(col_sums)(blk + j0, nr, Cp, w - j0, kc + j0, s + j0, q + j0, 0);
        return;
    }
    if (w8 >= 8 && w8 <= 64) {   /* up to 64 columns: sums in registers */
#define BN_COL_SUMS(k) BN_FN(col_sums_reg)(blk, nr, Cp, kc, s, q, k)
        BN_NV_SWITCH(w8 / 8, BN_COL_SUMS);
#undef BN_COL_SUMS
    } else
#endif
    {
        /* Accumulators in memory hold back the out-of-order window, so the hardware
         * prefetchers fall behind on DRAM-resident data: prefetch about 8 KiB ahead. */
        const ptrdiff_t pfr = (8192 / (ptrdiff_t)sizeof(T) + w - 1) / (w > 0 ? w : 1);
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
    /* The last w % 8 columns one by one. */
    for (j = w8; j < w; j++) {
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

/* Column strategy: statistics of the columns of tile t over the row blocks of group g. */
static void BN_FN(col_moments_item)(const T *x, const bn_colpart *p, ptrdiff_t g,
                                    ptrdiff_t t, const double *kcol, double *pm, double *pq,
                                    int resident)
{
    const ptrdiff_t Cp = p->Cp;
    const ptrdiff_t c0 = t * p->tile;
    const ptrdiff_t w = Cp - c0 < p->tile ? Cp - c0 : p->tile;
    double mean[BN_TILE], m2[BN_TILE], s[BN_TILE], q[BN_TILE], k[BN_TILE], m1[BN_TILE];
    int bad[BN_TILE];
    const double *kc = kcol + c0;
    double n = 0.0;
    ptrdiff_t b0 = g * p->bpg, b1 = b0 + p->bpg;
    if (b1 > p->nblocks) b1 = p->nblocks;
    for (ptrdiff_t b = b0; b < b1; b++) {
        ptrdiff_t r0 = b * p->rb, r1 = r0 + p->rb;
        if (r1 > p->R) r1 = p->R;
        const double nb = (double)(r1 - r0);
        ptrdiff_t j;
        /* Shifted sums; each column adds its rows in order, whatever the traversal. */
        const T *blk = x + r0 * Cp + c0;
        BN_FN(col_sums)(blk, r1 - r0, Cp, w, kc, s, q, resident);
        /* One pass (shifted sums) unless a column is ill-conditioned (see seg_moments);
         * the second pass runs over the whole tile but is used only for those columns,
         * so a column's result never depends on its neighbours' data. */
        int two_pass = 0;
        for (j = 0; j < w; j++) {
            const double mj = s[j] / nb;
            k[j] = q[j] - s[j] * mj;   /* M2 from the shifted sums */
            s[j] = mj;
            bad[j] = !(mj * mj <= BN_SHIFT_COND * (k[j] / nb));
            two_pass |= bad[j];
        }
        if (two_pass) {
            for (j = 0; j < w; j++) m1[j] = k[j];
            for (j = 0; j < w; j++) q[j] = k[j] = 0.0;
            for (ptrdiff_t r = r0; r < r1; r++) {
                const T *row = x + r * Cp + c0;
                for (j = 0; j + 8 <= w; j += 8) {
                    bn_vd d = (BN_FN(ld)(row + j) - bn_ldd(kc + j)) - bn_ldd(s + j);
                    bn_std(q + j, bn_ldd(q + j) + d * d);
                    bn_std(k + j, bn_ldd(k + j) + d);
                }
                for (; j < w; j++) {
                    double d = ((double)row[j] - kc[j]) - s[j];
                    q[j] += d * d;
                    k[j] += d;
                }
            }
            for (j = 0; j < w; j++) k[j] = bad[j] ? q[j] - k[j] * k[j] / nb : m1[j];
        }
        /* k[j] now holds the block's M2 of column j. */
        if (n == 0.0) {
            for (j = 0; j < w; j++) {
                double r = k[j];
                mean[j] = s[j];
                m2[j] = r < 0.0 ? 0.0 : r;
            }
        } else {
            const double nn = n + nb, f1 = nb / nn, f2 = n * nb / nn;
            for (j = 0; j < w; j++) {
                double r = k[j];
                if (r < 0.0) r = 0.0;
                double delta = s[j] - mean[j];
                mean[j] += delta * f1;
                m2[j] += r + delta * delta * f2;
            }
        }
        n += nb;
    }
    for (ptrdiff_t j = 0; j < w; j++) {
        pm[g * Cp + c0 + j] = mean[j];
        pq[g * Cp + c0 + j] = m2[j];
    }
}

/* Row strategy: channel c's mean and variance from its row-group partials, merged in
 * group order. */
static inline void BN_FN(row_finish)(const T *x, ptrdiff_t C, ptrdiff_t S, ptrdiff_t G,
                                     ptrdiff_t c, const double *pn, const double *pm,
                                     const double *pq, double *mean, double *var)
{
    double n = 0.0, m = 0.0, q = 0.0;
    for (ptrdiff_t g = 0; g < G; g++)
        bn_chan_merge(&n, &m, &q, pn[g * C + c], pm[g * C + c], pq[g * C + c]);
    *mean = BN_FN(shift_of)(x, C, S, c) + m;
    *var = q / n;
}

static int BN_FN(moments_blocked)(const void *xv, ptrdiff_t N, ptrdiff_t C, ptrdiff_t S,
                                  double *mean, double *var, int nthreads)
{
    const T *x = (const T *)xv;
    if (N < 0 || C < 0 || S < 0) return BN_EINVAL;
    if (C == 0) return BN_OK;
    if (N == 0 || S == 0) {
        for (ptrdiff_t c = 0; c < C; c++) mean[c] = var[c] = NAN;
        return BN_OK;
    }
    const int nt = bn_threads(nthreads, (double)N * (double)C * (double)S);
    (void)nt;
    if (S >= BN_ROW_MIN_S) {
        ptrdiff_t G = bn_groups_row(N, S);
        const ptrdiff_t npg = (N + G - 1) / G;
        G = (N + npg - 1) / npg;
        double *buf = (double *)malloc(sizeof(double) * 3 * (size_t)(G * C));
        if (!buf) return BN_ENOMEM;
        double *pn = buf, *pm = buf + G * C, *pq = buf + 2 * G * C;
        const ptrdiff_t cc = bn_chunk_row(C, S), nch = (C + cc - 1) / cc, items = G * nch;
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt)
        for (ptrdiff_t it = 0; it < items; it++) {
            const ptrdiff_t g = it / nch, c0 = (it % nch) * cc;
            const ptrdiff_t c1 = c0 + cc < C ? c0 + cc : C;
            const ptrdiff_t n0 = g * npg, n1 = n0 + npg < N ? n0 + npg : N;
            BN_FN(row_moments_item)(x, n0, n1, C, S, c0, c1, pn + g * C, pm + g * C,
                                    pq + g * C);
        }
        for (ptrdiff_t c = 0; c < C; c++)
            BN_FN(row_finish)(x, C, S, G, c, pn, pm, pq, &mean[c], &var[c]);
        free(buf);
        return BN_OK;
    }
    /* Column strategy over the (N, C*S) matrix. */
    const bn_colpart p = bn_colpart_make(N, C * S);
    const ptrdiff_t Cp = p.Cp, G = p.ngroups;
    double *buf = (double *)malloc(sizeof(double) * (2 * (size_t)(G * Cp) + (size_t)Cp));
    if (!buf) return BN_ENOMEM;
    double *pm = buf, *pq = buf + G * Cp, *kcol = buf + 2 * G * Cp;
    for (ptrdiff_t c = 0; c < C; c++) {
        const double K = BN_FN(shift_of)(x, C, S, c);
        for (ptrdiff_t s = 0; s < S; s++) kcol[c * S + s] = K;
    }
    const ptrdiff_t items = G * p.ntiles;
    /* Data small enough to stay in the cache (the streaming threshold's measure). */
    const int resident = (double)N * (double)Cp * (double)sizeof(T) <
                         (double)bn_get_stream_min_bytes();
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt)
    for (ptrdiff_t it = 0; it < items; it++)
        BN_FN(col_moments_item)(x, &p, it / p.ntiles, it % p.ntiles, kcol, pm, pq, resident);
    const ptrdiff_t rows_per_group = p.bpg * p.rb;
    for (ptrdiff_t c = 0; c < C; c++) {
        double n = 0.0, m = 0.0, q = 0.0;
        for (ptrdiff_t s = 0; s < S; s++) {
            const ptrdiff_t col = c * S + s;
            for (ptrdiff_t g = 0; g < G; g++) {
                ptrdiff_t r0 = g * rows_per_group, r1 = r0 + rows_per_group;
                if (r1 > N) r1 = N;
                bn_chan_merge(&n, &m, &q, (double)(r1 - r0), pm[g * Cp + col],
                              pq[g * Cp + col]);
            }
        }
        mean[c] = kcol[c * S] + m;
        var[c] = q / n;
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
static void BN_FN(moments_fixup)(const T *x, ptrdiff_t N, ptrdiff_t C, ptrdiff_t S,
                                 double *mean, double *var)
{
    const double cnt = (double)N * (double)S;
    for (ptrdiff_t c = 0; c < C; c++) {
        if (isfinite(mean[c]) && isfinite(var[c])) continue;
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
            mean[c] = (nan || (pinf && ninf)) ? NAN : (pinf ? INFINITY : -INFINITY);
            var[c] = NAN;
            continue;
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
        mean[c] = ldexp(m, k);
        var[c] = ldexp((q + qc) / cnt, 2 * (k + ed + 1));
    }
}

/* Per-channel mean and biased variance: the blocked algorithm, the overflow fallback, and
 * canonical NaNs (see bn_nanacc). */
static int BN_FN(moments)(const void *xv, ptrdiff_t N, ptrdiff_t C, ptrdiff_t S,
                          double *mean, double *var, int nthreads)
{
    const int st = BN_FN(moments_blocked)(xv, N, C, S, mean, var, nthreads);
    if (st != BN_OK || C <= 0) return st;
    if (N > 0 && S > 0) BN_FN(moments_fixup)((const T *)xv, N, C, S, mean, var);
    bn_canon_vec(mean, C);
    bn_canon_vec(var, C);
    return BN_OK;
}

/* ---- element-wise passes ---- */

/*
 * y[i] = (x[i] - m) * a + b, optional ReLU, with scalar parameters.  The last L % 8
 * elements are computed one by one into a buffer and stored by store_tail; with nts (see
 * use_stream) every store is non-temporal.
 */
static void BN_FN(norm_span_s)(const T *x, T *y, ptrdiff_t L, double m, double a, double b,
                               int relu, int nts)
{
    const bn_vd mv = bn_splat(m), av = bn_splat(a), bv = bn_splat(b);
    ptrdiff_t i = 0;
    T tmp[8];
    bn_nanacc acc = bn_nanacc_zero();
    if (relu) {
        for (; i + 8 <= L; i += 8)
            BN_FN(stx)(y + i, bn_vrelu((BN_FN(ld)(x + i) - mv) * av + bv), nts, &acc);
    } else {
        for (; i + 8 <= L; i += 8)
            BN_FN(stx)(y + i, (BN_FN(ld)(x + i) - mv) * av + bv, nts, &acc);
    }
    if (bn_nanacc_any(acc)) BN_FN(canon_mem)(y, i);
    for (ptrdiff_t k = 0; k < L - i; k++) {
        const double v = ((double)x[i + k] - m) * a + b;
        tmp[k] = (T)(relu ? bn_srelu(v) : v);
    }
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
    for (ptrdiff_t k = 0; k < L - i; k++) {
        const double v = ((double)x[i + k] - m[i + k]) * a[i + k] + b[i + k];
        tmp[k] = (T)(relu ? bn_srelu(v) : v);
    }
    BN_FN(store_tail)(y + i, tmp, L - i, nts);
}

/*
 * np consecutive periods of P elements with per-element parameters of one period; on
 * AVX-512 a period of 64 keeps its parameters in registers.
 */
#if BN_ISA_LEVEL == 2
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
#endif

static void BN_FN(norm_periods)(const T *x, T *y, ptrdiff_t np, ptrdiff_t P,
                                const double *m, const double *a, const double *b, int relu,
                                int nts)
{
#if BN_ISA_LEVEL == 2
    if (P == 64) {
        BN_FN(norm_periods64)(x, y, np, m, a, b, relu, nts);
        return;
    }
#endif
    for (ptrdiff_t k = 0; k < np; k++)
        BN_FN(norm_span_v)(x + k * P, y + k * P, P, m, a, b, relu, nts);
}

static int BN_FN(normalize)(const void *xv, void *yv, ptrdiff_t N, ptrdiff_t C, ptrdiff_t S,
                            const double *mean, const double *scale, const double *shift,
                            int flags, int nthreads)
{
    const T *x = (const T *)xv;
    T *y = (T *)yv;
    const int relu = (flags & BN_FLAG_RELU) != 0;
    if (N < 0 || C < 0 || S < 0) return BN_EINVAL;
    if (N == 0 || C == 0 || S == 0) return BN_OK;
    const int nt = bn_threads(nthreads, (double)N * (double)C * (double)S);
    (void)nt;
    if (S >= BN_ROW_MIN_S) {
        const int nts = BN_FN(use_stream)(y, (double)N * (double)C * (double)S, 2, S);
        const ptrdiff_t rows = N * C;
#pragma omp parallel num_threads(nt)
        {
#pragma omp for schedule(static)
            for (ptrdiff_t it = 0; it < rows; it++) {
                ptrdiff_t c = it % C;
                BN_FN(norm_span_s)(x + it * S, y + it * S, S, mean[c], scale[c], shift[c], relu,
                                   nts);
            }
            bn_stream_fence(nts);
        }
        return BN_OK;
    }
    const ptrdiff_t Cp = C * S, P = bn_period(Cp);
    /* Every period starts where the previous ended: stream only if a period is whole
     * 16-byte pieces (P is a multiple of 8 only when C * S < 64). */
    const int nts = BN_FN(use_stream)(y, (double)N * (double)C * (double)S, 2, P);
    double *buf = (double *)malloc(sizeof(double) * 3 * (size_t)P);
    if (!buf) return BN_ENOMEM;
    double *me = buf, *ae = buf + P, *be = buf + 2 * P;
    bn_expand(me, mean, P, Cp, S);
    bn_expand(ae, scale, P, Cp, S);
    bn_expand(be, shift, P, Cp, S);
    const ptrdiff_t total = N * Cp, nfull = total / P, rem = total - nfull * P;
    const ptrdiff_t ppi = bn_periods_per_item(P);
    const ptrdiff_t items = (nfull + ppi - 1) / ppi;
#pragma omp parallel num_threads(nt)
    {
#pragma omp for schedule(static)
        for (ptrdiff_t it = 0; it < items; it++) {
            const ptrdiff_t p0 = it * ppi, p1 = p0 + ppi < nfull ? p0 + ppi : nfull;
            BN_FN(norm_periods)(x + p0 * P, y + p0 * P, p1 - p0, P, me, ae, be, relu, nts);
        }
        bn_stream_fence(nts);
    }
    if (rem) BN_FN(norm_span_v)(x + nfull * P, y + nfull * P, rem, me, ae, be, relu, nts);
    bn_stream_fence(nts);
    free(buf);
    return BN_OK;
}

/* ---- backward ---- */

/* Sums of g and g * (x - m) over a span with scalar parameters (fixed lane order). */
static void BN_FN(bwd_span_s)(const T *dy, const T *x, ptrdiff_t L, double m, double a,
                              double b, int relu, double *sd, double *sx)
{
    const bn_vd mv = bn_splat(m), av = bn_splat(a), bv = bn_splat(b);
    bn_vd d0 = bn_splat(0.0), x0 = bn_splat(0.0);
    ptrdiff_t i = 0;
    for (; i + 8 <= L; i += 8) {
        bn_vd xm = BN_FN(ld)(x + i) - mv;
        bn_vd g = BN_FN(ld)(dy + i);
        if (relu) g = bn_vmask(g, xm * av + bv);
        d0 += g;
        x0 += g * xm;
    }
    double s1 = bn_hsum(d0), s2 = bn_hsum(x0);
    for (; i < L; i++) {
        double xm = (double)x[i] - m;
        double g = (double)dy[i];
        if (relu && !(xm * a + b > 0.0)) g = 0.0;
        s1 += g;
        s2 += g * xm;
    }
    *sd += s1;
    *sx += s2;
}

#if BN_ISA_LEVEL == 2
/* Backward sums of nv * 8 columns over nr rows (row stride Cp), accumulated in registers
 * from zero; each column adds its rows in order. */
static inline __attribute__((always_inline)) void BN_FN(bwd_sums_reg)(
    const T *dblk, const T *xblk, ptrdiff_t nr, ptrdiff_t Cp, const double *m,
    const double *a, const double *b, int relu, double *sd, double *sx, const int nv)
{
    bn_vd mv[8], dv[8], xv[8];
    for (int t = 0; t < nv; t++) {
        mv[t] = bn_ldd(m + 8 * t);
        dv[t] = xv[t] = bn_splat(0.0);
    }
    for (ptrdiff_t r = 0; r < nr; r++) {
#pragma GCC unroll 8
        for (int t = 0; t < nv; t++) {
            bn_vd xm = BN_FN(ld)(xblk + r * Cp + 8 * t) - mv[t];
            bn_vd gv = BN_FN(ld)(dblk + r * Cp + 8 * t);
            if (relu) gv = bn_vmask(gv, xm * bn_ldd(a + 8 * t) + bn_ldd(b + 8 * t));
            dv[t] += gv;
            xv[t] += gv * xm;
        }
    }
    for (int t = 0; t < nv; t++) {
        bn_std(sd + 8 * t, dv[t]);
        bn_std(sx + 8 * t, xv[t]);
    }
}
#endif

/* Row strategy: backward sums of channels [c0, c1) over rows [n0, n1), in memory order;
 * each channel adds its rows in order.  Results go to pd[c], px[c]. */
static void BN_FN(row_bwd_item)(const T *dy, const T *x, ptrdiff_t n0, ptrdiff_t n1,
                                ptrdiff_t C, ptrdiff_t S, ptrdiff_t c0, ptrdiff_t c1,
                                const double *mean, const double *scale, const double *shift,
                                int relu, double *pd, double *px)
{
    double sd[BN_ROW_CHUNK], sx[BN_ROW_CHUNK];
    for (ptrdiff_t c = c0; c < c1; c++) sd[c - c0] = sx[c - c0] = 0.0;
    for (ptrdiff_t r = n0; r < n1; r++)
        for (ptrdiff_t c = c0; c < c1; c++) {
            const ptrdiff_t off = (r * C + c) * S;
            const double a = scale ? scale[c] : 0.0, b = shift ? shift[c] : 0.0;
            BN_FN(bwd_span_s)(dy + off, x + off, S, mean[c], a, b, relu, &sd[c - c0],
                              &sx[c - c0]);
        }
    for (ptrdiff_t c = c0; c < c1; c++) {
        pd[c] = sd[c - c0];
        px[c] = sx[c - c0];
    }
}

static int BN_FN(backward_reduce)(const void *dyv, const void *xv, ptrdiff_t N, ptrdiff_t C,
                                  ptrdiff_t S, const double *mean, const double *scale,
                                  const double *shift, double *sum_dy, double *sum_dyxmu,
                                  int flags, int nthreads)
{
    const T *dy = (const T *)dyv, *x = (const T *)xv;
    const int relu = (flags & BN_FLAG_RELU) != 0;
    if (N < 0 || C < 0 || S < 0) return BN_EINVAL;
    for (ptrdiff_t c = 0; c < C; c++) sum_dy[c] = sum_dyxmu[c] = 0.0;
    if (N == 0 || C == 0 || S == 0) return BN_OK;
    const int nt = bn_threads(nthreads, (double)N * (double)C * (double)S);
    (void)nt;
    if (S >= BN_ROW_MIN_S) {
        ptrdiff_t G = bn_groups_row(N, S);
        const ptrdiff_t npg = (N + G - 1) / G;
        G = (N + npg - 1) / npg;
        double *buf = (double *)malloc(sizeof(double) * 2 * (size_t)(G * C));
        if (!buf) return BN_ENOMEM;
        double *pd = buf, *px = buf + G * C;
        const ptrdiff_t cc = bn_chunk_row(C, S), nch = (C + cc - 1) / cc, items = G * nch;
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt)
        for (ptrdiff_t it = 0; it < items; it++) {
            /* Channels [c0, c1) of rows [n0, n1) in memory order; each channel adds its
             * rows in order (see bn_chunk_row). */
            const ptrdiff_t g = it / nch, c0 = (it % nch) * cc;
            const ptrdiff_t c1 = c0 + cc < C ? c0 + cc : C;
            const ptrdiff_t n0 = g * npg, n1 = n0 + npg < N ? n0 + npg : N;
            BN_FN(row_bwd_item)(dy, x, n0, n1, C, S, c0, c1, mean, scale, shift, relu,
                                pd + g * C, px + g * C);
        }
        for (ptrdiff_t c = 0; c < C; c++)
            for (ptrdiff_t g = 0; g < G; g++) {
                sum_dy[c] += pd[g * C + c];
                sum_dyxmu[c] += px[g * C + c];
            }
        free(buf);
        return BN_OK;
    }
    /* Column strategy: per-column sums over groups of rows, then over S and groups. */
    const bn_colpart p = bn_colpart_make(N, C * S);
    const ptrdiff_t Cp = p.Cp, G = p.ngroups, rows_per_group = p.bpg * p.rb;
    double *buf = (double *)malloc(sizeof(double) * (2 * (size_t)(G * Cp) + 3 * (size_t)Cp));
    if (!buf) return BN_ENOMEM;
    double *pd = buf, *px = buf + G * Cp;
    double *me = px + G * Cp, *ae = me + Cp, *be = ae + Cp;
    bn_expand(me, mean, Cp, Cp, S);
    bn_expand(ae, scale, Cp, Cp, S);
    bn_expand(be, shift, Cp, Cp, S);
    const ptrdiff_t items = G * p.ntiles;
    /* Inputs small enough to stay in the cache (the streaming threshold's measure). */
    const int resident = 2.0 * (double)N * (double)Cp * (double)sizeof(T) <
                         (double)bn_get_stream_min_bytes();
    (void)resident;
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt)
    for (ptrdiff_t it = 0; it < items; it++) {
        const ptrdiff_t g = it / p.ntiles, t = it % p.ntiles;
        const ptrdiff_t c0 = t * p.tile, w = Cp - c0 < p.tile ? Cp - c0 : p.tile;
        ptrdiff_t r0 = g * rows_per_group, r1 = r0 + rows_per_group;
        if (r1 > N) r1 = N;
        /* Accumulate on the stack: neighbouring items' partials share cache lines. */
        double ad[BN_TILE], ax[BN_TILE];
        const double *m = me + c0, *a = ae + c0, *b = be + c0;
        ptrdiff_t j;
        /* Wide tiles: row by row, vectors across the row (stack accumulators).  Narrow
         * tiles: register-held strips of 8 columns over cache-resident row blocks.  Both add
         * each column's rows in order, so they give the same bits; the split is speed only
         * (measured: row-outer is faster for 64 or more columns, strips for 16). */
#if BN_ISA_LEVEL == 2
        /* AVX-512, sums in registers, 64 columns at a time: whole rows of 8 to 71 columns
         * (one stream), or wider tiles of cache-resident data (strips down the rows; from
         * DRAM the strided strips are slower than the row-by-row walk below). */
        if ((w == Cp && w >= 8 && w < 72) || (w >= 72 && resident)) {
            const ptrdiff_t w8 = w & ~(ptrdiff_t)7, nr = r1 - r0;
            const T *dblk = dy + r0 * Cp + c0, *xblk = x + r0 * Cp + c0;
#define BN_BWD_STRIP(k)                                                                   \
    BN_FN(bwd_sums_reg)(dblk + j0, xblk + j0, nr, Cp, m + j0, a + j0, b + j0, relu, ad + j0, \
                        ax + j0, k)
            for (ptrdiff_t j0 = 0; j0 < w8; j0 += 64)
                BN_NV_SWITCH(w8 - j0 < 64 ? (w8 - j0) / 8 : 8, BN_BWD_STRIP);
#undef BN_BWD_STRIP
            for (j = w8; j < w; j++) {
                double sd = 0.0, sx = 0.0;
                for (ptrdiff_t r = 0; r < nr; r++) {
                    double xm = (double)xblk[r * Cp + j] - m[j];
                    double gs = (double)dblk[r * Cp + j];
                    if (relu && !(xm * a[j] + b[j] > 0.0)) gs = 0.0;
                    sd += gs;
                    sx += gs * xm;
                }
                ad[j] = sd;
                ax[j] = sx;
            }
        } else
#endif
        if (w >= 32) {
            for (j = 0; j < w; j++) ad[j] = ax[j] = 0.0;
            for (ptrdiff_t r = r0; r < r1; r++) {
                const T *dr = dy + r * Cp + c0, *xr = x + r * Cp + c0;
                for (j = 0; j + 8 <= w; j += 8) {
                    bn_vd xm = BN_FN(ld)(xr + j) - bn_ldd(m + j);
                    bn_vd gv = BN_FN(ld)(dr + j);
                    if (relu) gv = bn_vmask(gv, xm * bn_ldd(a + j) + bn_ldd(b + j));
                    bn_std(ad + j, bn_ldd(ad + j) + gv);
                    bn_std(ax + j, bn_ldd(ax + j) + gv * xm);
                }
                for (; j < w; j++) {
                    double xm = (double)xr[j] - m[j];
                    double gs = (double)dr[j];
                    if (relu && !(xm * a[j] + b[j] > 0.0)) gs = 0.0;
                    ad[j] += gs;
                    ax[j] += gs * xm;
                }
            }
        } else {
            /* Block by block (cache-resident), column by column in register-held strips of 8
             * columns; every column adds its rows in order. */
            for (j = 0; j < w; j++) ad[j] = ax[j] = 0.0;
            for (ptrdiff_t rb0 = r0; rb0 < r1; rb0 += p.rb) {
                const ptrdiff_t nr = r1 - rb0 < p.rb ? r1 - rb0 : p.rb;
                const T *dblk = dy + rb0 * Cp + c0, *xblk = x + rb0 * Cp + c0;
                for (j = 0; j + 8 <= w; j += 8) {
                    const bn_vd mv = bn_ldd(m + j), av = bn_ldd(a + j), bv = bn_ldd(b + j);
                    bn_vd sd = bn_ldd(ad + j), sx = bn_ldd(ax + j);
                    for (ptrdiff_t r = 0; r < nr; r++) {
                        bn_vd xm = BN_FN(ld)(xblk + r * Cp + j) - mv;
                        bn_vd gv = BN_FN(ld)(dblk + r * Cp + j);
                        if (relu) gv = bn_vmask(gv, xm * av + bv);
                        sd += gv;
                        sx += gv * xm;
                    }
                    bn_std(ad + j, sd);
                    bn_std(ax + j, sx);
                }
                for (; j < w; j++) {
                    double sd = ad[j], sx = ax[j];
                    for (ptrdiff_t r = 0; r < nr; r++) {
                        double xm = (double)xblk[r * Cp + j] - m[j];
                        double gs = (double)dblk[r * Cp + j];
                        if (relu && !(xm * a[j] + b[j] > 0.0)) gs = 0.0;
                        sd += gs;
                        sx += gs * xm;
                    }
                    ad[j] = sd;
                    ax[j] = sx;
                }
            }
        }
        for (j = 0; j < w; j++) {
            pd[g * Cp + c0 + j] = ad[j];
            px[g * Cp + c0 + j] = ax[j];
        }
    }
    for (ptrdiff_t c = 0; c < C; c++)
        for (ptrdiff_t s = 0; s < S; s++)
            for (ptrdiff_t g = 0; g < G; g++) {
                sum_dy[c] += pd[g * Cp + c * S + s];
                sum_dyxmu[c] += px[g * Cp + c * S + s];
            }
    free(buf);
    return BN_OK;
}

/*
 * dx = kd * g + kx * (x - m) + k0 (training) or dx = kd * g (eval), g = dy or the
 * ReLU-masked dy.  Parameters are per element when inc == 1, scalars when inc == 0.
 */
/* One element of dx (the scalar form of dx_span's vector lanes; parameters at index j). */
static inline T BN_FN(dx_one)(const T *dy, const T *x, ptrdiff_t i, ptrdiff_t j,
                              const double *m, const double *a, const double *b,
                              const double *kd, const double *kx, const double *k0, int relu,
                              int eval)
{
    double g = (double)dy[i];
    double xm = (double)x[i] - m[j];
    if (relu && !(xm * a[j] + b[j] > 0.0)) g = 0.0;
    return (T)(eval ? kd[j] * g : (kd[j] * g + kx[j] * xm) + k0[j]);
}

static void BN_FN(dx_span)(const T *dy, const T *x, T *dx, ptrdiff_t L, const double *m,
                           const double *a, const double *b, const double *kd,
                           const double *kx, const double *k0, ptrdiff_t inc, int relu,
                           int eval, int nts)
{
    ptrdiff_t i = 0;
    T tmp[8];
    bn_nanacc acc = bn_nanacc_zero();
    if (inc == 0) {
        const bn_vd mv = bn_splat(*m), av = bn_splat(*a), bv = bn_splat(*b);
        const bn_vd kdv = bn_splat(*kd), kxv = bn_splat(*kx), k0v = bn_splat(*k0);
        for (; i + 8 <= L; i += 8) {
            bn_vd g = BN_FN(ld)(dy + i);
            bn_vd xm = BN_FN(ld)(x + i) - mv;
            if (relu) g = bn_vmask(g, xm * av + bv);
            BN_FN(stx)(dx + i, eval ? kdv * g : (kdv * g + kxv * xm) + k0v, nts, &acc);
        }
    } else {
        for (; i + 8 <= L; i += 8) {
            bn_vd g = BN_FN(ld)(dy + i);
            bn_vd xm = BN_FN(ld)(x + i) - bn_ldd(m + i);
            if (relu) g = bn_vmask(g, xm * bn_ldd(a + i) + bn_ldd(b + i));
            bn_vd kdv = bn_ldd(kd + i);
            BN_FN(stx)(dx + i,
                       eval ? kdv * g : (kdv * g + bn_ldd(kx + i) * xm) + bn_ldd(k0 + i), nts,
                       &acc);
        }
    }
    if (bn_nanacc_any(acc)) BN_FN(canon_mem)(dx, i);
    /* The last L % 8 elements (see norm_span_s). */
    for (ptrdiff_t k = 0; k < L - i; k++)
        tmp[k] = BN_FN(dx_one)(dy, x, i + k, (i + k) * inc, m, a, b, kd, kx, k0, relu, eval);
    BN_FN(store_tail)(dx + i, tmp, L - i, nts);
}

static int BN_FN(backward_dx)(const void *dyv, const void *xv, void *dxv, ptrdiff_t N,
                              ptrdiff_t C, ptrdiff_t S, const double *mean,
                              const double *scale, const double *shift, const double *k_dy,
                              const double *k_x, const double *k_0, int flags, int nthreads)
{
    const T *dy = (const T *)dyv, *x = (const T *)xv;
    T *dx = (T *)dxv;
    const int relu = (flags & BN_FLAG_RELU) != 0, eval = (flags & BN_FLAG_EVAL) != 0;
    if (N < 0 || C < 0 || S < 0) return BN_EINVAL;
    if (N == 0 || C == 0 || S == 0) return BN_OK;
    const int nt = bn_threads(nthreads, (double)N * (double)C * (double)S);
    (void)nt;
    if (S >= BN_ROW_MIN_S) {
        const int nts = BN_FN(use_stream)(dx, (double)N * (double)C * (double)S, 3, S);
        const ptrdiff_t rows = N * C;
#pragma omp parallel num_threads(nt)
        {
#pragma omp for schedule(static)
            for (ptrdiff_t it = 0; it < rows; it++) {
                const ptrdiff_t c = it % C, off = it * S;
                const double zero = 0.0;
                BN_FN(dx_span)(dy + off, x + off, dx + off, S, mean + c,
                               scale ? scale + c : &zero, shift ? shift + c : &zero, k_dy + c,
                               k_x ? k_x + c : &zero, k_0 ? k_0 + c : &zero, 0, relu, eval,
                               nts);
            }
            bn_stream_fence(nts);
        }
        return BN_OK;
    }
    const ptrdiff_t Cp = C * S, P = bn_period(Cp);
    /* As in normalize: periods must be whole 16-byte pieces (tiles start at multiples of
     * BN_EW_TILE elements within a period, so they are too). */
    const int nts = BN_FN(use_stream)(dx, (double)N * (double)C * (double)S, 3, P);
    double *buf = (double *)malloc(sizeof(double) * 6 * (size_t)P);
    if (!buf) return BN_ENOMEM;
    double *me = buf, *ae = buf + P, *be = buf + 2 * P, *kde = buf + 3 * P, *kxe = buf + 4 * P,
           *k0e = buf + 5 * P;
    bn_expand(me, mean, P, Cp, S);
    bn_expand(ae, scale, P, Cp, S);
    bn_expand(be, shift, P, Cp, S);
    bn_expand(kde, k_dy, P, Cp, S);
    bn_expand(kxe, k_x, P, Cp, S);
    bn_expand(k0e, k_0, P, Cp, S);
    const ptrdiff_t total = N * Cp, nfull = total / P, rem = total - nfull * P;
    const ptrdiff_t ppi = bn_periods_per_item(P);
    const ptrdiff_t items = (nfull + ppi - 1) / ppi;
#pragma omp parallel num_threads(nt)
    {
#pragma omp for schedule(static)
        for (ptrdiff_t it = 0; it < items; it++) {
            const ptrdiff_t p0 = it * ppi, p1 = p0 + ppi < nfull ? p0 + ppi : nfull;
            /* Column tiles, so a tile's six parameter arrays stay in L1 over the rows. */
            for (ptrdiff_t j0 = 0; j0 < P; j0 += BN_EW_TILE) {
                const ptrdiff_t w = P - j0 < BN_EW_TILE ? P - j0 : BN_EW_TILE;
                for (ptrdiff_t k = p0; k < p1; k++) {
                    const ptrdiff_t o = k * P + j0;
                    BN_FN(dx_span)(dy + o, x + o, dx + o, w, me + j0, ae + j0, be + j0,
                                   kde + j0, kxe + j0, k0e + j0, 1, relu, eval, nts);
                }
            }
        }
        bn_stream_fence(nts);
    }
    if (rem)
        BN_FN(dx_span)(dy + nfull * P, x + nfull * P, dx + nfull * P, rem, me, ae, be, kde, kxe,
                       k0e, 1, relu, eval, nts);
    bn_stream_fence(nts);
    free(buf);
    return BN_OK;
}

/* ---- complete operations: statistics or reductions, per-channel coefficients, and the
 * element-wise pass, in one call (one crossing from Python, one scratch allocation) ---- */

static int BN_FN(train_forward)(const void *xv, void *yv, ptrdiff_t N, ptrdiff_t C,
                                ptrdiff_t S, const double *weight, const double *bias,
                                double eps, double *mean, double *var, double *invstd,
                                int flags, int nthreads)
{
    if (N < 0 || C < 0 || S < 0) return BN_EINVAL;
    if (C == 0) return BN_OK;
    int st = BN_FN(moments)(xv, N, C, S, mean, var, nthreads);
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
    st = BN_FN(normalize)(xv, yv, N, C, S, mean, sc, sh, flags, nthreads);
    free(buf);
    return st;
}
