// The CPU hot loops for aarch64 with Advanced SIMD (NEON), which every ARMv8-A core has (Jetson
// Orin's Cortex-A78AE, Thor's Neoverse V3AE, Raspberry Pi 4/5, Graviton), so it is picked whenever
// the library is built for aarch64; GLA_CPU_ISA=generic forces the portable build instead.
// Built for the ARMv8-A baseline (no -march): one binary for every aarch64 board.
//
// Differences from the portable build (kernels_generic.cc), all in kernels_impl.h under
// GLA_CPU_NEON:
// * the register tiles (GEMM micro-tile, step-by-step tile, the streaming decode step) are written
//   with float32x4_t intrinsics. Written with the portable 64-byte vectors, GCC 12 keeps the
//   accumulator arrays on the stack for aarch64 (a load and a store per FMA in the GEMM's inner
//   loop); with float32x4_t they stay in registers. Register counts (of 32):
//     GEMM tile 5 rows x 16 columns: 20 accumulators + 4 B + 5 broadcast A = 29 (6 rows spilled)
//     step tile 2 heads x 16 columns: 8 accumulators + 4 state + 4 value = 16
// * float16 rows are converted with the FCVTL/FCVTN instructions and bfloat16 rows with widening
//   shifts, 8 elements at a time.
// Checked against the reference under qemu-user (tests/arm64); the tile sizes are chosen from the
// generated code (no spills), not timed: no Arm hardware was available (docs/arm64.md).
#if !defined(__aarch64__)
#error "kernels_neon.cc is for aarch64 only (plugins/kernels/CMakeLists.txt adds it there)"
#endif
#define GLA_CPU_ISA neon
#define GLA_CPU_NEON 1
#define GLA_MR 5
#define GLA_NV 1
#define GLA_REC_GB 2
#define GLA_REC_NB 1
#include "cpu/kernels_impl.h"
