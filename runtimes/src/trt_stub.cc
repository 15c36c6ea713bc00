// Built instead of trt_backend.cc when no TensorRT headers were found at build time.
#include "common.h"

namespace gla_run {

bool trt_compiled() { return false; }

std::unique_ptr<Backend> make_trt_backend(const TrtOptions&, const Metadata&) {
  throw Error(kMissingRuntime,
              "this gla-run was built without TensorRT: rebuild it where the TensorRT headers are found "
              "(TENSORRT_INCLUDE_DIR or a TensorRT install; see runtimes/README.md)");
}

}  // namespace gla_run
