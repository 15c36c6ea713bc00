// C entry of the CPU emulation of the CUDA launchers (tests/kernels/test_cuda_kernels.py builds it
// and calls it through ctypes with CPU tensors): the code of forward.cuh and the kernels, run by
// the fiber scheduler of emu.cc. Not part of the product.
#define GLA_EMULATE 1
#include <vector_functions.h>
#include <vector_types.h>

#include "cuda/entry.cuh"

extern "C" {

int gla_emu_forward(const gla::Problem* problem, const gla::Tensors* tensors, void* workspace, size_t workspace_bytes) {
  return static_cast<int>(gla::cuda::forward(*problem, *tensors, workspace, workspace_bytes, nullptr));
}

size_t gla_emu_workspace_bytes(const gla::Problem* problem) { return gla::cuda::workspace_bytes(*problem); }
size_t gla_emu_workspace_bound(const gla::Problem* problem) { return gla::cuda::workspace_bound(*problem); }

const char* gla_emu_last_error() { return gla::last_error_message(); }

// What make_plan chose, for tests that must know which kernels ran: [chunk, seg_len, slots, nkb,
// nvb, ct, R, threads, gb, v2, v3].
void gla_emu_plan(const gla::Problem* problem, int64_t* out) {
  const gla::cuda::Plan p = gla::cuda::make_plan(*problem);
  const int64_t v[] = {p.chunk, p.seg_len, p.slots, p.nkb, p.nvb, p.ct, p.R, p.threads, p.gb, p.v2, p.v3};
  for (int i = 0; i < 11; ++i) out[i] = v[i];
}

}  // extern "C"
