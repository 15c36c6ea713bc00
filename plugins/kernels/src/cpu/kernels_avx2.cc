// The CPU hot loops for x86-64 with AVX2 + FMA (built with -mavx2 -mfma -mf16c).
#define GLA_CPU_ISA avx2
#define GLA_MR 6  // 16 ymm registers: 6 x 2 accumulators
#define GLA_NV 1
#define GLA_REC_GB 2
#define GLA_REC_NB 2
#include "cpu/kernels_impl.h"
