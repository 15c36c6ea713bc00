// The GLA CUDA kernels for fp32 activations (see gla_cuda.cu).
#include "cuda/forward.cuh"

namespace gla {
namespace cuda {
template Status run<float>(Plan, const Params&, unsigned char*, stream_t);
}  // namespace cuda
}  // namespace gla
