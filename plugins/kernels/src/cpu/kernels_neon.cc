// The CPU hot loops for aarch64 with Advanced SIMD (NEON), which every ARMv8-A core has (Jetson
// Orin's Cortex-A78AE, Thor's Neoverse V3AE, Raspberry Pi 4/5, Graviton), so it is picked whenever
// the library is built for aarch64; GLA_CPU_ISA=generic forces the portable build instead.
// Built for the ARMv8-A baseline (no -march): one binary for every aarch64 board.
//
// Differences from the portable build (kernels_generic.cc), both in kernels_impl.h under
// GLA_CPU_NEON: the float16 <-> float32 conversions use the FCVTL/FCVTN instructions and bfloat16
// loads a widening shift, 8 elements at a time; the register tiles fill the 32 vector registers.
//   GEMM tile 6 rows x 1 vector of 16 floats: 24 accumulator + 4 operand + 1 broadcast registers
//   step tile 2 heads x 1 vector:                8 accumulator + 4 state + 4 value registers
// (chosen by register count; not yet timed on Arm hardware, see docs/arm64.md)
#if !defined(__aarch64__)
#error "kernels_neon.cc is for aarch64 only (plugins/kernels/CMakeLists.txt adds it there)"
#endif
#define GLA_CPU_ISA neon
#define GLA_CPU_NEON 1
#define GLA_MR 6
#define GLA_NV 1
#define GLA_REC_GB 2
#define GLA_REC_NB 1
#include "cpu/kernels_impl.h"
