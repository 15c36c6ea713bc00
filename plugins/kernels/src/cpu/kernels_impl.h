// The CPU hot loops, written once and compiled once per instruction set: kernels_generic.cc,
// kernels_avx2.cc and kernels_avx512.cc define
//   GLA_CPU_ISA   the namespace of this build (generic, avx2, avx512)
//   GLA_MR/NV     the GEMM register tile: GLA_MR rows x GLA_NV vectors of 16 floats
//   GLA_REC_GB/NB the step-by-step tile: GLA_REC_GB query heads x GLA_REC_NB vectors of 16 floats
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
//   as matrix products. Every exponential stays ≤ 1 except on the diagonal sub-chunks (below),
//   so nothing overflows for a decay g ≤ 0, however strong:
//   - the intra-chunk scores are computed per sub-chunk a of kSub rows with the pivot n = its first
//     row: q_i e^{Γ_i − Γ_n} (≤ 1) times k_j e^{Γ_n − Γ_j}, which is ≤ 1 for every earlier
//     sub-chunk (j < n). For j in the sub-chunk itself it is ≥ 1, bounded by e^{range} where range
//     is how far Γ falls across the sub-chunk; when that exceeds kMaxDiagRange the diagonal block is
//     computed pair by pair instead (exact, slower, only for extreme decays).
//   - the carried state is read by (q_i e^{Γ_i − Γ_n}) e^{Γ_n}: two factors ≤ 1.
#include <cmath>
#include <cstdint>
#include <cstring>

#include "cpu/plan.h"

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

// dst[0..n) = src[off..off+n) as float32
inline void load_row(float* __restrict dst, const void* src, int64_t off, DType dt, int64_t n) {
  switch (dt) {
    case DType::kFloat32:
      std::memcpy(dst, static_cast<const float*>(src) + off, size_t(n) * 4);
      break;
    case DType::kFloat16: {
      const uint16_t* __restrict s = static_cast<const uint16_t*>(src) + off;
      for (int64_t i = 0; i < n; ++i) dst[i] = half_to_float(s[i]);
      break;
    }
    case DType::kBFloat16: {
      const uint16_t* __restrict s = static_cast<const uint16_t*>(src) + off;
      for (int64_t i = 0; i < n; ++i) dst[i] = bf16_to_float(s[i]);
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
      for (int64_t i = 0; i < n; ++i) d[i] = float_to_half(src[i] * mul);
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

// ---- GEMM ----------------------------------------------------------------------------------------
// C[M x N] (= or +=) A[M x K] B[K x N] with A(i, p) = a[i*ars + p*acs] (any strides: its elements
// are broadcast), B and C row-major, N a multiple of 16. `lower`: A(i, p) = 0 for p > i, so a row
// tile reduces only up to its last row (the zeros above the diagonal must still be stored in A up
// to the tile's last row).

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

// Runs the unit's steps one by one on a state block read from S_in and written to S_out (they may
// be the same buffer, or the caller's past/present state rows directly).
void run_steps(const Job& job, const Unit& u, const float* S_in, int64_t ld_in, float* S_out, int64_t ld_out,
               float* scratch) {
  const Problem& p = job.p;
  const Plan& pl = job.plan;
  const int64_t dk = pl.dk, dv = pl.dv, G = pl.G, Hq = p.q_heads, Hkv = p.kv_heads;
  float* kr = scratch + pl.off_KTr;
  float* dr = scratch + pl.off_GT;
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
    for (int64_t g0 = 0; g0 < G; g0 += GLA_REC_GB) {
      const int64_t heads = G - g0 < GLA_REC_GB ? G - g0 : GLA_REC_GB;
      const bool update = g0 == 0;
      // later groups of heads read the block the first group has just updated
      const float* src = update ? (s == 0 ? S_in : S_out) : S_out;
      const int64_t ld_src = update ? (s == 0 ? ld_in : ld_out) : ld_out;
      step_heads_upto<GLA_REC_GB>(heads, dk, u.vwp, src, ld_src, S_out, ld_out, update, kr, dr, vr, qr + g0 * dk,
                                  o + g0 * u.vwp, u.vwp);
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
  float* KTr = scratch + pl.off_KTr;  // [dk][Cp] raw keys, transposed; later k_j e^{Γ_last − Γ_j}
  float* GT = scratch + pl.off_GT;    // [dk][Cp] Γ transposed
  float* Gm = scratch + pl.off_Gm;    // [C][dk]  Γ
  float* Q = scratch + pl.off_Q;      // [G][C][dk] queries, scaled in place
  float* KT = scratch + pl.off_KT;    // [dk][Cp] keys scaled for one sub-chunk's pivot
  float* V = scratch + pl.off_V;      // [C][vwp]
  float* A = scratch + pl.off_A;      // [G][C][Cp] intra-chunk scores, lower triangular
  float* O = scratch + pl.off_O;      // [G][C][vwp]
  float* row = scratch + pl.off_tmp;  // [dk] scratch rows
  float* row2 = row + dk;
  float* row3 = row2 + dk;

  for (int64_t c0 = 0; c0 < u.len; c0 += C) {
    const int64_t L = u.len - c0 < C ? u.len - c0 : C;

    // ---- load the chunk: keys and Γ transposed, values padded, queries per head
    for (int64_t i = 0; i < L; ++i) {
      const int64_t r = row_of(job, u, c0 + i);
      load_row(row, job.t.key, (r * Hkv + u.h) * dk, p.act_dtype, dk);
      for (int64_t k = 0; k < dk; ++k) KTr[k * Cp + i] = row[k];
      log_decay_row(job, u, r, row);
      float* gi = Gm + i * dk;
      if (i == 0) {
        for (int64_t k = 0; k < dk; ++k) gi[k] = row[k];
      } else {
        const float* gprev = gi - dk;
        for (int64_t k = 0; k < dk; ++k) gi[k] = gprev[k] + row[k];
      }
      for (int64_t k = 0; k < dk; ++k) GT[k * Cp + i] = gi[k];
      load_row(V + i * vwp, job.t.value, (r * Hkv + u.h) * dv + u.v0, p.act_dtype, u.vw);
      zero(V + i * vwp + u.vw, vwp - u.vw);
      for (int64_t g = 0; g < G; ++g)
        load_row(Q + (g * C + i) * dk, job.t.query, (r * Hq + u.h * G + g) * dk, p.act_dtype, dk);
    }

    // ---- intra-chunk scores, one sub-chunk of rows at a time
    for (int64_t n = 0; n < L; n += kSub) {
      const int64_t e = L - n < kSub ? L : n + kSub;  // rows [n, e)
      const int64_t wp = round_up(e, kLane);          // score columns computed: [0, wp)
      const float* Gn = Gm + n * dk;
      const float* Ge = Gm + (e - 1) * dk;
      float range = 0.f;
      for (int64_t k = 0; k < dk; ++k) range = Gn[k] - Ge[k] > range ? Gn[k] - Ge[k] : range;
      const bool diag_safe = range <= kMaxDiagRange;
      const int64_t jmax = diag_safe ? e : n;

      for (int64_t k = 0; k < dk; ++k) {
        const float* kt = KTr + k * Cp;
        const float* gt = GT + k * Cp;
        float* out = KT + k * Cp;
        const float gn = Gn[k];
        for (int64_t j = 0; j < jmax; ++j) out[j] = kt[j] * exp_f32(gn - gt[j]);
        for (int64_t j = jmax; j < wp; ++j) out[j] = 0.f;
      }
      for (int64_t i = n; i < e; ++i) {
        const float* gi = Gm + i * dk;
        for (int64_t k = 0; k < dk; ++k) row[k] = exp_f32(gi[k] - Gn[k]);
        for (int64_t g = 0; g < G; ++g) {
          float* qi = Q + (g * C + i) * dk;
          for (int64_t k = 0; k < dk; ++k) qi[k] *= row[k];
        }
      }
      for (int64_t g = 0; g < G; ++g)
        gemm(e - n, wp, dk, Q + (g * C + n) * dk, dk, 1, KT, Cp, A + (g * C + n) * Cp, Cp, false);
      for (int64_t g = 0; g < G; ++g)
        for (int64_t i = n; i < e; ++i) zero(A + (g * C + i) * Cp + i + 1, Cp - i - 1);

      if (!diag_safe) {
        // exact, pair by pair: sum_k q_i k_j e^{Γ_i − Γ_j} with every factor ≤ 1
        for (int64_t g = 0; g < G; ++g) {
          for (int64_t i = n; i < e; ++i) {
            const int64_t r = row_of(job, u, c0 + i);
            load_row(row2, job.t.query, (r * Hq + u.h * G + g) * dk, p.act_dtype, dk);
            const float* gi = Gm + i * dk;
            for (int64_t j = n; j <= i; ++j) {
              const float* gj = Gm + j * dk;
              for (int64_t k = 0; k < dk; ++k) row3[k] = KTr[k * Cp + j] * exp_f32(gi[k] - gj[k]);
              A[(g * C + i) * Cp + j] = dot(row2, row3, dk);
            }
          }
        }
      }

      // these rows now read the carried state: (q_i e^{Γ_i − Γ_n}) e^{Γ_n}
      for (int64_t k = 0; k < dk; ++k) row[k] = exp_f32(Gn[k]);
      for (int64_t g = 0; g < G; ++g)
        for (int64_t i = n; i < e; ++i) {
          float* qi = Q + (g * C + i) * dk;
          for (int64_t k = 0; k < dk; ++k) qi[k] *= row[k];
        }
    }

    // ---- outputs: carried state, then the chunk itself
    for (int64_t g = 0; g < G; ++g) {
      float* Og = O + g * C * vwp;
      gemm(L, vwp, dk, Q + g * C * dk, dk, 1, S, vwp, Og, vwp, false);
      gemm(L, vwp, L, A + g * C * Cp, Cp, 1, V, vwp, Og, vwp, true, /*lower=*/true);
      for (int64_t i = 0; i < L; ++i) {
        const int64_t r = row_of(job, u, c0 + i);
        store_row(job.t.output, (r * Hq + u.h * G + g) * dv + u.v0, Og + i * vwp, job.scale, p.act_dtype, u.vw);
      }
    }

    // ---- the state after the chunk
    const float* Gl = Gm + (L - 1) * dk;
    for (int64_t k = 0; k < dk; ++k) {
      const float gl = Gl[k];
      const float decay = exp_f32(gl);
      float* Sk = S + k * vwp;
      for (int64_t j = 0; j < vwp; ++j) Sk[j] *= decay;
      float* kt = KTr + k * Cp;
      const float* gt = GT + k * Cp;
      for (int64_t j = 0; j < L; ++j) kt[j] *= exp_f32(gl - gt[j]);
    }
    gemm(dk, vwp, L, KTr, Cp, 1, V, vwp, S, vwp, true);
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
