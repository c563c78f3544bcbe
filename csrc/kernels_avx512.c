/* AVX-512 (F, VL, DQ, BW) variant (x86-64 only). */
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512vl,avx512dq,avx512bw,avx2,fma"))), apply_to = function)
#else
#pragma GCC target("avx512f,avx512vl,avx512dq,avx512bw,avx2,fma,prefer-vector-width=512")
#endif
#define BN_ISA_LEVEL 2
#define BN_ISA BN_ISA_AVX512
#define BN_SUFFIX avx512
#include "bn_kernels.h"
#if defined(__clang__)
#pragma clang attribute pop
#endif
#else
typedef int bn_avx512_unavailable;
#endif
