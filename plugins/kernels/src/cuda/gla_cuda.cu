// The CUDA launchers declared in gla/kernels.h. Everything lives in the headers beside this file
// (entry.cuh checks a call, forward.cuh plans and launches, recurrent.cuh and chunk.cuh are the
// kernels) so that the tests' CPU emulation compiles exactly the same code. The kernels of each
// activation type are compiled in gla_cuda_<type>.cu.
#include "cuda/entry.cuh"

namespace gla {

bool cuda_compiled() { return true; }

size_t cuda_workspace_bytes(const Problem& problem) { return cuda::workspace_bytes(problem); }

size_t cuda_workspace_bound(const Problem& largest) { return cuda::workspace_bound(largest); }

Status cuda_forward(const Problem& problem, const Tensors& tensors, void* workspace, size_t workspace_bytes,
                    void* stream) {
  return cuda::forward(problem, tensors, workspace, workspace_bytes, static_cast<cudaStream_t>(stream));
}

}  // namespace gla
