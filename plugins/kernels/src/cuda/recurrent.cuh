// The fused recurrent kernel: decode steps (T = 1) and short sequences, step by step, exact fp32.
//
// A block owns one (sequence, key/value head, block of 4*ct value columns) and keeps that slice of
// the state in registers for the whole sequence, so the state is read once and written once: for
// T = 1 the kernel is one pass over the state, which is all a decode step must cost. Thread
// (column group c, row group r) holds rows r, r + RT, r + 2 RT, ... (R of them) of 4 adjacent
// columns; consecutive threads hold consecutive 4-column groups of a row, so every state access
// of a warp is a run of 16-byte (fp32) or 8-byte (16-bit) loads. Columns of the state evolve
// independently (S[:, j] only meets v[j]), so value blocks need no exchange; the output of a step
// is a sum over the rows, done in registers, then across the warp, then across warps in shared
// memory.
#pragma once

#include <cstring>

#include "cuda/params.cuh"

namespace gla {
namespace cuda {

// Rows rg, rg + RT, ... (R of them) of 4 state columns starting at col0, into or out of registers.
// The dtype switch is outside the row loop, so each of the three loops is a run of independent
// 16-byte (fp32) or 8-byte (16-bit) accesses.
template <class T, int R>
__device__ __forceinline__ void load_rows_t(const T* base, int64_t rstride, int nrows, int ncol, bool vec, float (&S)[R][4]) {
#pragma unroll
  for (int i = 0; i < R; ++i) {
    const T* src = base + i * rstride;
    if (i < nrows && vec && ncol == 4) {
      if constexpr (sizeof(T) == 4) {
        const float4 f = *reinterpret_cast<const float4*>(src);
        S[i][0] = f.x, S[i][1] = f.y, S[i][2] = f.z, S[i][3] = f.w;
      } else {
        const uint2 u = *reinterpret_cast<const uint2*>(src);
        T h[4];
        memcpy(static_cast<void*>(h), &u, 8);
#pragma unroll
        for (int j = 0; j < 4; ++j) S[i][j] = to_float(h[j]);
      }
    } else {
#pragma unroll
      for (int j = 0; j < 4; ++j) S[i][j] = i < nrows && j < ncol ? to_float(src[j]) : 0.f;
    }
  }
}

template <class T, int R>
__device__ __forceinline__ void store_rows_t(T* base, int64_t rstride, int nrows, int ncol, bool vec, const float (&S)[R][4]) {
#pragma unroll
  for (int i = 0; i < R; ++i) {
    T* dst = base + i * rstride;
    if (i < nrows && vec && ncol == 4) {
      if constexpr (sizeof(T) == 4) {
        *reinterpret_cast<float4*>(dst) = make_float4(S[i][0], S[i][1], S[i][2], S[i][3]);
      } else {
        T h[4];
#pragma unroll
        for (int j = 0; j < 4; ++j) h[j] = from_float<T>(S[i][j]);
        uint2 u;
        memcpy(&u, static_cast<const void*>(h), 8);
        *reinterpret_cast<uint2*>(dst) = u;
      }
    } else if (i < nrows) {
#pragma unroll
      for (int j = 0; j < 4; ++j)
        if (j < ncol) dst[j] = from_float<T>(S[i][j]);
    }
  }
}

template <int R>
__device__ __forceinline__ void load_rows(const Params& p, const void* base, int64_t off, int64_t rstride, int nrows, int ncol,
                                          float (&S)[R][4]) {
  const bool vec = p.vec_state != 0;
  switch (p.state_dt) {
    case DType::kFloat16: load_rows_t<__half, R>(static_cast<const __half*>(base) + off, rstride, nrows, ncol, vec, S); break;
    case DType::kBFloat16: load_rows_t<bf16, R>(static_cast<const bf16*>(base) + off, rstride, nrows, ncol, vec, S); break;
    default: load_rows_t<float, R>(static_cast<const float*>(base) + off, rstride, nrows, ncol, vec, S); break;
  }
}

template <int R>
__device__ __forceinline__ void store_rows(const Params& p, void* base, int64_t off, int64_t rstride, int nrows, int ncol,
                                           const float (&S)[R][4]) {
  const bool vec = p.vec_state != 0;
  switch (p.state_dt) {
    case DType::kFloat16: store_rows_t<__half, R>(static_cast<__half*>(base) + off, rstride, nrows, ncol, vec, S); break;
    case DType::kBFloat16: store_rows_t<bf16, R>(static_cast<bf16*>(base) + off, rstride, nrows, ncol, vec, S); break;
    default: store_rows_t<float, R>(static_cast<float*>(base) + off, rstride, nrows, ncol, vec, S); break;
  }
}

// Shared memory: two buffers of [gb][warps][4*ct] partial sums (alternated, so one barrier a pass).
inline size_t recurrent_smem_bytes(int threads, int ct, int gb) { return size_t(2) * gb * (threads / 32) * ct * 4 * 4; }

// Registers hold 4R state values a thread: the larger R, the fewer threads a block may have.
constexpr int recurrent_max_threads(int R) { return R <= 4 ? 1024 : R <= 8 ? 512 : 256; }

template <class Act, int R>
__global__ void __launch_bounds__(recurrent_max_threads(R)) gla_recurrent_kernel(const Params p) {
#if defined(GLA_EMULATE)
  float* red = reinterpret_cast<float*>(gla_emu::dynamic_smem());
#else
  extern __shared__ __align__(16) unsigned char smem_raw[];
  float* red = reinterpret_cast<float*>(smem_raw);
#endif
  const Act* __restrict__ q = static_cast<const Act*>(p.q);
  const Act* __restrict__ k = static_cast<const Act*>(p.k);
  const Act* __restrict__ v = static_cast<const Act*>(p.v);
  const Act* __restrict__ g = static_cast<const Act*>(p.g);
  Act* __restrict__ o = static_cast<Act*>(p.o);

  const int CT = p.ct, threads = int(blockDim.x), RT = threads / CT, warps = threads / 32;
  const int tid = int(threadIdx.x), ct = tid % CT, rg = tid / CT, lane = tid & 31, warp = tid >> 5;
  int64_t x = blockIdx.x;
  const int vb = int(x % p.nvb);
  x /= p.nvb;
  const int h = int(x % p.Hkv);
  const int64_t n = x / p.Hkv;
  if (n >= p.N) return;  // uniform over the block

  const int K = p.K, V = p.V, G = p.G;
  const int col0 = vb * CT * 4 + ct * 4;
  const int ncol = V - col0 < 0 ? 0 : (V - col0 > 4 ? 4 : V - col0);
  int64_t bos, len;
  sequence_bounds(p, n, bos, len);

  const int64_t state_base = (n * p.Hkv + h) * int64_t(K) * V;
  // this thread's rows rg + RT*i exist for i < nrows
  const int nrows = rg < K ? (K - 1 - rg) / RT + 1 : 0;
  const int64_t my_state = state_base + int64_t(rg) * V + col0;
  float S[R][4];
  if (p.h0 && ncol > 0) {
    load_rows<R>(p, p.h0, my_state, int64_t(RT) * V, nrows, ncol, S);
  } else {
#pragma unroll
    for (int i = 0; i < R; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) S[i][j] = 0.f;
  }

  const float gam = gamma_log2(p, h);
  const int64_t kstride = int64_t(p.Hkv) * K, vstride = int64_t(p.Hkv) * V, qstride = int64_t(p.Hq) * K;
  int parity = 0;
  const int64_t qhead_stride = K;
  for (int64_t t = 0; t < len; ++t) {
    const int64_t pos = bos + (p.reverse ? len - 1 - t : t);
    // every input of the step is loaded up front (q of the first query head too): one round trip
    float vv[4];
    const Act* vrow = v + pos * vstride + int64_t(h) * V + col0;
#pragma unroll
    for (int j = 0; j < 4; ++j) vv[j] = j < ncol ? to_float(vrow[j]) : 0.f;
    const Act* krow = k + pos * kstride + int64_t(h) * K + rg;
    const Act* grow = p.has_gate ? (p.gate_per_head ? g + pos * p.Hkv + h : g + pos * kstride + int64_t(h) * K + rg) : krow;
    const Act* q0row = q + pos * qstride + int64_t(h * G) * qhead_stride + rg;
    float kv[R], gl[R], q0[R];
#pragma unroll
    for (int i = 0; i < R; ++i) {
      kv[i] = i < nrows ? to_float(krow[i * RT]) : 0.f;
      gl[i] = i < nrows && p.has_gate ? to_float(grow[p.gate_per_head ? 0 : i * RT]) : 0.f;
      q0[i] = i < nrows ? to_float(q0row[i * RT]) : 0.f;
    }
#pragma unroll
    for (int i = 0; i < R; ++i) {
      const float decay = fast_exp2(gl[i] * kLog2e + gam);
#pragma unroll
      for (int j = 0; j < 4; ++j) S[i][j] = decay * S[i][j] + kv[i] * vv[j];
    }
    // after the last step the state is final: write it before the output's reduction and barrier
    if (t == len - 1 && ncol > 0) store_rows<R>(p, p.ht, my_state, int64_t(RT) * V, nrows, ncol, S);
    // o[hq] = scale * q[hq] . S for the G query heads of this key/value head, gb at a time
    for (int gq0 = 0; gq0 < G; gq0 += p.gb) {
      const int nb = G - gq0 < p.gb ? G - gq0 : p.gb;
      float* buf = red + size_t(parity) * p.gb * warps * CT * 4;
      parity ^= 1;
      for (int gg = 0; gg < nb; ++gg) {
        const Act* qrow = q + pos * qstride + int64_t(h * G + gq0 + gg) * K + rg;
        const bool first = gq0 + gg == 0;
        float part[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
        for (int i = 0; i < R; ++i) {
          if (i < nrows) {
            const float qv = first ? q0[i] : to_float(qrow[i * RT]);
#pragma unroll
            for (int j = 0; j < 4; ++j) part[j] += qv * S[i][j];
          }
        }
#pragma unroll
        for (int j = 0; j < 4; ++j) part[j] = warp_sum_xor(part[j], CT);
        if (lane < CT) {
#pragma unroll
          for (int j = 0; j < 4; ++j) buf[(size_t(gg) * warps + warp) * CT * 4 + ct * 4 + j] = part[j];
        }
      }
      __syncthreads();
      for (int idx = tid; idx < nb * CT * 4; idx += threads) {
        const int gg = idx / (CT * 4), c = idx % (CT * 4), col = vb * CT * 4 + c;
        float sum = 0.f;
        for (int w = 0; w < warps; ++w) sum += buf[(size_t(gg) * warps + w) * CT * 4 + c];
        if (col < V) o[(pos * p.Hq + h * G + gq0 + gg) * int64_t(V) + col] = from_float<Act>(p.scale * sum);
      }
    }
  }

  if (len == 0 && ncol > 0) store_rows<R>(p, p.ht, my_state, int64_t(RT) * V, nrows, ncol, S);
}

}  // namespace cuda
}  // namespace gla
