/* AVX2 + FMA variant (x86-64 only).  Contraction is off, so FMA is not used for a*b+c. */
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#else
#pragma GCC target("avx2,fma")
#endif
#define BN_ISA_LEVEL 1
#define BN_ISA BN_ISA_AVX2
#define BN_SUFFIX avx2
#include "bn_kernels.h"
#if defined(__clang__)
#pragma clang attribute pop
#endif
#else
typedef int bn_avx2_unavailable;
#endif
