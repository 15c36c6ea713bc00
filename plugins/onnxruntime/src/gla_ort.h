// Internal to the ONNX Runtime custom-op library: the op definition (one OrtCustomOp per execution
// provider x activation type x state type) and the kernel. Written against the ONNX Runtime C API
// only (no C++ wrappers, so nothing throws across the boundary), API version 21.
#pragma once

#include <onnxruntime_c_api.h>

#include <cstdint>
#include <string>

#include "gla/contract.h"
#include "gla/kernels.h"

namespace gla_ort {

constexpr const char* kDomain = "gla";
constexpr const char* kOpName = "GatedLinearAttention";

enum class Ep { kCpu, kCuda };

// Input and output positions (DESIGN.md §1).
enum Input : size_t { kQuery = 0, kKey, kValue, kGate, kPastState, kCuSeqlens, kGGamma, kNumInputs };
enum Output : size_t { kOutput = 0, kPresentState, kNumOutputs };


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

// One node's kernel: its attributes, read and checked (gla::check_attributes) once when ORT
// creates it, the prefix of its messages, and the allocator of its execution provider's device.
struct Kernel {
  const OrtApi* api = nullptr;
  Ep ep = Ep::kCpu;
  gla::OpAttributes attrs;
  std::string where;                 // "GatedLinearAttention 'node name'"
  OrtAllocator* allocator = nullptr; // workspace (and scratch state on CUDA); released with the kernel
  ~Kernel() {
    if (allocator) api->ReleaseAllocator(allocator);
  }
};

// Returns null on success, else an OrtStatus naming the offending input or attribute.
OrtStatus* compute(Kernel* kernel, OrtKernelContext* context);
OrtStatus* init_kernel(const OrtApi* api, const OrtKernelInfo* info, Kernel* kernel);
OrtStatus* infer_output_shapes(const OrtApi* api, OrtShapeInferContext* ctx);

}  // namespace gla_ort
