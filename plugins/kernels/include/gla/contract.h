// The op's contract, once: which inputs, element types, shapes, attributes and limits the GLA op
// accepts, for both ONNX forms (our GatedLinearAttention and the standard LinearAttention), and the
// gla::Problem they describe. The ONNX Runtime op (shape inference and compute), the TensorRT
// plugin (creator, getOutputShapes, configurePlugin, onShapeChange, getWorkspaceSize) and the C API
// (capi.h, gla_infer_problem) translate their descriptors into TensorDesc and call infer_problem;
// so the engines accept the same nodes and refuse the others with the same message. The Python
// side (gla_export/ops/contract.py) holds the same rules for the reference op and gla_export.ops;
// tests/conformance drives one table of cases through all of them. The table of the contract is in
// docs/op-contract.md.
//
// Messages name the input and its shape: "input 'key' has shape [2,5,24], expected [B=2, T=5,
// kv_num_heads*d_k=32]" ('?' for a dimension not known at build time). Nothing here throws.
#pragma once

#include <cstddef>
#include <cstdint>

#include "gla/kernels.h"

namespace gla {

enum class OpKind : int32_t { kGatedLinearAttention = 0, kLinearAttention = 1 };

// Element type of an input as an engine reports it (a superset of DType; DType's values first).
enum class ElemType : int32_t {
  kFloat32 = 0,
  kFloat16 = 1,
  kBFloat16 = 2,
  kInt32 = 3,
  kInt64 = 4,
  kFloat64 = 5,
  kInt8 = 6,
  kUInt8 = 7,
  kBool = 8,
  kOther = 9,
};

constexpr int32_t kMaxDescRank = 8;

// One input as the engine sees it. rank < 0: not known (shape inference without a shape).
// dims[i] < 0: not known (only accepted with kInferAllowUnknownDims).
struct TensorDesc {
  int32_t present = 0;    // 0: an absent optional input (the other fields are ignored)
  int32_t elem_type = 0;  // ElemType
  int32_t rank = 0;
  int32_t reserved = 0;
  int64_t dims[kMaxDescRank] = {};
};

// LinearAttention's update_rule, the only string attribute.
enum class UpdateRule : int32_t { kGated = 0, kLinear = 1, kUnsupported = 2, kMissing = 3 };

// An integer attribute the node does not carry.
constexpr int64_t kAttrMissing = INT64_MIN;

// The node's attributes as the ONNX node carries them (int64, so that an out-of-range value is
// seen, not truncated: a q_num_heads of 2^32+4 is refused, never read as 4).
struct OpAttributes {
  int64_t q_num_heads = kAttrMissing;  // required
  int64_t kv_num_heads = kAttrMissing; // required
  int64_t reverse = 0;      // GatedLinearAttention only
  int64_t chunk_size = 64;  // a hint; >= 0
  float scale = 0.f;        // 0: d_k^-1/2
  int32_t update_rule = 0;  // LinearAttention only (UpdateRule)
};

// infer_problem flags
enum : int32_t {
  kInferAllowUnknownDims = 1,  // build time: unknown (-1) dimensions pass; the problem keeps -1 there
  kInferForCuda = 2,           // the CUDA kernels will run it: their head-size limit applies
};

// The limits (the same numbers in gla_export/ops/contract.py).
constexpr int64_t kMaxHeads = 1 << 16;        // q_num_heads and kv_num_heads
constexpr int64_t kMaxHeadDim = 1 << 14;      // d_k and d_v
constexpr int64_t kCudaMaxHeadDimK = 1024;    // d_k on the CUDA kernels

// Inputs by position (the ONNX schemas).
// GatedLinearAttention: query, key, value, gate, [past_state], [cu_seqlens], [g_gamma]
// LinearAttention:      query, key, value, [past_state], [decay], [beta]
const char* op_name(OpKind kind);
int32_t op_min_inputs(OpKind kind);
int32_t op_max_inputs(OpKind kind);
const char* op_input_name(OpKind kind, int32_t index);  // "" past the end
const char* elem_type_name(ElemType type);

// The attributes alone (what a kernel or plugin creator can check before any shape is known).
Status check_attributes(OpKind kind, const OpAttributes& attrs);

// Inputs + attributes -> the problem, or kInvalidArgument (kUnsupported for a size over a kernel
// limit) with last_error_message() naming the input and its shape. With unknown dimensions
// (kInferAllowUnknownDims) the problem carries -1 where a size is not known yet; otherwise it is
// complete and validate()d. present_state's dtype is problem->state_dtype (float32 without a
// past_state).
Status infer_problem(OpKind kind, const OpAttributes& attrs, const TensorDesc* inputs, int32_t num_inputs,
                     int32_t flags, Problem* problem);

// Shapes of the outputs of a problem (-1 where the problem has one).
void output_dims(const Problem& problem, int64_t output[3], int64_t present_state[4]);

}  // namespace gla
