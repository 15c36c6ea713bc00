// The GatedLinearAttention kernel for ONNX Runtime: attributes, input validation, shape inference,
// and the CPU and CUDA launches into the kernel core. Every check happens before any output is
// written, and every failure is an OrtStatus that names the input (or attribute) and its shape.
#include <cmath>
#include <cstdarg>
#include <cstdio>
#include <cstring>
#include <exception>
#include <string>
#include <vector>

#include "gla_ort.h"

namespace gla_ort {

const char* const kInputNames[kNumInputs] = {"query", "key", "value", "gate", "past_state", "cu_seqlens", "g_gamma"};
const char* const kOutputNames[kNumOutputs] = {"output", "present_state"};

namespace {

std::string format(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
std::string format(const char* fmt, ...) {
  char buf[1024];
  va_list args;
  va_start(args, fmt);
  std::vsnprintf(buf, sizeof(buf), fmt, args);
  va_end(args);
  return buf;
}

std::string shape_str(const std::vector<int64_t>& dims) {
  std::string s = "[";
  for (size_t i = 0; i < dims.size(); ++i) {
    if (i) s += ",";
    s += dims[i] < 0 ? std::string("?") : std::to_string(dims[i]);
  }
  return s + "]";
}

const char* type_name(ONNXTensorElementDataType t) {
  switch (t) {
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT: return "float32";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16: return "float16";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16: return "bfloat16";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_DOUBLE: return "float64";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32: return "int32";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64: return "int64";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8: return "int8";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8: return "uint8";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT16: return "int16";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_BOOL: return "bool";
    default: return "an unsupported type";
  }
}

bool to_dtype(ONNXTensorElementDataType t, gla::DType* out) {
  switch (t) {
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT: *out = gla::DType::kFloat32; return true;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16: *out = gla::DType::kFloat16; return true;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16: *out = gla::DType::kBFloat16; return true;
    default: return false;
  }
}

// The node name in messages helps when a model has dozens of these nodes.
std::string where(const Kernel& k) {
  return k.node_name.empty() ? std::string(kOpName) : std::string(kOpName) + " '" + k.node_name + "'";
}

OrtStatus* error(const OrtApi* api, OrtErrorCode code, const std::string& msg) {
  return api->CreateStatus(code, msg.c_str());
}

// An input as the checks see it: from a kernel context (value set) or from shape inference.
struct TensorInfo {
  bool has = false;
  const OrtValue* value = nullptr;
  ONNXTensorElementDataType type = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
  std::vector<int64_t> dims;
  bool present() const { return has; }
};

OrtStatus* describe(const OrtApi* api, const OrtValue* value, TensorInfo* out) {
  out->value = value;
  out->has = value != nullptr;
  if (!value) return nullptr;
  OrtTensorTypeAndShapeInfo* info = nullptr;
  if (OrtStatus* st = api->GetTensorTypeAndShape(value, &info)) return st;
  OrtStatus* st = api->GetTensorElementType(info, &out->type);
  size_t rank = 0;
  if (!st) st = api->GetDimensionsCount(info, &rank);
  if (!st) {
    out->dims.assign(rank, 0);
    st = api->GetDimensions(info, out->dims.data(), rank);
  }
  api->ReleaseTensorTypeAndShapeInfo(info);
  return st;
}

// ---- checks shared by compute() and infer_output_shapes() ----------------------------------------

// Sizes that the checks establish; -1 where shape inference does not know a dimension.
struct Sizes {
  int64_t B = -1, T = -1, N = -1, Hq = 0, Hkv = 0, dk = -1, dv = -1;
  bool gate_per_head = false;
};

// dim known and different from `want` (also known)
inline bool differs(int64_t dim, int64_t want) { return dim >= 0 && want >= 0 && dim != want; }

// Checks ranks, shapes and the head arithmetic. `inputs[i]` with no rank (dims empty, type
// UNDEFINED) is absent. Unknown dimensions (-1) pass; compute() always has them all.
std::string check_shapes(const Attributes& a, const TensorInfo* in, Sizes* s) {
  const auto& q = in[kQuery];
  const auto& k = in[kKey];
  const auto& v = in[kValue];
  const auto& g = in[kGate];
  s->Hq = a.q_num_heads;
  s->Hkv = a.kv_num_heads;
  for (size_t i : {kQuery, kKey, kValue, kGate}) {
    if (in[i].dims.size() != 3)
      return format("input '%s' has shape %s, expected rank 3 [B, T, heads*head_size]", kInputNames[i],
                    shape_str(in[i].dims).c_str());
  }
  s->B = q.dims[0];
  s->T = q.dims[1];
  const int64_t qw = q.dims[2], kw = k.dims[2], vw = v.dims[2];
  if (qw >= 0 && qw % s->Hq != 0)
    return format("input 'query' has shape %s: its last dimension %lld is not a multiple of q_num_heads=%lld",
                  shape_str(q.dims).c_str(), (long long)qw, (long long)s->Hq);
  if (qw == 0) return format("input 'query' has shape %s: the head size d_k must be at least 1", shape_str(q.dims).c_str());
  s->dk = qw >= 0 ? qw / s->Hq : -1;
  if (differs(k.dims[0], s->B) || differs(k.dims[1], s->T) || differs(kw, s->dk >= 0 ? s->Hkv * s->dk : -1))
    return format("input 'key' has shape %s, expected [B=%lld, T=%lld, kv_num_heads*d_k=%lld]", shape_str(k.dims).c_str(),
                  (long long)s->B, (long long)s->T, (long long)(s->dk >= 0 ? s->Hkv * s->dk : -1));
  if (s->dk < 0 && kw >= 0) {
    if (kw % s->Hkv != 0)
      return format("input 'key' has shape %s: its last dimension is not a multiple of kv_num_heads=%lld",
                    shape_str(k.dims).c_str(), (long long)s->Hkv);
    s->dk = kw / s->Hkv;
  }
  if (differs(v.dims[0], s->B) || differs(v.dims[1], s->T))
    return format("input 'value' has shape %s, expected [B=%lld, T=%lld, kv_num_heads*d_v]", shape_str(v.dims).c_str(),
                  (long long)s->B, (long long)s->T);
  if (vw >= 0 && (vw == 0 || vw % s->Hkv != 0))
    return format("input 'value' has shape %s: its last dimension must be a positive multiple of kv_num_heads=%lld",
                  shape_str(v.dims).c_str(), (long long)s->Hkv);
  s->dv = vw >= 0 ? vw / s->Hkv : -1;
  const int64_t gw = g.dims[2];
  const int64_t full = s->dk >= 0 ? s->Hkv * s->dk : -1;
  if (differs(g.dims[0], s->B) || differs(g.dims[1], s->T) || (gw >= 0 && full >= 0 && gw != full && gw != s->Hkv))
    return format("input 'gate' has shape %s, expected [B=%lld, T=%lld, kv_num_heads*d_k=%lld] (or [B, T, kv_num_heads=%lld] "
                  "for one decay per head)",
                  shape_str(g.dims).c_str(), (long long)s->B, (long long)s->T, (long long)full, (long long)s->Hkv);
  s->gate_per_head = gw >= 0 && full >= 0 && gw == s->Hkv && gw != full;

  s->N = s->B;
  const auto& cu = in[kCuSeqlens];
  if (cu.present()) {
    if (cu.dims.size() != 1 || (cu.dims[0] >= 0 && cu.dims[0] < 2))
      return format("input 'cu_seqlens' has shape %s, expected [N+1] with N >= 1", shape_str(cu.dims).c_str());
    if (differs(s->B, 1))
      return format("input 'query' has shape %s: with cu_seqlens the sequences are packed along T and B must be 1",
                    shape_str(q.dims).c_str());
    s->N = cu.dims[0] >= 0 ? cu.dims[0] - 1 : -1;
  }
  const auto& h0 = in[kPastState];
  if (h0.present()) {
    if (h0.dims.size() != 4 || differs(h0.dims[0], s->N) || differs(h0.dims[1], s->Hkv) || differs(h0.dims[2], s->dk) ||
        differs(h0.dims[3], s->dv))
      return format("input 'past_state' has shape %s, expected [N=%lld, kv_num_heads=%lld, d_k=%lld, d_v=%lld]",
                    shape_str(h0.dims).c_str(), (long long)s->N, (long long)s->Hkv, (long long)s->dk, (long long)s->dv);
  }
  const auto& gamma = in[kGGamma];
  if (gamma.present() && (gamma.dims.size() != 1 || differs(gamma.dims[0], s->Hkv)))
    return format("input 'g_gamma' has shape %s, expected [kv_num_heads=%lld]", shape_str(gamma.dims).c_str(),
                  (long long)s->Hkv);
  return "";
}

// Element types; absent inputs have UNDEFINED and are skipped.
std::string check_types(const TensorInfo* in) {
  const ONNXTensorElementDataType act = in[kQuery].type;
  gla::DType d;
  if (!to_dtype(act, &d))
    return format("input 'query' has element type %s, expected float32, float16 or bfloat16", type_name(act));
  for (size_t i : {kKey, kValue, kGate}) {
    if (in[i].type != act)
      return format("input '%s' has element type %s, expected %s like 'query'", kInputNames[i], type_name(in[i].type),
                    type_name(act));
  }
  for (size_t i : {kPastState, kGGamma}) {
    if (in[i].present() && !to_dtype(in[i].type, &d))
      return format("input '%s' has element type %s, expected float32, float16 or bfloat16", kInputNames[i],
                    type_name(in[i].type));
  }
  const auto& cu = in[kCuSeqlens];
  if (cu.present() && cu.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32 && cu.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64)
    return format("input 'cu_seqlens' has element type %s, expected int32 or int64", type_name(cu.type));
  return "";
}

// ---- threads and memory --------------------------------------------------------------------------

struct OrtThreading {
  const OrtApi* api;
  const OrtKernelContext* context;
  OrtStatus* failure = nullptr;
};

struct ForwardCall {
  void (*fn)(void*, int64_t);
  void* arg;
};

void trampoline(void* usr, size_t i) {
  auto* call = static_cast<ForwardCall*>(usr);
  call->fn(call->arg, int64_t(i));
}

void ort_parallel_for(void* ctx, int64_t n, void (*fn)(void*, int64_t), void* arg) {
  auto* t = static_cast<OrtThreading*>(ctx);
  ForwardCall call{fn, arg};
  // one task per slot: the kernel core already sized them
  OrtStatus* st = t->api->KernelContext_ParallelFor(t->context, trampoline, size_t(n), size_t(n), &call);
  if (st) {
    // the pool refused: run the rest here, so the op still completes, and report nothing lost
    t->api->ReleaseStatus(st);
    for (int64_t i = 0; i < n; ++i) fn(arg, i);
  }
}

// Scratch memory from the session's allocator for `mem_info`, returned on scope exit.
struct Scratch {
  const OrtApi* api = nullptr;
  OrtAllocator* allocator = nullptr;
  void* ptr = nullptr;
  ~Scratch() {
    if (allocator && ptr) allocator->Free(allocator, ptr);
    if (allocator) api->ReleaseAllocator(allocator);
  }
};

OrtStatus* allocate(const OrtApi* api, OrtKernelContext* context, const OrtMemoryInfo* mem_info, size_t bytes,
                    Scratch* out) {
  out->api = api;
  if (bytes == 0) return nullptr;
  if (OrtStatus* st = api->KernelContext_GetAllocator(context, mem_info, &out->allocator)) return st;
  out->ptr = out->allocator->Alloc(out->allocator, bytes);
  if (!out->ptr) return api->CreateStatus(ORT_FAIL, "GatedLinearAttention: the workspace allocation failed");
  return nullptr;
}

}  // namespace

// ---- attributes ----------------------------------------------------------------------------------

namespace {

enum class AttrKind { kMissing, kInt, kFloat, kOther };

// What kind of value a node attribute holds (ORT's kernel info has no direct query for it).
AttrKind attr_kind(const OrtApi* api, const OrtKernelInfo* info, const char* name) {
  int64_t i;
  float f;
  if (OrtStatus* st = api->KernelInfoGetAttribute_int64(info, name, &i)) {
    api->ReleaseStatus(st);
  } else {
    return AttrKind::kInt;
  }
  if (OrtStatus* st = api->KernelInfoGetAttribute_float(info, name, &f)) {
    api->ReleaseStatus(st);
  } else {
    return AttrKind::kFloat;
  }
  size_t size = 0;
  if (OrtStatus* st = api->KernelInfoGetAttribute_string(info, name, nullptr, &size)) {
    api->ReleaseStatus(st);
  } else {
    return AttrKind::kOther;
  }
  size = 0;
  if (OrtStatus* st = api->KernelInfoGetAttributeArray_int64(info, name, nullptr, &size)) {
    api->ReleaseStatus(st);
  } else {
    return AttrKind::kOther;
  }
  size = 0;
  if (OrtStatus* st = api->KernelInfoGetAttributeArray_float(info, name, nullptr, &size)) {
    api->ReleaseStatus(st);
  } else {
    return AttrKind::kOther;
  }
  return AttrKind::kMissing;
}

OrtStatus* read_int(const OrtApi* api, const OrtKernelInfo* info, const char* name, bool required, int64_t* out) {
  const AttrKind kind = attr_kind(api, info, name);
  if (kind == AttrKind::kMissing) {
    if (!required) return nullptr;
    return error(api, ORT_INVALID_ARGUMENT, format("%s: the required int attribute '%s' is missing", kOpName, name));
  }
  if (kind != AttrKind::kInt)
    return error(api, ORT_INVALID_ARGUMENT, format("%s: attribute '%s' must be an int", kOpName, name));
  return api->KernelInfoGetAttribute_int64(info, name, out);
}

}  // namespace

OrtStatus* read_attributes(const OrtApi* api, const OrtKernelInfo* info, Attributes* a) {
  if (OrtStatus* st = read_int(api, info, "q_num_heads", true, &a->q_num_heads)) return st;
  if (OrtStatus* st = read_int(api, info, "kv_num_heads", true, &a->kv_num_heads)) return st;
  if (OrtStatus* st = read_int(api, info, "reverse", false, &a->reverse)) return st;
  if (OrtStatus* st = read_int(api, info, "chunk_size", false, &a->chunk_size)) return st;
  const AttrKind scale_kind = attr_kind(api, info, "scale");
  if (scale_kind == AttrKind::kFloat) {
    if (OrtStatus* st = api->KernelInfoGetAttribute_float(info, "scale", &a->scale)) return st;
  } else if (scale_kind != AttrKind::kMissing) {
    return error(api, ORT_INVALID_ARGUMENT, format("%s: attribute 'scale' must be a float", kOpName));
  }

  constexpr int64_t kMaxHeads = 1 << 16;
  if (a->q_num_heads < 1 || a->q_num_heads > kMaxHeads)
    return error(api, ORT_INVALID_ARGUMENT,
                 format("%s: attribute q_num_heads=%lld must be in [1, %lld]", kOpName, (long long)a->q_num_heads,
                        (long long)kMaxHeads));
  if (a->kv_num_heads < 1 || a->kv_num_heads > kMaxHeads)
    return error(api, ORT_INVALID_ARGUMENT,
                 format("%s: attribute kv_num_heads=%lld must be in [1, %lld]", kOpName, (long long)a->kv_num_heads,
                        (long long)kMaxHeads));
  if (a->q_num_heads % a->kv_num_heads != 0)
    return error(api, ORT_INVALID_ARGUMENT,
                 format("%s: q_num_heads=%lld must be a multiple of kv_num_heads=%lld", kOpName,
                        (long long)a->q_num_heads, (long long)a->kv_num_heads));
  if (a->reverse != 0 && a->reverse != 1)
    return error(api, ORT_INVALID_ARGUMENT,
                 format("%s: attribute reverse=%lld must be 0 or 1", kOpName, (long long)a->reverse));
  if (a->chunk_size < 0)
    return error(api, ORT_INVALID_ARGUMENT,
                 format("%s: attribute chunk_size=%lld must be >= 0 (it is a hint)", kOpName, (long long)a->chunk_size));
  if (!std::isfinite(a->scale))
    return error(api, ORT_INVALID_ARGUMENT, format("%s: attribute scale=%g must be finite", kOpName, (double)a->scale));
  return nullptr;
}

// ---- compute -------------------------------------------------------------------------------------

namespace {

OrtStatus* compute_impl(Kernel* kernel, OrtKernelContext* context) {
  const OrtApi* api = kernel->api;
  const std::string op = where(*kernel);

  size_t num_inputs = 0, num_outputs = 0;
  if (OrtStatus* st = api->KernelContext_GetInputCount(context, &num_inputs)) return st;
  if (OrtStatus* st = api->KernelContext_GetOutputCount(context, &num_outputs)) return st;
  TensorInfo in[kNumInputs];
  for (size_t i = 0; i < kNumInputs && i < num_inputs; ++i) {
    const OrtValue* value = nullptr;
    if (OrtStatus* st = api->KernelContext_GetInput(context, i, &value)) return st;
    if (OrtStatus* st = describe(api, value, &in[i])) return st;
  }
  for (size_t i : {kQuery, kKey, kValue, kGate})
    if (!in[i].present()) return error(api, ORT_INVALID_ARGUMENT, op + ": the required input '" + kInputNames[i] + "' is missing");

  std::string why = check_types(in);
  Sizes s;
  if (why.empty()) why = check_shapes(kernel->attrs, in, &s);
  if (!why.empty()) return error(api, ORT_INVALID_ARGUMENT, op + ": " + why);

  gla::Problem p;
  p.batch = s.B;
  p.seq_len = s.T;
  p.num_seqs = s.N;
  p.q_heads = int32_t(s.Hq);
  p.kv_heads = int32_t(s.Hkv);
  p.head_dim_k = int32_t(s.dk);
  p.head_dim_v = int32_t(s.dv);
  to_dtype(in[kQuery].type, &p.act_dtype);
  p.has_gate = 1;
  p.gate_per_head = s.gate_per_head ? 1 : 0;
  p.has_past_state = in[kPastState].present() ? 1 : 0;
  if (p.has_past_state) to_dtype(in[kPastState].type, &p.state_dtype);
  p.has_cu_seqlens = in[kCuSeqlens].present() ? 1 : 0;
  p.cu_seqlens_int64 = in[kCuSeqlens].type == ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64 ? 1 : 0;
  p.has_g_gamma = in[kGGamma].present() ? 1 : 0;
  if (p.has_g_gamma) to_dtype(in[kGGamma].type, &p.g_gamma_dtype);
  p.reverse = int32_t(kernel->attrs.reverse);
  p.scale = kernel->attrs.scale;
  if (s.dk > (1 << 14) || s.dv > (1 << 14)) {
    return error(api, ORT_INVALID_ARGUMENT,
                 op + format(": head sizes d_k=%lld, d_v=%lld are larger than the kernels support (16384)",
                             (long long)s.dk, (long long)s.dv));
  }
  if (gla::validate(p) != gla::Status::kOk)
    return error(api, ORT_INVALID_ARGUMENT, op + ": " + gla::last_error_message());

  gla::Tensors t;
  auto data = [&](size_t i) -> const void* {
    if (!in[i].present()) return nullptr;
    // API 21 has no const accessor; the kernel core only reads through these pointers
    void* ptr = nullptr;
    OrtStatus* st = api->GetTensorMutableData(const_cast<OrtValue*>(in[i].value), &ptr);
    if (st) api->ReleaseStatus(st);
    return static_cast<const void*>(ptr);
  };
  t.query = data(kQuery);
  t.key = data(kKey);
  t.value = data(kValue);
  t.gate = data(kGate);
  t.past_state = data(kPastState);
  t.cu_seqlens = data(kCuSeqlens);
  t.g_gamma = data(kGGamma);

  const int64_t out_dims[3] = {s.B, s.T, s.Hq * s.dv};
  const int64_t state_dims[4] = {s.N, s.Hkv, s.dk, s.dv};
  OrtValue* out = nullptr;
  if (OrtStatus* st = api->KernelContext_GetOutput(context, kOutput, out_dims, 3, &out)) return st;
  if (OrtStatus* st = api->GetTensorMutableData(out, &t.output)) return st;
  if (num_outputs > kPresentState) {
    OrtValue* present = nullptr;
    if (OrtStatus* st = api->KernelContext_GetOutput(context, kPresentState, state_dims, 4, &present)) return st;
    if (present)
      if (OrtStatus* st = api->GetTensorMutableData(present, &t.present_state)) return st;
  }

  gla::Status status;
  if (kernel->ep == Ep::kCpu) {
    const size_t bytes = gla::cpu_workspace_bytes(p);
    OrtMemoryInfo* cpu_info = nullptr;
    if (OrtStatus* st = api->CreateCpuMemoryInfo(OrtArenaAllocator, OrtMemTypeDefault, &cpu_info)) return st;
    Scratch ws;
    OrtStatus* st = allocate(api, context, cpu_info, bytes, &ws);
    api->ReleaseMemoryInfo(cpu_info);
    if (st) return st;
    OrtThreading ort_threads{api, context};
    gla::Threading threading;
    threading.parallel_for = ort_parallel_for;
    threading.ctx = &ort_threads;
    status = gla::cpu_forward(p, t, ws.ptr, bytes, &threading);
  } else {
    void* stream = nullptr;
    if (OrtStatus* st = api->KernelContext_GetGPUComputeStream(context, &stream)) return st;
    // the workspace lives on the device that holds the inputs
    const OrtMemoryInfo* q_info = nullptr;
    if (OrtStatus* st = api->GetTensorMemoryInfo(in[kQuery].value, &q_info)) return st;
    int device = 0;
    if (OrtStatus* st = api->MemoryInfoGetId(q_info, &device)) return st;
    OrtMemoryInfo* cuda_info = nullptr;
    if (OrtStatus* st = api->CreateMemoryInfo("Cuda", OrtArenaAllocator, device, OrtMemTypeDefault, &cuda_info)) return st;
    // the CUDA kernels always write a final state: give them scratch when the node drops it
    const size_t ws_bytes = (gla::cuda_workspace_bytes(p) + 255) / 256 * 256;
    const size_t state_bytes = t.present_state ? 0 : size_t(s.N * s.Hkv * s.dk * s.dv) * gla::dtype_size(p.state_dtype);
    Scratch ws;
    OrtStatus* st = allocate(api, context, cuda_info, ws_bytes + state_bytes, &ws);
    api->ReleaseMemoryInfo(cuda_info);
    if (st) return st;
    if (!t.present_state && state_bytes) t.present_state = static_cast<char*>(ws.ptr) + ws_bytes;
    status = gla::cuda_forward(p, t, ws.ptr, ws_bytes, stream);
  }
  if (status != gla::Status::kOk) {
    return error(api, status == gla::Status::kInvalidArgument ? ORT_INVALID_ARGUMENT : ORT_FAIL,
                 op + ": " + gla::status_name(status) + ": " + gla::last_error_message());
  }
  return nullptr;
}

}  // namespace

OrtStatus* compute(Kernel* kernel, OrtKernelContext* context) {
  try {
    return compute_impl(kernel, context);
  } catch (const std::exception& e) {
    return kernel->api->CreateStatus(ORT_FAIL, (std::string(kOpName) + ": unexpected C++ exception: " + e.what()).c_str());
  } catch (...) {
    return kernel->api->CreateStatus(ORT_FAIL, "GatedLinearAttention: unexpected C++ exception");
  }
}

// ---- shape inference -----------------------------------------------------------------------------

namespace {

void read_int_attr(const OrtApi* api, OrtShapeInferContext* ctx, const char* name, int64_t* out, bool* found) {
  const OrtOpAttr* attr = nullptr;
  *found = false;
  if (OrtStatus* st = api->ShapeInferContext_GetAttribute(ctx, name, &attr)) {
    api->ReleaseStatus(st);
    return;
  }
  if (!attr) return;
  size_t written = 0;
  if (OrtStatus* st = api->ReadOpAttr(attr, ORT_OP_ATTR_INT, out, sizeof(*out), &written)) {
    api->ReleaseStatus(st);
    return;
  }
  *found = true;
}

struct InferredDims {
  std::vector<int64_t> values;
  std::vector<std::string> names;  // symbolic name where the value is unknown
};

OrtStatus* set_output(const OrtApi* api, OrtShapeInferContext* ctx, size_t index, ONNXTensorElementDataType type,
                      const InferredDims& dims) {
  OrtTensorTypeAndShapeInfo* info = nullptr;
  if (OrtStatus* st = api->CreateTensorTypeAndShapeInfo(&info)) return st;
  std::vector<const char*> names;
  for (const auto& n : dims.names) names.push_back(n.c_str());
  OrtStatus* st = api->SetTensorElementType(info, type);
  if (!st) st = api->SetDimensions(info, dims.values.data(), dims.values.size());
  if (!st) st = api->SetSymbolicDimensions(info, names.data(), names.size());
  if (!st) st = api->ShapeInferContext_SetOutputTypeShape(ctx, index, info);
  api->ReleaseTensorTypeAndShapeInfo(info);
  return st;
}

}  // namespace

OrtStatus* infer_output_shapes(const OrtApi* api, OrtShapeInferContext* ctx) {
  try {
    size_t count = 0;
    if (OrtStatus* st = api->ShapeInferContext_GetInputCount(ctx, &count)) return st;
    if (count < 4) return nullptr;  // ORT reports the missing inputs itself

    Attributes a;
    bool found_q = false, found_kv = false;
    read_int_attr(api, ctx, "q_num_heads", &a.q_num_heads, &found_q);
    read_int_attr(api, ctx, "kv_num_heads", &a.kv_num_heads, &found_kv);
    // bad or missing attributes are reported with a clear message when the kernel is created
    if (!found_q || !found_kv || a.q_num_heads < 1 || a.kv_num_heads < 1 || a.q_num_heads % a.kv_num_heads != 0)
      return nullptr;

    TensorInfo in[kNumInputs];
    std::vector<std::vector<std::string>> names(kNumInputs);
    for (size_t i = 0; i < kNumInputs && i < count; ++i) {
      OrtTensorTypeAndShapeInfo* info = nullptr;  // owned by the context
      if (OrtStatus* st = api->ShapeInferContext_GetInputTypeShape(ctx, i, &info)) {
        api->ReleaseStatus(st);
        continue;
      }
      if (!info) continue;
      ONNXTensorElementDataType type;
      size_t rank = 0;
      if (OrtStatus* st = api->GetTensorElementType(info, &type)) return st;
      if (type == ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED) continue;  // an absent optional input
      if (OrtStatus* st = api->GetDimensionsCount(info, &rank)) return st;
      in[i].has = true;
      in[i].type = type;
      in[i].dims.assign(rank, 0);
      if (OrtStatus* st = api->GetDimensions(info, in[i].dims.data(), rank)) return st;
      std::vector<const char*> sym(rank, nullptr);
      if (OrtStatus* st = api->GetSymbolicDimensions(info, sym.data(), rank)) return st;
      for (size_t d = 0; d < rank; ++d) names[i].push_back(sym[d] ? sym[d] : "");
    }
    for (size_t i : {kQuery, kKey, kValue, kGate})
      if (!in[i].present()) return nullptr;  // types unknown here: nothing to say

    // A violation is not reported here: ONNX Runtime (1.21 to 1.31 at least) ignores, and leaks, a
    // status returned by shape inference. The kernel reports it, naming the input, at run time.
    std::string why = check_types(in);
    Sizes s;
    if (why.empty()) why = check_shapes(a, in, &s);
    if (!why.empty()) return nullptr;

    auto dim = [&](int64_t value, const std::string& name, const std::string& fallback, InferredDims* d) {
      d->values.push_back(value);
      d->names.push_back(value >= 0 ? std::string() : (name.empty() ? fallback : name));
    };
    InferredDims out_dims, state_dims;
    dim(s.B, names[kQuery][0], "gla_batch", &out_dims);
    dim(s.T, names[kQuery][1], "gla_seq_len", &out_dims);
    dim(s.dv >= 0 ? s.Hq * s.dv : -1, "", "gla_output_width", &out_dims);
    if (in[kCuSeqlens].present())
      dim(s.N, "", "gla_num_seqs", &state_dims);
    else
      dim(s.N, names[kQuery][0], "gla_batch", &state_dims);
    dim(s.Hkv, "", "", &state_dims);
    dim(s.dk, "", "gla_head_dim_k", &state_dims);
    dim(s.dv, "", "gla_head_dim_v", &state_dims);
    const ONNXTensorElementDataType state_type =
        in[kPastState].present() ? in[kPastState].type : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
    if (OrtStatus* st = set_output(api, ctx, kOutput, in[kQuery].type, out_dims)) return st;
    if (OrtStatus* st = set_output(api, ctx, kPresentState, state_type, state_dims)) {
      // a node without present_state has no second output to describe
      api->ReleaseStatus(st);
    }
    return nullptr;
  } catch (...) {
    return nullptr;  // no inferred shapes; the kernel still checks everything
  }
}

}  // namespace gla_ort
