// The GLA kernel core: CPU and CUDA launchers shared by the ONNX Runtime custom-op library and the
// TensorRT plugin. Nothing here includes ONNX Runtime, TensorRT or CUDA headers: a launcher takes
// sizes, pointers, a workspace and (for CUDA) a stream, and returns a Status. Nothing aborts or
// throws across this boundary.
//
// The operation (DESIGN.md §1), per key/value head with S of shape [d_k, d_v]:
//     S_t = diag(exp(g_t + g_gamma)) · S_{t-1} + k_tᵀ v_t
//     o_t = scale · q_t S_t
// Query head h reads key/value head h / (Hq / Hkv). With `reverse` each sequence runs from its
// last position to its first. Ragged sequences (cu_seqlens) are packed along T with B = 1.
//
// Layouts (row-major, contiguous):
//     query  [B, T, Hq  * d_k]     key  [B, T, Hkv * d_k]     value [B, T, Hkv * d_v]
//     gate   [B, T, Hkv * d_k], or [B, T, Hkv] when gate_per_head
//     output [B, T, Hq  * d_v]
//     past_state / present_state [N, Hkv, d_k, d_v]     cu_seqlens [N + 1]     g_gamma [Hkv]
// query/key/value/gate/output share the activation dtype; the states share the state dtype
// (float32 by default, so float16 activations keep a float32 state). Accumulation is float32.
#pragma once

#include <cstddef>
#include <cstdint>

namespace gla {

enum class DType : int32_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

enum class Status : int32_t {
  kOk = 0,
  kInvalidArgument = 1,    // sizes or pointers inconsistent (see last_error_message())
  kUnsupported = 2,        // valid but not implemented by this backend (e.g. a head size too large)
  kCudaError = 3,          // a CUDA call or launch failed
  kWorkspaceTooSmall = 4,  // the workspace is smaller than *_workspace_bytes() asked for
  kInternal = 5,
};

// Everything the kernel choice and the workspace size depend on. Plain C layout (int32 flags) so
// that the C entry point (capi.h) and ctypes can pass it as it is.
struct Problem {
  int64_t batch = 0;     // B of the activations (1 when has_cu_seqlens)
  int64_t seq_len = 0;   // T
  int64_t num_seqs = 0;  // N: rows of the state; B, or len(cu_seqlens) - 1
  int32_t q_heads = 0;   // Hq, a multiple of kv_heads
  int32_t kv_heads = 0;  // Hkv
  int32_t head_dim_k = 0;
  int32_t head_dim_v = 0;
  DType act_dtype = DType::kFloat32;
  DType state_dtype = DType::kFloat32;
  DType g_gamma_dtype = DType::kFloat32;
  int32_t has_gate = 1;         // 0: no decay (LinearAttention update_rule "linear")
  int32_t gate_per_head = 0;    // 1: one log decay per head, gate is [B, T, Hkv]
  int32_t has_past_state = 0;   // 0: the state starts at zero
  int32_t has_cu_seqlens = 0;
  int32_t cu_seqlens_int64 = 0; // cu_seqlens element type: 1 int64, 0 int32
  int32_t has_g_gamma = 0;
  int32_t reverse = 0;
  float scale = 0.f;            // 0: d_k^-1/2
};

// Pointers into the memory of the device the launcher runs on (host memory for the CPU).
struct Tensors {
  const void* query = nullptr;
  const void* key = nullptr;
  const void* value = nullptr;
  const void* gate = nullptr;        // null when !has_gate
  const void* past_state = nullptr;  // null when !has_past_state
  const void* cu_seqlens = nullptr;  // null when !has_cu_seqlens
  const void* g_gamma = nullptr;     // null when !has_g_gamma
  void* output = nullptr;
  void* present_state = nullptr;
};

const char* dtype_name(DType dtype);
const char* status_name(Status status);
size_t dtype_size(DType dtype);

// Why the last call on this thread failed: a sentence naming the argument and its value.
const char* last_error_message();

// Checks sizes and flags (not pointers, not the contents of cu_seqlens).
Status validate(const Problem& problem);

// ---- CPU --------------------------------------------------------------------------------------

// How the CPU kernels spread work over threads: parallel_for(ctx, n, fn, arg) must call
// fn(arg, i) once for every i in [0, n), in any order and on any threads, and return when all
// calls have returned (ONNX Runtime's KernelContext_ParallelFor has this contract). A null
// Threading, or a null parallel_for, runs everything on the calling thread.
struct Threading {
  void (*parallel_for)(void* ctx, int64_t n, void (*fn)(void* arg, int64_t i), void* arg) = nullptr;
  void* ctx = nullptr;
};

size_t cpu_workspace_bytes(const Problem& problem);
Status cpu_forward(const Problem& problem, const Tensors& tensors, void* workspace, size_t workspace_bytes,
                   const Threading* threading);

// ---- CUDA (present when the library was built with CUDA; see cuda_compiled()) -----------------

// True when these launchers were compiled in (not whether a GPU is present).
bool cuda_compiled();

// Workspace for cuda_forward, in bytes of device memory (256-byte aligned by the caller).
size_t cuda_workspace_bytes(const Problem& problem);

// The most cuda_workspace_bytes() asks for over every problem with the fields of `largest` except
// a smaller (or equal) batch, num_seqs and seq_len: what an engine declares once for a profile.
// A closed form next to the planner (cuda/forward.cuh); arithmetic only, no CUDA call.
size_t cuda_workspace_bound(const Problem& largest);

// Enqueues the whole operation on `stream` (a cudaStream_t); no allocation, no synchronisation.
// cu_seqlens, when present, is read on the device.
Status cuda_forward(const Problem& problem, const Tensors& tensors, void* workspace, size_t workspace_bytes,
                    void* stream);

}  // namespace gla
