// The creators of the plugin, one per ONNX op type. TensorRT's ONNX parser finds a creator by the
// node's op type, version "1" and namespace "", and passes the node's attributes as fields; a
// deserialised engine passes back what getFieldsToSerialize() emitted. Both go through
// createPlugin(), which refuses unknown fields and bad values with a message naming them.
#pragma once

#include <NvInferRuntime.h>

#include <vector>

#include "gla_plugin.h"

namespace gla_trt {

class GlaPluginCreator final : public nvinfer1::IPluginCreatorV3One {
 public:
  explicit GlaPluginCreator(OpKind kind);

  nvinfer1::IPluginV3* createPlugin(char const* name, nvinfer1::PluginFieldCollection const* fc,
                                    nvinfer1::TensorRTPhase phase) noexcept override;
  nvinfer1::PluginFieldCollection const* getFieldNames() noexcept override;
  char const* getPluginName() const noexcept override;
  char const* getPluginVersion() const noexcept override;
  char const* getPluginNamespace() const noexcept override;

  // Reads a field collection into a Config; throws std::invalid_argument naming the field.
  // `runtime`: a plan being deserialised, which may also carry the declared workspace.
  Config parse(nvinfer1::PluginFieldCollection const* fc, bool runtime) const;

 private:
  OpKind mKind;
  std::vector<nvinfer1::PluginField> mFieldNames;
  nvinfer1::PluginFieldCollection mFieldCollection{};
};

}  // namespace gla_trt
