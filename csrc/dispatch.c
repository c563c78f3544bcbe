/* Run-time selection of the kernel variant, running-statistics update, build facts. */
#include <stddef.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#include "bnfast.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define BN_HAVE_X86_VARIANTS 1
extern const bn_kernel_table bn_table_avx2;
extern const bn_kernel_table bn_table_avx512;
#else
#define BN_HAVE_X86_VARIANTS 0
#endif
extern const bn_kernel_table bn_table_baseline;

static const bn_kernel_table *bn_tables[BN_ISA_COUNT] = {
    &bn_table_baseline,
#if BN_HAVE_X86_VARIANTS
    &bn_table_avx2,
    &bn_table_avx512,
#else
    NULL,
    NULL,
#endif
};

static const char *bn_names[BN_ISA_COUNT] = {"baseline", "avx2", "avx512"};

static int bn_current = -1;

int bn_isa_compiled(int isa)
{
    return isa >= 0 && isa < BN_ISA_COUNT && bn_tables[isa] != NULL;
}

int bn_isa_supported(int isa)
{
    if (!bn_isa_compiled(isa)) return 0;
    if (isa == BN_ISA_BASELINE) return 1;
#if BN_HAVE_X86_VARIANTS
    /* libgcc/compiler-rt check both the CPU's flags and the OS's XSAVE state (XGETBV). */
    __builtin_cpu_init();
    if (isa == BN_ISA_AVX2)
        return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    if (isa == BN_ISA_AVX512)
        return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
               __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512bw") &&
               __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#endif
    return 0;
}

int bn_isa_best(void)
{
    for (int isa = BN_ISA_COUNT - 1; isa > 0; isa--)
        if (bn_isa_supported(isa)) return isa;
    return BN_ISA_BASELINE;
}

const char *bn_isa_name(int isa)
{
    return (isa >= 0 && isa < BN_ISA_COUNT) ? bn_names[isa] : "unknown";
}

int bn_set_isa(int isa)
{
    if (!bn_isa_supported(isa)) return BN_ENOISA;
    bn_current = isa;
    return BN_OK;
}

int bn_get_isa(void)
{
    if (bn_current < 0) bn_current = bn_isa_best();
    return bn_current;
}

const bn_kernel_table *bn_active(void) { return bn_tables[bn_get_isa()]; }

#define BN_UPDATE_RUNNING(T)                                                              \
    for (ptrdiff_t c = 0; c < C; c++) {                                                   \
        double unbiased = count > 1.0 ? var[c] * (count / (count - 1.0)) : var[c];        \
        T *pm = rmean + c * rm_stride, *pv = rvar + c * rv_stride;                        \
        *pm = (T)((1.0 - momentum) * (double)*pm + momentum * mean[c]);                   \
        *pv = (T)((1.0 - momentum) * (double)*pv + momentum * unbiased);                  \
    }                                                                                     \
    return BN_OK;

int bn_update_running_f32(float *rmean, float *rvar, ptrdiff_t rm_stride, ptrdiff_t rv_stride,
                          const double *mean, const double *var, ptrdiff_t C, double count,
                          double momentum)
{
    BN_UPDATE_RUNNING(float)
}

int bn_update_running_f64(double *rmean, double *rvar, ptrdiff_t rm_stride, ptrdiff_t rv_stride,
                          const double *mean, const double *var, ptrdiff_t C, double count,
                          double momentum)
{
    BN_UPDATE_RUNNING(double)
}

static size_t bn_stream_min = BN_STREAM_MIN_BYTES_DEFAULT;

size_t bn_get_stream_min_bytes(void) { return bn_stream_min; }

void bn_set_stream_min_bytes(size_t nbytes) { bn_stream_min = nbytes; }

#if defined(__x86_64__) || defined(_M_X64)
#include <emmintrin.h>
#include <stdint.h>
/* memcpy with non-temporal stores (SSE2, part of x86-64), as the kernels write large
 * outputs: the benchmark's copy floor must not pay a read-for-ownership that bnfast avoids. */
static void bn_copy_stream(char *dst, const char *src, size_t len)
{
    size_t head = (16 - ((uintptr_t)dst & 15)) & 15;
    if (head > len) head = len;
    memcpy(dst, src, head);
    size_t i = head;
    for (; i + 64 <= len; i += 64) {
        __m128i a = _mm_loadu_si128((const __m128i *)(src + i));
        __m128i b = _mm_loadu_si128((const __m128i *)(src + i + 16));
        __m128i c = _mm_loadu_si128((const __m128i *)(src + i + 32));
        __m128i d = _mm_loadu_si128((const __m128i *)(src + i + 48));
        _mm_stream_si128((__m128i *)(dst + i), a);
        _mm_stream_si128((__m128i *)(dst + i + 16), b);
        _mm_stream_si128((__m128i *)(dst + i + 32), c);
        _mm_stream_si128((__m128i *)(dst + i + 48), d);
    }
    memcpy(dst + i, src + i, len - i);
    _mm_sfence();
}
#define BN_HAVE_COPY_STREAM 1
#endif

int bn_copy(const void *src, void *dst, size_t nbytes, int nthreads)
{
    const size_t chunk = (size_t)1 << 20;
    const ptrdiff_t nchunks = (ptrdiff_t)((nbytes + chunk - 1) / chunk);
    /* Stream as the kernels do: read + written bytes over the threshold, and only when the
     * selected variant streams (not baseline). */
    const int stream = 2 * nbytes >= bn_stream_min && bn_get_isa() != BN_ISA_BASELINE;
    if (nthreads < 1) nthreads = 1;
    (void)nthreads;
    (void)stream;
#pragma omp parallel for schedule(static) num_threads(nthreads) if (nchunks > 1)
    for (ptrdiff_t i = 0; i < nchunks; i++) {
        size_t off = (size_t)i * chunk, len = nbytes - off < chunk ? nbytes - off : chunk;
#ifdef BN_HAVE_COPY_STREAM
        if (stream) {
            bn_copy_stream((char *)dst + off, (const char *)src + off, len);
            continue;
        }
#endif
        memcpy((char *)dst + off, (const char *)src + off, len);
    }
    return BN_OK;
}

const char *bn_compiler(void)
{
#if defined(__clang__)
    return "clang " __clang_version__;
#elif defined(__GNUC__)
    return "gcc " __VERSION__;
#elif defined(_MSC_VER)
    return "msvc";
#else
    return "unknown";
#endif
}

int bn_openmp_version(void)
{
#ifdef _OPENMP
    return _OPENMP;
#else
    return 0;
#endif
}

int bn_omp_max_threads(void)
{
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}
