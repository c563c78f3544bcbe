/* Run-time selection of the kernel variant (the default chosen here, bn_isa_default, and
 * nowhere else) and build facts. */
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

/* The default variant: the best this CPU and build support (AVX-512 over AVX2 over the
 * baseline).  The one place that chooses it; bnfast._config asks for it. */
int bn_isa_default(void)
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
    if (bn_current < 0) bn_current = bn_isa_default();
    return bn_current;
}

const bn_kernel_table *bn_active(void) { return bn_tables[bn_get_isa()]; }

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
