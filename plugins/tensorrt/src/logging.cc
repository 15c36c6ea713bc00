#include "logging.h"

#include <atomic>
#include <cstdio>

namespace gla_trt {
namespace {
std::atomic<nvinfer1::ILoggerFinder*> gLoggerFinder{nullptr};
}  // namespace

void setLoggerFinder(nvinfer1::ILoggerFinder* finder) noexcept { gLoggerFinder.store(finder); }

void log(nvinfer1::ILogger::Severity severity, std::string const& message) noexcept {
  try {
    nvinfer1::ILogger* logger = nullptr;
    if (auto* finder = gLoggerFinder.load()) {
      logger = finder->findLogger();
    }
    if (logger != nullptr) {
      logger->log(severity, message.c_str());
      return;
    }
    // No TensorRT logger (the library was loaded by hand, e.g. by the test harness): errors and
    // warnings still have to reach someone.
    if (severity <= nvinfer1::ILogger::Severity::kWARNING) {
      std::fprintf(stderr, "[gla_tensorrt] %s\n", message.c_str());
    }
  } catch (...) {
    // a failing logger must not take the caller down with it
  }
}

}  // namespace gla_trt
