// TensorRT IPluginV3 plugin for the GLA op: one class with the OneCore/OneBuild/OneRuntime views,
// serving two ONNX ops (see README.md):
//   GatedLinearAttention  our custom op (domain "gla"): query, key, value, gate, [past_state],
//                         [cu_seqlens], [g_gamma]
//   LinearAttention       the standard opset-27 op with update_rule "gated" or "linear": query,
//                         key, value, [past_state], [decay], [beta]
// The arithmetic is the kernel core's (plugins/kernels, gla::cuda_forward); this file only maps
// TensorRT descriptors to a gla::Problem. Nothing here throws across a noexcept boundary: every
// entry point catches, reports through the error recorder or the logger, and returns an error.
#pragma once

#include <NvInferRuntime.h>

#include <array>
#include <cstdint>
#include <string>
#include <vector>

#include "gla/contract.h"
#include "gla/kernels.h"

namespace gla_trt {

using gla::OpKind;

inline char const* opName(OpKind kind) { return gla::op_name(kind); }

// Version and namespace of both creators' plugins: the creator and the plugin must report the
// same pair, or TensorRT cannot find the creator when it deserialises an engine.
inline constexpr char const* kPluginVersion = "1";
inline constexpr char const* kPluginNamespace = "";

// The node's attributes, exactly as the ONNX attributes of each op, plus what the plan carries.
struct Config {
  OpKind kind = OpKind::kGatedLinearAttention;
  int32_t q_num_heads = 0;
  int32_t kv_num_heads = 0;
  float scale = 0.f;       // 0: d_k^-1/2
  int32_t reverse = 0;     // GatedLinearAttention only
  int32_t chunk_size = 64; // a hint (0: no preference); the kernels pick their own tiling
  std::string update_rule; // LinearAttention only: "gated" or "linear"
  // Not an ONNX attribute: the workspace the build declared (getWorkspaceSize), serialised with the
  // plan so that enqueue can tell the kernel core the real size; -1 when not known.
  int64_t workspace_bytes = -1;

  gla::OpAttributes attributes() const;
  std::string describe() const;
};

// LinearAttention's update_rule as the contract's enum (a missing attribute is kMissing).
gla::UpdateRule updateRule(std::string const& rule, bool present);

class GlaPlugin final : public nvinfer1::IPluginV3,
                        public nvinfer1::IPluginV3OneCore,
                        public nvinfer1::IPluginV3OneBuild,
                        public nvinfer1::IPluginV3OneRuntime {
 public:
  GlaPlugin(std::string name, Config config);
  GlaPlugin(GlaPlugin const& other);
  GlaPlugin& operator=(GlaPlugin const&) = delete;
  ~GlaPlugin() override = default;

  // IPluginV3
  nvinfer1::IPluginCapability* getCapabilityInterface(nvinfer1::PluginCapabilityType type) noexcept override;
  nvinfer1::IPluginV3* clone() noexcept override;

  // IPluginV3OneCore
  char const* getPluginName() const noexcept override;
  char const* getPluginVersion() const noexcept override;
  char const* getPluginNamespace() const noexcept override;

  // IPluginV3OneBuild
  int32_t configurePlugin(nvinfer1::DynamicPluginTensorDesc const* in, int32_t nbInputs,
                          nvinfer1::DynamicPluginTensorDesc const* out, int32_t nbOutputs) noexcept override;
  int32_t getOutputDataTypes(nvinfer1::DataType* outputTypes, int32_t nbOutputs, nvinfer1::DataType const* inputTypes,
                             int32_t nbInputs) const noexcept override;
  int32_t getOutputShapes(nvinfer1::DimsExprs const* inputs, int32_t nbInputs, nvinfer1::DimsExprs const* shapeInputs,
                          int32_t nbShapeInputs, nvinfer1::DimsExprs* outputs, int32_t nbOutputs,
                          nvinfer1::IExprBuilder& exprBuilder) noexcept override;
  bool supportsFormatCombination(int32_t pos, nvinfer1::DynamicPluginTensorDesc const* inOut, int32_t nbInputs,
                                 int32_t nbOutputs) noexcept override;
  int32_t getNbOutputs() const noexcept override;
  size_t getWorkspaceSize(nvinfer1::DynamicPluginTensorDesc const* inputs, int32_t nbInputs,
                          nvinfer1::DynamicPluginTensorDesc const* outputs, int32_t nbOutputs) const noexcept override;
  char const* getTimingCacheID() noexcept override;
  char const* getMetadataString() noexcept override;

  // IPluginV3OneRuntime
  int32_t onShapeChange(nvinfer1::PluginTensorDesc const* in, int32_t nbInputs, nvinfer1::PluginTensorDesc const* out,
                        int32_t nbOutputs) noexcept override;
  int32_t enqueue(nvinfer1::PluginTensorDesc const* inputDesc, nvinfer1::PluginTensorDesc const* outputDesc,
                  void const* const* inputs, void* const* outputs, void* workspace,
                  cudaStream_t stream) noexcept override;
  nvinfer1::IPluginV3* attachToContext(nvinfer1::IPluginResourceContext* context) noexcept override;
  nvinfer1::PluginFieldCollection const* getFieldsToSerialize() noexcept override;

  Config const& config() const { return mConfig; }

 private:
  // The contract's problem for these descriptors (gla::infer_problem); throws std::invalid_argument
  // with the contract's message (naming the input and its shape) when they do not fit the op.
  gla::Problem infer(nvinfer1::PluginTensorDesc const* in, int32_t nbInputs, int32_t flags) const;
  // The outputs TensorRT built agree with the problem (types; shapes where known).
  void checkOutputs(gla::Problem const& p, nvinfer1::PluginTensorDesc const* out, int32_t nbOutputs) const;

  void reportError(nvinfer1::ErrorCode code, std::string const& message) const noexcept;
  std::string where() const;  // "GatedLinearAttention plugin 'node'"

  std::string mName;
  Config mConfig;
  nvinfer1::IErrorRecorder* mRecorder = nullptr;
  int32_t mNbInputs = 0;  // enqueue() is not told how many inputs there are
  // What onShapeChange validated, reused by enqueue while the input shapes stay the same.
  gla::Problem mProblem{};
  std::array<nvinfer1::Dims, 7> mShapes{};
  bool mHaveProblem = false;
  mutable int64_t mDeclaredWorkspace = -1;  // the largest getWorkspaceSize() answered (build time)
  std::string mTimingId;
  std::vector<nvinfer1::PluginField> mFields;
  nvinfer1::PluginFieldCollection mFieldCollection{};
};

}  // namespace gla_trt
