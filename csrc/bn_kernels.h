/*
 * The kernels of one (instruction-set variant, dtype) pair: the body of every
 * translation unit csrc/kernels_<isa>_<f32|f64>.c.
 *
 * kernels_<isa>.c sets the instruction set (`#pragma GCC target`), BN_ISA_LEVEL (0, 1, 2),
 * BN_ISA (the BN_ISA_* value) and BN_SUFFIX (the variant's name); kernels_<isa>_f32.c and
 * _f64.c set BN_ONLY_DTYPE (32 or 64) and include it.  Here T becomes float or double and
 * the kernel files follow, in dependency order:
 *
 *   bn_common.h       vector type, names, Chan merge, partition skeletons (no intrinsics)
 *   bn_isa.h          the ISA shims: loads, stores, NaN test, ReLU, mask (all intrinsics)
 *   bn_stats.h        moments, backward_reduce
 *   bn_elementwise.h  normalize, backward_dx
 *   bn_train.h        train_forward and infer (the forwards in one call each),
 *                     backward_coeffs (the backward's per-channel coefficients)
 *   bn_entry.h        the exported entry points (bn_ prefix) that kernel_tables.c collects
 *
 * Generated names (static kernels; BN_FN(name) = name_<f32|f64>_<isa>), for isa in
 * baseline, avx2, avx512 and each dtype:
 *
 *   moments_f32_baseline          moments_f64_baseline         ... _avx2, _avx512
 *   infer_f32_baseline            infer_f64_baseline           ... _avx2, _avx512
 *   backward_reduce_f32_baseline  backward_reduce_f64_baseline ... _avx2, _avx512
 *   backward_dx_f32_baseline      backward_dx_f64_baseline     ... _avx2, _avx512
 *   train_forward_f32_baseline    train_forward_f64_baseline   ... _avx2, _avx512
 *   backward_coeffs_f32_baseline  backward_coeffs_f64_baseline ... _avx2, _avx512
 *
 * and their exported entry points bn_moments_f32_baseline ... bn_backward_coeffs_f64_avx512
 * and backward_fused's, and bn_widen_f32_<isa> (the float32 units only), collected into
 * bn_table_baseline, bn_table_avx2, bn_table_avx512.
 */
#ifndef BN_ONLY_DTYPE
#error "compile kernels_<isa>_f32.c / kernels_<isa>_f64.c, which set BN_ONLY_DTYPE"
#endif
#if BN_ONLY_DTYPE == 32
#define T float
#define BN_SFX f32
#define BN_IS_F32 1
#elif BN_ONLY_DTYPE == 64
#define T double
#define BN_SFX f64
#define BN_IS_F32 0
#else
#error "BN_ONLY_DTYPE must be 32 or 64"
#endif

#include "bn_common.h"
#include "bn_isa.h"
#include "bn_stats.h"
#include "bn_elementwise.h"
#include "bn_train.h"
#include "bn_entry.h"
