/*
 * Generic kernel bodies.  Included once per instruction-set variant, from
 * kernels_<isa>.c, after a `#pragma GCC target(...)` that selects the instruction set and
 * with BN_SUFFIX defined to the variant's name.  Inside, bn_impl_dtype.h is included once
 * for float and once for double.
 *
 * Vector code uses GCC/Clang vector extensions with a fixed width of eight doubles, so
 * the lane structure (and therefore the rounding) is the same in every variant: AVX-512
 * holds a vector in one register, AVX2 in two, SSE2 in four.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#include "bnfast.h"
#if BN_ISA_LEVEL > 0 || defined(__SSE2__)
#include <immintrin.h>
#endif

#define BN_CAT2(a, b) a##_##b
#define BN_CAT(a, b) BN_CAT2(a, b)
#define BN_FN(name) BN_CAT(BN_CAT(name, BN_SFX), BN_SUFFIX)

typedef double bn_vd __attribute__((vector_size(64)));
typedef float bn_vf __attribute__((vector_size(32)));
typedef long long bn_vl __attribute__((vector_size(64)));

/*
 * Fixed blocking.  Every constant here, and every partition derived from them, depends on
 * the shape of the data only, never on the number of threads.
 */
#define BN_ROW_MIN_S 64        /* S >= this: per-(n, c) rows; else columns of (N, C*S) */
#define BN_SEG 2048            /* row strategy: contiguous segment for the two-pass block */
#define BN_TILE 256            /* column strategy: columns per tile */
#define BN_BLOCK_ELEMS 32768   /* column strategy: elements per two-pass block (~tile x rows) */
#define BN_ROW_RUN 16384       /* row strategy: elements an item reads contiguously (per n) */
#define BN_ROW_CHUNK 256       /* row strategy: most channels per work item */
#define BN_SPAN 16384          /* element-wise passes: elements per work item (about) */
#define BN_EW_TILE 256         /* column backward dx: columns per tile */
#define BN_MAX_GROUPS_ROW 16
#define BN_MAX_GROUPS_COL 64
#define BN_PAR_MIN 32768       /* elements below which a call stays on one thread */
#define BN_SHIFT_COND 16.0     /* one-pass block statistics while mean(x-K)^2 <= this * var */

static inline double bn_hsum(bn_vd v)
{
    return ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7]));
}

static inline bn_vd bn_splat(double a)
{
    bn_vd v = {a, a, a, a, a, a, a, a};
    return v;
}

/*
 * NaN outputs are stored as the canonical quiet NaN (0x7ff8000000000000, NumPy's np.nan;
 * 0x7fc00000 in float32).  When two NaNs meet in an operation, x86 returns the first
 * operand's NaN, and the compiler may order the operands of a commutative operation
 * differently in each variant, so without this the sign and payload of a NaN result could
 * differ between variants.  Each element-wise span collects, store by store, whether any
 * stored value was NaN (bn_nanacc: one unordered compare and an OR per vector); only then
 * does it rewrite the span's NaNs in memory (canon_mem).  Scalar tails are rewritten as
 * they are stored, and the per-channel outputs by bn_canon_vec.
 *
 * Intrinsics, not the generic vector type: GCC lowers a compare of the 8-double vector
 * badly where it takes several registers, and a per-store branch made it keep the loop's
 * constants on the stack (both slowed the AVX2 and SSE2 kernels by 1.2-50x).
 */
#if BN_ISA_LEVEL == 2
typedef __mmask8 bn_nanacc;
static inline bn_nanacc bn_nanacc_zero(void) { return 0; }
static inline bn_nanacc bn_nanacc_add(bn_nanacc acc, bn_vd v)
{
    return acc | _mm512_cmp_pd_mask((__m512d)v, (__m512d)v, _CMP_UNORD_Q);
}
static inline int bn_nanacc_any(bn_nanacc acc) { return acc != 0; }
#elif BN_ISA_LEVEL == 1
typedef __m256d bn_nanacc;
static inline bn_nanacc bn_nanacc_zero(void) { return _mm256_setzero_pd(); }
typedef union { bn_vd v; __m256d h[2]; } bn_vd_halves;
static inline bn_nanacc bn_nanacc_add(bn_nanacc acc, bn_vd v)
{
    bn_vd_halves u;
    u.v = v;
    return _mm256_or_pd(acc, _mm256_cmp_pd(u.h[0], u.h[1], _CMP_UNORD_Q));
}
static inline int bn_nanacc_any(bn_nanacc acc) { return _mm256_movemask_pd(acc) != 0; }
#elif defined(__SSE2__)
typedef __m128d bn_nanacc;
static inline bn_nanacc bn_nanacc_zero(void) { return _mm_setzero_pd(); }
typedef union { bn_vd v; __m128d q[4]; } bn_vd_quarters;
static inline bn_nanacc bn_nanacc_add(bn_nanacc acc, bn_vd v)
{
    bn_vd_quarters u;
    u.v = v;
    return _mm_or_pd(acc, _mm_or_pd(_mm_cmpunord_pd(u.q[0], u.q[1]),
                                    _mm_cmpunord_pd(u.q[2], u.q[3])));
}
static inline int bn_nanacc_any(bn_nanacc acc) { return _mm_movemask_pd(acc) != 0; }
#else
typedef int bn_nanacc;
static inline bn_nanacc bn_nanacc_zero(void) { return 0; }
static inline bn_nanacc bn_nanacc_add(bn_nanacc acc, bn_vd v)
{
    for (int k = 0; k < 8; k++) acc |= v[k] != v[k];
    return acc;
}
static inline int bn_nanacc_any(bn_nanacc acc) { return acc != 0; }
#endif

/*
 * The ReLU and its gradient mask.  Both compares are ordered, so a NaN t is kept by
 * bn_vrelu and passes no gradient in bn_vmask; every form below gives the bits of the
 * generic one.  The ReLU uses intrinsics (GCC lowered the generic compare lane by lane
 * through the stack on SSE2 and AVX2: AVX2 fused BN+ReLU training 41 -> 7.4 ms on
 * (32, 64, 56, 56) float32).  The gradient mask keeps the generic form on AVX2 and
 * AVX-512: inside the column backward's loop the AVX2 intrinsic form (a union of halves)
 * made GCC move every operand through the stack, even with relu off (channels-last
 * backward 3.1 -> 12.5 ms).
 */
#if BN_ISA_LEVEL == 2
static inline bn_vd bn_vrelu(bn_vd t)          /* zero where t <= 0 (NaN kept) */
{
    const __mmask8 le = _mm512_cmp_pd_mask((__m512d)t, _mm512_setzero_pd(), _CMP_LE_OQ);
    return (bn_vd)_mm512_maskz_mov_pd((__mmask8)~le, (__m512d)t);
}
static inline bn_vd bn_vmask(bn_vd g, bn_vd t)   /* g where t > 0, else 0 */
{
    bn_vl gt = (t > bn_splat(0.0));
    return (bn_vd)((bn_vl)g & gt);
}
#elif BN_ISA_LEVEL == 1
static inline bn_vd bn_vrelu(bn_vd t)
{
    const __m256d z = _mm256_setzero_pd();
    bn_vd_halves u;
    u.v = t;
    for (int k = 0; k < 2; k++)
        u.h[k] = _mm256_andnot_pd(_mm256_cmp_pd(u.h[k], z, _CMP_LE_OQ), u.h[k]);
    return u.v;
}
static inline bn_vd bn_vmask(bn_vd g, bn_vd t)
{
    bn_vl gt = (t > bn_splat(0.0));
    return (bn_vd)((bn_vl)g & gt);
}
#elif defined(__SSE2__)
static inline bn_vd bn_vrelu(bn_vd t)
{
    const __m128d z = _mm_setzero_pd();
    bn_vd_quarters u;
    u.v = t;
    for (int k = 0; k < 4; k++) u.q[k] = _mm_andnot_pd(_mm_cmple_pd(u.q[k], z), u.q[k]);
    return u.v;
}
static inline bn_vd bn_vmask(bn_vd g, bn_vd t)
{
    const __m128d z = _mm_setzero_pd();
    bn_vd_quarters ut, ug;
    ut.v = t;
    ug.v = g;
    for (int k = 0; k < 4; k++) ug.q[k] = _mm_and_pd(_mm_cmpgt_pd(ut.q[k], z), ug.q[k]);
    return ug.v;
}
#else
static inline bn_vd bn_vrelu(bn_vd t)
{
    bn_vl le = (t <= bn_splat(0.0));
    return (bn_vd)((bn_vl)t & ~le);
}
static inline bn_vd bn_vmask(bn_vd g, bn_vd t)
{
    bn_vl gt = (t > bn_splat(0.0));
    return (bn_vd)((bn_vl)g & gt);
}
#endif

static inline void bn_canon_vec(double *p, ptrdiff_t n)
{
    if (!p) return;
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

/* Number of row groups for the row strategy (shape only). */
static inline ptrdiff_t bn_groups_row(ptrdiff_t N, ptrdiff_t S)
{
    ptrdiff_t g = (ptrdiff_t)(((double)N * (double)S) / 65536.0);
    if (g > BN_MAX_GROUPS_ROW) g = BN_MAX_GROUPS_ROW;
    if (g > N) g = N;
    if (g < 1) g = 1;
    return g;
}

/*
 * Row strategy: channels per work item.  An item covers channels [c0, c0 + chunk) of a group
 * of rows and walks them in memory order (for each n, its channels one after another), so
 * it reads runs of chunk * S contiguous elements that the hardware prefetchers can follow.
 * Each channel still merges its rows in order, so the chunking does not change any result.
 */
static inline ptrdiff_t bn_chunk_row(ptrdiff_t C, ptrdiff_t S)
{
    ptrdiff_t cc = (BN_ROW_RUN + S - 1) / (S > 0 ? S : 1);
    const ptrdiff_t par = (C + 7) / 8;   /* at least about 8 items per row group */
    if (cc > par) cc = par;
    if (cc > BN_ROW_CHUNK) cc = BN_ROW_CHUNK;
    if (cc < 1) cc = 1;
    return cc;
}

/* Column strategy partition (shape only): tile width, rows per block, blocks per group. */
typedef struct {
    ptrdiff_t R, Cp, tile, ntiles, rb, nblocks, bpg, ngroups;
} bn_colpart;

static inline bn_colpart bn_colpart_make(ptrdiff_t R, ptrdiff_t Cp)
{
    bn_colpart p;
    p.R = R;
    p.Cp = Cp;
    p.tile = Cp < BN_TILE ? Cp : BN_TILE;
    if (p.tile < 1) p.tile = 1;
    p.ntiles = (Cp + p.tile - 1) / p.tile;
    p.rb = BN_BLOCK_ELEMS / p.tile;
    if (p.rb < 8) p.rb = 8;
    p.nblocks = (R + p.rb - 1) / p.rb;
    if (p.nblocks < 1) p.nblocks = 1;
    ptrdiff_t g = p.nblocks;
    if (g > BN_MAX_GROUPS_COL) g = BN_MAX_GROUPS_COL;
    ptrdiff_t lim = (ptrdiff_t)1 << 20;
    lim = lim / (Cp > 0 ? Cp : 1);
    if (lim < 1) lim = 1;
    if (g > lim) g = lim;
    ptrdiff_t work = (ptrdiff_t)(((double)R * (double)Cp) / 65536.0);
    if (work < 1) work = 1;
    if (g > work) g = work;
    if (g < 1) g = 1;
    p.bpg = (p.nblocks + g - 1) / g;
    p.ngroups = (p.nblocks + p.bpg - 1) / p.bpg;
    return p;
}

/* Element-wise column passes: periods (rows) per work item. */
static inline ptrdiff_t bn_periods_per_item(ptrdiff_t P)
{
    ptrdiff_t k = BN_SPAN / (P > 0 ? P : 1);
    return k > 1 ? k : 1;
}

static inline int bn_threads(int nthreads, double work)
{
    if (nthreads < 1) nthreads = 1;
    if (work < BN_PAR_MIN) nthreads = 1;
    return nthreads;
}

/* BN_ONLY_DTYPE (32 or 64): the dtype of this translation unit, kernels_<isa>_f32.c or
 * _f64.c (bn_entry.h exports its entry points; kernel_tables.c assembles the tables). */
#ifndef BN_ONLY_DTYPE
#error "compile kernels_<isa>_f32.c / kernels_<isa>_f64.c, which set BN_ONLY_DTYPE"
#endif
#if BN_ONLY_DTYPE == 32
#define T float
#define BN_SFX f32
#define BN_IS_F32 1
#include "bn_impl_dtype.h"
#undef T
#undef BN_SFX
#undef BN_IS_F32
#endif

#if BN_ONLY_DTYPE == 64
#define T double
#define BN_SFX f64
#define BN_IS_F32 0
#include "bn_impl_dtype.h"
#undef T
#undef BN_SFX
#undef BN_IS_F32
#endif

#include "bn_entry.h"
