/* Plain-C variant: compiled for the baseline of the target (SSE2 on x86-64). Always built. */
#define BN_ISA_LEVEL 0
#define BN_ISA BN_ISA_BASELINE
#define BN_SUFFIX baseline
#include "bn_kernels.h"
