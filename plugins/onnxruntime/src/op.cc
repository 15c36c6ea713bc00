// The GatedLinearAttention kernel for ONNX Runtime: ORT's descriptors translated into the op
// contract (gla::infer_problem, plugins/kernels/include/gla/contract.h), which decides what is
// valid and words every error (naming the input and its shape); then the CPU and CUDA launches
// into the kernel core. Every check happens before any output is written.
//
// Unknown attributes: ONNX Runtime's custom-op API (C API 21 and later) reads attributes by name
// only and has no way to list a node's attributes, so a kernel cannot see one it does not know.
// The exporter never writes any (gla_export/ops/contract.py checks nodes; docs/op-contract.md).
#include <cstdio>
#include <exception>
#include <string>
#include <vector>

#include "gla_ort.h"

namespace gla_ort {
namespace {

constexpr gla::OpKind kKind = gla::OpKind::kGatedLinearAttention;

gla::ElemType elem_type(ONNXTensorElementDataType t) {
  switch (t) {
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT: return gla::ElemType::kFloat32;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16: return gla::ElemType::kFloat16;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16: return gla::ElemType::kBFloat16;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_DOUBLE: return gla::ElemType::kFloat64;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32: return gla::ElemType::kInt32;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64: return gla::ElemType::kInt64;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8: return gla::ElemType::kInt8;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8: return gla::ElemType::kUInt8;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_BOOL: return gla::ElemType::kBool;
    default: return gla::ElemType::kOther;
  }
}

ONNXTensorElementDataType onnx_type(gla::DType t) {
  switch (t) {
    case gla::DType::kFloat16: return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;
    case gla::DType::kBFloat16: return ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16;
    default: return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  }
}

OrtStatus* error(const OrtApi* api, OrtErrorCode code, const std::string& msg) {
  return api->CreateStatus(code, msg.c_str());
}

// Type and shape of an ORT tensor as the contract's descriptor.
OrtStatus* describe(const OrtApi* api, const OrtTensorTypeAndShapeInfo* info, gla::TensorDesc* out) {
  ONNXTensorElementDataType type;
  if (OrtStatus* st = api->GetTensorElementType(info, &type)) return st;
  size_t rank = 0;
  if (OrtStatus* st = api->GetDimensionsCount(info, &rank)) return st;
  int64_t dims[64];
  if (rank > 64) rank = 64;
  if (OrtStatus* st = api->GetDimensions(info, dims, rank)) return st;
  out->present = 1;
  out->elem_type = int32_t(elem_type(type));
  out->rank = int32_t(rank < size_t(gla::kMaxDescRank) ? rank : size_t(gla::kMaxDescRank));
  for (int32_t i = 0; i < out->rank; ++i) out->dims[i] = dims[i];
  return nullptr;
}

// ---- threads -------------------------------------------------------------------------------------

struct OrtThreading {
  const OrtApi* api;
  const OrtKernelContext* context;
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
    // the pool refused: run the rest here, so the op still completes
    t->api->ReleaseStatus(st);
    for (int64_t i = 0; i < n; ++i) fn(arg, i);
  }
}

// Scratch memory from the kernel's allocator, returned on scope exit.
struct Scratch {
  OrtAllocator* allocator = nullptr;
  void* ptr = nullptr;
  ~Scratch() {
    if (allocator && ptr) allocator->Free(allocator, ptr);
  }
};

// ---- attributes ----------------------------------------------------------------------------------

enum class AttrKind { kMissing, kInt, kFloat, kOther };

// What kind of value a node attribute holds (ORT's kernel info has no direct query for it).
AttrKind attr_kind(const OrtApi* api, const OrtKernelInfo* info, const char* name) {
  int64_t i;
  float f;
  size_t size = 0;
  auto ok = [&](OrtStatus* st) {
    if (!st) return true;
    api->ReleaseStatus(st);
    return false;
  };
  if (ok(api->KernelInfoGetAttribute_int64(info, name, &i))) return AttrKind::kInt;
  if (ok(api->KernelInfoGetAttribute_float(info, name, &f))) return AttrKind::kFloat;
  if (ok(api->KernelInfoGetAttribute_string(info, name, nullptr, &size))) return AttrKind::kOther;
  size = 0;
  if (ok(api->KernelInfoGetAttributeArray_int64(info, name, nullptr, &size))) return AttrKind::kOther;
  size = 0;
  if (ok(api->KernelInfoGetAttributeArray_float(info, name, nullptr, &size))) return AttrKind::kOther;
  return AttrKind::kMissing;
}

OrtStatus* read_int(const OrtApi* api, const OrtKernelInfo* info, const Kernel& k, const char* name, int64_t* out) {
  const AttrKind kind = attr_kind(api, info, name);
  if (kind == AttrKind::kMissing) return nullptr;  // the default stays (kAttrMissing for the required ones)
  if (kind != AttrKind::kInt)
    return error(api, ORT_INVALID_ARGUMENT, k.where + ": attribute '" + name + "' must be an int");
  return api->KernelInfoGetAttribute_int64(info, name, out);
}

}  // namespace

OrtStatus* init_kernel(const OrtApi* api, const OrtKernelInfo* info, Kernel* k) {
  k->where = kOpName;
  size_t size = 0;
  if (OrtStatus* st = api->KernelInfo_GetNodeName(info, nullptr, &size)) {
    api->ReleaseStatus(st);
  } else if (size > 1) {
    std::vector<char> name(size);
    if (OrtStatus* st2 = api->KernelInfo_GetNodeName(info, name.data(), &size))
      api->ReleaseStatus(st2);
    else
      k->where += std::string(" '") + name.data() + "'";
  }
  gla::OpAttributes& a = k->attrs;
  if (OrtStatus* st = read_int(api, info, *k, "q_num_heads", &a.q_num_heads)) return st;
  if (OrtStatus* st = read_int(api, info, *k, "kv_num_heads", &a.kv_num_heads)) return st;
  if (OrtStatus* st = read_int(api, info, *k, "reverse", &a.reverse)) return st;
  if (OrtStatus* st = read_int(api, info, *k, "chunk_size", &a.chunk_size)) return st;
  const AttrKind scale_kind = attr_kind(api, info, "scale");
  if (scale_kind == AttrKind::kFloat) {
    if (OrtStatus* st = api->KernelInfoGetAttribute_float(info, "scale", &a.scale)) return st;
  } else if (scale_kind != AttrKind::kMissing) {
    return error(api, ORT_INVALID_ARGUMENT, k->where + ": attribute 'scale' must be a float");
  }
  if (gla::check_attributes(kKind, a) != gla::Status::kOk)
    return error(api, ORT_INVALID_ARGUMENT, k->where + ": " + gla::last_error_message());
  // the device allocator of this kernel's execution provider, fetched once
  return api->KernelInfoGetAllocator(info, OrtMemTypeDefault, &k->allocator);
}

// ---- compute -------------------------------------------------------------------------------------

namespace {

OrtStatus* compute_impl(Kernel* kernel, OrtKernelContext* context) {
  const OrtApi* api = kernel->api;
  size_t num_inputs = 0, num_outputs = 0;
  if (OrtStatus* st = api->KernelContext_GetInputCount(context, &num_inputs)) return st;
  if (OrtStatus* st = api->KernelContext_GetOutputCount(context, &num_outputs)) return st;
  gla::TensorDesc desc[kNumInputs];
  const OrtValue* values[kNumInputs] = {};
  for (size_t i = 0; i < kNumInputs && i < num_inputs; ++i) {
    if (OrtStatus* st = api->KernelContext_GetInput(context, i, &values[i])) return st;
    if (!values[i]) continue;
    OrtTensorTypeAndShapeInfo* info = nullptr;
    if (OrtStatus* st = api->GetTensorTypeAndShape(values[i], &info)) return st;
    OrtStatus* st = describe(api, info, &desc[i]);
    api->ReleaseTensorTypeAndShapeInfo(info);
    if (st) return st;
  }
  gla::Problem p;
  const int32_t flags = kernel->ep == Ep::kCuda ? gla::kInferForCuda : 0;
  if (gla::Status s = gla::infer_problem(kKind, kernel->attrs, desc, int32_t(kNumInputs), flags, &p); s != gla::Status::kOk)
    return error(api, ORT_INVALID_ARGUMENT, kernel->where + ": " + gla::last_error_message());

  gla::Tensors t;
  auto data = [&](size_t i) -> const void* {
    if (!values[i]) return nullptr;
    // API 21 has no const accessor; the kernel core only reads through these pointers
    void* ptr = nullptr;
    if (OrtStatus* st = api->GetTensorMutableData(const_cast<OrtValue*>(values[i]), &ptr)) api->ReleaseStatus(st);
    return static_cast<const void*>(ptr);
  };
  t.query = data(kQuery);
  t.key = data(kKey);
  t.value = data(kValue);
  t.gate = data(kGate);
  t.past_state = data(kPastState);
  t.cu_seqlens = data(kCuSeqlens);
  t.g_gamma = data(kGGamma);

  int64_t out_dims[3], state_dims[4];
  gla::output_dims(p, out_dims, state_dims);
  OrtValue* out = nullptr;
  if (OrtStatus* st = api->KernelContext_GetOutput(context, kOutput, out_dims, 3, &out)) return st;
  if (OrtStatus* st = api->GetTensorMutableData(out, &t.output)) return st;
  if (num_outputs > kPresentState) {
    OrtValue* present = nullptr;
    if (OrtStatus* st = api->KernelContext_GetOutput(context, kPresentState, state_dims, 4, &present)) return st;
    if (present)
      if (OrtStatus* st = api->GetTensorMutableData(present, &t.present_state)) return st;
  }

  Scratch ws;
  auto allocate = [&](size_t bytes) {
    if (bytes == 0) return true;
    ws.allocator = kernel->allocator;
    ws.ptr = ws.allocator->Alloc(ws.allocator, bytes);
    return ws.ptr != nullptr;
  };
  gla::Status status;
  if (kernel->ep == Ep::kCpu) {
    const size_t bytes = gla::cpu_workspace_bytes(p);
    if (!allocate(bytes))
      return error(api, ORT_FAIL, kernel->where + ": the workspace allocation failed");
    OrtThreading ort_threads{api, context};
    gla::Threading threading;
    threading.parallel_for = ort_parallel_for;
    threading.ctx = &ort_threads;
    status = gla::cpu_forward(p, t, ws.ptr, bytes, &threading);
  } else {
    void* stream = nullptr;
    if (OrtStatus* st = api->KernelContext_GetGPUComputeStream(context, &stream)) return st;
    // the CUDA kernels always write a final state: give them scratch when the node drops it
    const size_t ws_bytes = (gla::cuda_workspace_bytes(p) + 255) / 256 * 256;
    const size_t state_bytes =
        t.present_state ? 0 : size_t(p.num_seqs * p.kv_heads * p.head_dim_k * p.head_dim_v) * gla::dtype_size(p.state_dtype);
    if (!allocate(ws_bytes + state_bytes))
      return error(api, ORT_FAIL, kernel->where + ": the workspace allocation failed");
    if (!t.present_state && state_bytes) t.present_state = static_cast<char*>(ws.ptr) + ws_bytes;
    status = gla::cuda_forward(p, t, ws.ptr, ws_bytes, stream);
  }
  if (status != gla::Status::kOk) {
    return error(api, status == gla::Status::kInvalidArgument ? ORT_INVALID_ARGUMENT : ORT_FAIL,
                 kernel->where + ": " + gla::status_name(status) + ": " + gla::last_error_message());
  }
  return nullptr;
}

}  // namespace

OrtStatus* compute(Kernel* kernel, OrtKernelContext* context) {
  try {
    return compute_impl(kernel, context);
  } catch (const std::exception& e) {
    return kernel->api->CreateStatus(ORT_FAIL, (kernel->where + ": unexpected C++ exception: " + e.what()).c_str());
  } catch (...) {
    return kernel->api->CreateStatus(ORT_FAIL, "GatedLinearAttention: unexpected C++ exception");
  }
}

// ---- shape inference -----------------------------------------------------------------------------

namespace {

template <typename T>
void read_attr(const OrtApi* api, OrtShapeInferContext* ctx, const char* name, OrtOpAttrType type, T* out) {
  const OrtOpAttr* attr = nullptr;
  if (OrtStatus* st = api->ShapeInferContext_GetAttribute(ctx, name, &attr)) {
    api->ReleaseStatus(st);
    return;
  }
  if (!attr) return;
  size_t written = 0;
  T value{};
  if (OrtStatus* st = api->ReadOpAttr(attr, type, &value, sizeof(value), &written)) {
    api->ReleaseStatus(st);
    return;
  }
  *out = value;
}

OrtStatus* set_output(const OrtApi* api, OrtShapeInferContext* ctx, size_t index, ONNXTensorElementDataType type,
                      const int64_t* dims, const std::vector<std::string>& names) {
  OrtTensorTypeAndShapeInfo* info = nullptr;
  if (OrtStatus* st = api->CreateTensorTypeAndShapeInfo(&info)) return st;
  std::vector<const char*> sym;
  for (const auto& n : names) sym.push_back(n.c_str());
  OrtStatus* st = api->SetTensorElementType(info, type);
  if (!st) st = api->SetDimensions(info, dims, names.size());
  if (!st) st = api->SetSymbolicDimensions(info, sym.data(), sym.size());
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

    gla::OpAttributes a;
    read_attr(api, ctx, "q_num_heads", ORT_OP_ATTR_INT, &a.q_num_heads);
    read_attr(api, ctx, "kv_num_heads", ORT_OP_ATTR_INT, &a.kv_num_heads);
    read_attr(api, ctx, "reverse", ORT_OP_ATTR_INT, &a.reverse);
    read_attr(api, ctx, "chunk_size", ORT_OP_ATTR_INT, &a.chunk_size);
    read_attr(api, ctx, "scale", ORT_OP_ATTR_FLOAT, &a.scale);

    gla::TensorDesc desc[kNumInputs];
    std::vector<std::string> query_names;
    for (size_t i = 0; i < kNumInputs && i < count; ++i) {
      OrtTensorTypeAndShapeInfo* info = nullptr;  // owned by the context
      if (OrtStatus* st = api->ShapeInferContext_GetInputTypeShape(ctx, i, &info)) {
        api->ReleaseStatus(st);
        continue;
      }
      if (!info) continue;
      ONNXTensorElementDataType type;
      if (OrtStatus* st = api->GetTensorElementType(info, &type)) return st;
      if (type == ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED) continue;  // an absent optional input
      if (OrtStatus* st = describe(api, info, &desc[i])) return st;
      if (i == kQuery) {
        std::vector<const char*> sym(size_t(desc[i].rank), nullptr);
        if (OrtStatus* st = api->GetSymbolicDimensions(info, sym.data(), sym.size())) return st;
        for (const char* s : sym) query_names.push_back(s ? s : "");
      }
    }
    for (size_t i : {kQuery, kKey, kValue, kGate})
      if (!desc[i].present) return nullptr;  // types unknown here: nothing to say

    // A violation is not reported here: ONNX Runtime (1.21 to 1.31 at least) ignores, and leaks, a
    // status returned by shape inference. The kernel reports it, naming the input, at run time.
    gla::Problem p;
    if (gla::infer_problem(kKind, a, desc, int32_t(kNumInputs), gla::kInferAllowUnknownDims, &p) != gla::Status::kOk)
      return nullptr;

    int64_t out_dims[3], state_dims[4];
    gla::output_dims(p, out_dims, state_dims);
    auto name = [&](int64_t value, size_t query_dim, const char* fallback) {
      if (value >= 0) return std::string();
      if (query_dim < query_names.size() && !query_names[query_dim].empty()) return query_names[query_dim];
      return std::string(fallback);
    };
    const std::vector<std::string> out_names = {name(out_dims[0], 0, "gla_batch"), name(out_dims[1], 1, "gla_seq_len"),
                                                name(out_dims[2], 99, "gla_output_width")};
    const std::vector<std::string> state_names = {
        name(state_dims[0], p.has_cu_seqlens ? 99 : 0, p.has_cu_seqlens ? "gla_num_seqs" : "gla_batch"), "",
        name(state_dims[2], 99, "gla_head_dim_k"), name(state_dims[3], 99, "gla_head_dim_v")};
    if (OrtStatus* st = set_output(api, ctx, kOutput, onnx_type(p.act_dtype), out_dims, out_names)) return st;
    if (OrtStatus* st = set_output(api, ctx, kPresentState, onnx_type(p.state_dtype), state_dims, state_names)) {
      // a node without present_state has no second output to describe
      api->ReleaseStatus(st);
    }
    return nullptr;
  } catch (...) {
    return nullptr;  // no inferred shapes; the kernel still checks everything
  }
}

}  // namespace gla_ort
