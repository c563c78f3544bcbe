/*
 * bnfast CUDA kernels (the GPU twin of csrc/bn_stats.h, bn_elementwise.h and bn_train.h), for float and double data.
 *
 * Device code only: nvcc compiles this file as a check (tools/cuda_compile.sh), and
 * bnfast.cuda compiles it at run time with NVRTC through cupy.RawModule, with
 * -fmad=false (no contraction of a multiply and an add: the element-wise formulas give the
 * CPU kernels' bits).  Kernels are templates instantiated at the end of the file for float
 * and double; Python finds them by name expression ("bn_stats_row<float>", ...).
 *
 * Data is the CPU kernels' (N, C, S) view, C-contiguous.  Two traversals:
 *  - row layout (S large: channels-first images): channel c of row n is a contiguous run
 *    of S elements; a block takes one channel and a fixed range of rows;
 *  - column layout (S small: fully connected, channels-last): the data is an (R = N,
 *    Cp = C*S) matrix whose column j belongs to channel j / S; a block of (TX, TY)
 *    threads takes TX adjacent columns (coalesced loads) and a fixed range of rows.
 *
 * Determinism: every reduction is two kernels.  The first writes one partial per block
 * (statistics: count, mean(x - K), M2 with the channel's shift K; backward: the two sums),
 * each block adding its threads' values in a fixed tree order.  The second merges the
 * partials of a channel in a fixed order (contiguous runs per thread, then a fixed tree;
 * Chan's formula for statistics).  The partition depends on the shape only, and there are
 * no atomics, so results are bit-identical from run to run and on every device.
 */
#include "bn_common.cuh"

/* ------------------------------------------------------------------ statistics, stage 1 */

/*
 * Per-block statistics.  Each thread sums d = x - K and d^2 (K: the channel's first value);
 * the block's sums give mean m = s1 / n and M2 = s2 - s1 * m.  When m^2 > 16 var (K far from
 * the block's values, or a constant block away from K) that loses digits, and the block
 * takes a second pass over its (cache-resident) data: M2 = sum((d - m)^2) - sum(d - m)^2 / n.
 * The CPU kernels' seg_moments, per block.
 */
#define BN_STATS_ROW_ARGS(T)                                                              \
    const T *__restrict__ x, bn_i64 N, bn_i64 C, bn_i64 S, bn_i64 RB, bn_i64 G,           \
        double *__restrict__ pn, double *__restrict__ pm, double *__restrict__ pq
/* Row layout: block b = c * G + g takes channel c, rows [g * RB, (g + 1) * RB). */
template <typename T>
__global__ void __launch_bounds__(BN_THREADS) bn_stats_row(BN_STATS_ROW_ARGS(T))
{
    __shared__ double sa[BN_THREADS], sb[BN_THREADS];
    const bn_i64 blk = blockIdx.x, c = blk / G, g = blk % G;
    const bn_i64 n0 = g * RB, n1 = n0 + RB < N ? n0 + RB : N;
    const int tid = threadIdx.x;
    const double K = bn_shift_of(x, S, c);
    double s1 = 0.0, s2 = 0.0;
    for (bn_i64 n = n0; n < n1; n++) {
        const T *row = x + (n * C + c) * S;
        for (bn_i64 s = tid; s < S; s += BN_THREADS) {
            const double d = bn_wide(row[s]) - K;
            s1 += d;
            s2 += d * d;
        }
    }
    sa[tid] = s1;
    sb[tid] = s2;
    bn_tree2(sa, sb, tid, 1, BN_THREADS);
    const double cnt = (double)((n1 - n0) * S);
    const double m = sa[0] / cnt;
    double r = sb[0] - sa[0] * m;
    if (!(m * m <= BN_SHIFT_COND * (r / cnt))) {      /* the same decision in every thread */
        double q = 0.0, k = 0.0;
        for (bn_i64 n = n0; n < n1; n++) {
            const T *row = x + (n * C + c) * S;
            for (bn_i64 s = tid; s < S; s += BN_THREADS) {
                const double d = (bn_wide(row[s]) - K) - m;
                q += d * d;
                k += d;
            }
        }
        __syncthreads();                              /* every thread has read sa[0] */
        sa[tid] = q;
        sb[tid] = k;
        bn_tree2(sa, sb, tid, 1, BN_THREADS);
        r = sa[0] - sb[0] * sb[0] / cnt;
    }
    if (tid == 0) {
        pn[blk] = cnt;
        pm[blk] = m;
        pq[blk] = r < 0.0 ? 0.0 : r;
    }
}

#define BN_STATS_COL_ARGS(T)                                                              \
    const T *__restrict__ x, bn_i64 R, bn_i64 Cp, bn_i64 S, bn_i64 RB, bn_i64 G,          \
        double *__restrict__ pn, double *__restrict__ pm, double *__restrict__ pq
/* Column layout: block b = tile * G + g takes columns [tile * TX, (tile + 1) * TX) and rows
 * [g * RB, (g + 1) * RB); the partial of column j is at j * G + g (so the partials of
 * channel c are the S * G values from c * S * G on).  (The second launch bound, two blocks
 * per multiprocessor, only steers ptxas: with the float loads widened by bn_wide's PTX, its
 * sm_80 allocation left CUDA's double-division slow path 8 bytes of spills.) */
template <typename T>
__global__ void __launch_bounds__(BN_THREADS, 2) bn_stats_col(BN_STATS_COL_ARGS(T))
{
    __shared__ double sa[BN_THREADS], sb[BN_THREADS];
    const int TX = blockDim.x, TY = blockDim.y, tx = threadIdx.x, ty = threadIdx.y;
    const int t = ty * TX + tx;
    const bn_i64 tile = blockIdx.x / G, g = blockIdx.x % G, j = tile * TX + tx;
    const bn_i64 r0 = g * RB, r1 = r0 + RB < R ? r0 + RB : R;
    const bool active = j < Cp;
    const double K = active ? bn_shift_of(x, S, j / S) : 0.0;
    double s1 = 0.0, s2 = 0.0;
    if (active) {
        for (bn_i64 r = r0 + ty; r < r1; r += TY) {
            const double d = bn_wide(x[r * Cp + j]) - K;
            s1 += d;
            s2 += d * d;
        }
    }
    sa[t] = s1;
    sb[t] = s2;
    bn_tree2(sa + tx, sb + tx, ty, TX, TY);
    const double cnt = (double)(r1 - r0);
    const double m = sa[tx] / cnt;
    double r = sb[tx] - sa[tx] * m;
    const bool two = !(m * m <= BN_SHIFT_COND * (r / cnt));   /* per column */
    double q = 0.0, k = 0.0;
    if (active && two) {
        for (bn_i64 rr = r0 + ty; rr < r1; rr += TY) {
            const double d = (bn_wide(x[rr * Cp + j]) - K) - m;
            q += d * d;
            k += d;
        }
    }
    __syncthreads();                                  /* every thread has read sa[tx] */
    sa[t] = q;
    sb[t] = k;
    bn_tree2(sa + tx, sb + tx, ty, TX, TY);
    if (two) r = sa[tx] - sb[tx] * sb[tx] / cnt;
    if (ty == 0 && active) {
        const bn_i64 o = j * G + g;
        pn[o] = cnt;
        pm[o] = m;
        pq[o] = r < 0.0 ? 0.0 : r;
    }
}

/* ------------------------------------------------------------------ statistics, stage 2 */

/*
 * One block per channel merges the channel's M partials with Chan's formula: thread t
 * merges a contiguous run of them in order, then the threads' results are merged in a
 * fixed tree.  Writes mean = K + m and the biased variance M2 / n.
 */
#define BN_STATS_MERGE_ARGS(T)                                                            \
    const double *__restrict__ pn, const double *__restrict__ pm,                         \
        const double *__restrict__ pq, bn_i64 M, const T *__restrict__ x, bn_i64 S,       \
        double *__restrict__ mean, double *__restrict__ var
template <typename T>
__global__ void __launch_bounds__(BN_THREADS) bn_stats_merge(BN_STATS_MERGE_ARGS(T))
{
    __shared__ double sn[BN_THREADS], sm[BN_THREADS], sq[BN_THREADS];
    const bn_i64 c = blockIdx.x;
    const int tid = threadIdx.x, nt = blockDim.x;
    const bn_i64 per = (M + nt - 1) / nt, k0 = tid * per, k1 = k0 + per < M ? k0 + per : M;
    double n = 0.0, m = 0.0, q = 0.0;
    for (bn_i64 k = k0; k < k1; k++)
        bn_chan_merge(n, m, q, pn[c * M + k], pm[c * M + k], pq[c * M + k]);
    sn[tid] = n;
    sm[tid] = m;
    sq[tid] = q;
    for (int half = nt >> 1; half > 0; half >>= 1) {
        __syncthreads();
        if (tid < half) {
            double a = sn[tid], b = sm[tid], d = sq[tid];
            bn_chan_merge(a, b, d, sn[tid + half], sm[tid + half], sq[tid + half]);
            sn[tid] = a;
            sm[tid] = b;
            sq[tid] = d;
        }
    }
    if (tid == 0) {
        mean[c] = bn_canon(bn_shift_of(x, S, c) + sm[0]);
        var[c] = bn_canon(sq[0] / sn[0]);
    }
}

/*
 * Channels whose statistics are not finite although their values are (float64 data near
 * the largest double overflows the shifted sums), recomputed in scaled coordinates: the
 * CPU kernels' moments_fixup, with the block's threads' compensated sums combined in a
 * fixed tree.  Channels holding inf or NaN get mean +-inf (NaN with a NaN or both
 * infinities) and variance NaN.  A block per channel; finite channels return at once.
 */
#define BN_FIXUP_ARGS(T)                                                                  \
    const T *__restrict__ x, bn_i64 N, bn_i64 C, bn_i64 S, double *__restrict__ mean,     \
        double *__restrict__ var
template <typename T>
__global__ void __launch_bounds__(BN_THREADS) bn_stats_fixup(BN_FIXUP_ARGS(T))
{
    const bn_i64 c = blockIdx.x;
    if (bn_isfinite(mean[c]) && bn_isfinite(var[c])) return;   /* the whole block */
    __shared__ double sa[BN_THREADS], sb[BN_THREADS];
    __shared__ int sf[BN_THREADS];
    const int tid = threadIdx.x;
    const bn_i64 L = N * S;
    const double inf = __longlong_as_double(0x7ff0000000000000LL);
#define BN_ELEM(i) (bn_wide(x[((i) / S * C + c) * S + (i) % S]))
    double amax = 0.0;
    int flags = 0;
    for (bn_i64 i = tid; i < L; i += BN_THREADS) {
        const double v = BN_ELEM(i);
        if (v != v) flags |= 1;
        else if (v == inf) flags |= 2;
        else if (v == -inf) flags |= 4;
        else if (bn_fabs(v) > amax) amax = bn_fabs(v);
    }
    sa[tid] = amax;
    sf[tid] = flags;
    for (int half = BN_THREADS >> 1; half > 0; half >>= 1) {
        __syncthreads();
        if (tid < half) {
            sa[tid] = sa[tid] > sa[tid + half] ? sa[tid] : sa[tid + half];
            sf[tid] |= sf[tid + half];
        }
    }
    __syncthreads();
    amax = sa[0];
    flags = sf[0];
    if (flags) {
        if (tid == 0) {
            const bool nan = (flags & 1) || ((flags & 6) == 6);
            mean[c] = bn_canon(nan ? inf - inf : ((flags & 2) ? inf : -inf));
            var[c] = bn_canon(inf - inf);
        }
        return;
    }
    const double cnt = (double)L;
    const int ea = bn_exponent(amax), ec = bn_exponent(cnt);
    const int k = ea + ec > 1000 ? ea + ec - 1000 : 0;   /* sums stay below 2^1000 */
    const double sc = bn_ldexp(1.0, -k);
    double s = 0.0, comp = 0.0;
    for (bn_i64 i = tid; i < L; i += BN_THREADS) bn_neumaier(s, comp, BN_ELEM(i) * sc);
    __syncthreads();
    sa[tid] = s;
    sb[tid] = comp;
    bn_block_neumaier(sa, sb, tid);
    __syncthreads();
    const double m = (sa[0] + sb[0]) / cnt;
    double dmax = 0.0;
    for (bn_i64 i = tid; i < L; i += BN_THREADS) {
        const double d = bn_fabs(BN_ELEM(i) * sc - m);
        if (d > dmax) dmax = d;
    }
    __syncthreads();
    sa[tid] = dmax;
    for (int half = BN_THREADS >> 1; half > 0; half >>= 1) {
        __syncthreads();
        if (tid < half) sa[tid] = sa[tid] > sa[tid + half] ? sa[tid] : sa[tid + half];
    }
    __syncthreads();
    const int ed = bn_exponent(sa[0]);
    const double tscale = bn_ldexp(1.0, -(ed + 1));
    double q = 0.0, qc = 0.0;
    for (bn_i64 i = tid; i < L; i += BN_THREADS) {
        const double d = (BN_ELEM(i) * sc - m) * tscale;
        bn_neumaier(q, qc, d * d);
    }
    __syncthreads();
    sa[tid] = q;
    sb[tid] = qc;
    bn_block_neumaier(sa, sb, tid);
    if (tid == 0) {
        mean[c] = bn_canon(bn_ldexp(m, k));
        var[c] = bn_canon(bn_ldexp((sa[0] + sb[0]) / cnt, 2 * (k + ed + 1)));
    }
#undef BN_ELEM
}

/* ------------------------------------------------------------------ per-channel vectors */

/*
 * invstd = 1 / sqrt(var + eps) (written when invstd is not null), the normalisation's
 * scale = invstd * weight (invstd without weight) and shift = bias (0 without bias): the
 * CPU's train_forward and infer coefficients, the same IEEE operations.
 */
extern "C" __global__ void __launch_bounds__(BN_THREADS)
bn_coeffs(const double *__restrict__ var, const double *__restrict__ weight,
          const double *__restrict__ bias, double eps, bn_i64 C, double *__restrict__ invstd,
          double *__restrict__ scale, double *__restrict__ shift)
{
    const bn_i64 c = (bn_i64)blockIdx.x * BN_THREADS + threadIdx.x;
    if (c >= C) return;
    const double inv = 1.0 / __dsqrt_rn(var[c] + eps);
    if (invstd) invstd[c] = bn_canon(inv);
    scale[c] = weight ? inv * weight[c] : inv;
    shift[c] = bias ? bias[c] : 0.0;
}

/*
 * Conversions between float32 and float64 arrays of n values, for the backend: the float32
 * per-channel parameters widened exactly (bn_widen_f32), the float32 dweight and dbias
 * rounded once with the canonical NaN (bn_narrow_f32), as the CPU path gives them.  CuPy's
 * own casts are compiled with -ftz=true and would flush float32 subnormals (bn_common.cuh).
 */
extern "C" __global__ void __launch_bounds__(BN_THREADS)
bn_widen_f32(const float *__restrict__ src, double *__restrict__ dst, bn_i64 n)
{
    const bn_i64 i = (bn_i64)blockIdx.x * BN_THREADS + threadIdx.x;
    if (i < n) dst[i] = bn_wide(src[i]);
}

extern "C" __global__ void __launch_bounds__(BN_THREADS)
bn_narrow_f32(const double *__restrict__ src, float *__restrict__ dst, bn_i64 n)
{
    const bn_i64 i = (bn_i64)blockIdx.x * BN_THREADS + threadIdx.x;
    if (i < n) dst[i] = bn_store<float>(src[i]);
}

/* Running statistics, in place (element strides sm, sv): r = (1 - momentum) r +
 * momentum * batch, with the unbiased variance (the CPU's bn_update_running). */
#define BN_RUNNING_ARGS(R)                                                                \
    R *rm, R *rv, bn_i64 sm, bn_i64 sv, const double *__restrict__ mean,                  \
        const double *__restrict__ var, bn_i64 C, double count, double momentum
template <typename R>
__global__ void __launch_bounds__(BN_THREADS) bn_update_running(BN_RUNNING_ARGS(R))
{
    const bn_i64 c = (bn_i64)blockIdx.x * BN_THREADS + threadIdx.x;
    if (c >= C) return;
    const double unbiased = count > 1.0 ? var[c] * (count / (count - 1.0)) : var[c];
    R *pm = rm + c * sm, *pv = rv + c * sv;
    *pm = bn_store<R>((1.0 - momentum) * bn_wide(*pm) + momentum * mean[c]);
    *pv = bn_store<R>((1.0 - momentum) * bn_wide(*pv) + momentum * unbiased);
}

/* ------------------------------------------------------------------ element-wise passes */

#define BN_CHUNK 4096   /* row layout: elements of a row per block */

/* y = (x - mean) * scale + shift, optional ReLU.  y may be x.  The CPU kernels' bits: in
 * double for double data, in float32 arithmetic (with a double fallback for the elements
 * float32 cannot carry) for float data, as csrc/bn_elementwise.h's normalize_f32 and
 * docs/user_guide/semantics.md describe -- bn_norm in bn_common.cuh, its channel's
 * parameters computed once per thread.  f64: float data in double, where the CPU's plan
 * keeps it there (channels of fewer than BN_F32_MIN_PER_CHANNEL elements: the backend
 * passes it, as for the dx below). */
#define BN_NORM_ROW_ARGS(T)                                                               \
    const T *x, T *y, bn_i64 C, bn_i64 S, bn_i64 chunks, const double *__restrict__ mean, \
        const double *__restrict__ scale, const double *__restrict__ shift, int relu,    \
        int f64
template <typename T>
__global__ void __launch_bounds__(BN_THREADS) bn_normalize_row(BN_NORM_ROW_ARGS(T))
{
    const bn_i64 row = blockIdx.x / chunks, s0 = (blockIdx.x % chunks) * BN_CHUNK;
    const bn_i64 c = row % C, s1 = s0 + BN_CHUNK < S ? s0 + BN_CHUNK : S;
    const bn_norm<T> f(mean[c], scale[c], shift[c], f64);
    const T *xr = x + row * S;
    T *yr = y + row * S;
    for (bn_i64 s = s0 + threadIdx.x; s < s1; s += BN_THREADS) yr[s] = f(xr[s], relu);
}

#define BN_NORM_COL_ARGS(T)                                                               \
    const T *x, T *y, bn_i64 R, bn_i64 Cp, bn_i64 S, bn_i64 RB, bn_i64 G,                 \
        const double *__restrict__ mean, const double *__restrict__ scale,                \
        const double *__restrict__ shift, int relu, int f64
template <typename T>
__global__ void __launch_bounds__(BN_THREADS) bn_normalize_col(BN_NORM_COL_ARGS(T))
{
    const bn_i64 tile = blockIdx.x / G, g = blockIdx.x % G;
    const bn_i64 j = tile * blockDim.x + threadIdx.x;
    if (j >= Cp) return;
    const bn_i64 c = j / S, r1 = (g + 1) * RB < R ? (g + 1) * RB : R;
    const bn_norm<T> f(mean[c], scale[c], shift[c], f64);
    for (bn_i64 r = g * RB + threadIdx.y; r < r1; r += blockDim.y)
        y[r * Cp + j] = f(x[r * Cp + j], relu);
}

/* ------------------------------------------------------------------ backward */

/*
 * The backward's sums per block: sd = sum(g), sx = sum(g * (x - mean)), with g = dy, or
 * with relu, dy where (x - mean) * a + b > 0 (a = invstd * weight, b = bias: the forward
 * output).  Same partition and indexing as the statistics.
 */
#define BN_BWD_PARAMS                                                                     \
    const double *__restrict__ mean, const double *__restrict__ invstd,                   \
        const double *__restrict__ weight, const double *__restrict__ bias, int relu
#define BN_BWD_ROW_ARGS(T)                                                                \
    const T *__restrict__ dy, const T *__restrict__ x, bn_i64 N, bn_i64 C, bn_i64 S,      \
        bn_i64 RB, bn_i64 G, BN_BWD_PARAMS, double *__restrict__ pd, double *__restrict__ px
template <typename T>
__global__ void __launch_bounds__(BN_THREADS) bn_bwd_reduce_row(BN_BWD_ROW_ARGS(T))
{
    __shared__ double sa[BN_THREADS], sb[BN_THREADS];
    const bn_i64 blk = blockIdx.x, c = blk / G, g = blk % G;
    const bn_i64 n0 = g * RB, n1 = n0 + RB < N ? n0 + RB : N;
    const int tid = threadIdx.x;
    const double m = mean[c], a = weight ? invstd[c] * weight[c] : invstd[c];
    const double b = bias ? bias[c] : 0.0;
    double sd = 0.0, sx = 0.0;
    for (bn_i64 n = n0; n < n1; n++) {
        const bn_i64 off = (n * C + c) * S;
        for (bn_i64 s = tid; s < S; s += BN_THREADS) {
            const double xm = bn_wide(x[off + s]) - m;
            double gv = bn_wide(dy[off + s]);
            if (relu) gv = bn_mask(gv, xm * a + b);
            sd += gv;
            sx += gv * xm;
        }
    }
    sa[tid] = sd;
    sb[tid] = sx;
    bn_tree2(sa, sb, tid, 1, BN_THREADS);
    if (tid == 0) {
        pd[blk] = sa[0];
        px[blk] = sb[0];
    }
}

#define BN_BWD_COL_ARGS(T)                                                                \
    const T *__restrict__ dy, const T *__restrict__ x, bn_i64 R, bn_i64 Cp, bn_i64 S,     \
        bn_i64 RB, bn_i64 G, BN_BWD_PARAMS, double *__restrict__ pd, double *__restrict__ px
template <typename T>
__global__ void __launch_bounds__(BN_THREADS) bn_bwd_reduce_col(BN_BWD_COL_ARGS(T))
{
    __shared__ double sa[BN_THREADS], sb[BN_THREADS];
    const int TX = blockDim.x, TY = blockDim.y, tx = threadIdx.x, ty = threadIdx.y;
    const bn_i64 tile = blockIdx.x / G, g = blockIdx.x % G, j = tile * TX + tx;
    const bn_i64 r0 = g * RB, r1 = r0 + RB < R ? r0 + RB : R;
    double sd = 0.0, sx = 0.0;
    if (j < Cp) {
        const bn_i64 c = j / S;
        const double m = mean[c], a = weight ? invstd[c] * weight[c] : invstd[c];
        const double b = bias ? bias[c] : 0.0;
        for (bn_i64 r = r0 + ty; r < r1; r += TY) {
            const double xm = bn_wide(x[r * Cp + j]) - m;
            double gv = bn_wide(dy[r * Cp + j]);
            if (relu) gv = bn_mask(gv, xm * a + b);
            sd += gv;
            sx += gv * xm;
        }
    }
    sa[ty * TX + tx] = sd;
    sb[ty * TX + tx] = sx;
    bn_tree2(sa + tx, sb + tx, ty, TX, TY);
    if (ty == 0 && j < Cp) {
        pd[j * G + g] = sa[tx];
        px[j * G + g] = sb[tx];
    }
}

/*
 * One block per channel adds the channel's M partial sums in a fixed order (contiguous
 * runs per thread, then a fixed tree) and computes, as the CPU's _bwd_coeffs:
 * dbias = sd, dweight = sx * invstd, and dx's coefficients kx = -(a * invstd) * (dweight /
 * cnt), k0 = -a * (sd / cnt) (0 in eval mode).  sd and sx are written too (the two-step
 * backward).  A channel with a non-finite weight, invstd, dweight or dbias sets *degenerate
 * (a plain store of 1; Python recomputes those channels as the CPU path does).
 */
extern "C" __global__ void __launch_bounds__(BN_THREADS)
bn_bwd_merge(const double *__restrict__ pd, const double *__restrict__ px, bn_i64 M,
             const double *__restrict__ invstd, const double *__restrict__ weight, double cnt,
             int training, double *__restrict__ sum_dy, double *__restrict__ sum_dyxmu,
             double *__restrict__ dweight, double *__restrict__ kx, double *__restrict__ k0,
             int *degenerate)
{
    __shared__ double sa[BN_THREADS], sb[BN_THREADS];
    const bn_i64 c = blockIdx.x;
    const int tid = threadIdx.x, nt = blockDim.x;
    const bn_i64 per = (M + nt - 1) / nt, q0 = tid * per, q1 = q0 + per < M ? q0 + per : M;
    double sd = 0.0, sx = 0.0;
    for (bn_i64 k = q0; k < q1; k++) {
        sd += pd[c * M + k];
        sx += px[c * M + k];
    }
    sa[tid] = sd;
    sb[tid] = sx;
    bn_tree2(sa, sb, tid, 1, nt);
    if (tid == 0) {
        sd = bn_canon(sa[0]);
        sx = bn_canon(sb[0]);
        sum_dy[c] = sd;
        sum_dyxmu[c] = sx;
        const double inv = invstd[c], a = weight ? inv * weight[c] : inv;
        const double dw = sx * inv;
        dweight[c] = bn_canon(dw);
        if (training && cnt > 0.0) {
            kx[c] = -(a * inv) * (dw / cnt);
            k0[c] = -a * (sd / cnt);
        } else {
            kx[c] = 0.0;
            k0[c] = 0.0;
        }
        if (!(bn_isfinite(dw) && bn_isfinite(sd) && bn_isfinite(inv) &&
              (!weight || bn_isfinite(weight[c]))))
            *degenerate = 1;
    }
}

/* dx = kd * g + kx * (x - mean) + k0 (training) or kd * g (eval), kd = invstd * weight,
 * g = dy or the ReLU-masked dy; without the ReLU through bn_dx (float data in float32
 * arithmetic, as on the CPU).  dx may be dy or x. */
#define BN_DX_PARAMS                                                                      \
    BN_BWD_PARAMS, const double *__restrict__ kx, const double *__restrict__ k0, int eval, \
        int f64
#define BN_DX_ROW_ARGS(T)                                                                 \
    const T *dy, const T *x, T *dx, bn_i64 C, bn_i64 S, bn_i64 chunks, BN_DX_PARAMS
template <typename T>
__global__ void __launch_bounds__(BN_THREADS) bn_bwd_dx_row(BN_DX_ROW_ARGS(T))
{
    const bn_i64 row = blockIdx.x / chunks, s0 = (blockIdx.x % chunks) * BN_CHUNK;
    const bn_i64 c = row % C, s1 = s0 + BN_CHUNK < S ? s0 + BN_CHUNK : S;
    const double m = mean[c], a = weight ? invstd[c] * weight[c] : invstd[c];
    const double b = bias ? bias[c] : 0.0, kxc = kx[c], k0c = k0[c];
    const bn_i64 off = row * S;
    if (!relu) {
        const bn_dx<T> f(m, a, kxc, k0c, eval, f64);
        for (bn_i64 s = s0 + threadIdx.x; s < s1; s += BN_THREADS)
            dx[off + s] = f(dy[off + s], x[off + s]);
        return;
    }
    for (bn_i64 s = s0 + threadIdx.x; s < s1; s += BN_THREADS) {
        const double xm = bn_wide(x[off + s]) - m;
        const double gv = bn_mask(bn_wide(dy[off + s]), xm * a + b);
        dx[off + s] = bn_store<T>(eval ? a * gv : (a * gv + kxc * xm) + k0c);
    }
}

#define BN_DX_COL_ARGS(T)                                                                 \
    const T *dy, const T *x, T *dx, bn_i64 R, bn_i64 Cp, bn_i64 S, bn_i64 RB, bn_i64 G,   \
        BN_DX_PARAMS
template <typename T>
__global__ void __launch_bounds__(BN_THREADS) bn_bwd_dx_col(BN_DX_COL_ARGS(T))
{
    const bn_i64 tile = blockIdx.x / G, g = blockIdx.x % G;
    const bn_i64 j = tile * blockDim.x + threadIdx.x;
    if (j >= Cp) return;
    const bn_i64 c = j / S, r1 = (g + 1) * RB < R ? (g + 1) * RB : R;
    const double m = mean[c], a = weight ? invstd[c] * weight[c] : invstd[c];
    const double b = bias ? bias[c] : 0.0, kxc = kx[c], k0c = k0[c];
    const bn_dx<T> f(m, a, kxc, k0c, eval, f64);
    for (bn_i64 r = g * RB + threadIdx.y; r < r1; r += blockDim.y) {
        const bn_i64 o = r * Cp + j;
        if (!relu) {
            dx[o] = f(dy[o], x[o]);
            continue;
        }
        const double xm = bn_wide(x[o]) - m;
        const double gv = bn_mask(bn_wide(dy[o]), xm * a + b);
        dx[o] = bn_store<T>(eval ? a * gv : (a * gv + kxc * xm) + k0c);
    }
}

/* ------------------------------------------------------------------ instantiations */

/* Every template for float and double data (and running statistics), so that nvcc's
 * compile check builds, and reports registers for, every kernel that NVRTC will. */
#define BN_INSTANTIATE(T)                                                                 \
    template __global__ void bn_stats_row<T>(BN_STATS_ROW_ARGS(T));                       \
    template __global__ void bn_stats_col<T>(BN_STATS_COL_ARGS(T));                       \
    template __global__ void bn_stats_merge<T>(BN_STATS_MERGE_ARGS(T));                   \
    template __global__ void bn_stats_fixup<T>(BN_FIXUP_ARGS(T));                         \
    template __global__ void bn_update_running<T>(BN_RUNNING_ARGS(T));                    \
    template __global__ void bn_normalize_row<T>(BN_NORM_ROW_ARGS(T));                    \
    template __global__ void bn_normalize_col<T>(BN_NORM_COL_ARGS(T));                    \
    template __global__ void bn_bwd_reduce_row<T>(BN_BWD_ROW_ARGS(T));                    \
    template __global__ void bn_bwd_reduce_col<T>(BN_BWD_COL_ARGS(T));                    \
    template __global__ void bn_bwd_dx_row<T>(BN_DX_ROW_ARGS(T));                         \
    template __global__ void bn_bwd_dx_col<T>(BN_DX_COL_ARGS(T));
BN_INSTANTIATE(float)
BN_INSTANTIATE(double)
