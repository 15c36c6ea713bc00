// Chunked prefill on tensor cores (mma.sync m16n8k16, sm_80 and later).
//
// The sequence is cut into chunks of 64 steps and each chunk into four sub-chunks of 16 (one
// m16 tile of rows each). With Γ the running sum of the log2 decay inside a chunk (Γ_C its total):
//
//   state carried in   o_i += (q_i ⊙ 2^Γ_i) S                       "Q̂ S"
//   inside the chunk   o_i += Σ_{j≤i} (q_i ⊙ 2^(Γ_i−Γ_r)) · (k_j ⊙ 2^(Γ_r−Γ_j)) v_j      "(Q̃ K̃ᵀ) V"
//   state carried out  S ← 2^Γ_C ⊙ S + Σ_j (k_j ⊙ 2^(Γ_C−Γ_j))ᵀ v_j                        "K̂ᵀ V"
//
// The pivot r is chosen per sub-chunk of rows i and per key column. For j in an earlier sub-chunk
// (j < r ≤ ... ) both factors are ≤ 2^θ and their product, 2^(Γ_i−Γ_j) ≤ 1, never overflows: r is
// the sub-chunk's middle row when the decay inside the sub-chunk stays within 2^θ either side of
// it, so the diagonal 16×16 tile can use the same tensor-core product with factors in
// [2^-θ, 2^θ]; otherwise (a fast decay, down to -100 per step) r is the sub-chunk's first row,
// every factor is ≤ 1, and that column's diagonal-tile terms are computed exactly, pair by pair,
// in fp32 on the CUDA cores (the slow path, taken only for such columns). θ keeps fp16 operands
// far from overflow (8 for fp16; bf16 has fp32's range).
//
// Work split. Kernel "chunk" (the main one) runs one block per (segment, query head, 64 value
// columns); it walks its segment chunk by chunk, keeping the 64·NKB × 64 fp32 state slice in
// registers (tensor-core accumulators), and per chunk and per 64 key columns: builds the scaled
// operands in shared memory, then A += Q̃K̃ᵀ, O += Q̂S, S = 2^Γ_C⊙S + K̂ᵀV; then O += AV.
// When (sequences × heads × value blocks) is too small to fill the GPU, each sequence is cut into
// segments: "segment state" computes each segment's own state contribution from zero (K̂ᵀV with
// the decay to the segment's end) in parallel, "segment scan" chains them into every segment's
// start state, and the main kernel then runs all segments at once. Prefill v2 computes the scores
// once per (chunk, query head) in their own kernel; prefill v3 (GLA_CUDA_PREFILL=v3) replaces the
// main kernel's walk by a walk of the state alone that writes it at every chunk boundary, and
// computes each chunk's outputs in a kernel of their own, all chunks at once (after the scores kernel).
//
// fp32 activations: operands are split into two bf16 planes (hi + lo) and each product takes three
// mma (hi·hi + hi·lo + lo·hi), about 2^-16 relative per product, enough for fp32's tolerance.
#pragma once

#include <type_traits>

#include "cuda/params.cuh"

namespace gla {
namespace cuda {

constexpr int kChunk = 64;
constexpr int kBK = 64;  // key columns per step
constexpr int kBV = 64;  // value columns per block
constexpr int kChunkThreads = 256;
constexpr int kPitch = 72;      // b16 elements per shared-memory row: 144 bytes, ldmatrix rows conflict-free
constexpr int kKtRows = 160;    // K̃ of the four sub-chunks: 16 + 32 + 48 + 64 rows
// rows of each operand tile inside one plane
constexpr int kRowQh = 0, kRowQt = 64, kRowKt = 128, kRowKh = 288, kRowS = 352, kRowV = 416, kPlaneRows = 480;
constexpr int kPlaneElems = kPlaneRows * kPitch;
constexpr int kFloatsMain = 4 * 64 + 4 * 64 + 64 + 4 * 16 * 16;  // sTot, sRef, sDC, sDiag

template <class Act>
struct Operand;
template <>
struct Operand<__half> {
  using E = __half;
  static constexpr int kPlanes = 1;
  static constexpr bool kBF16 = false;
  static constexpr float kTheta = 8.f;
};
template <>
struct Operand<bf16> {
  using E = bf16;
  static constexpr int kPlanes = 1;
  static constexpr bool kBF16 = true;
  static constexpr float kTheta = 24.f;
};
template <>
struct Operand<float> {
  using E = bf16;
  static constexpr int kPlanes = 2;
  static constexpr bool kBF16 = true;
  static constexpr float kTheta = 24.f;
};

template <class Act>
constexpr size_t chunk_smem_bytes() {
  return size_t(Operand<Act>::kPlanes) * kPlaneElems * 2 + size_t(kFloatsMain) * 4;
}
template <class Act>
constexpr size_t segment_smem_bytes() {
  return size_t(Operand<Act>::kPlanes) * 2 * 64 * kPitch * 2 + size_t(4 * 64) * 4;
}

__device__ __forceinline__ int kt_row0(int a) { return 8 * a * (a + 1); }  // first row of sub-chunk a's K̃

// Writes x into every plane (hi, then what hi missed).
template <class Act, int kStride = kPlaneElems>
__device__ __forceinline__ void put(typename Operand<Act>::E* at, float x) {
  using E = typename Operand<Act>::E;
  const E hi = from_float<E>(x);
  at[0] = hi;
  if constexpr (Operand<Act>::kPlanes > 1) at[kStride] = from_float<E>(x - to_float(hi));
}

// acc (one m16 × n8 tile) += A · B over every plane pair that matters (p + q < planes)
template <class Act>
__device__ __forceinline__ void mma_planes(float (&acc)[4], const uint32_t (&a)[Operand<Act>::kPlanes][4],
                                           const uint32_t b0[Operand<Act>::kPlanes],
                                           const uint32_t b1[Operand<Act>::kPlanes]) {
  constexpr int NP = Operand<Act>::kPlanes;
#pragma unroll
  for (int pa = NP - 1; pa >= 0; --pa)
#pragma unroll
    for (int pb = NP - 1 - pa; pb >= 0; --pb) {
      const uint32_t b[2] = {b0[pb], b1[pb]};
      mma_16816<Operand<Act>::kBF16>(acc, a[pa], b);
    }
}

// Raw inputs of one (chunk, 64 key columns) step, held in registers while the previous step's
// products run. Thread (column c, sub-chunk a) holds rows 16a..16a+15 of column c. Kept in the
// activation type: converting at load time would make the thread wait for every load right there,
// instead of after the products.
template <class Act>
struct Raw {
  Act q[16], k[16], g[16], v[16];
  Act a[16];   // shared scores (v2 only): rows 16a..16a+15 of column c
  int nv, ng;  // rows that exist; rows whose gate is read (0 without a gate)
  // the log2 decay of row r: the gate (if any) plus g_gamma for rows that exist
  __device__ __forceinline__ float decay(int r, float gam) const {
    return r < ng ? to_float(g[r]) * kLog2e + gam : (r < nv ? gam : 0.f);
  }
};

struct ChunkCtx {
  int64_t bos, len;  // the sequence
  int h, hq;         // key/value head, query head
  int c, a;          // column within the key block, sub-chunk
  float gam;         // g_gamma in log2 units
};

// Rows t, t+step, t+2 step, ... of the sequence as positions in the packed activations: the first
// row's position, the position step (negative with reverse) and how many of `count` rows exist.
// When none exists the position is the sequence's start, so that address arithmetic stays in
// bounds; callers never dereference rows past `nvalid`.
struct RowRun {
  int64_t pos0;
  int64_t dpos;
  int nvalid;
};

__device__ __forceinline__ RowRun row_run(const Params& p, const ChunkCtx& x, int64_t t, int step, int count) {
  RowRun r;
  const int64_t left = x.len - t;
  r.nvalid = left <= 0 ? 0 : int(left >= int64_t(count) * step ? count : (left + step - 1) / step);
  r.pos0 = r.nvalid > 0 ? x.bos + (p.reverse ? x.len - 1 - t : t) : x.bos;
  r.dpos = p.reverse ? -step : step;
  return r;
}

// Prefetch of q (if want_q), k (if want_k), g for rows t0 + 16a + r (r < 16) of key column kb*64 + c: one
// pointer per tensor stepped row by row, loads predicated on the row existing (missing rows and
// columns past d_k read as zero: k = 0 and g = 0 leave the state alone).
template <class Act>
__device__ __forceinline__ void load_qkg(const Params& p, const ChunkCtx& x, Raw<Act>& raw, int64_t t0, int kb,
                                         bool want_q, bool want_k = true) {
  const int col = kb * kBK + x.c;
  const RowRun rr = row_run(p, x, t0 + 16 * x.a, 1, 16);
  const int nv = col < p.K ? rr.nvalid : 0;
  const int colc = col < p.K ? col : 0;
  const int64_t kst = rr.dpos * int64_t(p.Hkv) * p.K, qst = rr.dpos * int64_t(p.Hq) * p.K;
  const int64_t gst = p.gate_per_head ? rr.dpos * int64_t(p.Hkv) : kst;
  const Act* pk = static_cast<const Act*>(p.k) + rr.pos0 * p.Hkv * int64_t(p.K) + int64_t(x.h) * p.K + colc;
  const Act* pq = static_cast<const Act*>(p.q) + rr.pos0 * p.Hq * int64_t(p.K) + int64_t(x.hq) * p.K + colc;
  const Act* pg = p.has_gate ? static_cast<const Act*>(p.g) + (p.gate_per_head ? rr.pos0 * p.Hkv + x.h
                                                                                 : rr.pos0 * p.Hkv * int64_t(p.K) +
                                                                                       int64_t(x.h) * p.K + colc)
                             : pk;  // never read
  const int ng = p.has_gate ? nv : 0;
  raw.nv = nv;
  raw.ng = ng;
  const Act zero = from_float<Act>(0.f);
#pragma unroll
  for (int r = 0; r < 16; ++r) {
    if (want_k) raw.k[r] = r < nv ? *pk : zero;
    if (want_q) raw.q[r] = r < nv ? *pq : zero;
    raw.g[r] = r < ng ? *pg : zero;
    pk += kst;
    pq += qst;
    pg += gst;
  }
}

// Prefetch of v for rows t0 + vrow0 + 4r (r < 16) of value column vcol.
template <class Act>
__device__ __forceinline__ void load_v(const Params& p, const ChunkCtx& x, Raw<Act>& raw, int64_t t0, int vcol, int vrow0) {
  const RowRun rr = row_run(p, x, t0 + vrow0, 4, 16);
  const int nv = vcol < p.V ? rr.nvalid : 0;
  const int64_t vst = rr.dpos * int64_t(p.Hkv) * p.V;
  const Act* pv = static_cast<const Act*>(p.v) + rr.pos0 * p.Hkv * int64_t(p.V) + int64_t(x.h) * p.V + (vcol < p.V ? vcol : 0);
  const Act zero = from_float<Act>(0.f);
#pragma unroll
  for (int r = 0; r < 16; ++r) {
    raw.v[r] = r < nv ? *pv : zero;
    pv += vst;
  }
}

// Prefetch of the shared scores (v2) for rows t0 + 16a + r (r < 16) of score column c: only the
// columns a row tile uses (c < 16(a+1)) and rows that exist; the rest read as zero.
template <class Act>
__device__ __forceinline__ void load_a(const Params& p, const ChunkCtx& x, Raw<Act>& raw, int64_t t0) {
  const RowRun rr = row_run(p, x, t0 + 16 * x.a, 1, 16);
  const int nv = x.c < 16 * (x.a + 1) ? rr.nvalid : 0;
  const int64_t st = rr.dpos * int64_t(p.Hq) * kChunk;
  const Act* pa = static_cast<const Act*>(p.scores) + (rr.pos0 * p.Hq + x.hq) * int64_t(kChunk) + x.c;
  const Act zero = from_float<Act>(0.f);
#pragma unroll
  for (int r = 0; r < 16; ++r) {
    raw.a[r] = r < nv ? *pa : zero;
    pa += st;
  }
}

// Runs f on the state slice of key block kb (a register array: each case indexes it statically).
template <int NKB, class F>
__device__ __forceinline__ void on_state(float (&S)[NKB][4][4], int kb, F&& f) {
  if constexpr (NKB == 1) {
    f(S[0]);
  } else if constexpr (NKB == 2) {
    if (kb == 0) f(S[0]);
    else f(S[1]);
  } else {
    static_assert(NKB == 4, "the chunk kernel is built for 1, 2 or 4 key blocks");
    switch (kb) {
      case 0: f(S[0]); break;
      case 1: f(S[1]); break;
      case 2: f(S[2]); break;
      default: f(S[3]); break;
    }
  }
}

// The slow path: diagonal-tile scores of the sub-chunk rows i >= j of columns whose decay is too
// fast for the pivot split, per pair: q_i k_j 2^(Γ_i − Γ_j) summed over the warp's columns, added
// to diag[i][j] (two warps share a sub-chunk, hence the atomics). Out of line: it is rare, and
// unrolled it would be most of the kernel's code.
static __device__ __noinline__ void exact_diagonal(const float* q, const float* k, const float* P, bool exact, float* diag,
                                            int lane) {
#pragma unroll 1
  for (int i = 0; i < 16; ++i) {
#pragma unroll 1
    for (int j = 0; j <= i; ++j) {
      float val = exact ? q[i] * k[j] * fast_exp2(P[i] - P[j]) : 0.f;
      val = warp_sum_xor(val, 1);
      if (lane == 0) atomicAdd(&diag[i * 16 + j], val);
    }
  }
}

// ---- pieces shared by the kernels ------------------------------------------------------------------
//
// mma roles: warp = row tile mt (16 rows) + half nh of the 64 columns; lane = fragment coordinates
// lg = lane / 4, lt = lane % 4. Tiles of b16 elements in shared memory, kPitch a row, one plane of
// each tile kPlane elements after the previous one.

// Running sums of the log2 decay over this thread's 16 rows (P[15]: the sub-chunk's total)
template <class Act>
__device__ __forceinline__ void decay_sums(const Raw<Act>& raw, float gam, float (&P)[16]) {
  float run = 0.f;
#pragma unroll
  for (int r = 0; r < 16; ++r) {
    run += raw.decay(r, gam);
    P[r] = run;
  }
}

// t[u][e] *= f for every element of four accumulator tiles
__device__ __forceinline__ void scale_tiles(float (&t)[4][4], float f) {
#pragma unroll
  for (int u = 0; u < 4; ++u)
#pragma unroll
    for (int e = 0; e < 4; ++e) t[u][e] *= f;
}

// Calls f(nt, e, row, col) for this thread's accumulators of the 64×64 state tile of key block kb
// and value block vb: rows kb*64 + 16mt + lg (+8), columns vb*64 + 32nh + 8nt + 2lt (+1). Rows and
// columns may lie past d_k / d_v: f checks.
template <class F>
__device__ __forceinline__ void for_state_acc(int kb, int vb, int mt, int nh, int lg, int lt, F&& f) {
#pragma unroll
  for (int nt = 0; nt < 4; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int row = kb * 64 + 16 * mt + lg + 8 * (e >> 1);
      const int col = vb * kBV + 32 * nh + 8 * nt + 2 * lt + (e & 1);
      f(nt, e, row, col);
    }
}

// The state tile's accumulators at the start of a segment: the segment scan's start state (split
// sequences), else h0 (zero without it); zero past d_k / d_v
__device__ __forceinline__ void load_state_acc(const Params& p, float (&S)[4][4], int64_t base_h0, int64_t base_ws,
                                               bool from_ws, int kb, int vb, int mt, int nh, int lg, int lt) {
  for_state_acc(kb, vb, mt, nh, lg, lt, [&](int nt, int e, int row, int col) {
    float val = 0.f;
    if (row < p.K && col < p.V) {
      if (from_ws) val = p.seg_state[base_ws + int64_t(row) * p.V + col];
      else if (p.h0) val = load_any(p.h0, base_h0 + int64_t(row) * p.V + col, p.state_dt);
    }
    S[nt][e] = val;
  });
}

// ... and the final state (p.ht, at base) from them
__device__ __forceinline__ void store_state_acc(const Params& p, const float (&S)[4][4], int64_t base, int kb, int vb,
                                                int mt, int nh, int lg, int lt) {
  for_state_acc(kb, vb, mt, nh, lg, lt, [&](int nt, int e, int row, int col) {
    if (row < p.K && col < p.V) store_any(p.ht, base + int64_t(row) * p.V + col, p.state_dt, S[nt][e]);
  });
}

// Rows 16mt + lg and 16mt + lg + 8 of the state tile times the chunk's decay 2^Γ_C of those rows (sDC)
__device__ __forceinline__ void decay_state_acc(float (&S)[4][4], const float* sDC, int mt, int lg) {
  const float d0 = sDC[16 * mt + lg], d1 = sDC[16 * mt + lg + 8];
#pragma unroll
  for (int nt = 0; nt < 4; ++nt) {
    S[nt][0] *= d0;
    S[nt][1] *= d0;
    S[nt][2] *= d1;
    S[nt][3] *= d1;
  }
}

// For one k16 step ks: the A fragments of every plane of a 64 × 64 tile at `x`, row tile mt, from a
// row-major [m][k] tile (Q̂, Q̃, the scores) or read transposed from a [k][m] tile (K̂ for K̂ᵀ V)
template <class Act, int kPlane>
__device__ __forceinline__ void ldsm_a(uint32_t (&af)[Operand<Act>::kPlanes][4], const typename Operand<Act>::E* x, int ks,
                                       int mt, int lane) {
#pragma unroll
  for (int pl = 0; pl < Operand<Act>::kPlanes; ++pl)
    ldsm_x4(af[pl], x + pl * kPlane + (16 * mt + (lane & 15)) * kPitch + 16 * ks + (lane >> 4) * 8);
}
template <class Act, int kPlane>
__device__ __forceinline__ void ldsm_a_t(uint32_t (&af)[Operand<Act>::kPlanes][4], const typename Operand<Act>::E* x,
                                         int ks, int mt, int lane) {
#pragma unroll
  for (int pl = 0; pl < Operand<Act>::kPlanes; ++pl)
    ldsm_x4_t(af[pl], x + pl * kPlane + (16 * ks + (lane & 7) + (lane >> 4) * 8) * kPitch + 16 * mt + ((lane >> 3) & 1) * 8);
}

// acc (this warp's four n8 tiles, columns 32nh + [0, 32)) += af · Y for one k16 step ks: Y a
// [k][n] tile at `y` (S, V), read transposed
template <class Act, int kPlane>
__device__ __forceinline__ void mma_x32(float (&acc)[4][4], const uint32_t (&af)[Operand<Act>::kPlanes][4],
                                        const typename Operand<Act>::E* y, int ks, int nh, int lane) {
  constexpr int NP = Operand<Act>::kPlanes;
#pragma unroll
  for (int pp = 0; pp < 2; ++pp) {
    uint32_t b[NP][4];
#pragma unroll
    for (int pl = 0; pl < NP; ++pl)
      ldsm_x4_t(b[pl], y + pl * kPlane + (16 * ks + (lane & 7) + ((lane >> 3) & 1) * 8) * kPitch + 32 * nh + 16 * pp +
                           (lane >> 4) * 8);
    uint32_t b0[NP], b1[NP], b2[NP], b3[NP];
#pragma unroll
    for (int pl = 0; pl < NP; ++pl) b0[pl] = b[pl][0], b1[pl] = b[pl][1], b2[pl] = b[pl][2], b3[pl] = b[pl][3];
    mma_planes<Act>(acc[2 * pp], af, b0, b1);
    mma_planes<Act>(acc[2 * pp + 1], af, b2, b3);
  }
}

// acc += X Y over 64 rows of k (X: 64 × 64 row-major at x, row tile mt; Y: 64 × 64 [k][n] at y). With
// kCausal only X's column tiles ks ≤ mt (a lower-triangular X: the scores, O += A V).
template <class Act, int kPlane, bool kCausal>
__device__ __forceinline__ void mma_rows(float (&acc)[4][4], const typename Operand<Act>::E* x,
                                         const typename Operand<Act>::E* y, int mt, int nh, int lane) {
#pragma unroll
  for (int ks = 0; ks < 4; ++ks) {
    if (!kCausal || ks <= mt) {
      uint32_t af[Operand<Act>::kPlanes][4];
      ldsm_a<Act, kPlane>(af, x, ks, mt, lane);
      mma_x32<Act, kPlane>(acc, af, y, ks, nh, lane);
    }
  }
}

// S (the state tile's accumulators, already decayed) += K̂ᵀ V over the chunk's 64 rows (K̂: 64 × 64
// [row][key column] at kh, V: [row][value column] at vs)
template <class Act, int kPlane>
__device__ __forceinline__ void mma_kv(float (&S)[4][4], const typename Operand<Act>::E* kh,
                                       const typename Operand<Act>::E* vs, int mt, int nh, int lane) {
#pragma unroll
  for (int ks = 0; ks < 4; ++ks) {
    uint32_t af[Operand<Act>::kPlanes][4];
    ldsm_a_t<Act, kPlane>(af, kh, ks, mt, lane);
    mma_x32<Act, kPlane>(S, af, vs, ks, nh, lane);
  }
}

// A (row tile mt; n8 tiles jt = nh*(mt+1) + u, u ≤ mt) += Q̃ K̃ᵀ for one k16 step: af holds Q̃'s
// fragments of step ks, kt is sub-chunk mt's K̃
template <class Act, int kPlane>
__device__ __forceinline__ void mma_qk(float (&A)[4][4], const uint32_t (&af)[Operand<Act>::kPlanes][4],
                                       const typename Operand<Act>::E* kt, int ks, int mt, int nh, int lane) {
  constexpr int NP = Operand<Act>::kPlanes;
#pragma unroll
  for (int u = 0; u < 4; ++u) {
    if (u <= mt) {
      const int jt = nh * (mt + 1) + u;
      uint32_t b0[NP], b1[NP];
#pragma unroll
      for (int pl = 0; pl < NP; ++pl) {
        uint32_t r2[2];
        ldsm_x2(r2, kt + pl * kPlane + (8 * jt + (lane & 7)) * kPitch + 16 * ks + ((lane >> 3) & 1) * 8);
        b0[pl] = r2[0];
        b1[pl] = r2[1];
      }
      mma_planes<Act>(A[u], af, b0, b1);
    }
  }
}

// The outputs O (rows 16mt + lg (+8) of the chunk starting at t0, columns vb*64 + 32nh + 8nt + 2lt
// (+1)) to p.o: in pairs where d_v allows, else element by element
template <class Act>
__device__ __forceinline__ void store_out(const Params& p, const ChunkCtx& x, int64_t t0, int vb, int mt, int nh, int lg,
                                          int lt, const float (&O)[4][4]) {
  Act* __restrict__ o = static_cast<Act*>(p.o);
  const int col0 = vb * kBV + 32 * nh + 2 * lt;
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const RowRun rr = row_run(p, x, t0 + 16 * mt + lg + 8 * half, 1, 1);
    if (rr.nvalid) {
      Act* orow = o + (rr.pos0 * p.Hq + x.hq) * int64_t(p.V);
#pragma unroll
      for (int nt = 0; nt < 4; ++nt) {
        const int col = col0 + 8 * nt;  // even
        if (p.vec_out && col + 1 < p.V) {
          store_pair(orow + col, O[nt][2 * half], O[nt][2 * half + 1]);
        } else {
#pragma unroll
          for (int e = 0; e < 2; ++e)
            if (col + e < p.V) orow[col + e] = from_float<Act>(O[nt][2 * half + e]);
        }
      }
    }
  }
}

// ---- main kernel -----------------------------------------------------------------------------------

// kShared (prefill v2): the masked, scaled scores of every chunk come from gla_scores_kernel
// (p.scores) instead of being computed here for each value block: no Q̃/K̃, no A += Q̃K̃ᵀ.
template <class Act, int NKB, bool kShared>
__global__ void __launch_bounds__(kChunkThreads, 1) gla_chunk_kernel(const Params p) {
  using OP = Operand<Act>;
  using E = typename OP::E;
  constexpr int NP = OP::kPlanes;
#if defined(GLA_EMULATE)
  unsigned char* smem_raw = gla_emu::dynamic_smem();
#else
  extern __shared__ __align__(16) unsigned char smem_raw[];
#endif
  E* sm = reinterpret_cast<E*>(smem_raw);
  float* sTot = reinterpret_cast<float*>(smem_raw + size_t(NP) * kPlaneElems * 2);
  float* sRef = sTot + 4 * 64;
  float* sDC = sRef + 4 * 64;
  float* sDiag = sDC + 64;

  const int tid = int(threadIdx.x), lane = tid & 31, warp = tid >> 5;
  const int mt = warp & 3, nh = warp >> 2;  // mma role: row tile, half of the 64 columns
  const int lg = lane >> 2, lt = lane & 3;  // mma fragment coordinates

  int64_t bx = blockIdx.x;
  const int vb = int(bx % p.nvb);
  bx /= p.nvb;
  const int hq = int(bx % p.Hq);
  const int64_t slot = bx / p.Hq;
  int64_t n, s, nseg, slot0;
  if (!find_segment(p, slot, n, s, nseg, slot0)) return;  // uniform over the block

  ChunkCtx x;
  sequence_bounds(p, n, x.bos, x.len);
  x.hq = hq;
  x.h = hq / p.G;
  x.c = tid & 63;
  x.a = tid >> 6;
  x.gam = gamma_log2(p, x.h);
  const int64_t t_begin = p.seg_len ? s * p.seg_len : 0;
  const int64_t t_end = p.seg_len && s + 1 < nseg ? (s + 1) * p.seg_len : x.len;
  const int64_t nchunks = t_end > t_begin ? (t_end - t_begin + kChunk - 1) / kChunk : 0;
  const int vcol = vb * kBV + x.c, vrow0 = x.a;

  for (int i = tid; i < 4 * 16 * 16; i += kChunkThreads) sDiag[i] = 0.f;

  // this thread's places in the operand tiles (column c, rows of sub-chunk a)
  E* const myQh = sm + (kRowQh + 16 * x.a) * kPitch + x.c;
  E* const myQt = sm + (kRowQt + 16 * x.a) * kPitch + x.c;
  E* const myKh = sm + (kRowKh + 16 * x.a) * kPitch + x.c;
  E* const myKt = sm + (kRowKt + 16 * x.a) * kPitch + x.c;  // + kt_row0(b) * kPitch for sub-chunk b's K̃
  E* const myV = sm + (kRowV + vrow0) * kPitch + x.c;

  // ---- the state slice, as tensor-core accumulators: rows kb*64 + 16mt + lg (+8), columns 32nh + 8nt + 2lt (+1)
  float S[NKB][4][4];
  {
    const int64_t base_h0 = (n * p.Hkv + x.h) * int64_t(p.K) * p.V;
    const int64_t base_ws = (slot * p.Hkv + x.h) * int64_t(p.K) * p.V;
    const bool from_ws = p.seg_len != 0;
#pragma unroll
    for (int kb = 0; kb < NKB; ++kb) load_state_acc(p, S[kb], base_h0, base_ws, from_ws, kb, vb, mt, nh, lg, lt);
  }

  Raw<Act> raw;
  raw.nv = raw.ng = 0;
  if (nchunks > 0) {
    load_qkg<Act>(p, x, raw, t_begin, 0, true);
    load_v<Act>(p, x, raw, t_begin, vcol, vrow0);
    if constexpr (kShared) load_a<Act>(p, x, raw, t_begin);
  }
  __syncthreads();  // sDiag zeroed

  for (int64_t ci = 0; ci < nchunks; ++ci) {
    const int64_t t0 = t_begin + ci * kChunk;
    float A[4][4], O[4][4];
#pragma unroll
    for (int u = 0; u < 4; ++u)
#pragma unroll
      for (int e = 0; e < 4; ++e) A[u][e] = O[u][e] = 0.f;
    int chunk_exact = 0;

    // one step per 64 key columns; a loop, not unrolled: its body is most of the kernel's code
#pragma unroll 1
    for (int kb = 0; kb < NKB; ++kb) {
      // (1) running sums of the decay inside this thread's 16 rows; pick the pivot row
      float P[16];
      decay_sums(raw, x.gam, P);
      const bool exact = !kShared && ((P[0] - P[8] > OP::kTheta) || (P[8] - P[15] > OP::kTheta));
      const float Pr = exact ? P[0] : P[8];
      sTot[x.a * 64 + x.c] = P[15];
      int any_exact = 0;
      if constexpr (kShared) {
        __syncthreads();
      } else {
        sRef[x.a * 64 + x.c] = Pr;
        any_exact = __syncthreads_or(exact ? 1 : 0);
        chunk_exact |= any_exact;
      }

      // (2) the scaled operands
      {
        float tot[4], ref[4];
#pragma unroll
        for (int b = 0; b < 4; ++b) {
          tot[b] = sTot[b * 64 + x.c];
          ref[b] = sRef[b * 64 + x.c];
        }
        float before = 0.f, after = 0.f, total = 0.f;
#pragma unroll
        for (int b = 0; b < 4; ++b) {
          if (b < x.a) before += tot[b];
          if (b > x.a) after += tot[b];
          total += tot[b];
        }
        if (x.a == 0) sDC[x.c] = fast_exp2(total);
        if constexpr (kShared) {
          // Q̂ = q 2^Γ_i, K̂ = k 2^(Γ_C − Γ_j); the scores of this chunk (prefetched) to the A tile
          const float e_after = fast_exp2(after);
#pragma unroll
          for (int r = 0; r < 16; ++r) {
            put<Act>(myQh + r * kPitch, to_float(raw.q[r]) * fast_exp2(before + P[r]));
            put<Act>(myKh + r * kPitch, to_float(raw.k[r]) * fast_exp2(P[15] - P[r]) * e_after);
          }
          if (kb == 0) {
#pragma unroll
            for (int r = 0; r < 16; ++r) put<Act>(myQt + r * kPitch, to_float(raw.a[r]));
          }
        } else {
        const float e_pivot = fast_exp2(before + Pr);  // 2^Γ_r
        const float e_after = fast_exp2(after);        // 2^(Γ_C − Γ_end of my sub-chunk)
        const float e_diag = exact ? 0.f : fast_exp2(Pr - P[15]);
        // 2^(Γ_r(b) − Γ_end of my sub-chunk) for each later sub-chunk b: the sub-chunks strictly
        // between, then b's own rows up to its pivot
        float e_later[4] = {0.f, 0.f, 0.f, 0.f};
        {
          float between = 0.f;
#pragma unroll
          for (int b = 1; b < 4; ++b) {
            if (b > x.a) {
              e_later[b] = fast_exp2(between + ref[b]);
              between += tot[b];
            }
          }
        }
        E* const myKtDiag = myKt + kt_row0(x.a) * kPitch;
#pragma unroll
        for (int r = 0; r < 16; ++r) {
          const float e = fast_exp2(P[r] - Pr);
          const float qe = to_float(raw.q[r]) * e;
          put<Act>(myQt + r * kPitch, qe);
          put<Act>(myQh + r * kPitch, qe * e_pivot);
          const float ku = to_float(raw.k[r]) * fast_exp2(P[15] - P[r]);
          put<Act>(myKh + r * kPitch, ku * e_after);
          put<Act>(myKtDiag + r * kPitch, ku * e_diag);
        }
        // later sub-chunks' K̃ (warp-uniform: a sub-chunk is two whole warps)
#pragma unroll
        for (int b = 1; b < 4; ++b) {
          if (b > x.a) {
            E* const dst = myKt + kt_row0(b) * kPitch;
#pragma unroll
            for (int r = 0; r < 16; ++r)
              put<Act>(dst + r * kPitch, to_float(raw.k[r]) * fast_exp2(P[15] - P[r]) * e_later[b]);
          }
        }
        }  // kShared
        if (kb == 0) {
#pragma unroll
          for (int r = 0; r < 16; ++r) put<Act>(myV + 4 * r * kPitch, to_float(raw.v[r]));
        }
        // this warp's accumulators of S (start of the chunk) for Q̂S
        on_state<NKB>(S, kb, [&](float(&Sk)[4][4]) {
          E* Ss = sm + (kRowS + 16 * mt + lg) * kPitch + 32 * nh + 2 * lt;
#pragma unroll
          for (int nt = 0; nt < 4; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) put<Act>(Ss + 8 * (e >> 1) * kPitch + 8 * nt + (e & 1), Sk[nt][e]);
        });
        // exact diagonal-tile terms of the columns whose decay is too fast for the pivot split
        if (any_exact && __any_sync(0xffffffffu, exact ? 1 : 0)) {
          float tq[16], tk[16], tp[16];  // copies: only these go to local memory, the registers stay
#pragma unroll
          for (int r = 0; r < 16; ++r) tq[r] = to_float(raw.q[r]), tk[r] = to_float(raw.k[r]), tp[r] = P[r];
          exact_diagonal(tq, tk, tp, exact, sDiag + x.a * 16 * 16, lane);
        }
      }
      // prefetch the next step's inputs; they arrive while the products below run
      {
        const bool last_kb = kb == NKB - 1;
        const int64_t nci = last_kb ? ci + 1 : ci;
        if (nci < nchunks) {
          load_qkg<Act>(p, x, raw, t_begin + nci * kChunk, last_kb ? 0 : kb + 1, true);
          if (last_kb) load_v<Act>(p, x, raw, t_begin + nci * kChunk, vcol, vrow0);
          if constexpr (kShared) {
            if (last_kb) load_a<Act>(p, x, raw, t_begin + nci * kChunk);
          }
        }
      }
      __syncthreads();

      // (3) products
      {
        const E* Qh = sm + kRowQh * kPitch;
        const E* Qt = sm + kRowQt * kPitch;
        const E* Kt = sm + kRowKt * kPitch + kt_row0(mt) * kPitch;
        const E* Kh = sm + kRowKh * kPitch;
        const E* Ss = sm + kRowS * kPitch;
        const E* Vs = sm + kRowV * kPitch;
        const int a_row = 16 * mt + (lane & 15), a_col = (lane >> 4) * 8;                       // A, row-major
        const int bt_row = (lane & 7) + ((lane >> 3) & 1) * 8, bt_col = 32 * nh + (lane >> 4) * 8;  // B, [k][n]
#pragma unroll
        for (int ks = 0; ks < 4; ++ks) {
          uint32_t af[NP][4];
          // A += Q̃ K̃ᵀ (row tile mt; this warp's n8 tiles jt = nh*(mt+1) + u)
          if constexpr (!kShared) {
#pragma unroll
          for (int pl = 0; pl < NP; ++pl) ldsm_x4(af[pl], Qt + pl * kPlaneElems + a_row * kPitch + 16 * ks + a_col);
#pragma unroll
          for (int u = 0; u < 4; ++u) {
            if (u <= mt) {
              const int jt = nh * (mt + 1) + u;
              uint32_t b0[NP], b1[NP];
#pragma unroll
              for (int pl = 0; pl < NP; ++pl) {
                uint32_t r2[2];
                ldsm_x2(r2, Kt + pl * kPlaneElems + (8 * jt + (lane & 7)) * kPitch + 16 * ks + ((lane >> 3) & 1) * 8);
                b0[pl] = r2[0];
                b1[pl] = r2[1];
              }
              mma_planes<Act>(A[u], af, b0, b1);
            }
          }
          }  // !kShared
          // O += Q̂ S
#pragma unroll
          for (int pl = 0; pl < NP; ++pl) ldsm_x4(af[pl], Qh + pl * kPlaneElems + a_row * kPitch + 16 * ks + a_col);
#pragma unroll
          for (int pp = 0; pp < 2; ++pp) {
            uint32_t b[NP][4];
#pragma unroll
            for (int pl = 0; pl < NP; ++pl)
              ldsm_x4_t(b[pl], Ss + pl * kPlaneElems + (16 * ks + bt_row) * kPitch + bt_col + 16 * pp);
            uint32_t b0[NP], b1[NP], b2[NP], b3[NP];
#pragma unroll
            for (int pl = 0; pl < NP; ++pl) b0[pl] = b[pl][0], b1[pl] = b[pl][1], b2[pl] = b[pl][2], b3[pl] = b[pl][3];
            mma_planes<Act>(O[2 * pp], af, b0, b1);
            mma_planes<Act>(O[2 * pp + 1], af, b2, b3);
          }
        }
        // S = 2^Γ_C ⊙ S + K̂ᵀ V
        on_state<NKB>(S, kb, [&](float(&Sk)[4][4]) {
          const float d0 = sDC[16 * mt + lg], d1 = sDC[16 * mt + lg + 8];
#pragma unroll
          for (int nt = 0; nt < 4; ++nt) {
            Sk[nt][0] *= d0;
            Sk[nt][1] *= d0;
            Sk[nt][2] *= d1;
            Sk[nt][3] *= d1;
          }
#pragma unroll
          for (int ks = 0; ks < 4; ++ks) {
            uint32_t af[NP][4];
#pragma unroll
            for (int pl = 0; pl < NP; ++pl)
              ldsm_x4_t(af[pl], Kh + pl * kPlaneElems + (16 * ks + (lane & 7) + (lane >> 4) * 8) * kPitch + 16 * mt +
                                    ((lane >> 3) & 1) * 8);
#pragma unroll
            for (int pp = 0; pp < 2; ++pp) {
              uint32_t b[NP][4];
#pragma unroll
              for (int pl = 0; pl < NP; ++pl)
                ldsm_x4_t(b[pl], Vs + pl * kPlaneElems + (16 * ks + bt_row) * kPitch + bt_col + 16 * pp);
              uint32_t b0[NP], b1[NP], b2[NP], b3[NP];
#pragma unroll
              for (int pl = 0; pl < NP; ++pl) b0[pl] = b[pl][0], b1[pl] = b[pl][1], b2[pl] = b[pl][2], b3[pl] = b[pl][3];
              mma_planes<Act>(Sk[2 * pp], af, b0, b1);
              mma_planes<Act>(Sk[2 * pp + 1], af, b2, b3);
            }
          }
        });
      }
      // v1: (4) writes the scores over Q̃, which these products read. v2 needs no barrier here: the next
      // step's operand writes (2) come after its barrier (1), which every warp reaches only after
      // these products; (1) itself writes sTot, read only in (2). So warps that finish their
      // products early start the next step's decay sums.
      if constexpr (!kShared) __syncthreads();
    }

    // (4) the causal scores, masked and scaled, to shared memory (over Q̃, no longer needed);
    // with kShared they are there already
    if constexpr (kShared) {
#pragma unroll
      for (int u = 0; u < 4; ++u)
#pragma unroll
        for (int e = 0; e < 4; ++e) O[u][e] *= p.scale;
    } else {
      E* As = sm + kRowQt * kPitch;
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        if (u <= mt) {
          const int jt = nh * (mt + 1) + u;
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int i = 16 * mt + lg + 8 * (e >> 1), j = 8 * jt + 2 * lt + (e & 1);
            float val = j <= i ? A[u][e] : 0.f;
            if (chunk_exact && j <= i && j >= 16 * mt) {
              float* d = &sDiag[(mt * 16 + (i - 16 * mt)) * 16 + (j - 16 * mt)];
              val += *d;
              *d = 0.f;
            }
            put<Act>(As + i * kPitch + j, val * p.scale);
          }
        }
      }
#pragma unroll
      for (int u = 0; u < 4; ++u)
#pragma unroll
        for (int e = 0; e < 4; ++e) O[u][e] *= p.scale;
    }
    if constexpr (!kShared) __syncthreads();  // v2: the A tile and V were written before the products' barrier

    // (5) O += A V, then store the rows of this chunk
    {
      const E* As = sm + kRowQt * kPitch;
      const E* Vs = sm + kRowV * kPitch;
#pragma unroll
      for (int ks = 0; ks < 4; ++ks) {
        if (ks <= mt) {
          uint32_t af[NP][4];
#pragma unroll
          for (int pl = 0; pl < NP; ++pl)
            ldsm_x4(af[pl], As + pl * kPlaneElems + (16 * mt + (lane & 15)) * kPitch + 16 * ks + (lane >> 4) * 8);
#pragma unroll
          for (int pp = 0; pp < 2; ++pp) {
            uint32_t b[NP][4];
#pragma unroll
            for (int pl = 0; pl < NP; ++pl)
              ldsm_x4_t(b[pl], Vs + pl * kPlaneElems + (16 * ks + (lane & 7) + ((lane >> 3) & 1) * 8) * kPitch + 32 * nh +
                                   16 * pp + (lane >> 4) * 8);
            uint32_t b0[NP], b1[NP], b2[NP], b3[NP];
#pragma unroll
            for (int pl = 0; pl < NP; ++pl) b0[pl] = b[pl][0], b1[pl] = b[pl][1], b2[pl] = b[pl][2], b3[pl] = b[pl][3];
            mma_planes<Act>(O[2 * pp], af, b0, b1);
            mma_planes<Act>(O[2 * pp + 1], af, b2, b3);
          }
        }
      }
      // rows 16mt + lg and 16mt + lg + 8 of the chunk; columns 32nh + 8nt + 2lt (+1)
      Act* __restrict__ o = static_cast<Act*>(p.o);
      const int col0 = vb * kBV + 32 * nh + 2 * lt;
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const RowRun rr = row_run(p, x, t0 + 16 * mt + lg + 8 * half, 1, 1);
        if (rr.nvalid) {
          Act* orow = o + (rr.pos0 * p.Hq + hq) * int64_t(p.V);
#pragma unroll
          for (int nt = 0; nt < 4; ++nt) {
            const int col = col0 + 8 * nt;  // even
            if (p.vec_out && col + 1 < p.V) {
              store_pair(orow + col, O[nt][2 * half], O[nt][2 * half + 1]);
            } else {
#pragma unroll
              for (int e = 0; e < 2; ++e)
                if (col + e < p.V) orow[col + e] = from_float<Act>(O[nt][2 * half + e]);
            }
          }
        }
      }
    }
    // the next chunk's first writes (sTot/sRef) touch nothing read above; its barrier (1) orders the rest
  }

  // the final state, once per key/value head: by its first query head, from the sequence's last segment
  if (s + 1 == nseg && hq % p.G == 0) {
    const int64_t base = (n * p.Hkv + x.h) * int64_t(p.K) * p.V;
#pragma unroll
    for (int kb = 0; kb < NKB; ++kb) store_state_acc(p, S[kb], base, kb, vb, mt, nh, lg, lt);
  }
}

// ---- scores (prefill v2): the masked, scaled intra-chunk scores, once per (chunk, query head) -----
//
// One block per (chunk slot, query head). The same operands and products as the main kernel's
// A += Q̃K̃ᵀ (pivot split, exact diagonal path), over every key block, then the masked scores times
// the scale to p.scores in the activation type (fp32: the main kernel splits them into its two
// planes as v1 does, so both paths feed AV the same operand). Shared memory: Q̃ and K̃ only.

constexpr int kScoreRowKt = 64;                              // Q̃ at row 0, K̃ (160 rows) after it
constexpr int kScorePlane = (kScoreRowKt + kKtRows) * kPitch;  // b16 elements of one plane
constexpr int kFloatsScores = 4 * 64 + 4 * 64 + 4 * 16 * 16;  // sTot, sRef, sDiag

template <class Act>
constexpr size_t scores_smem_bytes() {
  return size_t(Operand<Act>::kPlanes) * kScorePlane * 2 + size_t(kFloatsScores) * 4;
}

// The chunk slots of the scores kernel, as segments of one chunk each (find_segment's layout).
__device__ __forceinline__ Params chunk_slots(const Params& p) {
  Params pc = p;
  pc.seg_len = kChunk;
  pc.seg_off = p.chunk_off;
  pc.nseg_dense = p.nchunk_dense;
  return pc;
}

// The body of block bx (a device function: v3 runs it in the same launch as the chunk states)
template <class Act, int NKB>
__device__ __forceinline__ void scores_block(const Params& p, const int64_t bx, unsigned char* smem_raw) {
  using OP = Operand<Act>;
  using E = typename OP::E;
  constexpr int NP = OP::kPlanes;
  E* sm = reinterpret_cast<E*>(smem_raw);
  float* sTot = reinterpret_cast<float*>(smem_raw + size_t(NP) * kScorePlane * 2);
  float* sRef = sTot + 4 * 64;
  float* sDiag = sRef + 4 * 64;

  const int tid = int(threadIdx.x), lane = tid & 31, warp = tid >> 5;
  const int mt = warp & 3, nh = warp >> 2;
  const int lg = lane >> 2, lt = lane & 3;

  const int hq = int(bx % p.Hq);
  const int64_t cslot = bx / p.Hq;
  int64_t n, ci, nch, slot0;
  if (!find_segment(chunk_slots(p), cslot, n, ci, nch, slot0)) return;  // uniform over the block
  ChunkCtx x;
  sequence_bounds(p, n, x.bos, x.len);
  const int64_t t0 = ci * kChunk;
  if (t0 >= x.len) return;  // an empty sequence's slot
  x.hq = hq;
  x.h = hq / p.G;
  x.c = tid & 63;
  x.a = tid >> 6;
  x.gam = gamma_log2(p, x.h);

  for (int i = tid; i < 4 * 16 * 16; i += kChunkThreads) sDiag[i] = 0.f;
  E* const myQt = sm + (16 * x.a) * kPitch + x.c;
  E* const myKt = sm + (kScoreRowKt + 16 * x.a) * kPitch + x.c;  // + kt_row0(b) * kPitch for sub-chunk b's K̃

  float A[4][4];
#pragma unroll
  for (int u = 0; u < 4; ++u)
#pragma unroll
    for (int e = 0; e < 4; ++e) A[u][e] = 0.f;
  int chunk_exact = 0;

  __syncthreads();  // sDiag zeroed

  // no prefetch across key blocks: at 128 registers (two blocks an SM) it would spill; the other
  // block's products cover these loads
#pragma unroll 1
  for (int kb = 0; kb < NKB; ++kb) {
    Raw<Act> raw;
    load_qkg<Act>(p, x, raw, t0, kb, true);
    float P[16];
    decay_sums(raw, x.gam, P);
    const bool exact = (P[0] - P[8] > OP::kTheta) || (P[8] - P[15] > OP::kTheta);
    const float Pr = exact ? P[0] : P[8];
    sTot[x.a * 64 + x.c] = P[15];
    sRef[x.a * 64 + x.c] = Pr;
    const int any_exact = __syncthreads_or(exact ? 1 : 0);
    chunk_exact |= any_exact;
    {
      float tot[4], ref[4];
#pragma unroll
      for (int b = 0; b < 4; ++b) {
        tot[b] = sTot[b * 64 + x.c];
        ref[b] = sRef[b * 64 + x.c];
      }
      const float e_diag = exact ? 0.f : fast_exp2(Pr - P[15]);
      float e_later[4] = {0.f, 0.f, 0.f, 0.f};
      {
        float between = 0.f;
#pragma unroll
        for (int b = 1; b < 4; ++b) {
          if (b > x.a) {
            e_later[b] = fast_exp2(between + ref[b]);
            between += tot[b];
          }
        }
      }
      E* const myKtDiag = myKt + kt_row0(x.a) * kPitch;
#pragma unroll
      for (int r = 0; r < 16; ++r) {
        put<Act, kScorePlane>(myQt + r * kPitch, to_float(raw.q[r]) * fast_exp2(P[r] - Pr));
        put<Act, kScorePlane>(myKtDiag + r * kPitch, to_float(raw.k[r]) * fast_exp2(P[15] - P[r]) * e_diag);
      }
#pragma unroll
      for (int b = 1; b < 4; ++b) {
        if (b > x.a) {
          E* const dst = myKt + kt_row0(b) * kPitch;
#pragma unroll
          for (int r = 0; r < 16; ++r)
            put<Act, kScorePlane>(dst + r * kPitch, to_float(raw.k[r]) * fast_exp2(P[15] - P[r]) * e_later[b]);
        }
      }
      if (any_exact && __any_sync(0xffffffffu, exact ? 1 : 0)) {
        float tq[16], tk[16], tp[16];
#pragma unroll
        for (int r = 0; r < 16; ++r) tq[r] = to_float(raw.q[r]), tk[r] = to_float(raw.k[r]), tp[r] = P[r];
        exact_diagonal(tq, tk, tp, exact, sDiag + x.a * 16 * 16, lane);
      }
    }
    __syncthreads();
    {
      const E* Qt = sm;
      const E* Kt = sm + (kScoreRowKt + kt_row0(mt)) * kPitch;
#pragma unroll
      for (int ks = 0; ks < 4; ++ks) {
        uint32_t af[NP][4];
        ldsm_a<Act, kScorePlane>(af, Qt, ks, mt, lane);
        mma_qk<Act, kScorePlane>(A, af, Kt, ks, mt, nh, lane);
      }
    }
    __syncthreads();
  }

  // rows 16mt + lg (+8), columns 8jt + 2lt (+1): masked, exact diagonal terms added, scaled
  Act* __restrict__ out = static_cast<Act*>(p.scores);
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int i = 16 * mt + lg + 8 * half;
    const RowRun rr = row_run(p, x, t0 + i, 1, 1);
    if (!rr.nvalid) continue;
    Act* orow = out + (rr.pos0 * p.Hq + hq) * int64_t(kChunk);
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      if (u <= mt) {
        const int jt = nh * (mt + 1) + u;
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int j = 8 * jt + 2 * lt + e;
          float val = j <= i ? A[u][2 * half + e] : 0.f;
          if (chunk_exact && j <= i && j >= 16 * mt) val += sDiag[(mt * 16 + (i - 16 * mt)) * 16 + (j - 16 * mt)];
          orow[j] = from_float<Act>(val * p.scale);
        }
      }
    }
  }
}

template <class Act, int NKB>
__global__ void __launch_bounds__(kChunkThreads, 2) gla_scores_kernel(const Params p) {
#if defined(GLA_EMULATE)
  unsigned char* smem_raw = gla_emu::dynamic_smem();
#else
  extern __shared__ __align__(16) unsigned char smem_raw[];
#endif
  scores_block<Act, NKB>(p, blockIdx.x, smem_raw);
}

// ---- prefill v3: the state at every chunk boundary, then the outputs of every chunk in parallel ----
//
// "chunk states" walks each segment (or sequence) forward per (key/value head, 64 key rows, 64 value
// columns) with only the state update S = 2^Γ_C ⊙ S + K̂ᵀV (no queries, no scores): its 64×64 fp32
// tile is 16 registers a thread. Before each chunk it stores S, rounded to the activation type (the
// operand the output's Q̂S reads in v1/v2 too; fp32 for fp32), to p.chunk_state; after the last
// chunk of a sequence it writes the final state. "output" then runs one block per (chunk, query
// head, 64 value columns), all at once: O = scale · Q̂ S_chunk + A V with A from the scores kernel.

// The chunk slot of chunk ci of sequence n (the scores kernel's layout, chunk_slots).
__device__ __forceinline__ int64_t chunk_slot(const Params& p, int64_t n, int64_t ci) {
  return (p.cu ? int64_t(p.chunk_off[n]) : n * int64_t(p.nchunk_dense)) + ci;
}

// A 64×64 tile of a chunk-boundary state (rows = key rows, columns = value columns) moves between
// the workspace and the kernels in 16-byte pieces: piece idx = tid + 256·it is row idx / kPerRow,
// columns kVec·(idx % kPerRow) + [0, kVec), so a warp's accesses are whole 128- or 256-byte rows.
// Vector accesses need d_v to be a multiple of kVec (every row then starts 16-byte aligned: the
// workspace is 256-byte aligned); otherwise (odd d_v) each element goes alone.
template <class Act>
struct StateTile {
  using Vec = typename std::conditional<sizeof(Act) == 4, float4, uint4>::type;
  static constexpr int kVec = 16 / int(sizeof(Act));
  static constexpr int kPerRow = 64 / kVec;
  static constexpr int kIters = 64 * kPerRow / kChunkThreads;
  static constexpr int kStagePitch = 64 + kVec;  // Act elements per row of a staging tile (16-byte rows)
  Vec w[kIters];
};

template <class Act>
constexpr size_t chunk_states_smem_bytes() {  // K̂ and V planes, the staging tile, sTot, sDC
  return segment_smem_bytes<Act>() + size_t(64) * StateTile<Act>::kStagePitch * sizeof(Act) + size_t(64) * 4;
}

template <class Act>
__device__ __forceinline__ void chunk_states_block(const Params& p, int64_t bx, unsigned char* smem_raw) {
  using OP = Operand<Act>;
  using E = typename OP::E;
  using ST = StateTile<Act>;
  constexpr int NP = OP::kPlanes;
  constexpr int kPlane = 2 * 64 * kPitch;  // K̂ then V
  E* sm = reinterpret_cast<E*>(smem_raw);
  Act* sStage = reinterpret_cast<Act*>(smem_raw + size_t(NP) * kPlane * 2);  // the state, for coalesced stores
  float* sTot = reinterpret_cast<float*>(smem_raw + size_t(NP) * kPlane * 2 + size_t(64) * ST::kStagePitch * sizeof(Act));
  float* sDC = sTot + 4 * 64;

  const int tid = int(threadIdx.x), lane = tid & 31, warp = tid >> 5;
  const int mt = warp & 3, nh = warp >> 2, lg = lane >> 2, lt = lane & 3;
  const int vb = int(bx % p.nvb);
  bx /= p.nvb;
  const int kb = int(bx % p.nkb);
  bx /= p.nkb;
  const int h = int(bx % p.Hkv);
  const int64_t slot = bx / p.Hkv;
  int64_t n, s, nseg, slot0;
  if (!find_segment(p, slot, n, s, nseg, slot0)) return;  // uniform over the block

  ChunkCtx x;
  sequence_bounds(p, n, x.bos, x.len);
  x.h = h;
  x.hq = h * p.G;
  x.c = tid & 63;
  x.a = tid >> 6;
  x.gam = gamma_log2(p, h);
  const int64_t t_begin = p.seg_len ? s * p.seg_len : 0;
  const int64_t t_end = p.seg_len && s + 1 < nseg ? (s + 1) * p.seg_len : x.len;
  const int64_t nchunks = t_end > t_begin ? (t_end - t_begin + kChunk - 1) / kChunk : 0;
  const int vcol = vb * kBV + x.c, vrow0 = x.a;

  // this thread's accumulators: rows kb*64 + 16mt + lg (+8), columns vb*64 + 32nh + 8nt + 2lt (+1)
  float S[4][4];
  {
    const int64_t base_h0 = (n * p.Hkv + h) * int64_t(p.K) * p.V;
    const int64_t base_ws = (slot * p.Hkv + h) * int64_t(p.K) * p.V;
    load_state_acc(p, S, base_h0, base_ws, p.seg_len != 0, kb, vb, mt, nh, lg, lt);
  }

  Raw<Act> raw;
  raw.nv = raw.ng = 0;
  if (nchunks > 0) {
    load_qkg<Act>(p, x, raw, t_begin, kb, false);
    load_v<Act>(p, x, raw, t_begin, vcol, vrow0);
  }
  Act* __restrict__ hc = static_cast<Act*>(p.chunk_state);
  const int64_t cs0 = chunk_slot(p, n, t_begin / kChunk);
  const bool vec = p.V % ST::kVec == 0;
  for (int64_t ci = 0; ci < nchunks; ++ci) {
    // the state at this chunk's start: to the staging tile now, to the workspace after the barrier
#pragma unroll
    for (int nt = 0; nt < 4; ++nt)
#pragma unroll
      for (int half = 0; half < 2; ++half)
        store_pair(sStage + (16 * mt + lg + 8 * half) * ST::kStagePitch + 32 * nh + 8 * nt + 2 * lt, S[nt][2 * half],
                   S[nt][2 * half + 1]);
    float P[16];
    decay_sums(raw, x.gam, P);
    sTot[x.a * 64 + x.c] = P[15];
    __syncthreads();
    {  // the staging tile to the workspace (read before the next chunk's first barrier: rewritten after it)
      const int64_t base = ((cs0 + ci) * p.Hkv + h) * int64_t(p.K) * p.V;
#pragma unroll
      for (int it = 0; it < ST::kIters; ++it) {
        const int idx = tid + kChunkThreads * it, r = idx / ST::kPerRow, cv = (idx % ST::kPerRow) * ST::kVec;
        const int row = kb * 64 + r, col = vb * kBV + cv;
        if (row >= p.K || col >= p.V) continue;
        Act* dst = hc + base + int64_t(row) * p.V + col;
        const Act* src = sStage + r * ST::kStagePitch + cv;
        if (vec) {
          *reinterpret_cast<typename ST::Vec*>(dst) = *reinterpret_cast<const typename ST::Vec*>(src);
        } else {
          for (int u = 0; u < ST::kVec && col + u < p.V; ++u) dst[u] = src[u];
        }
      }
    }
    float after = 0.f, total = 0.f;
#pragma unroll
    for (int b = 0; b < 4; ++b) {
      const float tb = sTot[b * 64 + x.c];
      if (b > x.a) after += tb;
      total += tb;
    }
    if (x.a == 0) sDC[x.c] = fast_exp2(total);
    E* Kh = sm;
    E* Vs = sm + 64 * kPitch;
#pragma unroll
    for (int r = 0; r < 16; ++r) {
      const int row = 16 * x.a + r;
      put<Act, kPlane>(Kh + row * kPitch + x.c, to_float(raw.k[r]) * fast_exp2(P[15] - P[r] + after));
      put<Act, kPlane>(Vs + (vrow0 + 4 * r) * kPitch + x.c, to_float(raw.v[r]));
    }
    if (ci + 1 < nchunks) {
      load_qkg<Act>(p, x, raw, t_begin + (ci + 1) * kChunk, kb, false);
      load_v<Act>(p, x, raw, t_begin + (ci + 1) * kChunk, vcol, vrow0);
    }
    __syncthreads();
    decay_state_acc(S, sDC, mt, lg);
    mma_kv<Act, kPlane>(S, Kh, Vs, mt, nh, lane);
    // No barrier here: before the next chunk's first barrier a warp writes only the staging tile
    // and sTot, which nobody reads after this chunk's second barrier; K̂, V and sDC are rewritten
    // only past the next first barrier, which no warp reaches before every warp is done with
    // these products.
  }

  // the final state, from the sequence's last segment
  if (s + 1 == nseg) store_state_acc(p, S, (n * p.Hkv + h) * int64_t(p.K) * p.V, kb, vb, mt, nh, lg, lt);
}

// v3's first launch: blocks [0, nstates) walk the chunk states, the rest compute the scores (which
// need no state), so the short scores blocks fill the walks' last wave instead of a launch of their own.
template <class Act>
constexpr size_t states_scores_smem_bytes() {
  return chunk_states_smem_bytes<Act>() > scores_smem_bytes<Act>() ? chunk_states_smem_bytes<Act>()
                                                                   : scores_smem_bytes<Act>();
}

template <class Act, int NKB>
__global__ void __launch_bounds__(kChunkThreads, 2) gla_states_scores_kernel(const Params p, const int64_t nstates) {
#if defined(GLA_EMULATE)
  unsigned char* smem_raw = gla_emu::dynamic_smem();
#else
  extern __shared__ __align__(16) unsigned char smem_raw[];
#endif
  const int64_t bx = blockIdx.x;
  if (bx < nstates) chunk_states_block<Act>(p, bx, smem_raw);
  else scores_block<Act, NKB>(p, bx - nstates, smem_raw);
}

// Output: one block per (chunk slot, query head, 64 value columns). Per key block: Q̂ = q 2^Γ_i and
// the chunk's start state (rows of the key block) to shared memory, O += Q̂ S; then O = scale·O + A V
// with the chunk's scores (already masked and scaled by the scores kernel). Q̂ is q 2^(Γ_i − Γ at the
// sub-chunk's start), computed before the barrier (q and g die there), times 2^(the earlier
// sub-chunks' decay) after it: one fp32 rounding more than v2's single exponential. The Q̂ and S
// tiles are double-buffered and the next key block's S (and, where the registers allow, its q and g:
// output_prefetches_qg) is loaded while this one's products run: two barriers a key block.
constexpr int kOutRowA = 0, kOutRowV = 64, kOutRowQh = 128, kOutRowS = 256, kOutPlane = 384 * kPitch;  // Q̂, S: 2 × 64 rows

template <class Act>
constexpr size_t output_smem_bytes() {
  return size_t(Operand<Act>::kPlanes) * kOutPlane * 2 + size_t(2 * 4 * 64) * 4;  // A, V, 2 Q̂, 2 S; 2 sTot
}

// The state tile of key block kb into registers (zeros past d_k; only when d_v allows vector loads)
template <class Act>
__device__ __forceinline__ void load_state_tile(const Params& p, StateTile<Act>& st, const Act* hc, int kb, int vb, int tid) {
  using ST = StateTile<Act>;
#pragma unroll
  for (int it = 0; it < ST::kIters; ++it) {
    const int idx = tid + kChunkThreads * it, r = idx / ST::kPerRow, cv = (idx % ST::kPerRow) * ST::kVec;
    const int row = kb * kBK + r, col = vb * kBV + cv;
    if (row < p.K && col < p.V) st.w[it] = *reinterpret_cast<const typename ST::Vec*>(hc + int64_t(row) * p.V + col);
    else st.w[it] = typename ST::Vec{};
  }
}

// ... and from there (or, when d_v does not allow vector loads, element by element from hc) into
// the S tile at `dst` (row 0 of the tile)
template <class Act>
__device__ __forceinline__ void put_state_tile(const Params& p, const StateTile<Act>& st, bool vec, const Act* hc, int kb,
                                               int vb, int tid, typename Operand<Act>::E* dst) {
  using ST = StateTile<Act>;
#pragma unroll
  for (int it = 0; it < ST::kIters; ++it) {
    const int idx = tid + kChunkThreads * it, r = idx / ST::kPerRow, cv = (idx % ST::kPerRow) * ST::kVec;
    typename Operand<Act>::E* d = dst + r * kPitch + cv;
    if (vec) {
      if constexpr (sizeof(Act) == 4) {
        const float4 f = st.w[it];
        put<Act, kOutPlane>(d + 0, f.x);
        put<Act, kOutPlane>(d + 1, f.y);
        put<Act, kOutPlane>(d + 2, f.z);
        put<Act, kOutPlane>(d + 3, f.w);
      } else {
        *reinterpret_cast<uint4*>(d) = st.w[it];  // E is Act: the bits as they are
      }
    } else {
      const int row = kb * kBK + r, col = vb * kBV + cv;
      for (int u = 0; u < ST::kVec; ++u) {
        const bool in = row < p.K && col + u < p.V;
        put<Act, kOutPlane>(d + u, in ? to_float(hc[int64_t(in ? row : 0) * p.V + (in ? col + u : 0)]) : 0.f);
      }
    }
  }
}

// Whether the output kernel loads the next key block's q and g during this one's products: with
// 16-bit activations on sm_90 that fits 128 registers (two blocks an SM) without spills; fp32, and
// sm_80-class devices, spill 28-36 bytes with it, so there the loads come at the top of each key block.
template <class Act>
__device__ constexpr bool output_prefetches_qg() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
  return false;
#else
  return sizeof(Act) == 2;
#endif
}

template <class Act>
__global__ void __launch_bounds__(kChunkThreads, 2) gla_output_kernel(const Params p) {
  using OP = Operand<Act>;
  using E = typename OP::E;
  constexpr int NP = OP::kPlanes;
#if defined(GLA_EMULATE)
  unsigned char* smem_raw = gla_emu::dynamic_smem();
#else
  extern __shared__ __align__(16) unsigned char smem_raw[];
#endif
  E* sm = reinterpret_cast<E*>(smem_raw);
  float* sTot = reinterpret_cast<float*>(smem_raw + size_t(NP) * kOutPlane * 2);  // [2][4 * 64]

  const int tid = int(threadIdx.x), lane = tid & 31, warp = tid >> 5;
  const int mt = warp & 3, nh = warp >> 2, lg = lane >> 2, lt = lane & 3;
  int64_t bx = blockIdx.x;
  const int vb = int(bx % p.nvb);
  bx /= p.nvb;
  const int hq = int(bx % p.Hq);
  const int64_t cslot = bx / p.Hq;
  int64_t n, ci, nch, slot0;
  if (!find_segment(chunk_slots(p), cslot, n, ci, nch, slot0)) return;  // uniform over the block
  ChunkCtx x;
  sequence_bounds(p, n, x.bos, x.len);
  const int64_t t0 = ci * kChunk;
  if (t0 >= x.len) return;  // an empty sequence's slot
  x.hq = hq;
  x.h = hq / p.G;
  x.c = tid & 63;
  x.a = tid >> 6;
  x.gam = gamma_log2(p, x.h);
  const int vcol = vb * kBV + x.c, vrow0 = x.a;
  const Act* hc = static_cast<const Act*>(p.chunk_state) + (cslot * p.Hkv + x.h) * int64_t(p.K) * p.V;
  const bool vec = p.V % StateTile<Act>::kVec == 0;

  // the scores and V of the chunk: tiles of their own, covered by the first key block's barrier
  Raw<Act> raw;
  StateTile<Act> st;
  load_a<Act>(p, x, raw, t0);
  load_v<Act>(p, x, raw, t0, vcol, vrow0);
  {
    E* myA = sm + (kOutRowA + 16 * x.a) * kPitch + x.c;
    E* myV = sm + (kOutRowV + vrow0) * kPitch + x.c;
#pragma unroll
    for (int r = 0; r < 16; ++r) {
      put<Act, kOutPlane>(myA + r * kPitch, to_float(raw.a[r]));
      put<Act, kOutPlane>(myV + 4 * r * kPitch, to_float(raw.v[r]));
    }
  }

  constexpr bool kPrefetchQG = output_prefetches_qg<Act>();
  if constexpr (kPrefetchQG) load_qkg<Act>(p, x, raw, t0, 0, true, false);  // after A and V: fewer registers at once
  if (vec) load_state_tile<Act>(p, st, hc, 0, vb, tid);
  float O[4][4];
#pragma unroll
  for (int u = 0; u < 4; ++u)
#pragma unroll
    for (int e = 0; e < 4; ++e) O[u][e] = 0.f;

#pragma unroll 1
  for (int kb = 0; kb < p.nkb; ++kb) {
    const int buf = kb & 1;
    if constexpr (!kPrefetchQG) load_qkg<Act>(p, x, raw, t0, kb, true, false);
    // q 2^Γ within this thread's sub-chunk now (q and g die here); the earlier sub-chunks' decay after the barrier
    float qe[16];
    float run = 0.f;
#pragma unroll
    for (int r = 0; r < 16; ++r) {
      run += raw.decay(r, x.gam);
      qe[r] = to_float(raw.q[r]) * fast_exp2(run);
    }
    sTot[buf * 256 + x.a * 64 + x.c] = run;
    put_state_tile<Act>(p, st, vec, hc, kb, vb, tid, sm + (kOutRowS + 64 * buf) * kPitch);
    __syncthreads();
    float before = 0.f;
#pragma unroll
    for (int b = 0; b < 4; ++b)
      if (b < x.a) before += sTot[buf * 256 + b * 64 + x.c];
    E* const myQh = sm + (kOutRowQh + 64 * buf + 16 * x.a) * kPitch + x.c;
    const float e_before = fast_exp2(before);
#pragma unroll
    for (int r = 0; r < 16; ++r) put<Act, kOutPlane>(myQh + r * kPitch, qe[r] * e_before);
    if (kb + 1 < p.nkb) {  // the next key block's inputs arrive during the products
      if constexpr (kPrefetchQG) load_qkg<Act>(p, x, raw, t0, kb + 1, true, false);
      if (vec) load_state_tile<Act>(p, st, hc, kb + 1, vb, tid);
    }
    __syncthreads();
    // O += Q̂ S. No barrier after: the next key block writes the other buffers, and the one after
    // writes these only past the next block's second barrier, which no warp reaches before every
    // warp has finished these products.
    mma_rows<Act, kOutPlane, false>(O, sm + (kOutRowQh + 64 * buf) * kPitch, sm + (kOutRowS + 64 * buf) * kPitch, mt, nh, lane);
  }

  scale_tiles(O, p.scale);
  mma_rows<Act, kOutPlane, true>(O, sm + kOutRowA * kPitch, sm + kOutRowV * kPitch, mt, nh, lane);
  store_out<Act>(p, x, t0, vb, mt, nh, lg, lt, O);
}

// ---- segment state: each segment's own contribution, from a zero state --------------------------

template <class Act>
__global__ void __launch_bounds__(kChunkThreads) gla_segment_state_kernel(const Params p) {
  using OP = Operand<Act>;
  using E = typename OP::E;
  constexpr int NP = OP::kPlanes;
  constexpr int kPlane = 2 * 64 * kPitch;  // K̂ then V
#if defined(GLA_EMULATE)
  unsigned char* smem_raw = gla_emu::dynamic_smem();
#else
  extern __shared__ __align__(16) unsigned char smem_raw[];
#endif
  E* sm = reinterpret_cast<E*>(smem_raw);
  float* sTot = reinterpret_cast<float*>(smem_raw + size_t(NP) * kPlane * 2);

  const int tid = int(threadIdx.x), lane = tid & 31, warp = tid >> 5;
  const int mt = warp & 3, nh = warp >> 2, lg = lane >> 2, lt = lane & 3;
  int64_t bx = blockIdx.x;
  const int vb = int(bx % p.nvb);
  bx /= p.nvb;
  const int kb = int(bx % p.nkb);
  bx /= p.nkb;
  const int h = int(bx % p.Hkv);
  const int64_t slot = bx / p.Hkv;
  int64_t n, s, nseg, slot0;
  if (!find_segment(p, slot, n, s, nseg, slot0)) return;

  ChunkCtx x;
  sequence_bounds(p, n, x.bos, x.len);
  x.h = h;
  x.hq = h * p.G;
  x.c = tid & 63;
  x.a = tid >> 6;
  x.gam = gamma_log2(p, h);
  const int64_t t_begin = s * p.seg_len;
  const int64_t t_end = s + 1 < nseg ? (s + 1) * p.seg_len : x.len;
  const int64_t nchunks = t_end > t_begin ? (t_end - t_begin + kChunk - 1) / kChunk : 0;
  const int vcol = vb * kBV + x.c, vrow0 = x.a;

  float S[4][4];
#pragma unroll
  for (int nt = 0; nt < 4; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) S[nt][e] = 0.f;
  float carry = 0.f;  // log2 decay from the end of the current chunk to the end of the segment

  Raw<Act> raw;
  raw.nv = raw.ng = 0;
  // walk backwards: the decay to the segment's end is a suffix sum
  if (nchunks > 0) {
    load_qkg<Act>(p, x, raw, t_begin + (nchunks - 1) * kChunk, kb, false);
    load_v<Act>(p, x, raw, t_begin + (nchunks - 1) * kChunk, vcol, vrow0);
  }
  for (int64_t ci = nchunks - 1; ci >= 0; --ci) {
    float P[16];
    decay_sums(raw, x.gam, P);
    sTot[x.a * 64 + x.c] = P[15];
    __syncthreads();
    float after = 0.f, total = 0.f;
#pragma unroll
    for (int b = 0; b < 4; ++b) {
      const float tb = sTot[b * 64 + x.c];
      if (b > x.a) after += tb;
      total += tb;
    }
    E* Kh = sm;
    E* Vs = sm + 64 * kPitch;
#pragma unroll
    for (int r = 0; r < 16; ++r) {
      const int row = 16 * x.a + r;
      put<Act, kPlane>(Kh + row * kPitch + x.c, to_float(raw.k[r]) * fast_exp2(P[15] - P[r] + after + carry));
      put<Act, kPlane>(Vs + (vrow0 + 4 * r) * kPitch + x.c, to_float(raw.v[r]));
    }
    carry += total;
    if (ci > 0) {
      load_qkg<Act>(p, x, raw, t_begin + (ci - 1) * kChunk, kb, false);
      load_v<Act>(p, x, raw, t_begin + (ci - 1) * kChunk, vcol, vrow0);
    }
    __syncthreads();
    mma_kv<Act, kPlane>(S, Kh, Vs, mt, nh, lane);
    __syncthreads();
  }

  const int64_t base = (slot * p.Hkv + h) * int64_t(p.K) * p.V;
  for_state_acc(kb, vb, mt, nh, lg, lt, [&](int nt, int e, int row, int col) {
    if (row < p.K && col < p.V) p.seg_state[base + int64_t(row) * p.V + col] = S[nt][e];
  });
  const int krow = kb * 64 + x.c;
  if (vb == 0 && x.a == 0 && krow < p.K) p.seg_decay[(slot * p.Hkv + h) * int64_t(p.K) + krow] = carry;
}

// (Non-template functions here are static: every per-dtype translation unit has its own copy.)

// ---- segment scan: every segment's start state --------------------------------------------------

static __global__ void __launch_bounds__(256) gla_segment_scan_kernel(const Params p) {
  const int64_t KV = int64_t(p.K) * p.V;
  const int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= p.N * p.Hkv * KV) return;
  const int64_t kv = e % KV, nh = e / KV;
  const int h = int(nh % p.Hkv);
  const int64_t n = nh / p.Hkv;
  const int row = int(kv / p.V);
  int64_t slot0, nseg;
  if (p.cu) {
    slot0 = p.seg_off[n];
    nseg = p.seg_off[n + 1] - slot0;
  } else {
    nseg = p.nseg_dense;
    slot0 = n * nseg;
  }
  float run = p.h0 ? load_any(p.h0, e, p.state_dt) : 0.f;
  // the loads do not depend on the running state: issue a batch of them, then chain
  constexpr int kBatch = 8;
  for (int64_t s0 = 0; s0 < nseg; s0 += kBatch) {
    float own[kBatch], dec[kBatch];
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      const int64_t slot = slot0 + s0 + u;
      const bool ok = s0 + u < nseg;
      own[u] = ok ? p.seg_state[(slot * p.Hkv + h) * KV + kv] : 0.f;
      dec[u] = ok ? p.seg_decay[(slot * p.Hkv + h) * int64_t(p.K) + row] : 0.f;
    }
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      if (s0 + u < nseg) {
        const int64_t slot = slot0 + s0 + u;
        p.seg_state[(slot * p.Hkv + h) * KV + kv] = run;
        run = fast_exp2(dec[u]) * run + own[u];
      }
    }
  }
}

// ---- segment offsets (cu_seqlens): seg_off[n] = Σ_{m<n} max(1, ceil(len_m / seg_len)) ----------

static __global__ void __launch_bounds__(1024) gla_segment_offsets_kernel(const Params p) {
#if defined(GLA_EMULATE)
  int* buf = reinterpret_cast<int*>(gla_emu::dynamic_smem());
#else
  extern __shared__ __align__(16) unsigned char smem_raw[];
  int* buf = reinterpret_cast<int*>(smem_raw);
#endif
  const int tid = int(threadIdx.x), nt = int(blockDim.x);
  int carry = 0;
  if (tid == 0) p.seg_off[0] = 0;
  for (int64_t base = 0; base < p.N; base += nt) {
    const int64_t n = base + tid;
    int cnt = 0;
    if (n < p.N) {
      int64_t bos, len;
      sequence_bounds(p, n, bos, len);
      const int64_t c = (len + p.seg_len - 1) / p.seg_len;
      cnt = c < 1 ? 1 : int(c);
    }
    buf[tid] = cnt;
    __syncthreads();
    for (int off = 1; off < nt; off <<= 1) {  // inclusive scan (Hillis-Steele)
      const int add = tid >= off ? buf[tid - off] : 0;
      __syncthreads();
      buf[tid] += add;
      __syncthreads();
    }
    if (n < p.N) p.seg_off[n + 1] = carry + buf[tid];
    carry += buf[nt - 1];
    __syncthreads();
  }
}

}  // namespace cuda
}  // namespace gla
