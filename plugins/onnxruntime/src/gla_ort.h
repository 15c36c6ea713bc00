// Internal to the ONNX Runtime custom-op library: the op definition (one OrtCustomOp per execution
// provider x activation type x state type) and the kernel. Written against the ONNX Runtime C API
// only (no C++ wrappers, so nothing throws across the boundary), API version 21.
#pragma once

#include <onnxruntime_c_api.h>

#include <cstdint>
#include <string>

#include "gla/kernels.h"

namespace gla_ort {

constexpr const char* kDomain = "gla";
constexpr const char* kOpName = "GatedLinearAttention";

enum class Ep { kCpu, kCuda };

// Input and output positions (DESIGN.md §1).
enum Input : size_t { kQuery = 0, kKey, kValue, kGate, kPastState, kCuSeqlens, kGGamma, kNumInputs };
enum Output : size_t { kOutput = 0, kPresentState, kNumOutputs };

extern const char* const kInputNames[kNumInputs];
extern const char* const kOutputNames[kNumOutputs];

// One registration of the op. ORT builds one schema from all registrations of a name (the union of
// their types per input) and picks the kernel whose types match the node. query fixes the
// activation type and past_state the state type, so present_state gets past_state's type, and
// float32 when past_state is absent (the float32-state registration comes first for each
// activation type, and ORT's type inference takes the first match). key, value, gate, cu_seqlens
// and g_gamma accept any type at the schema level and are checked by the kernel, which can then
// name the offending input in its error.
struct OpDef : OrtCustomOp {
  Ep ep = Ep::kCpu;
  ONNXTensorElementDataType act = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  ONNXTensorElementDataType state = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
};

void init_op_def(OpDef* def, Ep ep, ONNXTensorElementDataType act, ONNXTensorElementDataType state);

// The attributes, read and checked once per node.
struct Attributes {
  int64_t q_num_heads = 0;
  int64_t kv_num_heads = 0;
  float scale = 0.f;
  int64_t reverse = 0;
  int64_t chunk_size = 64;
};

struct Kernel {
  const OrtApi* api = nullptr;
  Ep ep = Ep::kCpu;
  Attributes attrs;
  std::string node_name;
};

// Returns null on success, else an OrtStatus naming the offending input or attribute.
OrtStatus* compute(Kernel* kernel, OrtKernelContext* context);
OrtStatus* read_attributes(const OrtApi* api, const OrtKernelInfo* info, Attributes* out);
OrtStatus* infer_output_shapes(const OrtApi* api, OrtShapeInferContext* ctx);

}  // namespace gla_ort
