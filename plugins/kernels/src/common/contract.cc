// The op's contract (gla/contract.h): input descriptors + attributes -> gla::Problem, or an error
// naming the input and its shape. Every engine calls this; nothing else decides what is valid.
#include "gla/contract.h"

#include <cmath>
#include <cstdio>
#include <cstring>
#include <string>

#include "common/error.h"

namespace gla {
namespace {

using detail::fail;
constexpr Status kBad = Status::kInvalidArgument;

const char* const kGlaInputs[] = {"query", "key", "value", "gate", "past_state", "cu_seqlens", "g_gamma"};
const char* const kLaInputs[] = {"query", "key", "value", "past_state", "decay", "beta"};

// "[2,5,?]"
std::string shape_str(const TensorDesc& d) {
  if (d.rank < 0) return "[unknown rank]";
  std::string s = "[";
  for (int32_t i = 0; i < d.rank && i < kMaxDescRank; ++i) {
    if (i) s += ",";
    s += d.dims[i] < 0 ? std::string("?") : std::to_string(d.dims[i]);
  }
  return s + "]";
}

std::string num(int64_t v) { return v < 0 ? std::string("?") : std::to_string(v); }

bool is_float(int32_t t) {
  return t == int32_t(ElemType::kFloat32) || t == int32_t(ElemType::kFloat16) || t == int32_t(ElemType::kBFloat16);
}
bool is_index(int32_t t) { return t == int32_t(ElemType::kInt32) || t == int32_t(ElemType::kInt64); }

// known and different
bool differs(int64_t got, int64_t want) { return got >= 0 && want >= 0 && got != want; }

// Roles of the positional inputs; -1 when absent.
struct Roles {
  int32_t query = 0, key = 1, value = 2, gate = -1, past_state = -1, cu_seqlens = -1, g_gamma = -1, beta = -1;
};

}  // namespace

const char* op_name(OpKind kind) {
  return kind == OpKind::kLinearAttention ? "LinearAttention" : "GatedLinearAttention";
}
int32_t op_min_inputs(OpKind kind) { return kind == OpKind::kLinearAttention ? 3 : 4; }
int32_t op_max_inputs(OpKind kind) { return kind == OpKind::kLinearAttention ? 6 : 7; }

const char* op_input_name(OpKind kind, int32_t index) {
  if (index < 0 || index >= op_max_inputs(kind)) return "";
  return kind == OpKind::kLinearAttention ? kLaInputs[index] : kGlaInputs[index];
}

const char* elem_type_name(ElemType t) {
  switch (t) {
    case ElemType::kFloat32: return "float32";
    case ElemType::kFloat16: return "float16";
    case ElemType::kBFloat16: return "bfloat16";
    case ElemType::kInt32: return "int32";
    case ElemType::kInt64: return "int64";
    case ElemType::kFloat64: return "float64";
    case ElemType::kInt8: return "int8";
    case ElemType::kUInt8: return "uint8";
    case ElemType::kBool: return "bool";
    default: return "an unsupported type";
  }
}

Status check_attributes(OpKind kind, const OpAttributes& a) {
  detail::clear_error();
  if (kind != OpKind::kGatedLinearAttention && kind != OpKind::kLinearAttention)
    return fail(kBad, "op kind %d is not known", int(kind));
  if (a.q_num_heads == kAttrMissing) return fail(kBad, "the required int attribute 'q_num_heads' is missing");
  if (a.kv_num_heads == kAttrMissing) return fail(kBad, "the required int attribute 'kv_num_heads' is missing");
  if (a.q_num_heads < 1 || a.q_num_heads > kMaxHeads)
    return fail(kBad, "attribute q_num_heads=%lld must be in [1, %lld]", (long long)a.q_num_heads, (long long)kMaxHeads);
  if (a.kv_num_heads < 1 || a.kv_num_heads > kMaxHeads)
    return fail(kBad, "attribute kv_num_heads=%lld must be in [1, %lld]", (long long)a.kv_num_heads,
                (long long)kMaxHeads);
  if (a.q_num_heads % a.kv_num_heads != 0)
    return fail(kBad, "attribute q_num_heads=%lld must be a multiple of kv_num_heads=%lld", (long long)a.q_num_heads,
                (long long)a.kv_num_heads);
  if (a.reverse != 0 && a.reverse != 1)
    return fail(kBad, "attribute reverse=%lld must be 0 or 1", (long long)a.reverse);
  if (a.chunk_size < 0 || a.chunk_size > INT32_MAX)
    return fail(kBad, "attribute chunk_size=%lld must be >= 0 and fit int32 (it is a hint)", (long long)a.chunk_size);
  if (!std::isfinite(a.scale)) return fail(kBad, "attribute scale=%g must be finite", (double)a.scale);
  if (kind == OpKind::kLinearAttention) {
    if (a.update_rule == int32_t(UpdateRule::kMissing))
      return fail(kBad,
                  "attribute update_rule is missing: the ONNX default 'gated_delta' is not supported (supported: "
                  "'gated', 'linear'; set the attribute explicitly)");
    if (a.update_rule != int32_t(UpdateRule::kGated) && a.update_rule != int32_t(UpdateRule::kLinear))
      return fail(kBad, "attribute update_rule is not supported (supported: 'gated', 'linear')");
  }
  return Status::kOk;
}

void output_dims(const Problem& p, int64_t output[3], int64_t present_state[4]) {
  output[0] = p.batch;
  output[1] = p.seq_len;
  output[2] = p.head_dim_v < 0 ? -1 : int64_t(p.q_heads) * p.head_dim_v;
  present_state[0] = p.num_seqs;
  present_state[1] = p.kv_heads;
  present_state[2] = p.head_dim_k;
  present_state[3] = p.head_dim_v;
}

Status infer_problem(OpKind kind, const OpAttributes& a, const TensorDesc* in, int32_t n, int32_t flags,
                     Problem* out) {
  if (Status st = check_attributes(kind, a); st != Status::kOk) return st;
  if (!out) return fail(kBad, "problem is null");
  if (n > 0 && !in) return fail(kBad, "inputs is null");
  const bool la = kind == OpKind::kLinearAttention;
  const bool allow_unknown = (flags & kInferAllowUnknownDims) != 0;
  const int32_t lo = op_min_inputs(kind), hi = op_max_inputs(kind);
  // trailing absent inputs do not count
  while (n > lo && !in[n - 1].present) --n;
  if (n < lo || n > hi)
    return fail(kBad, "%s takes %d to %d inputs (%s), got %d", op_name(kind), lo, hi,
                la ? "query, key, value, [past_state], [decay], [beta]"
                   : "query, key, value, gate, [past_state], [cu_seqlens], [g_gamma]",
                n);
  Roles r;
  auto at = [&](int32_t i) { return i < n && in[i].present ? i : -1; };
  if (la) {
    r.past_state = at(3);
    r.gate = at(4);
    r.beta = at(5);
    if (a.update_rule == int32_t(UpdateRule::kGated) && r.gate < 0)
      return fail(kBad, "input 'decay' is absent: update_rule 'gated' needs it");
  } else {
    r.gate = at(3);
    r.past_state = at(4);
    r.cu_seqlens = at(5);
    r.g_gamma = at(6);
  }
  auto name = [&](int32_t i) { return op_input_name(kind, i); };
  for (int32_t i : {r.query, r.key, r.value})
    if (!in[i].present) return fail(kBad, "the required input '%s' is missing", name(i));
  if (!la && r.gate < 0) return fail(kBad, "the required input 'gate' is missing");

  // ---- ranks --------------------------------------------------------------------------------
  struct RankRule {
    int32_t index;
    int32_t rank;
    const char* layout;
  } ranks[] = {
      {r.query, 3, "[B, T, q_num_heads*d_k]"},     {r.key, 3, "[B, T, kv_num_heads*d_k]"},
      {r.value, 3, "[B, T, kv_num_heads*d_v]"},    {r.gate, 3, "[B, T, kv_num_heads*d_k] or [B, T, kv_num_heads]"},
      {r.beta, 3, "[B, T, kv_num_heads]"},         {r.past_state, 4, "[N, kv_num_heads, d_k, d_v]"},
      {r.cu_seqlens, 1, "[N+1]"},                  {r.g_gamma, 1, "[kv_num_heads]"},
  };
  for (const auto& rr : ranks) {
    if (rr.index < 0) continue;
    const TensorDesc& d = in[rr.index];
    if (d.rank < 0 && allow_unknown) continue;
    if (d.rank != rr.rank)
      return fail(kBad, "input '%s' has shape %s, expected rank %d %s", name(rr.index), shape_str(d).c_str(), rr.rank,
                  rr.layout);
    for (int32_t i = 0; i < d.rank; ++i)
      if (d.dims[i] < 0 && !allow_unknown)
        return fail(kBad, "input '%s' has shape %s with an unknown dimension", name(rr.index), shape_str(d).c_str());
  }
  auto dim = [&](int32_t index, int32_t i) -> int64_t {
    if (index < 0) return -1;
    const TensorDesc& d = in[index];
    return d.rank > i ? d.dims[i] : -1;
  };

  // ---- element types --------------------------------------------------------------------------
  const int32_t act = in[r.query].elem_type;
  if (!is_float(act))
    return fail(kBad, "input 'query' has element type %s, expected float32, float16 or bfloat16",
                elem_type_name(ElemType(act)));
  for (int32_t i : {r.key, r.value, r.gate, r.beta}) {
    if (i >= 0 && in[i].elem_type != act)
      return fail(kBad, "input '%s' has element type %s, expected %s like 'query'", name(i),
                  elem_type_name(ElemType(in[i].elem_type)), elem_type_name(ElemType(act)));
  }
  for (int32_t i : {r.past_state, r.g_gamma}) {
    if (i >= 0 && !is_float(in[i].elem_type))
      return fail(kBad, "input '%s' has element type %s, expected float32, float16 or bfloat16", name(i),
                  elem_type_name(ElemType(in[i].elem_type)));
  }
  if (r.cu_seqlens >= 0 && !is_index(in[r.cu_seqlens].elem_type))
    return fail(kBad, "input 'cu_seqlens' has element type %s, expected int32 or int64",
                elem_type_name(ElemType(in[r.cu_seqlens].elem_type)));

  // ---- shapes ---------------------------------------------------------------------------------
  const int64_t Hq = a.q_num_heads, Hkv = a.kv_num_heads;
  const int64_t B = dim(r.query, 0), T = dim(r.query, 1);
  const int64_t qw = dim(r.query, 2), kw = dim(r.key, 2), vw = dim(r.value, 2);
  const std::string qs = shape_str(in[r.query]);
  if (qw >= 0 && qw % Hq != 0)
    return fail(kBad, "input 'query' has shape %s: its last dimension %lld is not a multiple of q_num_heads=%lld",
                qs.c_str(), (long long)qw, (long long)Hq);
  if (qw == 0) return fail(kBad, "input 'query' has shape %s: the head size d_k must be at least 1", qs.c_str());
  int64_t dk = qw >= 0 ? qw / Hq : -1;
  if (differs(dim(r.key, 0), B) || differs(dim(r.key, 1), T) || differs(kw, dk >= 0 ? Hkv * dk : -1))
    return fail(kBad, "input 'key' has shape %s, expected [B=%s, T=%s, kv_num_heads*d_k=%s]",
                shape_str(in[r.key]).c_str(), num(B).c_str(), num(T).c_str(), num(dk >= 0 ? Hkv * dk : -1).c_str());
  if (dk < 0 && kw >= 0) {
    if (kw == 0 || kw % Hkv != 0)
      return fail(kBad, "input 'key' has shape %s: its last dimension must be a positive multiple of kv_num_heads=%lld",
                  shape_str(in[r.key]).c_str(), (long long)Hkv);
    dk = kw / Hkv;
  }
  if (differs(dim(r.value, 0), B) || differs(dim(r.value, 1), T))
    return fail(kBad, "input 'value' has shape %s, expected [B=%s, T=%s, kv_num_heads*d_v]",
                shape_str(in[r.value]).c_str(), num(B).c_str(), num(T).c_str());
  if (vw >= 0 && (vw == 0 || vw % Hkv != 0))
    return fail(kBad, "input 'value' has shape %s: its last dimension must be a positive multiple of kv_num_heads=%lld",
                shape_str(in[r.value]).c_str(), (long long)Hkv);
  const int64_t dv = vw >= 0 ? vw / Hkv : -1;

  // the gate: one log decay per key dimension [B, T, Hkv*d_k], or one per head [B, T, Hkv]
  bool per_head = false;
  if (r.gate >= 0) {
    const int64_t gw = dim(r.gate, 2);
    const int64_t full = dk >= 0 ? Hkv * dk : -1;
    if (differs(dim(r.gate, 0), B) || differs(dim(r.gate, 1), T) || (gw >= 0 && full >= 0 && gw != full && gw != Hkv))
      return fail(kBad,
                  "input '%s' has shape %s, expected [B=%s, T=%s, kv_num_heads*d_k=%s] (or [B, T, kv_num_heads=%lld] "
                  "for one decay per head)",
                  name(r.gate), shape_str(in[r.gate]).c_str(), num(B).c_str(), num(T).c_str(), num(full).c_str(),
                  (long long)Hkv);
    // with d_k == 1 the two layouts are one; with d_k unknown a width of Hkv is read as per head
    // only once d_k is known (run time), so at build time the gate's layout stays open
    per_head = gw >= 0 && gw == Hkv && full >= 0 && gw != full;
  }
  if (r.beta >= 0 && (differs(dim(r.beta, 0), B) || differs(dim(r.beta, 1), T)))
    return fail(kBad, "input 'beta' has shape %s, expected [B=%s, T=%s, ...]", shape_str(in[r.beta]).c_str(),
                num(B).c_str(), num(T).c_str());

  int64_t N = B;
  if (r.cu_seqlens >= 0) {
    const int64_t len = dim(r.cu_seqlens, 0);
    if (len >= 0 && len < 2)
      return fail(kBad, "input 'cu_seqlens' has shape %s, expected [N+1] with N >= 1",
                  shape_str(in[r.cu_seqlens]).c_str());
    if (differs(B, 1))
      return fail(kBad, "input 'query' has shape %s: with cu_seqlens the sequences are packed along T and B must be 1",
                  qs.c_str());
    N = len >= 0 ? len - 1 : -1;
  }
  if (r.past_state >= 0) {
    const TensorDesc& s = in[r.past_state];
    if (differs(dim(r.past_state, 0), N) || differs(dim(r.past_state, 1), Hkv) || differs(dim(r.past_state, 2), dk) ||
        differs(dim(r.past_state, 3), dv))
      return fail(kBad, "input 'past_state' has shape %s, expected [N=%s, kv_num_heads=%lld, d_k=%s, d_v=%s]%s",
                  shape_str(s).c_str(), num(N).c_str(), (long long)Hkv, num(dk).c_str(), num(dv).c_str(),
                  r.cu_seqlens >= 0 ? " (N = len(cu_seqlens) - 1)" : " (N = B)");
    if (N < 0) N = dim(r.past_state, 0);
  }
  if (r.g_gamma >= 0 && differs(dim(r.g_gamma, 0), Hkv))
    return fail(kBad, "input 'g_gamma' has shape %s, expected [kv_num_heads=%lld]", shape_str(in[r.g_gamma]).c_str(),
                (long long)Hkv);

  // ---- limits ---------------------------------------------------------------------------------
  if (dk > kMaxHeadDim || dv > kMaxHeadDim)
    return fail(Status::kUnsupported,
                "input 'query' has shape %s and 'value' %s: head sizes d_k=%lld, d_v=%lld; the kernels take at most "
                "%lld",
                qs.c_str(), shape_str(in[r.value]).c_str(), (long long)dk, (long long)dv, (long long)kMaxHeadDim);
  if ((flags & kInferForCuda) && dk > kCudaMaxHeadDimK)
    return fail(Status::kUnsupported,
                "input 'query' has shape %s: head size d_k=%lld is larger than the CUDA kernels take (%lld)",
                qs.c_str(), (long long)dk, (long long)kCudaMaxHeadDimK);

  Problem p;
  p.batch = r.cu_seqlens >= 0 ? 1 : B;
  p.seq_len = T;
  p.num_seqs = N;
  p.q_heads = int32_t(Hq);
  p.kv_heads = int32_t(Hkv);
  p.head_dim_k = int32_t(dk);
  p.head_dim_v = int32_t(dv);
  p.act_dtype = DType(act);
  p.state_dtype = r.past_state >= 0 ? DType(in[r.past_state].elem_type) : DType::kFloat32;
  p.g_gamma_dtype = r.g_gamma >= 0 ? DType(in[r.g_gamma].elem_type) : DType::kFloat32;
  p.has_gate = (r.gate >= 0 && (!la || a.update_rule == int32_t(UpdateRule::kGated))) ? 1 : 0;
  p.gate_per_head = p.has_gate && per_head ? 1 : 0;
  p.has_past_state = r.past_state >= 0 ? 1 : 0;
  p.has_cu_seqlens = r.cu_seqlens >= 0 ? 1 : 0;
  p.cu_seqlens_int64 = r.cu_seqlens >= 0 && in[r.cu_seqlens].elem_type == int32_t(ElemType::kInt64) ? 1 : 0;
  p.has_g_gamma = r.g_gamma >= 0 ? 1 : 0;
  p.reverse = la ? 0 : int32_t(a.reverse);
  p.scale = a.scale;
  const bool known = p.batch >= 0 && p.seq_len >= 0 && p.num_seqs >= 0 && dk >= 0 && dv >= 0;
  if (known) {
    // sizes beyond indexing and the like; the message is validate()'s
    if (Status st = validate(p); st != Status::kOk) return st;
  }
  *out = p;
  return Status::kOk;
}

}  // namespace gla
