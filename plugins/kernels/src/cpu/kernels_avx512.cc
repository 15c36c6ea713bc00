// The CPU hot loops for x86-64 with AVX-512 (F, VL, BW, DQ), picked at run time when present.
#define GLA_CPU_ISA avx512
#define GLA_MR 6  // 32 zmm registers: 6 x 2 accumulators
#define GLA_NV 2
#define GLA_REC_GB 4
#define GLA_REC_NB 4
#include "cpu/kernels_impl.h"
