// The library's only exports (see libgla_tensorrt.map): what IPluginRegistry::loadLibrary,
// `trtexec --dynamicPlugins` and polygraphy `--plugins` look up with dlsym. TensorRT requires
// both symbols: without setLoggerFinder the library is refused (in Python, load_library returns
// without registering anything).
#include <NvInferRuntime.h>

#include "gla_creator.h"
#include "logging.h"

#define GLA_TRT_EXPORT __attribute__((visibility("default")))

extern "C" {

GLA_TRT_EXPORT void setLoggerFinder(nvinfer1::ILoggerFinder* finder) noexcept { gla_trt::setLoggerFinder(finder); }

GLA_TRT_EXPORT nvinfer1::IPluginCreatorInterface* const* getCreators(int32_t& nbCreators) noexcept {
  static gla_trt::GlaPluginCreator gatedLinearAttention(gla_trt::OpKind::kGatedLinearAttention);
  static gla_trt::GlaPluginCreator linearAttention(gla_trt::OpKind::kLinearAttention);
  static nvinfer1::IPluginCreatorInterface* const creators[] = {&gatedLinearAttention, &linearAttention};
  nbCreators = 2;
  return creators;
}

}  // extern "C"
