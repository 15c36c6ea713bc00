// The CUDA launchers of a kernel core built without CUDA (no nvcc, GLA_WITH_CUDA=OFF, or no
// src/cuda/*.cu yet): they exist so that every consumer links, and say clearly why they refuse.
#include "common/error.h"
#include "gla/kernels.h"

namespace gla {

bool cuda_compiled() { return false; }

size_t cuda_workspace_bytes(const Problem&) { return 0; }
size_t cuda_workspace_bound(const Problem&) { return 0; }

Status cuda_forward(const Problem&, const Tensors&, void*, size_t, void*) {
  return detail::fail(Status::kUnsupported,
                      "this build of the GLA kernels has no CUDA kernels (built without a CUDA compiler, with "
                      "GLA_WITH_CUDA=OFF, or before plugins/kernels/src/cuda existed)");
}

}  // namespace gla
