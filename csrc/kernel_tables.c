/*
 * The kernel tables of the variants, from the entry points of the per-dtype units
 * kernels_<isa>_f32.c and kernels_<isa>_f64.c (see bn_entry.h).  dispatch.c selects one.
 */
#include "bnfast.h"
#include "bn_entry.h"

#define BN_TABLE(isa)                                                                     \
    BN_ENTRY_DECLARE(f32, isa)                                                            \
    BN_ENTRY_DECLARE(f64, isa)                                                            \
    extern BN_ENTRY_TYPE(bn_widen_fn) bn_widen_f32_##isa;                                 \
    const bn_kernel_table bn_table_##isa = {                                              \
        #isa,                                                                             \
        {bn_moments_f32_##isa, bn_moments_f64_##isa},                                     \
        {bn_infer_f32_##isa, bn_infer_f64_##isa},                                         \
        {bn_backward_reduce_f32_##isa, bn_backward_reduce_f64_##isa},                     \
        {bn_backward_dx_f32_##isa, bn_backward_dx_f64_##isa},                             \
        {bn_train_forward_f32_##isa, bn_train_forward_f64_##isa},                         \
        {bn_backward_coeffs_f32_##isa, bn_backward_coeffs_f64_##isa},                     \
        bn_widen_f32_##isa,                                                               \
        {bn_backward_fused_f32_##isa, bn_backward_fused_f64_##isa},                       \
    };

BN_TABLE(baseline)

/* The same condition as in kernels_avx2.c, kernels_avx512.c and dispatch.c. */
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
BN_TABLE(avx2)
BN_TABLE(avx512)
#endif
