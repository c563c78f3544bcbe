/* bn_copy: the benchmark's memory-bandwidth floor, a multithreaded copy in 1 MiB chunks with
 * non-temporal stores where the kernels would use them (same threshold, not the baseline
 * variant), so that "time as a multiple of a copy" compares like with like. */
#include <stddef.h>
#include <string.h>
#include "bnfast.h"

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
    /* Stream as the normalisation does (plan.c's rule, and not where the source lies
     * just before the destination modulo 4 KiB). */
    const int stream = bn_plan_streams(bn_get_isa(), BN_OP_INFER, (double)nbytes) &&
                       !bn_stream_alias(dst, src, NULL);
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

