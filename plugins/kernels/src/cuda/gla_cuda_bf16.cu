// The GLA CUDA kernels for bf16 activations (see gla_cuda.cu).
#include "cuda/forward.cuh"

namespace gla {
namespace cuda {
template Status run<bf16>(Plan, const Params&, unsigned char*, stream_t);
}  // namespace cuda
}  // namespace gla
