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
#if BN_ISA_LEVEL > 0
#include <immintrin.h>
#elif defined(__SSE2__)
#include <emmintrin.h>   /* SSE2 only: a fifth of immintrin.h's parsing (compile time) */
#endif
/* Streaming (non-temporal) stores and their fence: every x86-64 variant (SSE2 has them);
 * elsewhere ordinary stores (the plan then never streams: plan.c, bn_plan_streams). */
#if BN_ISA_LEVEL > 0 || defined(__SSE2__)
#define BN_CAN_STREAM 1
#else
#define BN_CAN_STREAM 0
#endif

#if BN_CAN_STREAM
/* Eight float32 values, two 16-byte pieces lo and hi, stored at p (streamed with nts: p is
 * then 16-byte aligned). */
static inline void bn_st_ps2(float *p, __m128 lo, __m128 hi, int nts)
{
    if (nts) {
        _mm_stream_ps(p, lo);
        _mm_stream_ps(p + 4, hi);
    } else {
        _mm_storeu_ps(p, lo);
        _mm_storeu_ps(p + 4, hi);
    }
}
#endif

/* Native pieces of the 8-double vector: 4 doubles (one AVX2 register), 2 (one SSE2
 * register), split and joined with __builtin_shufflevector (which GCC keeps in registers,
 * unlike a union: benchmarks/README.md). */
typedef double bn_v4 __attribute__((vector_size(32)));
typedef double bn_v2 __attribute__((vector_size(16)));
#define BN_LO4(v) __builtin_shufflevector((v), (v), 0, 1, 2, 3)
#define BN_HI4(v) __builtin_shufflevector((v), (v), 4, 5, 6, 7)
#define BN_CAT4(lo, hi) __builtin_shufflevector((lo), (hi), 0, 1, 2, 3, 4, 5, 6, 7)
#define BN_Q2(v, k) __builtin_shufflevector((v), (v), 2 * (k), 2 * (k) + 1)

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
static inline bn_nanacc bn_nanacc_neg(bn_nanacc acc, bn_vd v)
{
    return acc | _mm512_cmp_pd_mask((__m512d)v, _mm512_setzero_pd(), _CMP_LT_OQ);
}
#elif BN_ISA_LEVEL == 1
typedef __m256d bn_nanacc;
static inline bn_nanacc bn_nanacc_zero(void) { return _mm256_setzero_pd(); }
static inline bn_nanacc bn_nanacc_add(bn_nanacc acc, bn_vd v)
{
    return _mm256_or_pd(acc, _mm256_cmp_pd((__m256d)BN_LO4(v), (__m256d)BN_HI4(v),
                                           _CMP_UNORD_Q));
}
static inline int bn_nanacc_any(bn_nanacc acc) { return _mm256_movemask_pd(acc) != 0; }
static inline bn_nanacc bn_nanacc_neg(bn_nanacc acc, bn_vd v)
{
    const __m256d z = _mm256_setzero_pd();
    return _mm256_or_pd(acc, _mm256_or_pd(_mm256_cmp_pd((__m256d)BN_LO4(v), z, _CMP_LT_OQ),
                                          _mm256_cmp_pd((__m256d)BN_HI4(v), z, _CMP_LT_OQ)));
}
#elif defined(__SSE2__)
typedef __m128d bn_nanacc;
static inline bn_nanacc bn_nanacc_zero(void) { return _mm_setzero_pd(); }
static inline bn_nanacc bn_nanacc_add(bn_nanacc acc, bn_vd v)
{
    return _mm_or_pd(acc, _mm_or_pd(_mm_cmpunord_pd((__m128d)BN_Q2(v, 0), (__m128d)BN_Q2(v, 1)),
                                    _mm_cmpunord_pd((__m128d)BN_Q2(v, 2), (__m128d)BN_Q2(v, 3))));
}
static inline int bn_nanacc_any(bn_nanacc acc) { return _mm_movemask_pd(acc) != 0; }
static inline bn_nanacc bn_nanacc_neg(bn_nanacc acc, bn_vd v)
{
    const __m128d z = _mm_setzero_pd();
    return _mm_or_pd(acc, _mm_or_pd(_mm_or_pd(_mm_cmplt_pd((__m128d)BN_Q2(v, 0), z),
                                              _mm_cmplt_pd((__m128d)BN_Q2(v, 1), z)),
                                    _mm_or_pd(_mm_cmplt_pd((__m128d)BN_Q2(v, 2), z),
                                              _mm_cmplt_pd((__m128d)BN_Q2(v, 3), z))));
}
#else
typedef int bn_nanacc;
static inline bn_nanacc bn_nanacc_zero(void) { return 0; }
static inline bn_nanacc bn_nanacc_add(bn_nanacc acc, bn_vd v)
{
    for (int k = 0; k < 8; k++) acc |= v[k] != v[k];
    return acc;
}
static inline int bn_nanacc_any(bn_nanacc acc) { return acc != 0; }
static inline bn_nanacc bn_nanacc_neg(bn_nanacc acc, bn_vd v)
{
    for (int k = 0; k < 8; k++) acc |= v[k] < 0.0;
    return acc;
}
#endif

/*
 * The ReLU and its gradient mask.  Both compares are ordered, so a NaN t is kept by
 * bn_vrelu and passes no gradient in the mask (bn_vmask on AVX-512 and generic code,
 * bn_mask4 / bn_mask2 on the AVX2 / SSE2 pieces, used by the backward steps below); every
 * form gives the bits of the generic one.  AVX2 and SSE2 use intrinsics on the native pieces (GCC lowered the
 * generic compare lane by lane through the stack: AVX2 fused BN+ReLU training 41 -> 7.4 ms
 * on (32, 64, 56, 56) float32); the pieces are split and joined with shuffles, not a union
 * (a union of halves in the column backward's loop made GCC move every operand through
 * the stack: channels-last backward 3.1 -> 12.5 ms).
 */
#if BN_ISA_LEVEL == 2
static inline bn_vd bn_vrelu(bn_vd t)          /* zero where t <= 0 (NaN kept) */
{
    const __mmask8 le = _mm512_cmp_pd_mask((__m512d)t, _mm512_setzero_pd(), _CMP_LE_OQ);
    return (bn_vd)_mm512_maskz_mov_pd((__mmask8)~le, (__m512d)t);
}
#elif BN_ISA_LEVEL == 1
static inline bn_vd bn_vrelu(bn_vd t)
{
    const __m256d z = _mm256_setzero_pd();
    const __m256d lo = (__m256d)BN_LO4(t), hi = (__m256d)BN_HI4(t);
    const bn_v4 rlo = (bn_v4)_mm256_andnot_pd(_mm256_cmp_pd(lo, z, _CMP_LE_OQ), lo);
    const bn_v4 rhi = (bn_v4)_mm256_andnot_pd(_mm256_cmp_pd(hi, z, _CMP_LE_OQ), hi);
    return BN_CAT4(rlo, rhi);
}
static inline bn_v4 bn_mask4(bn_v4 g, bn_v4 t)   /* g where t > 0, else 0 */
{
    return (bn_v4)_mm256_and_pd(_mm256_cmp_pd((__m256d)t, _mm256_setzero_pd(), _CMP_GT_OQ),
                                (__m256d)g);
}
#elif defined(__SSE2__)
static inline bn_vd bn_vrelu(bn_vd t)
{
    const __m128d z = _mm_setzero_pd();
    union { bn_vd v; __m128d q[4]; } u;   /* measured: faster here than shuffles */
    u.v = t;
    for (int k = 0; k < 4; k++) u.q[k] = _mm_andnot_pd(_mm_cmple_pd(u.q[k], z), u.q[k]);
    return u.v;
}
static inline bn_v2 bn_mask2(bn_v2 g, bn_v2 t)   /* g where t > 0, else 0 */
{
    return (bn_v2)_mm_and_pd(_mm_cmpgt_pd((__m128d)t, _mm_setzero_pd()), (__m128d)g);
}
#else
static inline bn_vd bn_vrelu(bn_vd t)
{
    bn_vl le = (t <= bn_splat(0.0));
    return (bn_vd)((bn_vl)t & ~le);
}
#endif

/*
 * Accumulators: an 8-double vector carried from one loop iteration to the next.  Where
 * the target has no 64-byte registers (AVX2, SSE2), GCC 12 keeps a loop-carried value of
 * the generic 8-double type in memory and moves it through general registers every
 * iteration (rows-layout statistics on AVX2 ran at 2.2x the SSE2 time).  bn_acc holds
 * the eight lanes as native vectors instead (split with __builtin_shufflevector, not a
 * union: union splits in a loop made GCC spill, benchmarks/README.md).  Lane k always adds
 * lane k of its operands, so the sums are those of the generic form, bit for bit, and
 * bn_acc_hsum adds the lanes in bn_hsum's order; bn_acc_hsum2 does so for two accumulators
 * at once, in vector adds whose first operand is always the lower lane (the same bits,
 * NaN payloads included; lane by lane in scalar adds, the two sums at the end of every
 * row of S = 49 took a third of the rows layout's backward sums).
 */
#if BN_ISA_LEVEL == 2
typedef struct { bn_vd v; } bn_acc;
static inline bn_acc bn_acc_zero(void) { bn_acc a = {bn_splat(0.0)}; return a; }
static inline bn_acc bn_acc_ld(const double *p) { bn_acc a = {bn_ldd(p)}; return a; }
static inline void bn_acc_st(double *p, bn_acc a) { bn_std(p, a.v); }
static inline bn_acc bn_acc_add(bn_acc a, bn_vd v) { a.v += v; return a; }
static inline bn_acc bn_acc_plus(bn_acc a, bn_acc b) { a.v += b.v; return a; }
static inline double bn_acc_hsum(bn_acc a) { return bn_hsum(a.v); }
static inline void bn_acc_hsum2(bn_acc a, bn_acc b, double *sa, double *sb)
{
    /* [a01 b01 a23 b23 a45 b45 a67 b67], then [a0123 b0123 a4567 b4567], then [a b] */
    const bn_vd t = __builtin_shufflevector(a.v, b.v, 0, 8, 2, 10, 4, 12, 6, 14) +
                    __builtin_shufflevector(a.v, b.v, 1, 9, 3, 11, 5, 13, 7, 15);
    const bn_v4 u = __builtin_shufflevector(t, t, 0, 1, 4, 5) +
                    __builtin_shufflevector(t, t, 2, 3, 6, 7);
    const bn_v2 w = __builtin_shufflevector(u, u, 0, 1) + __builtin_shufflevector(u, u, 2, 3);
    *sa = w[0];
    *sb = w[1];
}
#elif BN_ISA_LEVEL == 1
typedef struct { bn_v4 lo, hi; } bn_acc;
static inline bn_acc bn_acc_zero(void) { bn_acc a = {{0, 0, 0, 0}, {0, 0, 0, 0}}; return a; }
static inline bn_acc bn_acc_ld(const double *p)
{
    bn_acc a;
    memcpy(&a.lo, p, sizeof a.lo);
    memcpy(&a.hi, p + 4, sizeof a.hi);
    return a;
}
static inline void bn_acc_st(double *p, bn_acc a)
{
    memcpy(p, &a.lo, sizeof a.lo);
    memcpy(p + 4, &a.hi, sizeof a.hi);
}
static inline bn_acc bn_acc_add(bn_acc a, bn_vd v)
{
    a.lo += BN_LO4(v);
    a.hi += BN_HI4(v);
    return a;
}
static inline bn_acc bn_acc_plus(bn_acc a, bn_acc b)
{
    a.lo += b.lo;
    a.hi += b.hi;
    return a;
}
static inline double bn_acc_hsum(bn_acc a)
{
    return ((a.lo[0] + a.lo[1]) + (a.lo[2] + a.lo[3])) +
           ((a.hi[0] + a.hi[1]) + (a.hi[2] + a.hi[3]));
}
static inline void bn_acc_hsum2(bn_acc a, bn_acc b, double *sa, double *sb)
{
    /* [a01 b01 a23 b23] and [a45 b45 a67 b67], then [a0123 b0123] and [a4567 b4567] */
    const bn_v4 tl = __builtin_shufflevector(a.lo, b.lo, 0, 4, 2, 6) +
                     __builtin_shufflevector(a.lo, b.lo, 1, 5, 3, 7);
    const bn_v4 th = __builtin_shufflevector(a.hi, b.hi, 0, 4, 2, 6) +
                     __builtin_shufflevector(a.hi, b.hi, 1, 5, 3, 7);
    const bn_v2 ul = __builtin_shufflevector(tl, tl, 0, 1) + __builtin_shufflevector(tl, tl, 2, 3);
    const bn_v2 uh = __builtin_shufflevector(th, th, 0, 1) + __builtin_shufflevector(th, th, 2, 3);
    const bn_v2 w = ul + uh;
    *sa = w[0];
    *sb = w[1];
}
#else
typedef struct { bn_v2 q0, q1, q2, q3; } bn_acc;
static inline bn_acc bn_acc_zero(void)
{
    bn_acc a = {{0, 0}, {0, 0}, {0, 0}, {0, 0}};
    return a;
}
static inline bn_acc bn_acc_ld(const double *p)
{
    bn_acc a;
    memcpy(&a.q0, p, sizeof a.q0);
    memcpy(&a.q1, p + 2, sizeof a.q1);
    memcpy(&a.q2, p + 4, sizeof a.q2);
    memcpy(&a.q3, p + 6, sizeof a.q3);
    return a;
}
static inline void bn_acc_st(double *p, bn_acc a)
{
    memcpy(p, &a.q0, sizeof a.q0);
    memcpy(p + 2, &a.q1, sizeof a.q1);
    memcpy(p + 4, &a.q2, sizeof a.q2);
    memcpy(p + 6, &a.q3, sizeof a.q3);
}
static inline bn_acc bn_acc_add(bn_acc a, bn_vd v)
{
    a.q0 += BN_Q2(v, 0);
    a.q1 += BN_Q2(v, 1);
    a.q2 += BN_Q2(v, 2);
    a.q3 += BN_Q2(v, 3);
    return a;
}
static inline bn_acc bn_acc_plus(bn_acc a, bn_acc b)
{
    a.q0 += b.q0;
    a.q1 += b.q1;
    a.q2 += b.q2;
    a.q3 += b.q3;
    return a;
}
static inline double bn_acc_hsum(bn_acc a)
{
    return ((a.q0[0] + a.q0[1]) + (a.q1[0] + a.q1[1])) +
           ((a.q2[0] + a.q2[1]) + (a.q3[0] + a.q3[1]));
}
/* Lane by lane, as two bn_acc_hsum: with the pairs in vector adds, the 16 registers of
 * SSE2 no longer held the backward sums' loop, which then kept four accumulators on the
 * stack (rows backward of (8, 1000, 7, 7) 4% slower). */
static inline void bn_acc_hsum2(bn_acc a, bn_acc b, double *sa, double *sb)
{
    *sa = bn_acc_hsum(a);
    *sb = bn_acc_hsum(b);
}
#endif

/* Square root of each lane (correctly rounded, so the bits of the scalar sqrt). */
static inline bn_vd bn_vsqrt(bn_vd v)
{
#if BN_ISA_LEVEL == 2
    return (bn_vd)_mm512_sqrt_pd((__m512d)v);
#elif BN_ISA_LEVEL == 1
    const bn_v4 lo = (bn_v4)_mm256_sqrt_pd((__m256d)BN_LO4(v));
    const bn_v4 hi = (bn_v4)_mm256_sqrt_pd((__m256d)BN_HI4(v));
    return BN_CAT4(lo, hi);
#elif defined(__SSE2__)
    const bn_v2 q0 = (bn_v2)_mm_sqrt_pd((__m128d)BN_Q2(v, 0));
    const bn_v2 q1 = (bn_v2)_mm_sqrt_pd((__m128d)BN_Q2(v, 1));
    const bn_v2 q2 = (bn_v2)_mm_sqrt_pd((__m128d)BN_Q2(v, 2));
    const bn_v2 q3 = (bn_v2)_mm_sqrt_pd((__m128d)BN_Q2(v, 3));
    return BN_CAT4(__builtin_shufflevector(q0, q1, 0, 1, 2, 3),
                   __builtin_shufflevector(q2, q3, 0, 1, 2, 3));
#else
    for (int k = 0; k < 8; k++) v[k] = sqrt(v[k]);
    return v;
#endif
}

/* Order this thread's non-temporal stores before its later stores. */
static inline void bn_stream_fence(int nts)
{
#if BN_CAN_STREAM
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
    const bn_v4 lo = (bn_v4)_mm256_cvtps_pd(_mm_loadu_ps(p));
    const bn_v4 hi = (bn_v4)_mm256_cvtps_pd(_mm_loadu_ps(p + 4));
    return BN_CAT4(lo, hi);
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
    _mm_storeu_ps(p, _mm256_cvtpd_ps((__m256d)BN_LO4(v)));
    _mm_storeu_ps(p + 4, _mm256_cvtpd_ps((__m256d)BN_HI4(v)));
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
#if !BN_CAN_STREAM
    BN_FN(st)(p, v);
#elif !BN_IS_F32   /* every variant: four 16-byte pieces */
    _mm_stream_pd(p, (__m128d)BN_Q2(v, 0));
    _mm_stream_pd(p + 2, (__m128d)BN_Q2(v, 1));
    _mm_stream_pd(p + 4, (__m128d)BN_Q2(v, 2));
    _mm_stream_pd(p + 6, (__m128d)BN_Q2(v, 3));
#elif BN_ISA_LEVEL == 2
    const __m256 f = _mm512_cvtpd_ps((__m512d)v);
    _mm_stream_ps(p, _mm256_castps256_ps128(f));
    _mm_stream_ps(p + 4, _mm256_extractf128_ps(f, 1));
#elif BN_ISA_LEVEL == 1
    _mm_stream_ps(p, _mm256_cvtpd_ps((__m256d)BN_LO4(v)));
    _mm_stream_ps(p + 4, _mm256_cvtpd_ps((__m256d)BN_HI4(v)));
#else   /* SSE2 (the baseline): the conversion of BN_FN(st), in two 16-byte pieces */
    const bn_vf t = __builtin_convertvector(v, bn_vf);
    _mm_stream_ps(p, (__m128)__builtin_shufflevector(t, t, 0, 1, 2, 3));
    _mm_stream_ps(p + 4, (__m128)__builtin_shufflevector(t, t, 4, 5, 6, 7));
#endif
}

#if BN_ISA_LEVEL == 1
/* AVX2: store the halves h0, h1 of a vector at p, noting NaNs in *acc; one split of the
 * vector serves the NaN test and the store (splitting it once for each made GCC move the
 * column kernels' operands through the stack: channels-last backward of (32, 64, 56, 56)
 * float32 3.1 -> 12.5 ms). */
static inline void BN_FN(stx_halves)(T *p, __m256d h0, __m256d h1, int nts, bn_nanacc *acc)
{
    *acc = _mm256_or_pd(*acc, _mm256_cmp_pd(h0, h1, _CMP_UNORD_Q));
#if BN_IS_F32
    bn_st_ps2(p, _mm256_cvtpd_ps(h0), _mm256_cvtpd_ps(h1), nts);
#else
    if (nts) {
        _mm_stream_pd(p, _mm256_castpd256_pd128(h0));
        _mm_stream_pd(p + 2, _mm256_extractf128_pd(h0, 1));
        _mm_stream_pd(p + 4, _mm256_castpd256_pd128(h1));
        _mm_stream_pd(p + 6, _mm256_extractf128_pd(h1, 1));
    } else {
        _mm256_storeu_pd(p, h0);
        _mm256_storeu_pd(p + 4, h1);
    }
#endif
}
#endif

/* Store v at p (streaming with nts), noting in *acc whether any value is NaN. */
static inline void BN_FN(stx)(T *p, bn_vd v, int nts, bn_nanacc *acc)
{
#if BN_ISA_LEVEL == 1
    BN_FN(stx_halves)(p, (__m256d)BN_LO4(v), (__m256d)BN_HI4(v), nts, acc);
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
#if BN_CAN_STREAM
    const ptrdiff_t step = 16 / (ptrdiff_t)sizeof(T);
    if (nts) {
        for (ptrdiff_t k = 0; k < n; k++)
            if (tmp[k] != tmp[k]) tmp[k] = (T)NAN;
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
    /* Canonical NaNs as they are stored: a plain copy loop here became a call of memcpy
     * for every tail (a row of S = 49 has one element; 3% of the dx of (8, 1000, 7, 7)). */
    for (; i < n; i++) {
        const T v = tmp[i];
        p[i] = v == v ? v : (T)NAN;
    }
}

/*
 * The backward's vector steps, with g' = g where t = xm * a + b > 0, else 0 (relu), or
 * g' = g (no relu):
 *   bn_bwd_acc(sd, sx, g, xm, a, b, relu)    *sd += g', *sx += g' * xm
 *   BN_FN(stx_dx)(p, g, xm, a, b, kd, kx, k0, relu, eval, nts, acc)
 *                                  stores kd * g' (eval) or (kd * g' + kx * xm) + k0 at p as
 *                                  BN_FN(stx) does (scalar parameters, splat)
 *   BN_FN(stx_dx_p)(p, dy, x, m, a, b, kd, kx, k0, relu, eval, nts, acc)
 *                                  the same for the 8 elements at dy, x with xm = x - m and
 *                                  per-element parameters read at m, a, b, kd, kx, k0
 * On AVX2 and SSE2 they work on the native pieces from start to end: an 8-double vector
 * rebuilt from masked pieces made GCC move it through memory (AVX2 backward with fused
 * ReLU took 2.5x the time without; a union of halves did the same, even with relu off),
 * and so did parameters loaded as 8-double vectors and split (AVX2 channels-last dx
 * 2.5 -> 6.4 ms).  Lane k computes exactly what the generic form computes.
 */
#if BN_ISA_LEVEL == 1
static inline void bn_bwd_acc(bn_acc *sd, bn_acc *sx, bn_vd g, bn_vd xm, bn_vd a, bn_vd b,
                              int relu)
{
    bn_v4 gl = BN_LO4(g), gh = BN_HI4(g);
    const bn_v4 xl = BN_LO4(xm), xh = BN_HI4(xm);
    if (relu) {
        gl = bn_mask4(gl, xl * BN_LO4(a) + BN_LO4(b));
        gh = bn_mask4(gh, xh * BN_HI4(a) + BN_HI4(b));
    }
    sd->lo += gl;
    sd->hi += gh;
    sx->lo += gl * xl;
    sx->hi += gh * xh;
}

static inline bn_v4 bn_dx4(bn_v4 g, bn_v4 xm, bn_v4 a, bn_v4 b, bn_v4 kd, bn_v4 kx,
                           bn_v4 k0, int relu, int eval)
{
    if (relu) g = bn_mask4(g, xm * a + b);
    return eval ? kd * g : (kd * g + kx * xm) + k0;
}

static inline bn_v4 bn_ld4d(const double *p)
{
    bn_v4 v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline bn_v4 BN_FN(ld4)(const T *p)
{
#if BN_IS_F32
    return (bn_v4)_mm256_cvtps_pd(_mm_loadu_ps(p));
#else
    return bn_ld4d(p);
#endif
}

static inline void BN_FN(stx_dx)(T *p, bn_vd g, bn_vd xm, bn_vd a, bn_vd b, bn_vd kd,
                                 bn_vd kx, bn_vd k0, int relu, int eval, int nts,
                                 bn_nanacc *acc)
{
    const bn_v4 lo = bn_dx4(BN_LO4(g), BN_LO4(xm), BN_LO4(a), BN_LO4(b), BN_LO4(kd),
                            BN_LO4(kx), BN_LO4(k0), relu, eval);
    const bn_v4 hi = bn_dx4(BN_HI4(g), BN_HI4(xm), BN_HI4(a), BN_HI4(b), BN_HI4(kd),
                            BN_HI4(kx), BN_HI4(k0), relu, eval);
    BN_FN(stx_halves)(p, (__m256d)lo, (__m256d)hi, nts, acc);
}

static inline void BN_FN(stx_dx_p)(T *p, const T *dy, const T *x, const double *m,
                                   const double *a, const double *b, const double *kd,
                                   const double *kx, const double *k0, int relu, int eval,
                                   int nts, bn_nanacc *acc)
{
    const bn_v4 lo = bn_dx4(BN_FN(ld4)(dy), BN_FN(ld4)(x) - bn_ld4d(m), bn_ld4d(a),
                            bn_ld4d(b), bn_ld4d(kd), bn_ld4d(kx), bn_ld4d(k0), relu, eval);
    const bn_v4 hi = bn_dx4(BN_FN(ld4)(dy + 4), BN_FN(ld4)(x + 4) - bn_ld4d(m + 4),
                            bn_ld4d(a + 4), bn_ld4d(b + 4), bn_ld4d(kd + 4), bn_ld4d(kx + 4),
                            bn_ld4d(k0 + 4), relu, eval);
    BN_FN(stx_halves)(p, (__m256d)lo, (__m256d)hi, nts, acc);
}
#elif BN_ISA_LEVEL == 0 && defined(__SSE2__)
static inline void bn_bwd_acc(bn_acc *sd, bn_acc *sx, bn_vd g, bn_vd xm, bn_vd a, bn_vd b,
                              int relu)
{
    bn_v2 g0 = BN_Q2(g, 0), g1 = BN_Q2(g, 1), g2 = BN_Q2(g, 2), g3 = BN_Q2(g, 3);
    const bn_v2 x0 = BN_Q2(xm, 0), x1 = BN_Q2(xm, 1), x2 = BN_Q2(xm, 2), x3 = BN_Q2(xm, 3);
    if (relu) {
        g0 = bn_mask2(g0, x0 * BN_Q2(a, 0) + BN_Q2(b, 0));
        g1 = bn_mask2(g1, x1 * BN_Q2(a, 1) + BN_Q2(b, 1));
        g2 = bn_mask2(g2, x2 * BN_Q2(a, 2) + BN_Q2(b, 2));
        g3 = bn_mask2(g3, x3 * BN_Q2(a, 3) + BN_Q2(b, 3));
    }
    sd->q0 += g0;
    sd->q1 += g1;
    sd->q2 += g2;
    sd->q3 += g3;
    sx->q0 += g0 * x0;
    sx->q1 += g1 * x1;
    sx->q2 += g2 * x2;
    sx->q3 += g3 * x3;
}

static inline bn_v2 bn_dx2(bn_v2 g, bn_v2 xm, bn_v2 a, bn_v2 b, bn_v2 kd, bn_v2 kx,
                           bn_v2 k0, int relu, int eval)
{
    if (relu) g = bn_mask2(g, xm * a + b);
    return eval ? kd * g : (kd * g + kx * xm) + k0;
}

static inline bn_v2 bn_ld2d(const double *p)
{
    bn_v2 v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline bn_v2 BN_FN(ld2)(const T *p)
{
#if BN_IS_F32
    return (bn_v2)_mm_cvtps_pd(_mm_castsi128_ps(_mm_loadl_epi64((const __m128i *)p)));
#else
    return bn_ld2d(p);
#endif
}

/* Store four pieces at p (streaming with nts: p is then 16-byte aligned), noting NaNs in
 * *acc. */
static inline void BN_FN(stx_quarters)(T *p, bn_v2 y0, bn_v2 y1, bn_v2 y2, bn_v2 y3,
                                       int nts, bn_nanacc *acc)
{
    *acc = _mm_or_pd(*acc, _mm_or_pd(_mm_cmpunord_pd((__m128d)y0, (__m128d)y1),
                                     _mm_cmpunord_pd((__m128d)y2, (__m128d)y3)));
#if BN_IS_F32
    bn_st_ps2(p, _mm_movelh_ps(_mm_cvtpd_ps((__m128d)y0), _mm_cvtpd_ps((__m128d)y1)),
              _mm_movelh_ps(_mm_cvtpd_ps((__m128d)y2), _mm_cvtpd_ps((__m128d)y3)), nts);
#else
    if (nts) {
        _mm_stream_pd(p, (__m128d)y0);
        _mm_stream_pd(p + 2, (__m128d)y1);
        _mm_stream_pd(p + 4, (__m128d)y2);
        _mm_stream_pd(p + 6, (__m128d)y3);
    } else {
        _mm_storeu_pd(p, (__m128d)y0);
        _mm_storeu_pd(p + 2, (__m128d)y1);
        _mm_storeu_pd(p + 4, (__m128d)y2);
        _mm_storeu_pd(p + 6, (__m128d)y3);
    }
#endif
}

static inline void BN_FN(stx_dx)(T *p, bn_vd g, bn_vd xm, bn_vd a, bn_vd b, bn_vd kd,
                                 bn_vd kx, bn_vd k0, int relu, int eval, int nts,
                                 bn_nanacc *acc)
{
    BN_FN(stx_quarters)(p,
                        bn_dx2(BN_Q2(g, 0), BN_Q2(xm, 0), BN_Q2(a, 0), BN_Q2(b, 0),
                               BN_Q2(kd, 0), BN_Q2(kx, 0), BN_Q2(k0, 0), relu, eval),
                        bn_dx2(BN_Q2(g, 1), BN_Q2(xm, 1), BN_Q2(a, 1), BN_Q2(b, 1),
                               BN_Q2(kd, 1), BN_Q2(kx, 1), BN_Q2(k0, 1), relu, eval),
                        bn_dx2(BN_Q2(g, 2), BN_Q2(xm, 2), BN_Q2(a, 2), BN_Q2(b, 2),
                               BN_Q2(kd, 2), BN_Q2(kx, 2), BN_Q2(k0, 2), relu, eval),
                        bn_dx2(BN_Q2(g, 3), BN_Q2(xm, 3), BN_Q2(a, 3), BN_Q2(b, 3),
                               BN_Q2(kd, 3), BN_Q2(kx, 3), BN_Q2(k0, 3), relu, eval),
                        nts, acc);
}

static inline void BN_FN(stx_dx_p)(T *p, const T *dy, const T *x, const double *m,
                                   const double *a, const double *b, const double *kd,
                                   const double *kx, const double *k0, int relu, int eval,
                                   int nts, bn_nanacc *acc)
{
    bn_v2 y[4];
    for (int k = 0; k < 4; k++)   /* piece k: elements 2k, 2k + 1 */
        y[k] = bn_dx2(BN_FN(ld2)(dy + 2 * k), BN_FN(ld2)(x + 2 * k) - bn_ld2d(m + 2 * k),
                      bn_ld2d(a + 2 * k), bn_ld2d(b + 2 * k), bn_ld2d(kd + 2 * k),
                      bn_ld2d(kx + 2 * k), bn_ld2d(k0 + 2 * k), relu, eval);
    BN_FN(stx_quarters)(p, y[0], y[1], y[2], y[3], nts, acc);
}
#else
static inline bn_vd bn_vmask(bn_vd g, bn_vd t)   /* g where t > 0, else 0 */
{
    bn_vl gt = (t > bn_splat(0.0));
    return (bn_vd)((bn_vl)g & gt);
}

static inline void bn_bwd_acc(bn_acc *sd, bn_acc *sx, bn_vd g, bn_vd xm, bn_vd a, bn_vd b,
                              int relu)
{
    if (relu) g = bn_vmask(g, xm * a + b);
    *sd = bn_acc_add(*sd, g);
    *sx = bn_acc_add(*sx, g * xm);
}

static inline void BN_FN(stx_dx)(T *p, bn_vd g, bn_vd xm, bn_vd a, bn_vd b, bn_vd kd,
                                 bn_vd kx, bn_vd k0, int relu, int eval, int nts,
                                 bn_nanacc *acc)
{
    if (relu) g = bn_vmask(g, xm * a + b);
    BN_FN(stx)(p, eval ? kd * g : (kd * g + kx * xm) + k0, nts, acc);
}

static inline void BN_FN(stx_dx_p)(T *p, const T *dy, const T *x, const double *m,
                                   const double *a, const double *b, const double *kd,
                                   const double *kx, const double *k0, int relu, int eval,
                                   int nts, bn_nanacc *acc)
{
    BN_FN(stx_dx)(p, BN_FN(ld)(dy), BN_FN(ld)(x) - bn_ldd(m), bn_ldd(a), bn_ldd(b),
                  bn_ldd(kd), bn_ldd(kx), bn_ldd(k0), relu, eval, nts, acc);
}
#endif

#if BN_IS_F32
/*
 * float32 arithmetic for the element-wise passes of float32 data (bn_plan.ew_f32; the
 * loops are in bn_elementwise.h): t = (x - mh) * af + bf (bn_f8_norm), (g * kd + k0) +
 * (x - mh) * kx (bn_f8_dx) or g * kd (bn_f8_mul) on eight float lanes, each operation
 * rounded once (no FMA: -ffp-contract=off and separate intrinsics), so every
 * variant computes the same bits.  bn_f8_bad tells whether any lane of t is not finite
 * (t - t is then NaN): those elements are recomputed in double; bn_f8_flag collects the
 * same over many vectors (an OR of t - t: the bits of 0 where finite, of a NaN where not;
 * the generic form adds, with the same outcome) and bn_f8_flagged reads it.  The ReLU is the double
 * one's, +0 where t <= 0, as one max(t, +0): x86's max returns its second operand for two
 * zeros and for a NaN (a NaN t is recomputed in double before or after, so its 0 is never
 * kept); the compare and AND it replaces cost 5-15% more on the fused ReLU's
 * cache-resident cases (benchmarks/README.md item 59).  AVX2 and AVX-512 hold the eight lanes in one 256-bit register
 * (16 lanes of AVX-512 were 10% faster from L1 and the same from L2 in
 * benchmarks/loops_f32.c; one form serves both), SSE2 in two halves.
 */
#if BN_ISA_LEVEL >= 1
typedef __m256 bn_f8;
static inline bn_f8 bn_f8_zero(void) { return _mm256_setzero_ps(); }
static inline bn_f8 bn_f8_splat(float a) { return _mm256_set1_ps(a); }
static inline bn_f8 bn_f8_ld(const float *p) { return _mm256_loadu_ps(p); }
static inline bn_f8 bn_f8_norm(bn_f8 x, bn_f8 m, bn_f8 a, bn_f8 b)
{
    return _mm256_add_ps(_mm256_mul_ps(_mm256_sub_ps(x, m), a), b);
}
static inline bn_f8 bn_f8_dx(bn_f8 g, bn_f8 x, bn_f8 m, bn_f8 kd, bn_f8 kx, bn_f8 k0)
{
    return _mm256_add_ps(_mm256_add_ps(_mm256_mul_ps(g, kd), k0),
                         _mm256_mul_ps(_mm256_sub_ps(x, m), kx));
}
static inline bn_f8 bn_f8_mul(bn_f8 g, bn_f8 kd) { return _mm256_mul_ps(g, kd); }
static inline bn_f8 bn_f8_flag(bn_f8 acc, bn_f8 t) { return _mm256_or_ps(acc, _mm256_sub_ps(t, t)); }
static inline int bn_f8_flagged(bn_f8 acc)
{
    return _mm256_movemask_ps(_mm256_cmp_ps(acc, acc, _CMP_UNORD_Q)) != 0;
}
static inline int bn_f8_bad(bn_f8 t) { return bn_f8_flagged(_mm256_sub_ps(t, t)); }
static inline bn_f8 bn_f8_relu(bn_f8 t)   /* +0 for t <= 0 (max's second operand) */
{
    return _mm256_max_ps(t, _mm256_setzero_ps());
}
static inline void bn_f8_st(float *p, bn_f8 t, int nts)   /* nts: p 16-byte aligned */
{
    if (nts) {
        _mm_stream_ps(p, _mm256_castps256_ps128(t));
        _mm_stream_ps(p + 4, _mm256_extractf128_ps(t, 1));
    } else {
        _mm256_storeu_ps(p, t);
    }
}
#elif defined(__SSE2__)
typedef struct { __m128 lo, hi; } bn_f8;
static inline bn_f8 bn_f8_zero(void)
{
    bn_f8 r = {_mm_setzero_ps(), _mm_setzero_ps()};
    return r;
}
static inline bn_f8 bn_f8_splat(float a)
{
    bn_f8 r = {_mm_set1_ps(a), _mm_set1_ps(a)};
    return r;
}
static inline bn_f8 bn_f8_ld(const float *p)
{
    bn_f8 r = {_mm_loadu_ps(p), _mm_loadu_ps(p + 4)};
    return r;
}
static inline bn_f8 bn_f8_norm(bn_f8 x, bn_f8 m, bn_f8 a, bn_f8 b)
{
    bn_f8 r = {_mm_add_ps(_mm_mul_ps(_mm_sub_ps(x.lo, m.lo), a.lo), b.lo),
               _mm_add_ps(_mm_mul_ps(_mm_sub_ps(x.hi, m.hi), a.hi), b.hi)};
    return r;
}
static inline bn_f8 bn_f8_dx(bn_f8 g, bn_f8 x, bn_f8 m, bn_f8 kd, bn_f8 kx, bn_f8 k0)
{
    bn_f8 r = {_mm_add_ps(_mm_add_ps(_mm_mul_ps(g.lo, kd.lo), k0.lo),
                          _mm_mul_ps(_mm_sub_ps(x.lo, m.lo), kx.lo)),
               _mm_add_ps(_mm_add_ps(_mm_mul_ps(g.hi, kd.hi), k0.hi),
                          _mm_mul_ps(_mm_sub_ps(x.hi, m.hi), kx.hi))};
    return r;
}
static inline bn_f8 bn_f8_mul(bn_f8 g, bn_f8 kd)
{
    bn_f8 r = {_mm_mul_ps(g.lo, kd.lo), _mm_mul_ps(g.hi, kd.hi)};
    return r;
}
static inline bn_f8 bn_f8_flag(bn_f8 acc, bn_f8 t)
{
    bn_f8 r = {_mm_or_ps(acc.lo, _mm_sub_ps(t.lo, t.lo)), _mm_or_ps(acc.hi, _mm_sub_ps(t.hi, t.hi))};
    return r;
}
static inline int bn_f8_flagged(bn_f8 acc) { return _mm_movemask_ps(_mm_cmpunord_ps(acc.lo, acc.hi)) != 0; }
static inline int bn_f8_bad(bn_f8 t)
{
    return _mm_movemask_ps(_mm_cmpunord_ps(_mm_sub_ps(t.lo, t.lo), _mm_sub_ps(t.hi, t.hi))) != 0;
}
static inline bn_f8 bn_f8_relu(bn_f8 t)   /* +0 for t <= 0 (max's second operand) */
{
    const __m128 z = _mm_setzero_ps();
    bn_f8 r = {_mm_max_ps(t.lo, z), _mm_max_ps(t.hi, z)};
    return r;
}
static inline void bn_f8_st(float *p, bn_f8 t, int nts)   /* nts: p 16-byte aligned */
{
    bn_st_ps2(p, t.lo, t.hi, nts);
}
#else
typedef bn_vf bn_f8;
typedef int bn_vi8 __attribute__((vector_size(32)));
static inline bn_f8 bn_f8_zero(void)
{
    bn_f8 r = {0, 0, 0, 0, 0, 0, 0, 0};
    return r;
}
static inline bn_f8 bn_f8_splat(float a)
{
    bn_f8 r = {a, a, a, a, a, a, a, a};
    return r;
}
static inline bn_f8 bn_f8_ld(const float *p)
{
    bn_f8 r;
    memcpy(&r, p, sizeof r);
    return r;
}
static inline bn_f8 bn_f8_norm(bn_f8 x, bn_f8 m, bn_f8 a, bn_f8 b) { return (x - m) * a + b; }
static inline bn_f8 bn_f8_dx(bn_f8 g, bn_f8 x, bn_f8 m, bn_f8 kd, bn_f8 kx, bn_f8 k0)
{
    return (g * kd + k0) + (x - m) * kx;
}
static inline bn_f8 bn_f8_mul(bn_f8 g, bn_f8 kd) { return g * kd; }
static inline bn_f8 bn_f8_flag(bn_f8 acc, bn_f8 t) { return acc + (t - t); }
static inline int bn_f8_flagged(bn_f8 acc)
{
    int bad = 0;
    for (int k = 0; k < 8; k++) bad |= acc[k] != acc[k];
    return bad;
}
static inline int bn_f8_bad(bn_f8 t) { return bn_f8_flagged(t - t); }
static inline bn_f8 bn_f8_relu(bn_f8 t)
{
    const bn_vi8 le = (t <= bn_f8_splat(0.0f));
    return (bn_f8)((bn_vi8)t & ~le);
}
static inline void bn_f8_st(float *p, bn_f8 t, int nts)
{
    (void)nts;
    memcpy(p, &t, sizeof t);
}
#endif
#endif /* BN_IS_F32 */
