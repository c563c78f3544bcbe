/*
 * Common definitions of the kernels: the 8-double vector type, the generated names, the
 * Chan merge, the per-element parameter expansion, and the partition skeletons that run
 * a pass's work items (shared by statistics and backward sums, and by normalize and dx).
 * No intrinsics here (bn_isa.h has them all) and nothing that depends on the variant;
 * functions that may be compiled out of line carry the variant in their name (BN_FN), as
 * tools/check_isa.py expects of code compiled for AVX2/AVX-512.
 *
 * Vector code uses GCC/Clang vector extensions with a fixed width of eight doubles, so the
 * lane structure (and therefore the rounding) is the same in every variant: AVX-512 holds
 * a vector in one register, AVX2 in two, SSE2 in four.
 */
#ifndef BN_COMMON_H
#define BN_COMMON_H
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#include "bnfast.h"
#include "bn_plan.h"

/* BN_FN(moments) is moments_f32_avx2 in the float32 unit of the AVX2 variant. */
#define BN_CAT2(a, b) a##_##b
#define BN_CAT(a, b) BN_CAT2(a, b)
#define BN_FN(name) BN_CAT(BN_CAT(name, BN_SFX), BN_SUFFIX)

/* Software prefetch from DRAM, for the passes whose input is not cache-resident (beyond
 * the streaming threshold): the line BN_PF_BYTES + extra bytes beyond p.  With sums in
 * double, or a store stream beside the loads, the out-of-order window does not reach far
 * enough ahead for the hardware prefetchers (benchmarks/README.md items 73, 75, 77).  The
 * address is formed as an integer: near an array's end it lies beyond it, where a
 * prefetch does not fault but pointer arithmetic would be undefined. */
#ifndef BN_PF_BYTES
#define BN_PF_BYTES 8192
#endif
static inline void bn_prefetch_ahead(const void *p, ptrdiff_t extra)
{
    __builtin_prefetch((const void *)((uintptr_t)p + BN_PF_BYTES + (uintptr_t)extra));
}

typedef double bn_vd __attribute__((vector_size(64)));
typedef float bn_vf __attribute__((vector_size(32)));
typedef long long bn_vl __attribute__((vector_size(64)));

static inline double bn_hsum(bn_vd v)
{
    return ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7]));
}

static inline bn_vd bn_splat(double a)
{
    bn_vd v = {a, a, a, a, a, a, a, a};
    return v;
}

static inline bn_vd bn_ldd(const double *p)
{
    bn_vd t;
    memcpy(&t, p, sizeof t);
    return t;
}

static inline void bn_std(double *p, bn_vd v) { memcpy(p, &v, sizeof v); }

/* The scalar ReLU, and the gradient mask: g where t = (x - m) * a + b > 0, else 0 (a NaN t
 * passes no gradient).  The vector forms are bn_vrelu and bn_vmask (bn_isa.h). */
static inline double bn_bits_and(double v, uint64_t mask)
{
    uint64_t u;
    memcpy(&u, &v, sizeof u);
    u &= mask;
    memcpy(&v, &u, sizeof v);
    return v;
}
/* Branch-free (an AND with an all-ones or all-zeros mask, the same bits as `t <= 0 ? 0 : t`
 * and `t > 0 ? g : 0`): data-dependent branches here cost a misprediction per element on
 * signed data whenever the compiler does not turn them into selects (gcc -O2 does not). */
static inline double bn_srelu(double t) { return bn_bits_and(t, (uint64_t)0 - !(t <= 0.0)); }
static inline double bn_smask(double g, double t) { return bn_bits_and(g, (uint64_t)0 - (t > 0.0)); }

/* Whether all n values at p are finite: an OR of exponent tests that GCC vectorises (a
 * scan with a branch per value cost about 1 ns per channel: the statistics' checks for
 * overflow and NaN took 7% of the training forward of (32, 8192) on one thread). */
static inline int bn_all_finite(const double *p, ptrdiff_t n)
{
    uint64_t bad = 0;
    for (ptrdiff_t i = 0; i < n; i++) {
        uint64_t u;
        memcpy(&u, p + i, sizeof u);
        bad |= (uint64_t)((u & 0x7ff0000000000000ull) == 0x7ff0000000000000ull);
    }
    return bad == 0;
}

/* Per-channel outputs with canonical NaNs (see bn_nanacc in bn_isa.h). */
static inline void bn_canon_vec(double *p, ptrdiff_t n)
{
    if (!p || bn_all_finite(p, n)) return;
    for (ptrdiff_t i = 0; i < n; i++)
        if (p[i] != p[i]) p[i] = NAN;
}

/* Chan, Golub & LeVeque pairwise update of (count, mean, M2) with a block's values. */
static inline void bn_chan_merge(double *n, double *mean, double *m2, double nb,
                                 double meanb, double m2b)
{
    if (nb == 0) return;
    if (*n == 0) {
        *n = nb;
        *mean = meanb;
        *m2 = m2b;
        return;
    }
    double nn = *n + nb;
    double delta = meanb - *mean;
    *mean += delta * (nb / nn);
    *m2 += m2b + delta * delta * (*n * nb / nn);
    *n = nn;
}

/* The row stride of the columns layout's position-major statistics partials (bn_stats.h:
 * position s of channel c at s * stride + c): C rounded up to 8, plus 8, so that the
 * positions' rows fall in different L1 sets (a stride of 4 KiB put all 49 rows of
 * (32, 512, 7, 7) in one set: the training forward took twice its time). */
static inline ptrdiff_t bn_col_part_stride(ptrdiff_t C)
{
    return ((C + 7) & ~(ptrdiff_t)7) + 8;
}

/* Expand per-channel values v[C] to per-element values e[P] for columns of width S
 * (P is a multiple of Cp = C * S; v == NULL gives zeros). */
static inline void BN_FN(expand)(double *e, const double *v, ptrdiff_t P, ptrdiff_t Cp,
                             ptrdiff_t S)
{
    const ptrdiff_t C = Cp / S;
    for (ptrdiff_t c = 0; c < C; c++) {
        const double val = v ? v[c] : 0.0;
        for (ptrdiff_t s = 0; s < S; s++) e[c * S + s] = val;
    }
    for (ptrdiff_t j = Cp; j < P; j++) e[j] = e[j - Cp];
}

/* Per-element parameters of one period for the columns layout: v itself where it already
 * is that (S == 1 and the period is Cp: channels-last and 2-D data with C >= 64), else
 * its expansion into e (which may then be NULL: bn_params_direct tells). */
static inline int bn_params_direct(ptrdiff_t P, ptrdiff_t Cp, ptrdiff_t S)
{
    return S == 1 && P == Cp;
}

static inline const double *BN_FN(params)(double *e, const double *v, ptrdiff_t P,
                                          ptrdiff_t Cp, ptrdiff_t S)
{
    if (bn_params_direct(P, Cp, S) && v) return v;
    BN_FN(expand)(e, v, P, Cp, S);
    return e;
}

/* ---- partition skeletons ---- */

/* Rows layout, reductions: item `it` covers channels [c0, c1) of the rows [n0, n1) of row
 * group g (bn_plan.h: row_groups, rows_per_group, row_chunk). */
typedef struct {
    ptrdiff_t g, n0, n1, c0, c1;
} bn_row_item;

static inline bn_row_item bn_row_item_of(const bn_plan *p, ptrdiff_t it)
{
    const ptrdiff_t nch = (p->C + p->row_chunk - 1) / p->row_chunk;
    bn_row_item r;
    r.g = it / nch;
    r.c0 = (it % nch) * p->row_chunk;
    r.c1 = r.c0 + p->row_chunk < p->C ? r.c0 + p->row_chunk : p->C;
    r.n0 = r.g * p->rows_per_group;
    r.n1 = r.n0 + p->rows_per_group < p->N ? r.n0 + p->rows_per_group : p->N;
    return r;
}

/* Columns layout, reductions: item `it` covers the columns [c0, c0 + w) of tile t over the
 * rows [r0, r1) of group g (blocks of col.rb rows). */
typedef struct {
    ptrdiff_t g, t, c0, w, r0, r1;
} bn_col_item;

static inline bn_col_item bn_col_item_of(const bn_plan *p, ptrdiff_t it)
{
    const bn_colpart *cp = &p->col;
    const ptrdiff_t rows_per_group = cp->bpg * cp->rb;
    bn_col_item r;
    r.g = it / cp->ntiles;
    r.t = it % cp->ntiles;
    r.c0 = r.t * cp->tile;
    r.w = cp->Cp - r.c0 < cp->tile ? cp->Cp - r.c0 : cp->tile;
    r.r0 = r.g * rows_per_group;
    r.r1 = r.r0 + rows_per_group < cp->R ? r.r0 + rows_per_group : cp->R;
    return r;
}

/* Run items [0, items) of a reduction on the plan's threads, dynamically scheduled (each
 * item writes its own partial results, merged afterwards in a fixed order). */
typedef void (*bn_item_fn)(const void *ctx, ptrdiff_t it);

static void BN_FN(run_reduce_items)(const bn_plan *p, ptrdiff_t items, bn_item_fn f,
                                const void *ctx)
{
    const int nt = p->nthreads;
    if (nt == 1) {   /* no parallel region: its cost matters for small calls */
        for (ptrdiff_t it = 0; it < items; it++) f(ctx, it);
        return;
    }
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt)
    for (ptrdiff_t it = 0; it < items; it++) f(ctx, it);
}

/* Run an element-wise pass: units (rows, or whole periods) [u0, u1) per item, statically
 * scheduled; f stores its outputs and fences its own streaming stores. */
typedef void (*bn_range_fn)(const void *ctx, ptrdiff_t u0, ptrdiff_t u1);

static void BN_FN(run_ew_items)(const bn_plan *p, bn_range_fn f, const void *ctx)
{
    const int nt = p->nthreads;
    const ptrdiff_t per = p->ew_per_item, units = p->ew_units, items = p->ew_items;
    if (nt == 1) {   /* no parallel region: its cost matters for small calls */
        for (ptrdiff_t it = 0; it < items; it++) {
            const ptrdiff_t u0 = it * per, u1 = u0 + per < units ? u0 + per : units;
            f(ctx, u0, u1);
        }
        return;
    }
#pragma omp parallel for schedule(static) num_threads(nt)
    for (ptrdiff_t it = 0; it < items; it++) {
        const ptrdiff_t u0 = it * per, u1 = u0 + per < units ? u0 + per : units;
        f(ctx, u0, u1);
    }
}
#endif /* BN_COMMON_H */
