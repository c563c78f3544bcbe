/* The float64 half of the plain-C (baseline) variant: kernels_baseline.c with one dtype (setup.py compiles
 * the six (variant, dtype) units in parallel; bn_entry.h, kernel_tables.c). */
#define BN_ONLY_DTYPE 64
#include "kernels_baseline.c"
