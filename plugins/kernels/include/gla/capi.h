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

/* The op contract (gla/contract.h): input descriptors and attributes -> the problem, or a status
 * with gla_last_error_message() naming the input and its shape. Inputs by position:
 *   op 0 GatedLinearAttention: query, key, value, gate, [past_state], [cu_seqlens], [g_gamma]
 *   op 1 LinearAttention:      query, key, value, [past_state], [decay], [beta]
 * elem_type: GLA_ELEM_*; dims[i] = -1 for a size unknown at build time (flags GLA_INFER_ALLOW_UNKNOWN_DIMS,
 * then the problem has -1 there); GLA_INFER_FOR_CUDA applies the CUDA kernels' head-size limit. */
enum {
  GLA_ELEM_FLOAT32 = 0,
  GLA_ELEM_FLOAT16 = 1,
  GLA_ELEM_BFLOAT16 = 2,
  GLA_ELEM_INT32 = 3,
  GLA_ELEM_INT64 = 4,
  GLA_ELEM_FLOAT64 = 5,
  GLA_ELEM_INT8 = 6,
  GLA_ELEM_UINT8 = 7,
  GLA_ELEM_BOOL = 8,
  GLA_ELEM_OTHER = 9,
};
enum { GLA_INFER_ALLOW_UNKNOWN_DIMS = 1, GLA_INFER_FOR_CUDA = 2 };
enum { GLA_UPDATE_RULE_GATED = 0, GLA_UPDATE_RULE_LINEAR = 1, GLA_UPDATE_RULE_UNSUPPORTED = 2, GLA_UPDATE_RULE_MISSING = 3 };
#define GLA_ATTR_MISSING INT64_MIN

/* gla::TensorDesc */
typedef struct GlaTensorDesc {
  int32_t present;
  int32_t elem_type;
  int32_t rank; /* < 0: unknown */
  int32_t reserved;
  int64_t dims[8];
} GlaTensorDesc;

/* gla::OpAttributes; an int attribute the node lacks is GLA_ATTR_MISSING */
typedef struct GlaOpAttributes {
  int64_t q_num_heads;
  int64_t kv_num_heads;
  int64_t reverse;
  int64_t chunk_size;
  float scale;
  int32_t update_rule;
} GlaOpAttributes;

GLA_CAPI_EXPORT int32_t gla_check_attributes(int32_t op, const GlaOpAttributes* attrs);
GLA_CAPI_EXPORT int32_t gla_infer_problem(int32_t op, const GlaOpAttributes* attrs, const GlaTensorDesc* inputs,
                                          int32_t num_inputs, int32_t flags, GlaProblem* problem);

/* CPU. num_threads: 0 uses every hardware thread, 1 runs on the calling thread. The library keeps
 * one pool of worker threads; concurrent calls take turns on it. The workspace is host memory of
 * at least gla_cpu_workspace_bytes() bytes (0 when the problem is invalid). */
GLA_CAPI_EXPORT size_t gla_cpu_workspace_bytes(const GlaProblem* problem);
GLA_CAPI_EXPORT int32_t gla_cpu_forward(const GlaProblem* problem, const GlaTensors* tensors, void* workspace,
                                        size_t workspace_bytes, int32_t num_threads);
/* The build of the CPU hot loops that runs here: "avx512", "avx2", "neon" or "generic"
 * (GLA_CPU_ISA=generic|avx2 in the environment forces a lesser one, for tests). */
GLA_CAPI_EXPORT const char* gla_cpu_isa(void);

/* CUDA. gla_cuda_compiled() is 1 when the CUDA kernels were built in (not whether a GPU is
 * present). stream is a cudaStream_t (0 = the legacy default stream); the workspace is device
 * memory, 256-byte aligned. Enqueues only: no allocation, no synchronisation. */
GLA_CAPI_EXPORT int32_t gla_cuda_compiled(void);
GLA_CAPI_EXPORT size_t gla_cuda_workspace_bytes(const GlaProblem* problem);
/* The most gla_cuda_workspace_bytes() asks for over every problem like `largest` with a smaller or
 * equal batch, num_seqs and seq_len (what an engine declares for a profile). */
GLA_CAPI_EXPORT size_t gla_cuda_workspace_bound(const GlaProblem* largest);
GLA_CAPI_EXPORT int32_t gla_cuda_forward(const GlaProblem* problem, const GlaTensors* tensors, void* workspace,
                                         size_t workspace_bytes, void* stream);

#ifdef __cplusplus
}
#endif

#endif /* GLA_CAPI_H_ */
