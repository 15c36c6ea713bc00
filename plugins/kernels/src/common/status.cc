// Status names, dtype helpers, the per-thread error message and Problem validation: everything in
// the kernel core that is neither CPU nor CUDA arithmetic.
#include <cmath>
#include <cstdarg>
#include <cstdio>

#include "common/error.h"
#include "gla/kernels.h"

namespace gla {
namespace {

thread_local char g_last_error[512] = "";

}  // namespace

namespace detail {

Status fail(Status status, const char* fmt, ...) {
  va_list args;
  va_start(args, fmt);
  std::vsnprintf(g_last_error, sizeof(g_last_error), fmt, args);
  va_end(args);
  return status;
}

void clear_error() { g_last_error[0] = '\0'; }

}  // namespace detail

const char* last_error_message() { return g_last_error; }

const char* dtype_name(DType dtype) {
  switch (dtype) {
    case DType::kFloat32: return "float32";
    case DType::kFloat16: return "float16";
    case DType::kBFloat16: return "bfloat16";
  }
  return "unknown";
}

const char* status_name(Status status) {
  switch (status) {
    case Status::kOk: return "ok";
    case Status::kInvalidArgument: return "invalid argument";
    case Status::kUnsupported: return "unsupported";
    case Status::kCudaError: return "CUDA error";
    case Status::kWorkspaceTooSmall: return "workspace too small";
    case Status::kInternal: return "internal error";
  }
  return "unknown status";
}

size_t dtype_size(DType dtype) {
  switch (dtype) {
    case DType::kFloat32: return 4;
    case DType::kFloat16:
    case DType::kBFloat16: return 2;
  }
  return 0;
}

namespace {

bool valid_dtype(DType d) { return d == DType::kFloat32 || d == DType::kFloat16 || d == DType::kBFloat16; }
bool is_flag(int32_t v) { return v == 0 || v == 1; }

}  // namespace

Status validate(const Problem& p) {
  using detail::fail;
  constexpr Status kBad = Status::kInvalidArgument;
  // Far beyond any model; keeps every index product well inside int64.
  constexpr int64_t kMaxHeadDim = 1 << 14;
  constexpr int64_t kMaxHeads = 1 << 16;

  if (p.batch < 0) return fail(kBad, "batch must be >= 0, got %lld", (long long)p.batch);
  if (p.seq_len < 0) return fail(kBad, "seq_len must be >= 0, got %lld", (long long)p.seq_len);
  if (p.kv_heads <= 0 || p.kv_heads > kMaxHeads)
    return fail(kBad, "kv_heads must be in [1, %lld], got %d", (long long)kMaxHeads, p.kv_heads);
  if (p.q_heads <= 0 || p.q_heads > kMaxHeads || p.q_heads % p.kv_heads != 0)
    return fail(kBad, "q_heads must be a positive multiple of kv_heads=%d, got %d", p.kv_heads, p.q_heads);
  if (p.head_dim_k <= 0 || p.head_dim_k > kMaxHeadDim)
    return fail(kBad, "head_dim_k must be in [1, %lld], got %d", (long long)kMaxHeadDim, p.head_dim_k);
  if (p.head_dim_v <= 0 || p.head_dim_v > kMaxHeadDim)
    return fail(kBad, "head_dim_v must be in [1, %lld], got %d", (long long)kMaxHeadDim, p.head_dim_v);
  if (!valid_dtype(p.act_dtype)) return fail(kBad, "act_dtype %d is not a known dtype", (int)p.act_dtype);
  if (!valid_dtype(p.state_dtype)) return fail(kBad, "state_dtype %d is not a known dtype", (int)p.state_dtype);
  if (!valid_dtype(p.g_gamma_dtype)) return fail(kBad, "g_gamma_dtype %d is not a known dtype", (int)p.g_gamma_dtype);
  const struct { const char* name; int32_t value; } flags[] = {
      {"has_gate", p.has_gate},
      {"gate_per_head", p.gate_per_head},
      {"has_past_state", p.has_past_state},
      {"has_cu_seqlens", p.has_cu_seqlens},
      {"cu_seqlens_int64", p.cu_seqlens_int64},
      {"has_g_gamma", p.has_g_gamma},
      {"reverse", p.reverse},
  };
  for (const auto& f : flags)
    if (!is_flag(f.value)) return fail(kBad, "%s must be 0 or 1, got %d", f.name, f.value);
  if (p.gate_per_head && !p.has_gate) return fail(kBad, "gate_per_head=1 needs has_gate=1");
  if (p.has_cu_seqlens) {
    if (p.batch != 1) return fail(kBad, "with cu_seqlens the batch must be 1, got %lld", (long long)p.batch);
    if (p.num_seqs < 1)
      return fail(kBad, "with cu_seqlens num_seqs must be >= 1 (cu_seqlens has num_seqs+1 entries), got %lld",
                  (long long)p.num_seqs);
  } else if (p.num_seqs != p.batch) {
    return fail(kBad, "without cu_seqlens num_seqs must equal batch=%lld, got %lld", (long long)p.batch,
                (long long)p.num_seqs);
  }
  if (!std::isfinite(p.scale)) return fail(kBad, "scale must be finite, got %g", (double)p.scale);
  // Element counts of the largest tensors must fit int64 comfortably.
  const double elems = double(p.batch) * double(p.seq_len) * double(p.q_heads) *
                       double(p.head_dim_k > p.head_dim_v ? p.head_dim_k : p.head_dim_v);
  const double state = double(p.num_seqs) * double(p.kv_heads) * double(p.head_dim_k) * double(p.head_dim_v);
  if (elems > 4e18 || state > 4e18) return fail(kBad, "the tensors are too large to index");
  return Status::kOk;
}

}  // namespace gla
