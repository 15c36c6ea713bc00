// cuda_forward's body: the checks of the call, then the kernels of the activation type. Included
// by gla_cuda.cu and by the tests' CPU emulation (emu/emu_capi.cc); the kernels of each activation
// type are compiled in gla_cuda_<type>.cu (declared extern here, so a parallel build compiles the
// three sets at once).
#pragma once

#include "cuda/forward.cuh"

namespace gla {
namespace cuda {

#if !defined(GLA_EMULATE)
extern template Status run<float>(Plan, const Params&, unsigned char*, stream_t);
extern template Status run<__half>(Plan, const Params&, unsigned char*, stream_t);
extern template Status run<bf16>(Plan, const Params&, unsigned char*, stream_t);
#endif

inline Status forward(const Problem& pr, const Tensors& t, void* workspace, size_t workspace_bytes, stream_t stream) {
  using detail::fail;
  constexpr Status kBad = Status::kInvalidArgument;
  detail::clear_error();
  if (Status st = validate(pr); st != Status::kOk) return st;
  // activations may be null when there are none (B * T == 0); the states never are
  const bool no_acts = pr.batch * pr.seq_len == 0;
  const struct {
    const char* name;
    const void* ptr;
    bool needed;
  } ptrs[] = {
      {"query", t.query, !no_acts},
      {"key", t.key, !no_acts},
      {"value", t.value, !no_acts},
      {"gate", t.gate, pr.has_gate != 0 && !no_acts},
      {"past_state", t.past_state, pr.has_past_state != 0 && pr.num_seqs > 0},
      {"cu_seqlens", t.cu_seqlens, pr.has_cu_seqlens != 0},
      {"g_gamma", t.g_gamma, pr.has_g_gamma != 0},
      {"output", t.output, !no_acts},
      {"present_state", t.present_state, pr.num_seqs > 0},
  };
  for (const auto& x : ptrs)
    if (x.needed && !x.ptr) return fail(kBad, "%s is null (the problem says it is present)", x.name);
  const Plan pl = make_plan(pr);
  if (pl.workspace > 0) {
    if (!workspace || workspace_bytes < pl.workspace)
      return fail(Status::kWorkspaceTooSmall, "the workspace has %zu bytes, this problem needs %zu (cuda_workspace_bytes)",
                  workspace ? workspace_bytes : size_t(0), pl.workspace);
    if (reinterpret_cast<uintptr_t>(workspace) % kAlign != 0)
      return fail(kBad, "the workspace must be %zu-byte aligned", kAlign);
  }
  if (pr.num_seqs == 0) return Status::kOk;

  Params p{};
  p.q = t.query;
  p.k = t.key;
  p.v = t.value;
  p.g = pr.has_gate ? t.gate : nullptr;
  p.h0 = pr.has_past_state ? t.past_state : nullptr;
  p.cu = pr.has_cu_seqlens ? t.cu_seqlens : nullptr;
  p.gamma = pr.has_g_gamma ? t.g_gamma : nullptr;
  p.o = t.output;
  p.ht = t.present_state;
  p.T = pr.seq_len;
  p.N = pr.num_seqs;
  p.Hq = pr.q_heads;
  p.Hkv = pr.kv_heads;
  p.G = pr.q_heads / pr.kv_heads;
  p.K = pr.head_dim_k;
  p.V = pr.head_dim_v;
  p.state_dt = pr.state_dtype;
  p.gamma_dt = pr.g_gamma_dtype;
  p.has_gate = pr.has_gate;
  p.gate_per_head = pr.gate_per_head;
  p.cu64 = pr.cu_seqlens_int64;
  p.reverse = pr.reverse;
  p.scale = pr.scale != 0.f ? pr.scale : 1.f / std::sqrt(float(pr.head_dim_k));
  const size_t state_align = pr.state_dtype == DType::kFloat32 ? 16 : 8;
  p.vec_state = pr.head_dim_v % 4 == 0 && reinterpret_cast<uintptr_t>(t.present_state) % state_align == 0 &&
                reinterpret_cast<uintptr_t>(t.past_state) % state_align == 0;
  const size_t act_size = dtype_size(pr.act_dtype);
  p.vec_out = pr.head_dim_v % 2 == 0 && reinterpret_cast<uintptr_t>(t.output) % (2 * act_size) == 0;
  // grid sizes stay within one dimension of a launch
  const int64_t blocks = std::max({pl.slots * std::max<int64_t>(pr.q_heads, int64_t(pr.kv_heads) * pl.nkb) * pl.nvb,
                                   pr.num_seqs * pr.kv_heads * pl.rnvb, pl.cslots * pr.q_heads * pl.nvb,
                                   pl.slots * pr.kv_heads * pl.nkb * pl.nvb + pl.cslots * pr.q_heads});  // v3's first launch
  if (blocks > int64_t(0x7fffffff))
    return fail(Status::kUnsupported, "the problem needs %lld blocks, more than one launch can hold", (long long)blocks);

  unsigned char* ws = static_cast<unsigned char*>(workspace);
  switch (pr.act_dtype) {
    case DType::kFloat16: return run<__half>(pl, p, ws, static_cast<stream_t>(stream));
    case DType::kBFloat16: return run<bf16>(pl, p, ws, static_cast<stream_t>(stream));
    default: return run<float>(pl, p, ws, static_cast<stream_t>(stream));
  }
}

}  // namespace cuda
}  // namespace gla
