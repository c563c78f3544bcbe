/*
 * bnfast CUDA kernels: shared helpers.  Device code only, no #include: the same text is
 * compiled by nvcc (tools/cuda_compile.sh) and by NVRTC through cupy.RawModule at run time
 * (bnfast/cuda/_kernels.py inlines this header into bnfast.cu before compiling).
 *
 * Numerics as in the CPU kernels (csrc/bn_stats.h): every value is widened to double,
 * all arithmetic is double precision, results are rounded once -- except the
 * normalisation of float data and its dx without the ReLU, in float32 arithmetic as on
 * the CPU (bn_norm, bn_dx below).  The
 * module is compiled with -fmad=false, so no multiply and add are contracted into an FMA
 * and every element-wise formula gives the CPU kernels' bits.
 */
#ifndef BN_COMMON_CUH
#define BN_COMMON_CUH

#define BN_THREADS 256          /* threads per block in every kernel */
#define BN_SHIFT_COND 16.0      /* one-pass block statistics while m^2 <= this * var */

typedef long long bn_i64;

/*
 * float32 operations that keep subnormals, whatever -ftz says.  CuPy appends -ftz=true to
 * every NVRTC compile, after the caller's options (cupy/cuda/compiler.py,
 * _compile_with_cache_cuda; CuPy issue #9576), so plain float code here would flush float32
 * subnormals to zero -- in the widening of every float input (cvt.ftz.f64.f32), the rounding
 * of every float result (cvt.rn.ftz.f32.f64), the float32 arithmetic and comparisons --
 * where the CPU keeps them (seen on an H200: outputs of about 5e-39 stored as 0).  On the
 * device these are PTX instructions without .ftz; every float32 value the kernels read,
 * compute or store goes through them (tests/gpu/test_cuda.py compiles this source with
 * -ftz=true and checks that no .ftz instruction is left).  Elsewhere (the tests' CPU
 * stand-in) they are the host compiler's IEEE operations.
 */
#ifdef __CUDA_ARCH__
__device__ __forceinline__ double bn_wide(float v)
{
    double r;
    asm("cvt.f64.f32 %0, %1;" : "=d"(r) : "f"(v));
    return r;
}
__device__ __forceinline__ float bn_to_f32(double v)
{
    float r;
    asm("cvt.rn.f32.f64 %0, %1;" : "=f"(r) : "d"(v));
    return r;
}
__device__ __forceinline__ float bn_fadd(float a, float b)
{
    float r;
    asm("add.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
    return r;
}
__device__ __forceinline__ float bn_fsub(float a, float b)
{
    float r;
    asm("sub.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
    return r;
}
__device__ __forceinline__ float bn_fmul(float a, float b)
{
    float r;
    asm("mul.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
    return r;
}
#else
__device__ __forceinline__ double bn_wide(float v) { return (double)v; }
__device__ __forceinline__ float bn_to_f32(double v) { return (float)v; }
__device__ __forceinline__ float bn_fadd(float a, float b) { return a + b; }
__device__ __forceinline__ float bn_fsub(float a, float b) { return a - b; }
__device__ __forceinline__ float bn_fmul(float a, float b) { return a * b; }
#endif
__device__ __forceinline__ double bn_wide(double v) { return v; }

/* Canonical quiet NaNs (NumPy's np.nan and its float32 cast), stored for every NaN
 * output: the GPU's own NaNs have other bits. */
__device__ __forceinline__ double bn_canon(double v)
{
    return v != v ? __longlong_as_double(0x7ff8000000000000LL) : v;
}

__device__ __forceinline__ float bn_canon(float v)
{
    return (__float_as_int(v) & 0x7fffffff) > 0x7f800000 ? __int_as_float(0x7fc00000) : v;
}

/* Round a double result to the storage type, with the canonical NaN. */
template <typename T> __device__ __forceinline__ T bn_store(double v);
template <> __device__ __forceinline__ float bn_store<float>(double v)
{
    return bn_canon(bn_to_f32(v));
}
template <> __device__ __forceinline__ double bn_store<double>(double v)
{
    return bn_canon(v);
}

__device__ __forceinline__ bool bn_isfinite(double v)
{
    return ((__double_as_longlong(v) >> 52) & 0x7ff) != 0x7ff;
}

/* v * 2^e for any int e (in steps that keep every intermediate exact for normal values). */
__device__ __forceinline__ double bn_ldexp(double v, int e)
{
    while (e > 1000) {
        v *= __longlong_as_double((bn_i64)(1000 + 1023) << 52);
        e -= 1000;
    }
    while (e < -1000) {
        v *= __longlong_as_double((bn_i64)(-1000 + 1023) << 52);
        e += 1000;
    }
    return v * __longlong_as_double((bn_i64)(e + 1023) << 52);
}

/* The e with v < 2^e for v >= 0 (frexp's exponent; 0 for v == 0). */
__device__ __forceinline__ int bn_exponent(double v)
{
    if (v == 0.0) return 0;
    const int biased = (int)((__double_as_longlong(v) >> 52) & 0x7ff);
    return biased == 0 ? -1022 : biased - 1022;
}

/* The ReLU (zero where t <= 0; NaN kept) and its gradient mask (g where t > 0). */
__device__ __forceinline__ double bn_relu(double t) { return t <= 0.0 ? 0.0 : t; }
__device__ __forceinline__ double bn_mask(double g, double t) { return t > 0.0 ? g : 0.0; }

/*
 * The normalisation y = (x - m) * a + b (optional ReLU) of one channel, from its double
 * parameters m (mean), a (scale = invstd * weight) and b (shift = bias): the CPU kernels'
 * bits for either storage type.
 *
 * double data: all in double, rounded once (csrc/bn_elementwise.h, norm_one).
 *
 * float data: in float32 arithmetic, exactly as the CPU's normalize_f32 (csrc/
 * bn_elementwise.h: f32_params, f32_one; docs/user_guide/semantics.md, "float32 outputs:
 * the element-wise passes in float32").  Per channel, once (in double, each rounded once):
 *     mh = (float)m,  af = (float)a,  bf = (float)(b - (m - (double)mh) * a);
 * a channel whose af float32 holds only as a subnormal or zero (a nonzero |a| below
 * FLT_MIN) gets af = NaN (bn_f32_scale), so that every
 * one of its elements takes the fallback below (where mh, af or bf is not finite, every t
 * of the channel is not finite anyway).  Per element: t = (x - mh) * af + bf, three
 * float32 operations each rounded once (bn_fsub, bn_fmul, bn_fadd: never contracted into an
 * FMA, whatever -fmad says, and never flushed); where t is not finite (NaN or infinite x, or a float32 overflow), the
 * element is computed in double instead, (float)(((double)x - m) * a + b) with the ReLU in
 * double and the canonical NaN; otherwise y = t, or with the ReLU (t <= 0 ? 0 : t).
 */
/* (float)v, or NaN where float32 holds v only as a subnormal or as zero (v != 0): a scale
 * float32 would lose precision on (the CPU's f32_scale). */
__device__ __forceinline__ float bn_f32_scale(double v)
{
    const float f = bn_to_f32(v);
    return ((__float_as_int(f) & 0x7f800000) == 0 && v != 0.0) ? __int_as_float(0x7fc00000)
                                                                : f;
}

template <typename T> struct bn_norm;

template <> struct bn_norm<double> {
    double m, a, b;
    __device__ __forceinline__ bn_norm(double m_, double a_, double b_, int)
        : m(m_), a(a_), b(b_) {}
    __device__ __forceinline__ double operator()(double x, int relu) const
    {
        const double v = (x - m) * a + b;
        return bn_store<double>(relu ? bn_relu(v) : v);
    }
};

template <> struct bn_norm<float> {
    double m, a, b;   /* the fallback's (the double path's) parameters */
    float mh, af, bf;
    int f64;          /* the whole channel in double (the CPU's plan: ew_f32 off) */
    __device__ __forceinline__ bn_norm(double m_, double a_, double b_, int f64_)
        : m(m_), a(a_), b(b_), f64(f64_)
    {
        mh = bn_to_f32(m);
        af = bn_f32_scale(a);
        bf = bn_to_f32(b - (m - bn_wide(mh)) * a);
    }
    __device__ __forceinline__ float operator()(float x, int relu) const
    {
        const float t = bn_fadd(bn_fmul(bn_fsub(x, mh), af), bf);
        if (f64 || (__float_as_int(t) & 0x7f800000) == 0x7f800000) {   /* NaN or infinite */
            const double v = (bn_wide(x) - m) * a + b;
            return bn_store<float>(relu ? bn_relu(v) : v);
        }
        return relu && bn_wide(t) <= 0.0 ? 0.0f : t;
    }
};

/*
 * The backward's dx without the ReLU, dx = kd * g + kx * (x - m) + k0 (eval: kd * g), of
 * one channel from its double coefficients: the CPU kernels' bits for either storage type.
 * double data: in double, rounded once (csrc/bn_elementwise.h, dx_one).  float data: in
 * float32 arithmetic as the CPU's ew_f32 (BN_F32_DX, BN_F32_DXE): per channel mh = (float)m,
 * kdf and kxf through bn_f32_scale, k0f = (float)(k0 + kx * ((double)mh - m)); per element
 * t = (g * kdf + k0f) + (x - mh) * kxf (eval: g * kdf), each operation rounded once; where
 * t is not finite, the double formula.  (With the ReLU, dx is computed in double on both.)
 */
template <typename T> struct bn_dx;

template <> struct bn_dx<double> {
    double m, kd, kx, k0;
    int eval;
    __device__ __forceinline__ bn_dx(double m_, double kd_, double kx_, double k0_, int e, int)
        : m(m_), kd(kd_), kx(kx_), k0(k0_), eval(e)
    {
    }
    __device__ __forceinline__ double operator()(double g, double x) const
    {
        return bn_store<double>(eval ? kd * g : (kd * g + kx * (x - m)) + k0);
    }
};

template <> struct bn_dx<float> {
    double m, kd, kx, k0;   /* the fallback's (the double path's) coefficients */
    float mh, kdf, kxf, k0f;
    int eval, f64;    /* f64: the whole channel in double (the CPU's plan: ew_f32 off) */
    __device__ __forceinline__ bn_dx(double m_, double kd_, double kx_, double k0_, int e,
                                     int f64_)
        : m(m_), kd(kd_), kx(kx_), k0(k0_), eval(e), f64(f64_)
    {
        mh = bn_to_f32(m);
        kdf = bn_f32_scale(kd);
        kxf = bn_f32_scale(kx);
        k0f = bn_to_f32(k0 + kx * (bn_wide(mh) - m));
    }
    __device__ __forceinline__ float operator()(float g, float x) const
    {
        const float t = eval ? bn_fmul(g, kdf)
                             : bn_fadd(bn_fadd(bn_fmul(g, kdf), k0f),
                                       bn_fmul(bn_fsub(x, mh), kxf));
        if (f64 || (__float_as_int(t) & 0x7f800000) == 0x7f800000) {   /* NaN or infinite */
            const double gd = bn_wide(g);
            return bn_store<float>(eval ? kd * gd : (kd * gd + kx * (bn_wide(x) - m)) + k0);
        }
        return t;
    }
};

/* The shift of channel c: its first value x[c*S], or 0 if that is not finite. */
template <typename T>
__device__ __forceinline__ double bn_shift_of(const T *x, bn_i64 S, bn_i64 c)
{
    const double K = bn_wide(x[c * S]);
    return bn_isfinite(K) ? K : 0.0;
}

/* Chan, Golub & LeVeque's pairwise update of (n, mean, M2) with (nb, meanb, m2b): the
 * CPU kernels' bn_chan_merge. */
__device__ __forceinline__ void bn_chan_merge(double &n, double &mean, double &m2, double nb,
                                              double meanb, double m2b)
{
    if (nb == 0.0) return;
    if (n == 0.0) {
        n = nb;
        mean = meanb;
        m2 = m2b;
        return;
    }
    const double nn = n + nb;
    const double delta = meanb - mean;
    mean += delta * (nb / nn);
    m2 += m2b + delta * delta * (n * nb / nn);
    n = nn;
}

__device__ __forceinline__ double bn_fabs(double v)
{
    return __longlong_as_double(__double_as_longlong(v) & 0x7fffffffffffffffLL);
}

/* Neumaier's compensated addition of v to (s, comp). */
__device__ __forceinline__ void bn_neumaier(double &s, double &comp, double v)
{
    const double t = s + v;
    comp += (bn_fabs(s) >= bn_fabs(v)) ? (s - t) + v : (v - t) + s;
    s = t;
}

/*
 * The block's compensated sum in a fixed tree order: thread tid holds (sa[tid], sb[tid])
 * (sum, compensation); afterwards sa[0] + sb[0] is the block's sum.  Every thread of the
 * block must call it (it synchronises); thread 0 may read sa[0], sb[0] at once, the
 * others after a __syncthreads().
 */
__device__ __forceinline__ void bn_block_neumaier(double *sa, double *sb, int tid)
{
    for (int half = BN_THREADS >> 1; half > 0; half >>= 1) {
        __syncthreads();
        if (tid < half) {
            double s0 = sa[tid], c0 = sb[tid] + sb[tid + half];
            bn_neumaier(s0, c0, sa[tid + half]);
            sa[tid] = s0;
            sb[tid] = c0;
        }
    }
}

/*
 * Tree sums over the block in a fixed order: after bn_tree2, a[base] holds the sum of
 * a[base + k * step] for k < count (count a power of two), added pairwise as
 * (a[i] + a[i + half]) -- the same order on every run and every device.  Every thread of
 * the block must call it.
 */
__device__ __forceinline__ void bn_tree2(double *a, double *b, int lane, int step, int count)
{
    for (int half = count >> 1; half > 0; half >>= 1) {
        __syncthreads();
        if (lane < half) {
            a[lane * step] += a[(lane + half) * step];
            b[lane * step] += b[(lane + half) * step];
        }
    }
    __syncthreads();
}

#endif
