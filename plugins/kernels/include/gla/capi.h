/* C entry point to the GLA kernel core (libgla_kernels_capi): for ctypes (gla_export.ops.native,
 * tests, benchmarks) and for C programs. Plain C; the structs have exactly the layout of
 * gla::Problem and gla::Tensors (kernels.h), which capi.cc checks at compile time, so C++ callers
 * may pass those instead.
 *
 * Every function returns a status (0 = ok, see GLA_STATUS_*) or a size; none aborts or throws.
 * After a failure, gla_last_error_message() names the argument and its value (per thread).
 */
#ifndef GLA_CAPI_H_
#define GLA_CAPI_H_

#include <stddef.h>
#include <stdint.h>

#if defined(_WIN32)
#define GLA_CAPI_EXPORT __declspec(dllexport)
#else
#define GLA_CAPI_EXPORT __attribute__((visibility("default")))
#endif

#ifdef __cplusplus
extern "C" {
#endif

#define GLA_CAPI_VERSION 1

enum {
  GLA_DTYPE_FLOAT32 = 0,
  GLA_DTYPE_FLOAT16 = 1,
  GLA_DTYPE_BFLOAT16 = 2,
};

enum {
  GLA_STATUS_OK = 0,
  GLA_STATUS_INVALID_ARGUMENT = 1,
  GLA_STATUS_UNSUPPORTED = 2,
  GLA_STATUS_CUDA_ERROR = 3,
  GLA_STATUS_WORKSPACE_TOO_SMALL = 4,
  GLA_STATUS_INTERNAL = 5,
};

/* gla::Problem: sizes, dtypes and flags (see kernels.h for the meaning of each field). */
typedef struct GlaProblem {
  int64_t batch;
  int64_t seq_len;
  int64_t num_seqs;
  int32_t q_heads;
  int32_t kv_heads;
  int32_t head_dim_k;
  int32_t head_dim_v;
  int32_t act_dtype;
  int32_t state_dtype;
  int32_t g_gamma_dtype;
  int32_t has_gate;
  int32_t gate_per_head;
  int32_t has_past_state;
  int32_t has_cu_seqlens;
  int32_t cu_seqlens_int64;
  int32_t has_g_gamma;
  int32_t reverse;
  float scale;
} GlaProblem;

/* gla::Tensors: pointers into host memory (CPU) or device memory (CUDA). On the CPU,
 * present_state may be null (the final state is not written) and may equal past_state. */
typedef struct GlaTensors {
  const void* query;
  const void* key;
  const void* value;
  const void* gate;
  const void* past_state;
  const void* cu_seqlens;
  const void* g_gamma;
  void* output;
  void* present_state;
} GlaTensors;

GLA_CAPI_EXPORT int32_t gla_capi_version(void);

/* Why the last failing call on this thread failed ("" when none did). */
GLA_CAPI_EXPORT const char* gla_last_error_message(void);
GLA_CAPI_EXPORT const char* gla_status_name(int32_t status);

/* Checks sizes and flags (not pointers, not the contents of cu_seqlens). */
GLA_CAPI_EXPORT int32_t gla_validate(const GlaProblem* problem);

/* CPU. num_threads: 0 uses every hardware thread, 1 runs on the calling thread. The library keeps
 * one pool of worker threads; concurrent calls take turns on it. The workspace is host memory of
 * at least gla_cpu_workspace_bytes() bytes (0 when the problem is invalid). */
GLA_CAPI_EXPORT size_t gla_cpu_workspace_bytes(const GlaProblem* problem);
GLA_CAPI_EXPORT int32_t gla_cpu_forward(const GlaProblem* problem, const GlaTensors* tensors, void* workspace,
                                        size_t workspace_bytes, int32_t num_threads);
/* The build of the CPU hot loops that runs here: "avx512", "avx2" or "generic"
 * (GLA_CPU_ISA=generic|avx2 in the environment forces a lesser one, for tests). */
GLA_CAPI_EXPORT const char* gla_cpu_isa(void);

/* CUDA. gla_cuda_compiled() is 1 when the CUDA kernels were built in (not whether a GPU is
 * present). stream is a cudaStream_t (0 = the legacy default stream); the workspace is device
 * memory, 256-byte aligned. Enqueues only: no allocation, no synchronisation. */
GLA_CAPI_EXPORT int32_t gla_cuda_compiled(void);
GLA_CAPI_EXPORT size_t gla_cuda_workspace_bytes(const GlaProblem* problem);
GLA_CAPI_EXPORT int32_t gla_cuda_forward(const GlaProblem* problem, const GlaTensors* tensors, void* workspace,
                                         size_t workspace_bytes, void* stream);

#ifdef __cplusplus
}
#endif

#endif /* GLA_CAPI_H_ */
