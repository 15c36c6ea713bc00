// The CUDA launchers: which kernels a Problem takes, their grids, the workspace layout, the launches.
// Included by the per-type translation units (gla_cuda_<type>.cu), by entry.cuh (cuda_forward's
// checks) and so by the CPU emulation of the tests, which runs exactly this code.
#pragma once

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "common/error.h"
#include "cuda/chunk.cuh"
#include "cuda/params.cuh"
#include "cuda/recurrent.cuh"
#include "gla/kernels.h"

#if defined(GLA_EMULATE)
namespace gla {
namespace cuda {
using stream_t = void*;
namespace rt {
inline bool device(int& dev, int& cc_major, int& smem_optin, const char*& why) {
  dev = 0;
  cc_major = 9;
  smem_optin = 227 * 1024;
  why = nullptr;
  return true;
}
template <auto Kernel>
inline bool allow_smem(int, size_t, const char*&) {
  return true;
}
inline const char* last_launch_error() { return nullptr; }
}  // namespace rt
}  // namespace cuda
}  // namespace gla
#else
namespace gla {
namespace cuda {
using stream_t = cudaStream_t;
namespace rt {
inline bool device(int& dev, int& cc_major, int& smem_optin, const char*& why) {
  cudaError_t e = cudaGetDevice(&dev);
  if (e == cudaSuccess) e = cudaDeviceGetAttribute(&cc_major, cudaDevAttrComputeCapabilityMajor, dev);
  if (e == cudaSuccess) e = cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  why = e == cudaSuccess ? nullptr : cudaGetErrorString(e);
  return e == cudaSuccess;
}
// Raises a kernel's dynamic shared-memory limit once per device (idempotent, so a race between
// threads only repeats a harmless call).
template <auto Kernel>
inline bool allow_smem(int dev, size_t bytes, const char*& why) {
  static std::atomic<uint64_t> done{0};
  const uint64_t bit = dev >= 0 && dev < 64 ? uint64_t(1) << dev : 0;
  if (bit && (done.load(std::memory_order_acquire) & bit)) return true;
  const cudaError_t e = cudaFuncSetAttribute(Kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes));
  if (e != cudaSuccess) {
    why = cudaGetErrorString(e);
    return false;
  }
  if (bit) done.fetch_or(bit, std::memory_order_acq_rel);
  return true;
}
inline const char* last_launch_error() {
  const cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? nullptr : cudaGetErrorString(e);
}
}  // namespace rt
}  // namespace cuda
}  // namespace gla
#endif

namespace gla {
namespace cuda {

// Sequences at most this long run step by step (decode); longer ones chunk by chunk. With
// cu_seqlens the lengths are unknown on the host, so only a short total goes step by step.
constexpr int64_t kRecurrentMaxT = 16;
constexpr int64_t kRecurrentMaxTPacked = 64;
constexpr int kChunkMaxK = 256;             // NKB <= 4 (the state slice lives in registers)
constexpr int64_t kTargetBlocks = 256;      // enough blocks to fill a data-centre GPU twice over
constexpr int64_t kMinSegmentChunks = 8;    // shorter segments cost more in the extra passes than they gain
constexpr size_t kAlign = 256;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// GLA_CUDA_STEP_ROWS (4, 8 or 16; default 4): the step kernel's state rows a thread, a tuning knob
// for benchmarks (read once per process; the workspace does not depend on it). The segment split's
// target (kTargetBlocks) is a constant: the workspace depends on it, and an engine planned under one
// value must not run under another (a TensorRT plan declares its workspace once, at build time).
inline int step_rows() {
  static const int value = [] {
    const char* e = std::getenv("GLA_CUDA_STEP_ROWS");
    const int v = e ? std::atoi(e) : 4;
    return v == 8 || v == 16 ? v : 4;
  }();
  return value;
}

inline size_t align_up(size_t x) { return (x + kAlign - 1) / kAlign * kAlign; }

// Prefill v2 (shared scores: gla_scores_kernel once per chunk and query head, then the main kernel
// without Q̃K̃ᵀ) and v3 (the state at every chunk boundary, then the scores and a parallel output
// kernel) can run wherever a head has two or more value blocks; the workspace of both is planned
// for every such problem whichever path runs, so the choice below never changes the workspace.
inline bool shares_scores(int nvb) { return nvb >= 2; }

// Which prefill runs where v2/v3 can: GLA_CUDA_PREFILL=v1, v2 or v3 (a knob for benchmarks and
// tests, read at each call; it changes no workspace). Default v1 everywhere: v2 and v3 stay opt-in
// until they have been timed on a GPU (docs/cuda-kernels.md).
inline int prefill_version() {
  const char* e = std::getenv("GLA_CUDA_PREFILL");
  if (e && std::strcmp(e, "v2") == 0) return 2;
  if (e && std::strcmp(e, "v3") == 0) return 3;
  return 1;
}

// GLA_CUDA_V3_SEGMENTS=0: v3 walks whole sequences in its chunk-states kernel, without the segment
// passes (a knob for benchmarks: fewer, longer walks against two passes; read at each call). Safe
// for the workspace: the plan drops segments only after the workspace was planned with them.
inline bool v3_segments() {
  const char* e = std::getenv("GLA_CUDA_V3_SEGMENTS");
  return !(e && std::strcmp(e, "0") == 0);
}

struct Plan {
  bool chunk = false;
  // chunk path
  int nkb = 0, nvb = 0;
  int64_t seg_len = 0;  // 0: one segment per sequence
  int64_t nseg_dense = 1;
  int64_t slots = 0;
  size_t off_seg_off = 0, off_seg_state = 0, off_seg_decay = 0;
  // shared scores (v2, v3) and chunk-boundary states (v3): planned whenever shares_scores(nvb)
  bool v2 = false, v3 = false;
  int64_t cslots = 0;  // chunk slots: the scores kernel's grid over (sequence, chunk)
  int64_t nchunk_dense = 0;
  size_t off_chunk_off = 0, off_scores = 0, off_chunk_state = 0;
  size_t workspace = 0;
  // recurrent path (always planned: the fallback when the chunk kernel cannot run on this device)
  int ct = 0, R = 0, threads = 0, gb = 0, rnvb = 0;
  size_t rsmem = 0;
};

inline int next_pow2(int x) {
  int p = 1;
  while (p < x) p <<= 1;
  return p;
}

inline Plan make_plan(const Problem& pr) {
  Plan pl;
  const int64_t N = pr.num_seqs, T = pr.seq_len;
  const int K = pr.head_dim_k, V = pr.head_dim_v, G = pr.q_heads / pr.kv_heads;

  // recurrent: 4 state rows a thread (64 registers, four 256-thread blocks resident per SM: enough
  // loads in flight for a decode step to run at memory speed); a block is 256 threads, so its
  // columns (4 per thread) are what the rows leave; K past 256 takes more rows a thread.
  int ct = std::min(32, std::max(4, next_pow2(int(ceil_div(V, 4)))));
  int R = step_rows();
  while (ct > 4 && ceil_div(K, R) * ct > 256) ct /= 2;
  while (R < 16 && ceil_div(K, R) * ct > 256) R *= 2;
  const int threads = int(ceil_div(ceil_div(K, R) * ct, 32) * 32);  // past 256 only for K > 1024: refused
  pl.ct = ct;
  pl.R = R;
  pl.threads = threads;
  pl.rnvb = int(ceil_div(V, 4 * ct));
  const int warps = threads / 32;
  const int64_t per_head = int64_t(2) * warps * ct * 4 * 4;  // bytes of partial sums per query head
  pl.gb = int(std::max<int64_t>(1, std::min<int64_t>(G, (32 * 1024) / per_head)));
  pl.rsmem = recurrent_smem_bytes(threads, ct, pl.gb);

  const int64_t short_t = pr.has_cu_seqlens ? kRecurrentMaxTPacked : kRecurrentMaxT;
  pl.chunk = T > short_t && K <= kChunkMaxK;
  if (!pl.chunk) return pl;

  pl.nkb = int(ceil_div(K, kBK));
  pl.nvb = int(ceil_div(V, kBV));
  const int64_t base = N * pr.q_heads * pl.nvb;
  const int64_t chunks = pr.has_cu_seqlens ? ceil_div(ceil_div(T, N), kChunk) : ceil_div(T, kChunk);
  if (base < kTargetBlocks) {
    const int64_t want = ceil_div(kTargetBlocks, base);
    const int64_t seg_chunks = std::max(kMinSegmentChunks, ceil_div(chunks, want));
    if (seg_chunks < chunks) pl.seg_len = seg_chunks * kChunk;
  }
  size_t off = 0;
  if (pl.seg_len == 0) {
    pl.slots = N;
  } else {
    pl.nseg_dense = std::max<int64_t>(1, ceil_div(T, pl.seg_len));
    pl.slots = pr.has_cu_seqlens ? N + T / pl.seg_len : N * pl.nseg_dense;
    if (pr.has_cu_seqlens) {
      pl.off_seg_off = off;
      off = align_up(off + size_t(N + 1) * sizeof(int32_t));
    }
    pl.off_seg_state = off;
    off = align_up(off + size_t(pl.slots) * pr.kv_heads * K * V * sizeof(float));
    pl.off_seg_decay = off;
    off = align_up(off + size_t(pl.slots) * pr.kv_heads * K * sizeof(float));
  }
  if (shares_scores(pl.nvb)) {
    const int version = prefill_version();
    pl.v2 = version == 2;
    pl.v3 = version == 3;
    pl.nchunk_dense = std::max<int64_t>(1, ceil_div(T, kChunk));
    pl.cslots = pr.has_cu_seqlens ? N + T / kChunk : N * pl.nchunk_dense;
    if (pr.has_cu_seqlens) {
      pl.off_chunk_off = off;
      off = align_up(off + size_t(N + 1) * sizeof(int32_t));
    }
    pl.off_scores = off;
    off = align_up(off + size_t(pr.batch) * size_t(T) * pr.q_heads * kChunk * dtype_size(pr.act_dtype));
    pl.off_chunk_state = off;
    off = align_up(off + size_t(pl.cslots) * pr.kv_heads * K * V * dtype_size(pr.act_dtype));
  }
  pl.workspace = off;
  if (pl.v3 && pl.seg_len != 0 && !v3_segments()) {
    pl.seg_len = 0;
    pl.nseg_dense = 1;
    pl.slots = N;
  }
  return pl;
}

inline Status launch_failed(const char* kernel) {
  const char* why = rt::last_launch_error();
  if (why) return detail::fail(Status::kCudaError, "launching the GLA %s kernel failed: %s", kernel, why);
  return Status::kOk;
}

template <class Act, int R>
Status launch_recurrent_r(const Plan& pl, const Params& p, stream_t stream) {
  const int64_t blocks = p.N * p.Hkv * pl.rnvb;
  const char* why = nullptr;
  int dev = 0, cc = 0, optin = 0;
  if (pl.rsmem > 48 * 1024) {
    if (!rt::device(dev, cc, optin, why) || !rt::allow_smem<gla_recurrent_kernel<Act, R>>(dev, pl.rsmem, why))
      return detail::fail(Status::kCudaError, "preparing the GLA recurrent kernel failed: %s", why ? why : "?");
  }
  auto* kernel = &gla_recurrent_kernel<Act, R>;
  GLA_LAUNCH(kernel, blocks, pl.threads, pl.rsmem, stream, p);
  return launch_failed("recurrent");
}

template <class Act>
Status launch_recurrent(const Plan& pl, Params p, stream_t stream) {
  p.ct = pl.ct;
  p.gb = pl.gb;
  p.nvb = pl.rnvb;
  switch (pl.R) {
    case 4: return launch_recurrent_r<Act, 4>(pl, p, stream);
    case 8: return launch_recurrent_r<Act, 8>(pl, p, stream);
    default: return launch_recurrent_r<Act, 16>(pl, p, stream);
  }
}

template <class Act, int NKB, bool kShared>
Status launch_chunk_main(const Plan& pl, const Params& p, stream_t stream, int dev) {
  const char* why = nullptr;
  constexpr size_t smem = chunk_smem_bytes<Act>();
  if (!rt::allow_smem<gla_chunk_kernel<Act, NKB, kShared>>(dev, smem, why))
    return detail::fail(Status::kCudaError, "preparing the GLA chunk kernel failed: %s", why ? why : "?");
  const int64_t blocks = pl.slots * p.Hq * pl.nvb;
  auto* kernel = &gla_chunk_kernel<Act, NKB, kShared>;
  GLA_LAUNCH(kernel, blocks, kChunkThreads, smem, stream, p);
  return launch_failed("chunk");
}

template <class Act, int NKB>
Status launch_scores(const Plan& pl, const Params& p, stream_t stream, int dev) {
  const char* why = nullptr;
  constexpr size_t smem = scores_smem_bytes<Act>();
  if (!rt::allow_smem<gla_scores_kernel<Act, NKB>>(dev, smem, why))
    return detail::fail(Status::kCudaError, "preparing the GLA scores kernel failed: %s", why ? why : "?");
  auto* kernel = &gla_scores_kernel<Act, NKB>;
  GLA_LAUNCH(kernel, pl.cslots * p.Hq, kChunkThreads, smem, stream, p);
  return launch_failed("scores");
}

// v3: every chunk's start state (and the final state) and, in the same launch, the scores; then all
// outputs at once. run() checks the device's shared memory against the main kernel's only: v3's
// kernels need no more.
template <class Act, int NKB>
Status launch_v3(const Plan& pl, const Params& p, stream_t stream, int dev) {
  static_assert(states_scores_smem_bytes<Act>() <= chunk_smem_bytes<Act>() && output_smem_bytes<Act>() <= chunk_smem_bytes<Act>(),
                "a device that fits the main chunk kernel must fit every v3 kernel");
  const char* why = nullptr;
  constexpr size_t ss_smem = states_scores_smem_bytes<Act>();
  if (!rt::allow_smem<gla_states_scores_kernel<Act, NKB>>(dev, ss_smem, why))
    return detail::fail(Status::kCudaError, "preparing the GLA chunk-states kernel failed: %s", why ? why : "?");
  auto* ss_kernel = &gla_states_scores_kernel<Act, NKB>;
  const int64_t nstates = pl.slots * p.Hkv * pl.nkb * pl.nvb;
  GLA_LAUNCH(ss_kernel, nstates + pl.cslots * p.Hq, kChunkThreads, ss_smem, stream, p, nstates);
  if (Status st = launch_failed("chunk states and scores"); st != Status::kOk) return st;
  constexpr size_t out_smem = output_smem_bytes<Act>();
  if (!rt::allow_smem<gla_output_kernel<Act>>(dev, out_smem, why))
    return detail::fail(Status::kCudaError, "preparing the GLA output kernel failed: %s", why ? why : "?");
  auto* out_kernel = &gla_output_kernel<Act>;
  GLA_LAUNCH(out_kernel, pl.cslots * p.Hq * pl.nvb, kChunkThreads, out_smem, stream, p);
  return launch_failed("output");
}

template <class Act, int NKB>
Status launch_chunk_nkb(const Plan& pl, const Params& p, stream_t stream, int dev) {
  if (pl.v3) return launch_v3<Act, NKB>(pl, p, stream, dev);
  if (!pl.v2) return launch_chunk_main<Act, NKB, false>(pl, p, stream, dev);
  if (Status st = launch_scores<Act, NKB>(pl, p, stream, dev); st != Status::kOk) return st;
  return launch_chunk_main<Act, NKB, true>(pl, p, stream, dev);
}

template <class Act>
Status launch_chunk(const Plan& pl, Params p, unsigned char* ws, stream_t stream, int dev) {
  p.nvb = pl.nvb;
  p.nkb = pl.nkb;
  p.seg_len = int32_t(pl.seg_len);
  p.nseg_dense = int32_t(pl.nseg_dense);
  p.slots = pl.slots;
  if (pl.seg_len) {
    p.seg_off = p.cu ? reinterpret_cast<int32_t*>(ws + pl.off_seg_off) : nullptr;
    p.seg_state = reinterpret_cast<float*>(ws + pl.off_seg_state);
    p.seg_decay = reinterpret_cast<float*>(ws + pl.off_seg_decay);
    if (p.cu) {
      GLA_LAUNCH(gla_segment_offsets_kernel, 1, 1024, 1024 * sizeof(int), stream, p);
      if (Status st = launch_failed("segment offsets"); st != Status::kOk) return st;
    }
    const char* why = nullptr;
    constexpr size_t smem = segment_smem_bytes<Act>();
    if (!rt::allow_smem<gla_segment_state_kernel<Act>>(dev, smem, why))
      return detail::fail(Status::kCudaError, "preparing the GLA segment kernel failed: %s", why ? why : "?");
    auto* seg_kernel = &gla_segment_state_kernel<Act>;
    GLA_LAUNCH(seg_kernel, pl.slots * p.Hkv * pl.nkb * pl.nvb, kChunkThreads, smem, stream, p);
    if (Status st = launch_failed("segment state"); st != Status::kOk) return st;
    const int64_t elems = p.N * p.Hkv * int64_t(p.K) * p.V;
    GLA_LAUNCH(gla_segment_scan_kernel, ceil_div(elems, 256), 256, 0, stream, p);
    if (Status st = launch_failed("segment scan"); st != Status::kOk) return st;
  }
  if (pl.v2 || pl.v3) {
    p.scores = ws + pl.off_scores;
    p.chunk_state = pl.v3 ? ws + pl.off_chunk_state : nullptr;
    p.chunk_off = p.cu ? reinterpret_cast<int32_t*>(ws + pl.off_chunk_off) : nullptr;
    p.nchunk_dense = int32_t(pl.nchunk_dense);
    if (p.cu) {  // chunk slots per sequence: the segment offsets kernel with one-chunk segments
      Params pc = p;
      pc.seg_len = kChunk;
      pc.seg_off = p.chunk_off;
      GLA_LAUNCH(gla_segment_offsets_kernel, 1, 1024, 1024 * sizeof(int), stream, pc);
      if (Status st = launch_failed("chunk offsets"); st != Status::kOk) return st;
    }
  }
  // the state slice is a register array: one kernel per size (K <= 64, 128, 256)
  switch (pl.nkb) {
    case 1: return launch_chunk_nkb<Act, 1>(pl, p, stream, dev);
    case 2: return launch_chunk_nkb<Act, 2>(pl, p, stream, dev);
    default: return launch_chunk_nkb<Act, 4>(pl, p, stream, dev);
  }
}

// Explicitly instantiated once per activation type, each in its own translation unit
// (gla_cuda_<type>.cu); entry.cuh declares them extern.
template <class Act>
Status run(Plan pl, const Params& p, unsigned char* ws, stream_t stream) {
  int dev = 0, cc = 0, optin = 0;
  const char* why = nullptr;
  if (!rt::device(dev, cc, optin, why))
    return detail::fail(Status::kCudaError, "no usable CUDA device: %s", why ? why : "?");
  if (cc < 8)
    return detail::fail(Status::kUnsupported,
                        "the GLA CUDA kernels need compute capability 8.0 or newer (tensor-core mma.sync), the "
                        "current device has %d.x",
                        cc);
  // a device with too little shared memory for the chunk kernel still gets a correct answer
  if (pl.chunk && size_t(optin) < chunk_smem_bytes<Act>()) pl.chunk = false;
  if (pl.chunk) return launch_chunk<Act>(pl, p, ws, stream, dev);
  if (pl.threads > recurrent_max_threads(pl.R))
    return detail::fail(Status::kUnsupported,
                        "head_dim_k=%d is too large for the GLA CUDA kernels (at most 1024; the chunked kernel "
                        "takes at most %d, the step kernel at most 1024)",
                        p.K, kChunkMaxK);
  return launch_recurrent<Act>(pl, p, stream);
}

inline size_t workspace_bytes(const Problem& pr) {
  if (validate(pr) != Status::kOk) return 0;
  return make_plan(pr).workspace;
}

// The most workspace_bytes() asks for over every problem that differs from `largest` only in
// smaller batch, num_seqs and seq_len: what a TensorRT profile declares once. In closed form from
// make_plan: a workspace exists only when sequences are split into segments, which happens only
// while base = N * Hq * nvb < kTargetBlocks; a segment is then at least kMinSegmentChunks chunks
// and there are at most ceil(kTargetBlocks / base) of them per sequence, so
//     dense:  slots = N * nseg <= min(N * ceil(T / seg_min), N_seg + kTargetBlocks / (Hq * nvb))
//     packed: slots = N + T / seg_len <= N_seg + T / seg_min
// with N_seg = min(N, ceil(kTargetBlocks / (Hq * nvb)) - 1) the most sequences that still split.
// Where the scores can be shared (nvb >= 2), every chunked problem also has N + 1 chunk offsets
// (cu_seqlens), batch * T * Hq * 64 scores and (v3) chunk slots * Hkv * K * V chunk-boundary
// states, chunk slots = N * ceil(T / 64) (dense) or N + T / 64 (packed): all grow with the problem.
inline size_t workspace_bound(const Problem& largest) {
  if (validate(largest) != Status::kOk) return 0;
  const int64_t N = largest.num_seqs, T = largest.seq_len;
  const int64_t K = largest.head_dim_k, V = largest.head_dim_v;
  const int64_t short_t = largest.has_cu_seqlens ? kRecurrentMaxTPacked : kRecurrentMaxT;
  if (T <= short_t || K > kChunkMaxK || N == 0) return 0;
  const int64_t per_seq = int64_t(largest.q_heads) * ceil_div(V, kBV);  // base / N
  const int64_t n_split = std::min(N, ceil_div(kTargetBlocks, per_seq) - 1);
  size_t off = 0;
  if (n_split >= 1) {
    const int64_t seg_min = kMinSegmentChunks * kChunk;
    const int64_t slots = largest.has_cu_seqlens
                              ? n_split + T / seg_min
                              : std::min(n_split * ceil_div(T, seg_min), n_split + kTargetBlocks / per_seq);
    if (largest.has_cu_seqlens) off = align_up(size_t(n_split + 1) * sizeof(int32_t));
    off = align_up(off + size_t(slots) * largest.kv_heads * K * V * sizeof(float));
    off = align_up(off + size_t(slots) * largest.kv_heads * K * sizeof(float));
  }
  if (shares_scores(int(ceil_div(V, kBV)))) {
    if (largest.has_cu_seqlens) off = align_up(off + size_t(N + 1) * sizeof(int32_t));
    off = align_up(off + size_t(largest.batch) * size_t(T) * largest.q_heads * kChunk * dtype_size(largest.act_dtype));
    const int64_t cslots = largest.has_cu_seqlens ? N + T / kChunk : N * ceil_div(T, kChunk);
    off = align_up(off + size_t(cslots) * largest.kv_heads * K * V * dtype_size(largest.act_dtype));
  }
  return off;
}

}  // namespace cuda
}  // namespace gla
