// The CPU hot loops, written once and compiled once per instruction set: kernels_generic.cc,
// kernels_avx2.cc, kernels_avx512.cc (x86-64) and kernels_neon.cc (aarch64) define
//   GLA_CPU_ISA   the namespace of this build (generic, avx2, avx512)
//   GLA_MR/NV     the GEMM register tile: GLA_MR rows x GLA_NV vectors of 16 floats
//   GLA_REC_GB/NB the step-by-step tile: GLA_REC_GB query heads x GLA_REC_NB vectors of 16 floats
//   GLA_CPU_NEON  (aarch64 only) convert float16/bfloat16 rows with NEON instructions
// and include this file. Plain C++ with GCC/Clang vector extensions (V16 = 16 floats): the compiler
// maps V16 to one zmm, two ymm, or four xmm / NEON registers, so the same code vectorises on every
// target. Nothing here allocates; every buffer lives in the slot's scratch (plan.h).
//
// Two algorithms per work unit (one sequence, one key/value head, one block of value columns):
//
// * step by step (short sequences, decode): per step, per state row i,
//       S[i, :] = exp(g[i]) S[i, :] + k[i] v,      o_h += q_h[i] S[i, :]
//   one pass over the state, all the query heads of the group read it while it is in registers.
//
// * chunked (long sequences): chunks of kChunk steps, Γ the running sum of the log decay inside a
//   chunk (Γ_i includes step i), so with S the state before the chunk
//       o_i   = scale (q_i ⊙ e^{Γ_i}) S + scale Σ_{j≤i} (q_i · (k_j ⊙ e^{Γ_i − Γ_j})) v_j
//       S_out = e^{Γ_last} ⊙ S + Σ_j (k_j ⊙ e^{Γ_last − Γ_j})ᵀ v_j
//   as matrix products, with every factor that can be tiny kept ≤ 1, so nothing overflows or
//   loses its exponent range for a decay g ≤ 0, however strong. The scores use sub-chunks of
//   kSub rows: keys are taken as k_j e^{Γ_m(b) − Γ_j} (≤ 1) with m(b) the last row of j's
//   sub-chunk b, queries as q_i e^{Γ_i − Γ_m(a)} (≥ 1, but at most e^{range} where range is how far
//   Γ falls across i's sub-chunk a), and e^{Γ_m(a) − Γ_m(b)} (≤ 1) in between for b < a. When a
//   sub-chunk's range exceeds kMaxDiagRange its queries pivot on its first row instead (every
//   factor ≤ 1) and its diagonal block is computed pair by pair (exact, slower, extreme decays
//   only). The carried state and the state update reuse the same pivoted rows times one factor.
//   Exponentials: about 2 per key dimension and step, all in contiguous rows.
#include <cmath>
#include <cstdint>
#include <cstring>

#include "cpu/plan.h"

#if defined(GLA_CPU_NEON)
#include <arm_neon.h>
#endif

namespace gla {
namespace cpu {
namespace GLA_CPU_ISA {
namespace {

typedef float V16 __attribute__((vector_size(64)));

// Largest fall of Γ across a diagonal sub-chunk for which k_j e^{Γ_n − Γ_j} is safe to form:
// e^60 ≈ 1e26 leaves 12 orders of magnitude of fp32 range for |k|.
constexpr float kMaxDiagRange = 60.f;

inline V16 vload(const float* p) {
  V16 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void vstore(float* p, V16 v) { std::memcpy(p, &v, sizeof v); }

inline float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

// e^x in float32, ~1 ulp (Cephes' polynomial), branch-free so that loops over it vectorise.
// e^x for x < -87.3 is 0 (it would be subnormal), NaN stays NaN.
inline float exp_f32(float x) {
  const float lo = -87.33654475f, hi = 88.37626266f;
  const float xc = x < lo ? lo : (x > hi ? hi : x);
  const float n = (xc * 1.44269504088896341f + 12582912.f) - 12582912.f;  // round to nearest
  const float r = xc - n * 0.693359375f - n * -2.12194440e-4f;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r * r + r + 1.f;
  const float e = y * bits_to_float(uint32_t(int32_t(n) + 127) << 23);
  const float z = x < lo ? 0.f : e;
  return x != x ? x : z;
}

// ---- dtype conversion (bit-exact, round to nearest even, vectorisable) ---------------------------

inline float half_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  const uint32_t em = h & 0x7fffu;
  const uint32_t shifted = em << 13;
  // rebias the exponent by a multiplication: right for normal and subnormal halves alike
  const uint32_t finite = float_to_bits(bits_to_float(shifted) * 0x1p112f);
  const uint32_t out = em >= 0x7c00u ? (shifted | 0x7f800000u) : finite;
  return bits_to_float(out | sign);
}

inline uint16_t float_to_half(float f) {
  uint32_t x = float_to_bits(f);
  const uint32_t sign = x & 0x80000000u;
  x ^= sign;
  const uint32_t inf_nan = x > 0x7f800000u ? 0x7e00u : 0x7c00u;
  // subnormal halves: let the float adder round, with 0.5f as the magic addend
  const uint32_t sub = float_to_bits(bits_to_float(x) + 0.5f) - 0x3f000000u;
  const uint32_t odd = (x >> 13) & 1u;
  const uint32_t normal = (x + 0xc8000fffu + odd) >> 13;  // 0xc8000000 = (15 - 127) << 23
  const uint32_t out = x >= 0x47800000u ? inf_nan : (x < 0x38800000u ? sub : normal);
  return uint16_t(out | (sign >> 16));
}

inline float bf16_to_float(uint16_t h) { return bits_to_float(uint32_t(h) << 16); }

inline uint16_t float_to_bf16(float f) {
  const uint32_t x = float_to_bits(f);
  const uint32_t rounded = (x + 0x7fffu + ((x >> 16) & 1u)) >> 16;
  const uint32_t quiet_nan = (x >> 16) | 0x40u;
  return uint16_t((x & 0x7fffffffu) > 0x7f800000u ? quiet_nan : rounded);
}

#if defined(GLA_CPU_NEON)
// FCVTL/FCVTN round to nearest even, like the portable conversions above, and Linux leaves the
// flush-to-zero bits of FPCR clear, so subnormal halves convert exactly; only a NaN's payload may
// differ (FCVTN keeps its top bits, float_to_half returns the canonical quiet NaN).
inline void half_row_to_float(float* __restrict dst, const uint16_t* __restrict s, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const float16x8_t h = vreinterpretq_f16_u16(vld1q_u16(s + i));
    vst1q_f32(dst + i, vcvt_f32_f16(vget_low_f16(h)));
    vst1q_f32(dst + i + 4, vcvt_high_f32_f16(h));
  }
  for (; i < n; ++i) dst[i] = half_to_float(s[i]);
}

inline void bf16_row_to_float(float* __restrict dst, const uint16_t* __restrict s, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const uint16x8_t h = vld1q_u16(s + i);
    vst1q_f32(dst + i, vreinterpretq_f32_u32(vshll_n_u16(vget_low_u16(h), 16)));
    vst1q_f32(dst + i + 4, vreinterpretq_f32_u32(vshll_high_n_u16(h, 16)));
  }
  for (; i < n; ++i) dst[i] = bf16_to_float(s[i]);
}

inline void float_row_to_half(uint16_t* __restrict d, const float* __restrict src, float mul, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const float16x4_t lo = vcvt_f16_f32(vmulq_n_f32(vld1q_f32(src + i), mul));
    const float16x8_t h = vcvt_high_f16_f32(lo, vmulq_n_f32(vld1q_f32(src + i + 4), mul));
    vst1q_u16(d + i, vreinterpretq_u16_f16(h));
  }
  for (; i < n; ++i) d[i] = float_to_half(src[i] * mul);
}
#endif

// dst[0..n) = src[off..off+n) as float32
inline void load_row(float* __restrict dst, const void* src, int64_t off, DType dt, int64_t n) {
  switch (dt) {
    case DType::kFloat32:
      std::memcpy(dst, static_cast<const float*>(src) + off, size_t(n) * 4);
      break;
    case DType::kFloat16: {
      const uint16_t* __restrict s = static_cast<const uint16_t*>(src) + off;
#if defined(GLA_CPU_NEON)
      half_row_to_float(dst, s, n);
#else
      for (int64_t i = 0; i < n; ++i) dst[i] = half_to_float(s[i]);
#endif
      break;
    }
    case DType::kBFloat16: {
      const uint16_t* __restrict s = static_cast<const uint16_t*>(src) + off;
#if defined(GLA_CPU_NEON)
      bf16_row_to_float(dst, s, n);
#else
      for (int64_t i = 0; i < n; ++i) dst[i] = bf16_to_float(s[i]);
#endif
      break;
    }
  }
}

inline float load_one(const void* src, int64_t off, DType dt) {
  float x;
  load_row(&x, src, off, dt, 1);
  return x;
}

// dst[off..off+n) = mul * src[0..n) in dt
inline void store_row(void* dst, int64_t off, const float* __restrict src, float mul, DType dt, int64_t n) {
  switch (dt) {
    case DType::kFloat32: {
      float* __restrict d = static_cast<float*>(dst) + off;
      for (int64_t i = 0; i < n; ++i) d[i] = src[i] * mul;
      break;
    }
    case DType::kFloat16: {
      uint16_t* __restrict d = static_cast<uint16_t*>(dst) + off;
#if defined(GLA_CPU_NEON)
      float_row_to_half(d, src, mul, n);
#else
      for (int64_t i = 0; i < n; ++i) d[i] = float_to_half(src[i] * mul);
#endif
      break;
    }
    case DType::kBFloat16: {
      uint16_t* __restrict d = static_cast<uint16_t*>(dst) + off;
      for (int64_t i = 0; i < n; ++i) d[i] = float_to_bf16(src[i] * mul);
      break;
    }
  }
}

inline void zero(float* p, int64_t n) {
  for (int64_t i = 0; i < n; ++i) p[i] = 0.f;
}

inline float dot(const float* __restrict a, const float* __restrict b, int64_t n) {
  V16 acc0 = {}, acc1 = {};
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    acc0 += vload(a + i) * vload(b + i);
    acc1 += vload(a + i + 16) * vload(b + i + 16);
  }
  for (; i + 16 <= n; i += 16) acc0 += vload(a + i) * vload(b + i);
  acc0 += acc1;
  float s = 0.f;
  for (int l = 0; l < 16; ++l) s += acc0[l];
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

// ---- transpose -----------------------------------------------------------------------------------

#if defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 12)
#define GLA_SHUFFLE(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
typedef int32_t I16 __attribute__((vector_size(64)));
#define GLA_SHUFFLE(a, b, ...) __builtin_shuffle(a, b, I16{__VA_ARGS__})
#endif

// Swaps the off-diagonal B x B blocks of every 2B x 2B block of a 16 x 16 tile held in r[16];
// B = 1, 2, 4, 8 in turn transposes the tile.
template <int B>
inline void swap_blocks(V16* r);

#define GLA_SWAP_LEVEL(B, LO, HI)                      \
  template <>                                          \
  inline void swap_blocks<B>(V16 * r) {                \
    for (int i = 0; i < 16; ++i) {                     \
      if (i & B) continue;                             \
      const V16 a = r[i], c = r[i + B];                \
      r[i] = GLA_SHUFFLE(a, c, LO);                    \
      r[i + B] = GLA_SHUFFLE(a, c, HI);                \
    }                                                  \
  }
#define GLA_IDX(...) __VA_ARGS__
GLA_SWAP_LEVEL(1, GLA_IDX(0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30),
               GLA_IDX(1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31))
GLA_SWAP_LEVEL(2, GLA_IDX(0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29),
               GLA_IDX(2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31))
GLA_SWAP_LEVEL(4, GLA_IDX(0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27),
               GLA_IDX(4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31))
GLA_SWAP_LEVEL(8, GLA_IDX(0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23),
               GLA_IDX(8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31))
#undef GLA_SWAP_LEVEL
#undef GLA_IDX

// dst[c * ldd + r] = src[r * lds + c] for r < rows, c < cols; both multiples of 16.
inline void transpose(const float* __restrict src, int64_t lds, float* __restrict dst, int64_t ldd, int64_t rows,
                      int64_t cols) {
  for (int64_t r0 = 0; r0 < rows; r0 += 16) {
    for (int64_t c0 = 0; c0 < cols; c0 += 16) {
      V16 t[16];
      for (int i = 0; i < 16; ++i) t[i] = vload(src + (r0 + i) * lds + c0);
      swap_blocks<1>(t);
      swap_blocks<2>(t);
      swap_blocks<4>(t);
      swap_blocks<8>(t);
      for (int i = 0; i < 16; ++i) vstore(dst + (c0 + i) * ldd + r0, t[i]);
    }
  }
}

// ---- GEMM ----------------------------------------------------------------------------------------
// C[M x N] (= or +=) A[M x K] B[K x N] with A(i, p) = a[i*ars + p*acs] (any strides: its elements
// are broadcast), B and C row-major, N a multiple of 16. `lower`: A(i, p) = 0 for p > i, so a row
// tile reduces only up to its last row (the zeros above the diagonal must still be stored in A up
// to the tile's last row).

#if defined(GLA_CPU_NEON)
// NEON: GCC keeps arrays of 64-byte generic vectors in memory on aarch64 (the accumulators went
// to the stack on every step of K), so the register tiles are written with float32x4_t, which it
// keeps in registers once the constant loops are unrolled.
template <int MR, int NV>
inline void micro_tile(int64_t K, const float* __restrict a, int64_t ars, int64_t acs, const float* __restrict b,
                       int64_t ldb, float* __restrict c, int64_t ldc, bool accumulate) {
  constexpr int NQ = 4 * NV;  // float32x4_t per row of the tile
  float32x4_t acc[MR][NQ];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 8
    for (int j = 0; j < NQ; ++j) acc[i][j] = accumulate ? vld1q_f32(c + i * ldc + 4 * j) : vdupq_n_f32(0.f);
  for (int64_t p = 0; p < K; ++p) {
    float32x4_t bv[NQ];
#pragma GCC unroll 8
    for (int j = 0; j < NQ; ++j) bv[j] = vld1q_f32(b + p * ldb + 4 * j);
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const float av = a[i * ars + p * acs];
#pragma GCC unroll 8
      for (int j = 0; j < NQ; ++j) acc[i][j] = vfmaq_n_f32(acc[i][j], bv[j], av);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 8
    for (int j = 0; j < NQ; ++j) vst1q_f32(c + i * ldc + 4 * j, acc[i][j]);
}
#else
template <int MR, int NV>
inline void micro_tile(int64_t K, const float* __restrict a, int64_t ars, int64_t acs, const float* __restrict b,
                       int64_t ldb, float* __restrict c, int64_t ldc, bool accumulate) {
  V16 acc[MR][NV];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NV; ++j) acc[i][j] = accumulate ? vload(c + i * ldc + 16 * j) : V16{};
  for (int64_t p = 0; p < K; ++p) {
    V16 bv[NV];
    for (int j = 0; j < NV; ++j) bv[j] = vload(b + p * ldb + 16 * j);
    for (int i = 0; i < MR; ++i) {
      const float av = a[i * ars + p * acs];
      for (int j = 0; j < NV; ++j) acc[i][j] += av * bv[j];
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NV; ++j) vstore(c + i * ldc + 16 * j, acc[i][j]);
}
#endif

template <int NV, int R>
inline void micro_rows(int64_t rows, int64_t K, const float* a, int64_t ars, int64_t acs, const float* b, int64_t ldb,
                       float* c, int64_t ldc, bool accumulate) {
  if (rows == R) {
    micro_tile<R, NV>(K, a, ars, acs, b, ldb, c, ldc, accumulate);
  } else if constexpr (R > 1) {
    micro_rows<NV, R - 1>(rows, K, a, ars, acs, b, ldb, c, ldc, accumulate);
  }
}

void gemm(int64_t M, int64_t N, int64_t K, const float* a, int64_t ars, int64_t acs, const float* b, int64_t ldb,
          float* c, int64_t ldc, bool accumulate, bool lower = false) {
  for (int64_t i0 = 0; i0 < M; i0 += GLA_MR) {
    const int64_t rows = M - i0 < GLA_MR ? M - i0 : GLA_MR;
    const int64_t kk = lower ? (i0 + rows < K ? i0 + rows : K) : K;
    const float* ai = a + i0 * ars;
    float* ci = c + i0 * ldc;
    int64_t j0 = 0;
    for (; j0 + 16 * GLA_NV <= N; j0 += 16 * GLA_NV)
      micro_rows<GLA_NV, GLA_MR>(rows, kk, ai, ars, acs, b + j0, ldb, ci + j0, ldc, accumulate);
    for (; j0 < N; j0 += 16) micro_rows<1, GLA_MR>(rows, kk, ai, ars, acs, b + j0, ldb, ci + j0, ldc, accumulate);
  }
}

// ---- one work unit -------------------------------------------------------------------------------

struct Unit {
  int64_t n, h;        // sequence (state row) and key/value head
  int64_t v0, vw, vwp; // value columns [v0, v0 + vw), padded width
  int64_t b, bos, len; // batch row and the sequence's extent along T
  float gamma;         // g_gamma[h], or 0
};

// Flat row index (b * T + t) of step s of the unit's sequence, honouring `reverse`.
inline int64_t row_of(const Job& job, const Unit& u, int64_t s) {
  const int64_t t = job.p.reverse ? u.bos + u.len - 1 - s : u.bos + s;
  return u.b * job.p.seq_len + t;
}

// A log decay below this is this: e^-100 is already 0 in float32, and keeping Γ finite keeps
// differences of running sums defined after a full reset (g = -inf), where -inf - -inf is NaN.
constexpr float kMinLogDecay = -100.f;

// log decay of row r for head h, per key dimension: gate + g_gamma, clamped at kMinLogDecay
inline void log_decay_row(const Job& job, const Unit& u, int64_t r, float* __restrict dst) {
  const Problem& p = job.p;
  const int64_t dk = p.head_dim_k;
  if (!p.has_gate) {
    for (int64_t k = 0; k < dk; ++k) dst[k] = u.gamma;
  } else if (p.gate_per_head) {
    const float g = load_one(job.t.gate, r * p.kv_heads + u.h, p.act_dtype) + u.gamma;
    for (int64_t k = 0; k < dk; ++k) dst[k] = g;
  } else {
    load_row(dst, job.t.gate, (r * p.kv_heads + u.h) * dk, p.act_dtype, dk);
    if (p.has_g_gamma)
      for (int64_t k = 0; k < dk; ++k) dst[k] += u.gamma;
  }
  for (int64_t k = 0; k < dk; ++k) dst[k] = dst[k] < kMinLogDecay ? kMinLogDecay : dst[k];
}

// Step-by-step tile: GB query heads x NB vectors of value columns starting at column j.
// With `update`, S_in rows are decayed, take k v and go to S_out; without, S_in is already updated.
#if defined(GLA_CPU_NEON)
template <int GB, int NB>
inline void step_tile(int64_t dk, const float* S_in, int64_t ld_in, float* S_out, int64_t ld_out, bool update,
                      const float* __restrict kr, const float* __restrict dr, const float* __restrict vr,
                      const float* __restrict q, float* __restrict o, int64_t ldo, int64_t j) {
  constexpr int NQ = 4 * NB;
  float32x4_t acc[GB][NQ];
  float32x4_t vv[NQ];
#pragma GCC unroll 8
  for (int c = 0; c < NQ; ++c) vv[c] = vld1q_f32(vr + j + 4 * c);
#pragma GCC unroll 8
  for (int g = 0; g < GB; ++g)
#pragma GCC unroll 8
    for (int c = 0; c < NQ; ++c) acc[g][c] = vdupq_n_f32(0.f);
  for (int64_t i = 0; i < dk; ++i) {
    float32x4_t s[NQ];
#pragma GCC unroll 8
    for (int c = 0; c < NQ; ++c) s[c] = vld1q_f32(S_in + i * ld_in + j + 4 * c);
    if (update) {
      const float di = dr[i], ki = kr[i];
#pragma GCC unroll 8
      for (int c = 0; c < NQ; ++c) {
        s[c] = vfmaq_n_f32(vmulq_n_f32(s[c], di), vv[c], ki);
        vst1q_f32(S_out + i * ld_out + j + 4 * c, s[c]);
      }
    }
#pragma GCC unroll 8
    for (int g = 0; g < GB; ++g) {
      const float qi = q[g * dk + i];
#pragma GCC unroll 8
      for (int c = 0; c < NQ; ++c) acc[g][c] = vfmaq_n_f32(acc[g][c], s[c], qi);
    }
  }
#pragma GCC unroll 8
  for (int g = 0; g < GB; ++g)
#pragma GCC unroll 8
    for (int c = 0; c < NQ; ++c) vst1q_f32(o + g * ldo + j + 4 * c, acc[g][c]);
}
#else
template <int GB, int NB>
inline void step_tile(int64_t dk, const float* S_in, int64_t ld_in, float* S_out, int64_t ld_out, bool update,
                      const float* __restrict kr, const float* __restrict dr, const float* __restrict vr,
                      const float* __restrict q, float* __restrict o, int64_t ldo, int64_t j) {
  V16 acc[GB][NB];
  V16 vv[NB];
  for (int c = 0; c < NB; ++c) vv[c] = vload(vr + j + 16 * c);
  for (int g = 0; g < GB; ++g)
    for (int c = 0; c < NB; ++c) acc[g][c] = V16{};
  for (int64_t i = 0; i < dk; ++i) {
    V16 s[NB];
    for (int c = 0; c < NB; ++c) s[c] = vload(S_in + i * ld_in + j + 16 * c);
    if (update) {
      const float di = dr[i], ki = kr[i];
      for (int c = 0; c < NB; ++c) {
        s[c] = s[c] * di + ki * vv[c];
        vstore(S_out + i * ld_out + j + 16 * c, s[c]);
      }
    }
    for (int g = 0; g < GB; ++g) {
      const float qi = q[g * dk + i];
      for (int c = 0; c < NB; ++c) acc[g][c] += qi * s[c];
    }
  }
  for (int g = 0; g < GB; ++g)
    for (int c = 0; c < NB; ++c) vstore(o + g * ldo + j + 16 * c, acc[g][c]);
}
#endif

template <int GB>
inline void step_heads(int64_t dk, int64_t vwp, const float* S_in, int64_t ld_in, float* S_out, int64_t ld_out,
                       bool update, const float* kr, const float* dr, const float* vr, const float* q, float* o,
                       int64_t ldo) {
  int64_t j = 0;
  for (; j + 16 * GLA_REC_NB <= vwp; j += 16 * GLA_REC_NB)
    step_tile<GB, GLA_REC_NB>(dk, S_in, ld_in, S_out, ld_out, update, kr, dr, vr, q, o, ldo, j);
  for (; j < vwp; j += 16) step_tile<GB, 1>(dk, S_in, ld_in, S_out, ld_out, update, kr, dr, vr, q, o, ldo, j);
}

template <int GB>
inline void step_heads_upto(int64_t heads, int64_t dk, int64_t vwp, const float* S_in, int64_t ld_in, float* S_out,
                            int64_t ld_out, bool update, const float* kr, const float* dr, const float* vr,
                            const float* q, float* o, int64_t ldo) {
  if (heads == GB) {
    step_heads<GB>(dk, vwp, S_in, ld_in, S_out, ld_out, update, kr, dr, vr, q, o, ldo);
  } else if constexpr (GB > 1) {
    step_heads_upto<GB - 1>(heads, dk, vwp, S_in, ld_in, S_out, ld_out, update, kr, dr, vr, q, o, ldo);
  }
}

// One step, row by row in address order, for a state read once from memory (a decode step): the
// outputs accumulate in L1 instead of registers, and the state streams through with whole rows,
// which the prefetchers follow (column tiles would visit every row once per tile).
void step_streaming(int64_t dk, int64_t vwp, int64_t G, const float* S_in, int64_t ld_in, float* S_out,
                    int64_t ld_out, const float* __restrict kr, const float* __restrict dr,
                    const float* __restrict vr, const float* __restrict q, float* __restrict o) {
  zero(o, G * vwp);
  for (int64_t i = 0; i < dk; ++i) {
    const float di = dr[i], ki = kr[i];
    const float* si = S_in + i * ld_in;
    float* so = S_out + i * ld_out;
#if defined(GLA_CPU_NEON)
    for (int64_t j = 0; j < vwp; j += 4) {
      const float32x4_t sv = vfmaq_n_f32(vmulq_n_f32(vld1q_f32(si + j), di), vld1q_f32(vr + j), ki);
      vst1q_f32(so + j, sv);
      for (int64_t g = 0; g < G; ++g)
        vst1q_f32(o + g * vwp + j, vfmaq_n_f32(vld1q_f32(o + g * vwp + j), sv, q[g * dk + i]));
    }
#else
    for (int64_t j = 0; j < vwp; j += 16) {
      const V16 sv = vload(si + j) * di + ki * vload(vr + j);
      vstore(so + j, sv);
      for (int64_t g = 0; g < G; ++g) vstore(o + g * vwp + j, vload(o + g * vwp + j) + q[g * dk + i] * sv);
    }
#endif
  }
}

// Runs the unit's steps one by one on a state block read from S_in and written to S_out (they may
// be the same buffer, or the caller's past/present state rows directly).
void run_steps(const Job& job, const Unit& u, const float* S_in, int64_t ld_in, float* S_out, int64_t ld_out,
               float* scratch) {
  const Problem& p = job.p;
  const Plan& pl = job.plan;
  const int64_t dk = pl.dk, dv = pl.dv, G = pl.G, Hq = p.q_heads, Hkv = p.kv_heads;
  float* kr = scratch + pl.off_Kr;
  float* dr = scratch + pl.off_Gm;
  float* vr = scratch + pl.off_V;
  float* qr = scratch + pl.off_Q;
  float* o = scratch + pl.off_O;
  zero(vr + u.vw, u.vwp - u.vw);
  for (int64_t s = 0; s < u.len; ++s) {
    const int64_t r = row_of(job, u, s);
    load_row(kr, job.t.key, (r * Hkv + u.h) * dk, p.act_dtype, dk);
    log_decay_row(job, u, r, dr);
    for (int64_t k = 0; k < dk; ++k) dr[k] = exp_f32(dr[k]);
    load_row(vr, job.t.value, (r * Hkv + u.h) * dv + u.v0, p.act_dtype, u.vw);
    for (int64_t g = 0; g < G; ++g) load_row(qr + g * dk, job.t.query, (r * Hq + u.h * G + g) * dk, p.act_dtype, dk);
    if (u.len == 1) {
      step_streaming(dk, u.vwp, G, S_in, ld_in, S_out, ld_out, kr, dr, vr, qr, o);
    } else {
      for (int64_t g0 = 0; g0 < G; g0 += GLA_REC_GB) {
        const int64_t heads = G - g0 < GLA_REC_GB ? G - g0 : GLA_REC_GB;
        const bool update = g0 == 0;
        // later groups of heads read the block the first group has just updated
        const float* src = update ? (s == 0 ? S_in : S_out) : S_out;
        const int64_t ld_src = update ? (s == 0 ? ld_in : ld_out) : ld_out;
        step_heads_upto<GLA_REC_GB>(heads, dk, u.vwp, src, ld_src, S_out, ld_out, update, kr, dr, vr, qr + g0 * dk,
                                    o + g0 * u.vwp, u.vwp);
      }
    }
    for (int64_t g = 0; g < G; ++g)
      store_row(job.t.output, (r * Hq + u.h * G + g) * dv + u.v0, o + g * u.vwp, job.scale, p.act_dtype, u.vw);
  }
}

// The chunked form (see the top of this file) on the fp32 state block S [dk][vwp].
void run_chunks(const Job& job, const Unit& u, float* S, float* scratch) {
  const Problem& p = job.p;
  const Plan& pl = job.plan;
  const int64_t dk = pl.dk, dv = pl.dv, G = pl.G, Hq = p.q_heads, Hkv = p.kv_heads;
  const int64_t C = kChunk, Cp = round_up(kChunk, kLane), vwp = u.vwp;
  const int64_t dkp = round_up(dk, kLane);
  constexpr int64_t kMaxSubs = kChunk / kSub;
  static_assert(kSub == 16, "sub-chunks are one vector of score columns");
  float* Kh = scratch + pl.off_Kr;    // [C][dkp]  k_j e^{Γ_m(b) − Γ_j}, row-major
  float* KhT = scratch + pl.off_KTr;  // [dkp][Cp] the same, transposed; later k_j e^{Γ_last − Γ_j}
  float* Gm = scratch + pl.off_Gm;    // [C][dkp]  Γ
  float* Q = scratch + pl.off_Q;      // [gq][C][dk] queries of one group of heads, scaled in place
  float* KT = scratch + pl.off_KT;    // [dkp][Cp] the keys as sub-chunk a's scores see them
  float* V = scratch + pl.off_V;      // [C][vwp]
  float* A = scratch + pl.off_A;      // [gq][C][Cp] intra-chunk scores, lower triangular
  float* O = scratch + pl.off_O;      // [gq][C][vwp]
  float* M = scratch + pl.off_tmp;    // [kMaxSubs][dkp] e^{Γ_p(a) − Γ_m(b)} for the sub-chunks b < a
  float* row = M + kMaxSubs * dkp;    // [dkp] scratch rows
  float* row2 = row + dkp;
  float* row3 = row2 + dkp;

  for (int64_t c0 = 0; c0 < u.len; c0 += C) {
    const int64_t L = u.len - c0 < C ? u.len - c0 : C;
    const int64_t nsub = (L + kSub - 1) / kSub;

    // ---- load the chunk: keys, Γ (running sum of the log decay), values padded, queries per head
    for (int64_t i = 0; i < L; ++i) {
      const int64_t r = row_of(job, u, c0 + i);
      load_row(Kh + i * dkp, job.t.key, (r * Hkv + u.h) * dk, p.act_dtype, dk);
      log_decay_row(job, u, r, row);
      float* gi = Gm + i * dkp;
      if (i == 0) {
        for (int64_t k = 0; k < dk; ++k) gi[k] = row[k];
      } else {
        const float* gprev = gi - dkp;
        for (int64_t k = 0; k < dk; ++k) gi[k] = gprev[k] + row[k];
      }
      load_row(V + i * vwp, job.t.value, (r * Hkv + u.h) * dv + u.v0, p.act_dtype, u.vw);
      zero(V + i * vwp + u.vw, vwp - u.vw);
    }

    // ---- pivots: keys of sub-chunk b are seen from its last row m(b); queries of sub-chunk a from
    // its last row too (a factor ≥ 1, bounded by the sub-chunk's range) when that range is safe,
    // else from its first row (≤ 1) with the diagonal block computed pair by pair.
    int64_t last[kMaxSubs], pivot[kMaxSubs];
    bool safe[kMaxSubs];
    for (int64_t b = 0; b < nsub; ++b) {
      const int64_t n = b * kSub;
      last[b] = n + kSub - 1 < L - 1 ? n + kSub - 1 : L - 1;
      const float* Gn = Gm + n * dkp;
      const float* Ge = Gm + last[b] * dkp;
      float range = 0.f;
      for (int64_t k = 0; k < dk; ++k) range = Gn[k] - Ge[k] > range ? Gn[k] - Ge[k] : range;
      safe[b] = range <= kMaxDiagRange;
      pivot[b] = safe[b] ? last[b] : n;
    }
    for (int64_t i = 0; i < L; ++i) {
      const int64_t b = i / kSub;
      const float* gi = Gm + i * dkp;
      const float* gm = Gm + last[b] * dkp;
      float* ki = Kh + i * dkp;
      for (int64_t k = 0; k < dk; ++k) ki[k] *= exp_f32(gm[k] - gi[k]);
    }
    // rows [L, 16 nsub) and columns [dk, dkp) of the transpose are never read
    transpose(Kh, dkp, KhT, Cp, nsub * kSub, dkp);

    // ---- the query heads, pl.gq at a time: their scratch (Q, A, O) stays bounded however many
    // query heads share this key/value head
    for (int64_t g0 = 0; g0 < G; g0 += pl.gq) {
    const int64_t gn = G - g0 < pl.gq ? G - g0 : pl.gq;
    for (int64_t i = 0; i < L; ++i) {
      const int64_t r = row_of(job, u, c0 + i);
      const float* gi = Gm + i * dkp;
      const float* gp = Gm + pivot[i / kSub] * dkp;
      for (int64_t k = 0; k < dk; ++k) row[k] = exp_f32(gi[k] - gp[k]);
      for (int64_t g = 0; g < gn; ++g) {
        float* qi = Q + (g * C + i) * dk;
        load_row(qi, job.t.query, (r * Hq + u.h * G + g0 + g) * dk, p.act_dtype, dk);
        for (int64_t k = 0; k < dk; ++k) qi[k] *= row[k];
      }
    }

    // ---- intra-chunk scores, one sub-chunk of rows at a time
    for (int64_t a = 0; a < nsub; ++a) {
      const int64_t n = a * kSub, e = last[a] + 1, w = (a + 1) * kSub;
      const float* gp = Gm + pivot[a] * dkp;
      for (int64_t b = 0; b < a; ++b) {
        const float* gm = Gm + last[b] * dkp;
        float* mb = M + b * dkp;
        for (int64_t k = 0; k < dk; ++k) mb[k] = exp_f32(gp[k] - gm[k]);
      }
      for (int64_t k = 0; k < dk; ++k) {
        const float* src = KhT + k * Cp;
        float* dst = KT + k * Cp;
        for (int64_t b = 0; b < a; ++b) vstore(dst + b * kSub, vload(src + b * kSub) * M[b * dkp + k]);
        vstore(dst + n, safe[a] ? vload(src + n) : V16{});
      }
      for (int64_t g = 0; g < gn; ++g)
        gemm(e - n, w, dk, Q + (g * C + n) * dk, dk, 1, KT, Cp, A + (g * C + n) * Cp, Cp, false);
      for (int64_t g = 0; g < gn; ++g)
        for (int64_t i = n; i < e; ++i) zero(A + (g * C + i) * Cp + i + 1, Cp - i - 1);

      if (!safe[a]) {
        // exact, pair by pair: sum_k q_i k_j e^{Γ_i − Γ_j} with every factor ≤ 1
        for (int64_t j = n; j < e; ++j) {
          const int64_t rj = row_of(job, u, c0 + j);
          load_row(row3, job.t.key, (rj * Hkv + u.h) * dk, p.act_dtype, dk);
          const float* gj = Gm + j * dkp;
          for (int64_t i = j; i < e; ++i) {
            const float* gi = Gm + i * dkp;
            for (int64_t k = 0; k < dk; ++k) row[k] = row3[k] * exp_f32(gi[k] - gj[k]);
            const int64_t ri = row_of(job, u, c0 + i);
            for (int64_t g = 0; g < gn; ++g) {
              load_row(row2, job.t.query, (ri * Hq + u.h * G + g0 + g) * dk, p.act_dtype, dk);
              A[(g * C + i) * Cp + j] = dot(row2, row, dk);
            }
          }
        }
      }

      // these rows now read the carried state: q_i e^{Γ_i} = (q_i e^{Γ_i − Γ_p}) e^{Γ_p}
      for (int64_t k = 0; k < dk; ++k) row[k] = exp_f32(gp[k]);
      for (int64_t g = 0; g < gn; ++g)
        for (int64_t i = n; i < e; ++i) {
          float* qi = Q + (g * C + i) * dk;
          for (int64_t k = 0; k < dk; ++k) qi[k] *= row[k];
        }
    }

    // ---- outputs: carried state, then the chunk itself
    for (int64_t g = 0; g < gn; ++g) {
      float* Og = O + g * C * vwp;
      gemm(L, vwp, dk, Q + g * C * dk, dk, 1, S, vwp, Og, vwp, false);
      gemm(L, vwp, L, A + g * C * Cp, Cp, 1, V, vwp, Og, vwp, true, /*lower=*/true);
      for (int64_t i = 0; i < L; ++i) {
        const int64_t r = row_of(job, u, c0 + i);
        store_row(job.t.output, (r * Hq + u.h * G + g0 + g) * dv + u.v0, Og + i * vwp, job.scale, p.act_dtype, u.vw);
      }
    }
    }  // query-head groups

    // ---- the state after the chunk: e^{Γ_last} S + Σ_j (k_j e^{Γ_last − Γ_j})ᵀ v_j
    const float* Gl = Gm + (L - 1) * dkp;
    for (int64_t b = 0; b < nsub; ++b) {
      const float* gm = Gm + last[b] * dkp;
      float* mb = M + b * dkp;
      for (int64_t k = 0; k < dk; ++k) mb[k] = exp_f32(Gl[k] - gm[k]);
    }
    for (int64_t k = 0; k < dk; ++k) {
      const float decay = exp_f32(Gl[k]);
      float* Sk = S + k * vwp;
      for (int64_t j = 0; j < vwp; j += kLane) vstore(Sk + j, vload(Sk + j) * decay);
      float* kt = KhT + k * Cp;
      for (int64_t b = 0; b < nsub; ++b) vstore(kt + b * kSub, vload(kt + b * kSub) * M[b * dkp + k]);
    }
    gemm(dk, vwp, L, KhT, Cp, 1, V, vwp, S, vwp, true);
  }
}

void run_unit(const Job& job, int64_t unit, float* scratch) {
  const Problem& p = job.p;
  const Plan& pl = job.plan;
  const int64_t dk = pl.dk, dv = pl.dv;

  Unit u;
  const int64_t vblk = unit % pl.nvb;
  u.h = (unit / pl.nvb) % p.kv_heads;
  u.n = unit / (pl.nvb * p.kv_heads);
  u.v0 = vblk * pl.vb;
  u.vw = dv - u.v0 < pl.vb ? dv - u.v0 : pl.vb;
  u.vwp = round_up(u.vw, kLane);
  if (p.has_cu_seqlens) {
    int64_t lo, hi;
    if (p.cu_seqlens_int64) {
      lo = static_cast<const int64_t*>(job.t.cu_seqlens)[u.n];
      hi = static_cast<const int64_t*>(job.t.cu_seqlens)[u.n + 1];
    } else {
      lo = static_cast<const int32_t*>(job.t.cu_seqlens)[u.n];
      hi = static_cast<const int32_t*>(job.t.cu_seqlens)[u.n + 1];
    }
    u.b = 0;
    u.bos = lo;
    u.len = hi - lo;
  } else {
    u.b = u.n;
    u.bos = 0;
    u.len = p.seq_len;
  }
  u.gamma = p.has_g_gamma ? load_one(job.t.g_gamma, u.h, p.g_gamma_dtype) : 0.f;

  const int64_t state_off = (u.n * p.kv_heads + u.h) * dk * dv + u.v0;  // row i at state_off + i * dv
  float* present = static_cast<float*>(job.t.present_state);

  // One fp32 step with fp32 states: read the past rows and write the present rows directly.
  if (u.len == 1 && p.state_dtype == DType::kFloat32 && p.has_past_state && present && u.vw == u.vwp) {
    run_steps(job, u, static_cast<const float*>(job.t.past_state) + state_off, dv, present + state_off, dv, scratch);
    return;
  }

  float* S = scratch + pl.off_S;  // [dk][vwp]
  for (int64_t i = 0; i < dk; ++i) {
    if (p.has_past_state)
      load_row(S + i * u.vwp, job.t.past_state, state_off + i * dv, p.state_dtype, u.vw);
    else
      zero(S + i * u.vwp, u.vw);
    zero(S + i * u.vwp + u.vw, u.vwp - u.vw);
  }
  if (u.len > 0) {
    if (u.len < kRecurrentMaxLen)
      run_steps(job, u, S, u.vwp, S, u.vwp, scratch);
    else
      run_chunks(job, u, S, scratch);
  }
  if (job.t.present_state)
    for (int64_t i = 0; i < dk; ++i) store_row(job.t.present_state, state_off + i * dv, S + i * u.vwp, 1.f, p.state_dtype, u.vw);
}

}  // namespace

void run_slot(const Job& job, int64_t slot) {
  float* scratch = job.scratch + slot * job.plan.slot_floats;
  for (int64_t unit = slot; unit < job.plan.units; unit += job.plan.slots) run_unit(job, unit, scratch);
}

}  // namespace GLA_CPU_ISA
}  // namespace cpu
}  // namespace gla
