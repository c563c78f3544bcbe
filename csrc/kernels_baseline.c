/* Plain-C variant: compiled for the baseline of the target (SSE2 on x86-64). Always built. */
#define BN_ISA_LEVEL 0
#define BN_SUFFIX baseline
#include "bn_impl.h"
