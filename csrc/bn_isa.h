/*
 * The instruction-set shims: the ONLY file with intrinsics and with code that depends on
 * BN_ISA_LEVEL (0 baseline, 1 AVX2, 2 AVX-512).  Every function here gives the same bits in
 * every variant; only how GCC is made to lower it differs.  Loads and stores of eight
 * elements of T as a double vector (with float32 conversion), streaming stores, the NaN
 * test behind canonical NaNs, the ReLU and its gradient mask, and the store fence.
 *
 * Known trap (benchmarks/README.md): splitting the 8-double vector through a union more
 * than once in a loop body made GCC move the loop's operands through the stack on AVX2
 * (a 4x regression); where a store and a NaN test need the halves, they share one split.
 */
#if BN_ISA_LEVEL > 0 || defined(__SSE2__)
#include <immintrin.h>
#endif

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

/* Order this thread's non-temporal stores before its later stores. */
static inline void bn_stream_fence(int nts)
{
#if BN_ISA_LEVEL > 0
    if (nts) _mm_sfence();
#else
    (void)nts;
#endif
}

/* ---- loads and stores of eight elements of T as a double vector ---- */

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
 * cache (bn_plan.stream); the stored bits are those of BN_FN(st).
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
 * Store the n < 8 tail elements of a span, computed into tmp, at p, as canonical NaNs
 * where NaN.  With nts (p is then 16-byte aligned) whole 16-byte pieces are streamed, and
 * only a remainder (possible only at the very end of an output) is stored normally.
 */
static inline void BN_FN(store_tail)(T *p, T *tmp, ptrdiff_t n, int nts)
{
    ptrdiff_t i = 0;
    for (ptrdiff_t k = 0; k < n; k++)
        if (tmp[k] != tmp[k]) tmp[k] = (T)NAN;
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
