// The CPU hot loops for any processor: the baseline of x86-64 (SSE2) or aarch64 (NEON).
#define GLA_CPU_ISA generic
#if defined(__aarch64__)
#define GLA_MR 4  // 32 NEON registers: 4 x 4 accumulators
#define GLA_NV 1
#define GLA_REC_GB 2
#define GLA_REC_NB 2
#else
#define GLA_MR 2  // 16 SSE registers: 2 x 4 accumulators
#define GLA_NV 1
#define GLA_REC_GB 1
#define GLA_REC_NB 1
#endif
#include "cpu/kernels_impl.h"
