// A CPU emulation of the small part of the CUDA execution model that the GLA kernels use, so that
// the kernels' own source (not a transcription of it) can be run and tested on a machine with no
// GPU. Every CUDA thread of a block is a fiber on one OS thread; blocks run one after another.
// Barriers (__syncthreads*, warp collectives) switch fibers, so a missing barrier shows up as a
// wrong result here too. Warp-level matrix instructions (ldmatrix, mma.sync m16n8k16) are
// computed from the documented fragment layouts of the PTX ISA.
//
// Only for tests: built by tests/kernels (x86-64 Linux, g++), never part of the product.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>

namespace gla_emu {

struct Dim3 {
  unsigned x = 1, y = 1, z = 1;
};

struct ThreadState {
  Dim3 tid;
  int linear = 0;
};

extern Dim3 g_block_idx, g_block_dim, g_grid_dim;

ThreadState* current();
void syncthreads();
int syncthreads_or(int predicate);
void syncwarp();
unsigned char* dynamic_smem();

// Runs `body` for every thread of every block of the grid.
void launch(Dim3 grid, Dim3 block, size_t dynamic_smem_bytes, const std::function<void()>& body);

// Warp collective: every lane passes a pointer to its own data, then reads any lane's data until
// the second barrier. Returns the table of the 32 lanes' pointers.
const void* const* warp_exchange_begin(const void* mine);
void warp_exchange_end();

inline int lane_id() { return current()->linear & 31; }

}  // namespace gla_emu

#define threadIdx (gla_emu::current()->tid)
#define blockIdx (gla_emu::g_block_idx)
#define blockDim (gla_emu::g_block_dim)
#define gridDim (gla_emu::g_grid_dim)
#ifndef __global__
#define __global__
#endif
#ifndef __device__
#define __device__
#endif
#ifndef __host__
#define __host__
#endif
#ifndef __forceinline__
#define __forceinline__ inline
#endif
#define __launch_bounds__(...)
#define __noinline__
#define __syncthreads() gla_emu::syncthreads()
#define __syncthreads_or(p) gla_emu::syncthreads_or(p)
#define __syncwarp(...) gla_emu::syncwarp()

inline float __shfl_xor_sync(unsigned, float v, int mask) {
  const void* const* all = gla_emu::warp_exchange_begin(&v);
  const float out = *static_cast<const float*>(all[gla_emu::lane_id() ^ mask]);
  gla_emu::warp_exchange_end();
  return out;
}

inline int __any_sync(unsigned, int p) {
  const void* const* all = gla_emu::warp_exchange_begin(&p);
  int any = 0;
  for (int l = 0; l < 32; ++l) any |= *static_cast<const int*>(all[l]) != 0;
  gla_emu::warp_exchange_end();
  return any;
}

inline float atomicAdd(float* p, float v) {
  const float old = *p;
  *p = old + v;
  return old;
}

template <class T>
inline T __ldg(const T* p) {
  return *p;
}

namespace gla_emu {

// ldmatrix.sync.aligned.m8n8.{x1,x2,x4}[.trans].shared.b16: lane 8*i + r gives the address of row
// r of matrix i; lane l receives, from matrix i, the 32-bit word (row l/4, b16 columns 2*(l%4), +1),
// or with .trans the b16 elements at (row 2*(l%4), column l/4) and (row 2*(l%4)+1, column l/4).
inline void ldmatrix(uint32_t* r, int count, const void* row_address, bool trans) {
  const void* const* all = warp_exchange_begin(row_address);
  const int l = lane_id();
  for (int i = 0; i < count; ++i) {
    if (!trans) {
      const unsigned char* row = static_cast<const unsigned char*>(all[8 * i + l / 4]);
      std::memcpy(&r[i], row + 4 * (l % 4), 4);
    } else {
      uint16_t lo, hi;
      const unsigned char* r0 = static_cast<const unsigned char*>(all[8 * i + 2 * (l % 4)]);
      const unsigned char* r1 = static_cast<const unsigned char*>(all[8 * i + 2 * (l % 4) + 1]);
      std::memcpy(&lo, r0 + 2 * (l / 4), 2);
      std::memcpy(&hi, r1 + 2 * (l / 4), 2);
      r[i] = uint32_t(lo) | (uint32_t(hi) << 16);
    }
  }
  warp_exchange_end();
}

inline float b16_to_float(uint16_t bits, bool bf16) {
  if (bf16) {
    uint32_t u = uint32_t(bits) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
  __half h;
  std::memcpy(static_cast<void*>(&h), &bits, 2);
  return __half2float(h);
}

// mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}.{f16,bf16}.f32, d = a * b + d, with g = lane/4,
// t = lane%4: a regs (g,2t) (g+8,2t) (g,2t+8) (g+8,2t+8) each with the next column in the high half;
// b regs (k=2t,n=g) (k=2t+8,n=g) with k+1 in the high half; d (g,2t) (g,2t+1) (g+8,2t) (g+8,2t+1).
struct MmaLane {
  uint32_t a[4];
  uint32_t b[2];
  float d[4];
};

inline void mma_16816(float* d, const uint32_t* a, const uint32_t* b, bool bf16) {
  MmaLane mine;
  std::memcpy(mine.a, a, sizeof(mine.a));
  std::memcpy(mine.b, b, sizeof(mine.b));
  std::memcpy(mine.d, d, sizeof(mine.d));
  const void* const* all = warp_exchange_begin(&mine);
  float A[16][16], B[16][8], D[16][8];
  for (int l = 0; l < 32; ++l) {
    const MmaLane& m = *static_cast<const MmaLane*>(all[l]);
    const int g = l / 4, t = l % 4;
    const int arow[4] = {g, g + 8, g, g + 8}, acol[4] = {2 * t, 2 * t, 2 * t + 8, 2 * t + 8};
    for (int i = 0; i < 4; ++i) {
      A[arow[i]][acol[i]] = b16_to_float(uint16_t(m.a[i] & 0xffff), bf16);
      A[arow[i]][acol[i] + 1] = b16_to_float(uint16_t(m.a[i] >> 16), bf16);
    }
    const int bk[2] = {2 * t, 2 * t + 8};
    for (int i = 0; i < 2; ++i) {
      B[bk[i]][g] = b16_to_float(uint16_t(m.b[i] & 0xffff), bf16);
      B[bk[i] + 1][g] = b16_to_float(uint16_t(m.b[i] >> 16), bf16);
    }
    D[g][2 * t] = m.d[0];
    D[g][2 * t + 1] = m.d[1];
    D[g + 8][2 * t] = m.d[2];
    D[g + 8][2 * t + 1] = m.d[3];
  }
  const int l = lane_id(), g = l / 4, t = l % 4;
  const int orow[4] = {g, g, g + 8, g + 8}, ocol[4] = {2 * t, 2 * t + 1, 2 * t, 2 * t + 1};
  float out[4];
  for (int i = 0; i < 4; ++i) {
    double s = D[orow[i]][ocol[i]];
    for (int k = 0; k < 16; ++k) s += double(A[orow[i]][k]) * double(B[k][ocol[i]]);
    out[i] = float(s);
  }
  warp_exchange_end();
  std::memcpy(d, out, sizeof(out));
}

}  // namespace gla_emu
