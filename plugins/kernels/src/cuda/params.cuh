// What every GLA CUDA kernel receives (by value, one struct for all of them) and how a block finds
// its sequence and segment on the device (cu_seqlens is never read on the host).
#pragma once

#include <cstdint>

#include "cuda/device.cuh"
#include "gla/kernels.h"

namespace gla {
namespace cuda {

struct Params {
  // tensors (kernels.h layouts); g, h0, cu, gamma may be null
  const void* q;
  const void* k;
  const void* v;
  const void* g;
  const void* h0;
  const void* cu;
  const void* gamma;
  void* o;
  void* ht;

  int64_t T;  // seq_len of the activations
  int64_t N;  // sequences (rows of the state)
  int32_t Hq, Hkv, G, K, V;
  DType state_dt, gamma_dt;
  int32_t has_gate, gate_per_head, cu64, reverse;
  float scale;

  // recurrent kernel
  int32_t ct;         // column threads (4 value columns each)
  int32_t gb;         // query heads reduced per pass
  int32_t vec_state;  // 16-byte (fp32) / 8-byte (16-bit) state accesses are aligned
  int32_t vec_out;    // pairs of output elements can be stored at once (d_v even, output aligned)

  // chunk kernels
  int32_t nvb;         // value blocks (of 64 columns for the chunk kernels, of 4*ct for the recurrent one)
  int32_t nkb;         // key blocks of 64
  int32_t seg_len;     // steps per segment (a multiple of the chunk); 0: one segment per sequence
  int32_t nseg_dense;  // segments per sequence without cu_seqlens
  int64_t slots;       // segment slots: the grid of the segment kernels
  int32_t* seg_off;    // [N + 1] first slot of each sequence (cu_seqlens with segments only)
  float* seg_state;    // [slots, Hkv, K, V] a segment's own state, then (after the scan) its start state
  float* seg_decay;    // [slots, Hkv, K] log2 of a segment's total decay

  // shared scores (prefill v2): the scores kernel writes them once per (chunk, query head), every
  // value block of the main kernel reads them
  void* scores;           // [positions, Hq, 64] Act: row i's masked, scaled scores against its chunk's rows j <= i
  int32_t* chunk_off;     // [N + 1] first chunk slot of each sequence (cu_seqlens only)
  int32_t nchunk_dense;   // chunks per sequence without cu_seqlens

  // prefill v3: the state at the start of every chunk, written by the chunk-states kernel, read by
  // the output kernel; chunk slots as for the scores
  void* chunk_state;  // [chunk slots, Hkv, K, V] Act (the rounded copy the products use; fp32 for fp32)
};

__device__ __forceinline__ void sequence_bounds(const Params& p, int64_t n, int64_t& bos, int64_t& len) {
  if (p.cu) {
    bos = load_index(p.cu, n, p.cu64 != 0);
    len = load_index(p.cu, n + 1, p.cu64 != 0) - bos;
    if (len < 0) len = 0;  // validated on the host side of the op; never index backwards
  } else {
    bos = n * p.T;
    len = p.T;
  }
}

// The segment of `slot`: sequence n, index s among nseg, first slot slot0. False for the unused
// tail of an upper-bound grid (cu_seqlens).
__device__ __forceinline__ bool find_segment(const Params& p, int64_t slot, int64_t& n, int64_t& s, int64_t& nseg,
                                             int64_t& slot0) {
  if (p.seg_len == 0) {
    n = slot;
    s = 0;
    nseg = 1;
    slot0 = slot;
    return slot < p.N;
  }
  if (!p.cu) {
    nseg = p.nseg_dense;
    n = slot / nseg;
    s = slot % nseg;
    slot0 = n * nseg;
    return n < p.N;
  }
  if (slot >= p.seg_off[p.N]) return false;
  int64_t lo = 0, hi = p.N - 1;  // the last n with seg_off[n] <= slot
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) / 2;
    if (p.seg_off[mid] <= slot) lo = mid;
    else hi = mid - 1;
  }
  n = lo;
  slot0 = p.seg_off[n];
  s = slot - slot0;
  nseg = p.seg_off[n + 1] - slot0;
  return true;
}

__device__ __forceinline__ float gamma_log2(const Params& p, int h) {
  return p.gamma ? load_any(p.gamma, h, p.gamma_dt) * kLog2e : 0.f;
}

}  // namespace cuda
}  // namespace gla
