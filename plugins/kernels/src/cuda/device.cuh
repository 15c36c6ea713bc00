// Device-side building blocks of the GLA CUDA kernels: dtype conversions, warp-level matrix
// instructions (ldmatrix, mma.sync m16n8k16; sm_80 and later, so one code path serves Ampere, Orin,
// Ada, Hopper and Thor) and the launch seam. With GLA_EMULATE the same kernels compile for the CPU
// emulation used by the tests (emu/emu.h); nothing else differs between the two builds.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "gla/kernels.h"

#if defined(GLA_EMULATE)
#include "cuda/emu/emu.h"
#define GLA_LAUNCH(kernel, grid, block, smem, stream, ...) \
  gla_emu::launch(gla_emu::Dim3{static_cast<unsigned>(grid), 1, 1}, gla_emu::Dim3{static_cast<unsigned>(block), 1, 1}, \
                  (smem), [&] { kernel(__VA_ARGS__); })
#else
#include <cuda_runtime.h>
#define GLA_LAUNCH(kernel, grid, block, smem, stream, ...) \
  kernel<<<dim3(grid), dim3(block), (smem), (stream)>>>(__VA_ARGS__)
#endif

namespace gla {
namespace cuda {

using bf16 = __nv_bfloat16;

constexpr float kLog2e = 1.4426950408889634f;

// ---- scalars ---------------------------------------------------------------------------------

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(bf16 x) { return __bfloat162float(x); }

template <class T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ __half from_float<__half>(float x) {
  return __float2half_rn(x);
}
template <>
__device__ __forceinline__ bf16 from_float<bf16>(float x) {
  return __float2bfloat16_rn(x);
}

// Tensors whose dtype is only known at run time (states, g_gamma): a uniform branch per access.
__device__ __forceinline__ float load_any(const void* p, int64_t i, DType dt) {
  switch (dt) {
    case DType::kFloat16: return to_float(static_cast<const __half*>(p)[i]);
    case DType::kBFloat16: return to_float(static_cast<const bf16*>(p)[i]);
    default: return static_cast<const float*>(p)[i];
  }
}

__device__ __forceinline__ void store_any(void* p, int64_t i, DType dt, float x) {
  switch (dt) {
    case DType::kFloat16: static_cast<__half*>(p)[i] = from_float<__half>(x); break;
    case DType::kBFloat16: static_cast<bf16*>(p)[i] = from_float<bf16>(x); break;
    default: static_cast<float*>(p)[i] = x; break;
  }
}

// Two adjacent outputs in one store (dst is aligned to two elements).
__device__ __forceinline__ void store_pair(float* dst, float a, float b) { *reinterpret_cast<float2*>(dst) = make_float2(a, b); }
__device__ __forceinline__ void store_pair(__half* dst, float a, float b) {
  *reinterpret_cast<__half2*>(dst) = __floats2half2_rn(a, b);
}
__device__ __forceinline__ void store_pair(bf16* dst, float a, float b) {
  *reinterpret_cast<__nv_bfloat162*>(dst) = __floats2bfloat162_rn(a, b);
}

__device__ __forceinline__ int64_t load_index(const void* p, int64_t i, bool is64) {
  return is64 ? static_cast<const int64_t*>(p)[i] : int64_t(static_cast<const int32_t*>(p)[i]);
}

__device__ __forceinline__ float fast_exp2(float x) { return exp2f(x); }

__device__ __forceinline__ float warp_sum_xor(float v, int from_mask) {
  for (int m = from_mask; m < 32; m <<= 1) v += __shfl_xor_sync(0xffffffffu, v, m);
  return v;
}

// ---- warp-level matrix instructions --------------------------------------------------------------

#if defined(GLA_EMULATE)
__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], const void* p) { gla_emu::ldmatrix(r, 4, p, false); }
__device__ __forceinline__ void ldsm_x4_t(uint32_t (&r)[4], const void* p) { gla_emu::ldmatrix(r, 4, p, true); }
__device__ __forceinline__ void ldsm_x2(uint32_t (&r)[2], const void* p) { gla_emu::ldmatrix(r, 2, p, false); }
template <bool kBF16>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  gla_emu::mma_16816(d, a, b, kBF16);
}
#else
__device__ __forceinline__ uint32_t smem_u32(const void* p) { return static_cast<uint32_t>(__cvta_generic_to_shared(p)); }
__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(p))
               : "memory");
}
__device__ __forceinline__ void ldsm_x4_t(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(p))
               : "memory");
}
__device__ __forceinline__ void ldsm_x2(uint32_t (&r)[2], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(smem_u32(p))
               : "memory");
}
template <bool kBF16>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  if constexpr (kBF16) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
}
#endif

}  // namespace cuda
}  // namespace gla
