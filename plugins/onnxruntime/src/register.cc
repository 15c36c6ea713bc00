// The library's one entry point, RegisterCustomOps: creates the "gla" domain (once, kept for the
// library's lifetime, as ONNX Runtime requires) holding GatedLinearAttention version 1 for the
// CPU execution provider and, when the kernel core has CUDA kernels, the CUDA execution provider.
#include <mutex>
#include <new>
#include <string>
#include <vector>

#include "gla_ort.h"

#if defined(_WIN32)
#define GLA_ORT_EXPORT __declspec(dllexport)
#else
#define GLA_ORT_EXPORT __attribute__((visibility("default")))
#endif

namespace gla_ort {
namespace {

constexpr ONNXTensorElementDataType kFloatTypes[] = {
    ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT,  // first: the state type when past_state is absent
    ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16,
    ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16,
};

const OpDef& def_of(const OrtCustomOp* op) { return *static_cast<const OpDef*>(op); }

OrtStatus* ORT_API_CALL create_kernel(const OrtCustomOp* op, const OrtApi* api, const OrtKernelInfo* info,
                                      void** out) {
  try {
    *out = nullptr;
    auto* kernel = new Kernel;
    kernel->api = api;
    kernel->ep = def_of(op).ep;
    if (OrtStatus* st = init_kernel(api, info, kernel)) {
      delete kernel;
      return st;
    }
    *out = kernel;
    return nullptr;
  } catch (...) {
    return api->CreateStatus(ORT_FAIL, "GatedLinearAttention: out of memory creating the kernel");
  }
}

OrtStatus* ORT_API_CALL kernel_compute(void* kernel, OrtKernelContext* context) {
  return compute(static_cast<Kernel*>(kernel), context);
}

void ORT_API_CALL kernel_destroy(void* kernel) { delete static_cast<Kernel*>(kernel); }

const char* ORT_API_CALL get_name(const OrtCustomOp*) { return kOpName; }

const char* ORT_API_CALL get_ep(const OrtCustomOp* op) {
  return def_of(op).ep == Ep::kCuda ? "CUDAExecutionProvider" : "CPUExecutionProvider";
}

ONNXTensorElementDataType ORT_API_CALL input_type(const OrtCustomOp* op, size_t index) {
  if (index == kQuery) return def_of(op).act;
  if (index == kPastState) return def_of(op).state;
  return ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;  // checked by the kernel, which names the input
}

size_t ORT_API_CALL input_count(const OrtCustomOp*) { return kNumInputs; }

ONNXTensorElementDataType ORT_API_CALL output_type(const OrtCustomOp* op, size_t index) {
  return index == kOutput ? def_of(op).act : def_of(op).state;
}

size_t ORT_API_CALL output_count(const OrtCustomOp*) { return kNumOutputs; }

OrtCustomOpInputOutputCharacteristic ORT_API_CALL input_characteristic(const OrtCustomOp*, size_t index) {
  return index <= kGate ? INPUT_OUTPUT_REQUIRED : INPUT_OUTPUT_OPTIONAL;
}

OrtCustomOpInputOutputCharacteristic ORT_API_CALL output_characteristic(const OrtCustomOp*, size_t index) {
  return index == kOutput ? INPUT_OUTPUT_REQUIRED : INPUT_OUTPUT_OPTIONAL;
}

OrtMemType ORT_API_CALL input_memory_type(const OrtCustomOp*, size_t) { return OrtMemTypeDefault; }

int ORT_API_CALL variadic_min_arity(const OrtCustomOp*) { return 1; }
int ORT_API_CALL variadic_homogeneity(const OrtCustomOp*) { return 1; }

const OrtApi* g_api = nullptr;  // set by RegisterCustomOps before any shape inference

OrtStatus* ORT_API_CALL infer_shapes(const OrtCustomOp*, OrtShapeInferContext* ctx) {
  return infer_output_shapes(g_api, ctx);
}

int ORT_API_CALL start_version(const OrtCustomOp*) { return 1; }
int ORT_API_CALL end_version(const OrtCustomOp*) { return 1000; }

// ---- the domain ----------------------------------------------------------------------------------

struct Registry {
  std::vector<OpDef*> defs;  // never freed: ORT holds pointers to them for the process lifetime
  OrtCustomOpDomain* domain = nullptr;
};

Registry g_registry;
std::mutex g_mutex;

OrtStatus* build_domain(const OrtApi* api) {
  if (g_registry.domain) return nullptr;
  OrtCustomOpDomain* domain = nullptr;
  if (OrtStatus* st = api->CreateCustomOpDomain(kDomain, &domain)) return st;
  std::vector<Ep> eps{Ep::kCpu};
  if (gla::cuda_compiled()) eps.push_back(Ep::kCuda);
  for (Ep ep : eps) {
    for (auto act : kFloatTypes) {
      for (auto state : kFloatTypes) {
        auto* def = new OpDef;
        init_op_def(def, ep, act, state);
        if (OrtStatus* st = api->CustomOpDomain_Add(domain, def)) {
          delete def;
          api->ReleaseCustomOpDomain(domain);
          return st;
        }
        g_registry.defs.push_back(def);
      }
    }
  }
  g_registry.domain = domain;
  return nullptr;
}

}  // namespace

void init_op_def(OpDef* def, Ep ep, ONNXTensorElementDataType act, ONNXTensorElementDataType state) {
  OrtCustomOp* op = def;
  *op = OrtCustomOp{};
  op->version = ORT_API_VERSION;
  op->CreateKernel = nullptr;
  op->GetName = get_name;
  op->GetExecutionProviderType = get_ep;
  op->GetInputType = input_type;
  op->GetInputTypeCount = input_count;
  op->GetOutputType = output_type;
  op->GetOutputTypeCount = output_count;
  op->KernelCompute = nullptr;
  op->KernelDestroy = kernel_destroy;
  op->GetInputCharacteristic = input_characteristic;
  op->GetOutputCharacteristic = output_characteristic;
  op->GetInputMemoryType = input_memory_type;
  op->GetVariadicInputMinArity = variadic_min_arity;
  op->GetVariadicInputHomogeneity = variadic_homogeneity;
  op->GetVariadicOutputMinArity = variadic_min_arity;
  op->GetVariadicOutputHomogeneity = variadic_homogeneity;
  op->CreateKernelV2 = create_kernel;
  op->KernelComputeV2 = kernel_compute;
  op->InferOutputShapeFn = infer_shapes;
  op->GetStartVersion = start_version;
  op->GetEndVersion = end_version;
  def->ep = ep;
  def->act = act;
  def->state = state;
}

}  // namespace gla_ort

extern "C" GLA_ORT_EXPORT OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options,
                                                                    const OrtApiBase* api_base) {
  if (!api_base) return nullptr;
  const OrtApi* api = api_base->GetApi(ORT_API_VERSION);
  if (!api) {
    // an onnxruntime older than these headers: report it through the oldest API there is
    const OrtApi* old = api_base->GetApi(1);
    return old ? old->CreateStatus(ORT_FAIL, "libgla_onnxruntime needs onnxruntime >= 1.21 (C API version 21)") : nullptr;
  }
  try {
    std::lock_guard<std::mutex> lock(gla_ort::g_mutex);
    gla_ort::g_api = api;
    if (OrtStatus* st = gla_ort::build_domain(api)) return st;
    return api->AddCustomOpDomain(options, gla_ort::g_registry.domain);
  } catch (...) {
    return api->CreateStatus(ORT_FAIL, "libgla_onnxruntime: registering the custom ops failed");
  }
}
