// Where the plugin's messages go: TensorRT's logger, found through the ILoggerFinder that
// TensorRT hands to setLoggerFinder() when it loads the library; stderr before that.
#pragma once

#include <NvInferRuntime.h>

#include <string>

namespace gla_trt {

void setLoggerFinder(nvinfer1::ILoggerFinder* finder) noexcept;

void log(nvinfer1::ILogger::Severity severity, std::string const& message) noexcept;

}  // namespace gla_trt
