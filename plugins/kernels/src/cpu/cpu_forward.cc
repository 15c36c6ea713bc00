// CPU launcher: checks the problem and the pointers, plans the work units (plan.h), picks the
// instruction set the hot loops were built for, and spreads the slots over the caller's threads.
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>

#include "common/error.h"
#include "cpu/plan.h"
#include "gla/kernels.h"

namespace gla {
namespace cpu {

Plan make_plan(const Problem& p) {
  Plan plan;
  plan.G = p.q_heads / p.kv_heads;
  plan.dk = p.head_dim_k;
  plan.dv = p.head_dim_v;
  const int64_t heads = p.num_seqs * p.kv_heads;

  // Workspace must not depend on the contents of cu_seqlens: any sequence may be as long as T.
  plan.rows = p.seq_len >= kRecurrentMaxLen ? kChunk : 1;
  // Step by step, a unit streams its state rows; whole rows keep that sequential (a block of
  // columns would read a few lines of every row, and the prefetchers fetch the rest for nothing).
  // Chunked, a dk x vb block of the state is the GEMMs' operand and should stay in L2.
  int64_t nvb = plan.rows == 1 ? 1 : (plan.dv + kMaxVBlock - 1) / kMaxVBlock;
  // Few heads: split the value columns further so that every thread has work.
  while (heads * nvb < kMinUnits && (plan.dv + nvb) / (nvb + 1) >= kMinVBlock) ++nvb;
  plan.vb = round_up((plan.dv + nvb - 1) / nvb, kLane);
  if (plan.vb > plan.dv) plan.vb = plan.dv;
  plan.nvb = (plan.dv + plan.vb - 1) / plan.vb;
  plan.vbp = round_up(plan.vb, kLane);
  plan.units = heads * plan.nvb;
  plan.slots = plan.units < kMaxSlots ? plan.units : kMaxSlots;

  const int64_t dk = plan.dk, C = plan.rows, vbp = plan.vbp;
  const int64_t Cp = round_up(C, kLane), dkp = round_up(dk, kLane);
  // step by step the heads' rows are few (one row each); chunked, a group of query heads at a time
  const int64_t per_head = C * (dk + Cp + vbp);
  plan.gq = C == 1 ? plan.G : std::max<int64_t>(1, std::min<int64_t>(plan.G, kMaxHeadGroupFloats / per_head));
  const int64_t G = plan.gq, Gall = plan.G;
  int64_t off = 0;
  auto take = [&](int64_t floats) {
    const int64_t at = off;
    off += round_up(floats, kLane);
    return at;
  };
  plan.off_S = take(dk * vbp);                 // the state block, fp32
  plan.off_Kr = take(Cp * dkp);                // pivoted keys of the chunk [C][dkp]
  plan.off_KTr = take(dkp * Cp);               // the same, transposed [dkp][C]
  plan.off_Gm = take(Cp * dkp);                // cumulative log decay [C][dkp]
  // (a short sequence of a packed batch runs step by step even in a chunked plan: all G heads' rows)
  plan.off_Q = take(std::max(G * C * dk, Gall * dk));  // queries [gq][C][dk]
  plan.off_KT = take(dkp * Cp);                // keys as one sub-chunk's scores see them [dkp][C]
  plan.off_V = take(C * vbp);                  // values [C][vbp]
  plan.off_A = take(G * C * Cp);               // intra-chunk scores [gq][C][C]
  plan.off_O = take(std::max(G * C * vbp, Gall * vbp));  // outputs [gq][C][vbp]
  plan.off_tmp = take((kChunk / kSub + 3) * dkp);  // per-sub-chunk factors and scratch rows
  plan.slot_floats = off;
  plan.workspace_bytes = plan.units == 0 ? 0 : size_t(plan.slots) * size_t(plan.slot_floats) * 4 + 64;
  return plan;
}

namespace {

using RunSlot = void (*)(const Job&, int64_t);

// GLA_CPU_ISA=generic|avx2|avx512 forces a build of the hot loops (tests cover each one); an ISA
// the processor lacks is never picked. On aarch64 NEON is part of the architecture: the NEON build
// runs unless GLA_CPU_ISA=generic. Other architectures have the portable build only.
RunSlot pick_isa() {
  const char* want = std::getenv("GLA_CPU_ISA");
  const bool want_generic = want && std::strcmp(want, "generic") == 0;
#if defined(GLA_CPU_X86_DISPATCH)
  __builtin_cpu_init();
  const bool has_avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
                          __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") &&
                          __builtin_cpu_supports("fma");
  const bool has_avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                        __builtin_cpu_supports("f16c");
  if (want_generic) return generic::run_slot;
  if (want && std::strcmp(want, "avx2") == 0) return has_avx2 ? avx2::run_slot : generic::run_slot;
  if (has_avx512) return avx512::run_slot;
  if (has_avx2) return avx2::run_slot;
#elif defined(GLA_CPU_NEON_DISPATCH)
  if (!want_generic) return neon::run_slot;
#else
  (void)want_generic;
#endif
  return generic::run_slot;
}

RunSlot run_slot_fn() {
  static const RunSlot fn = pick_isa();
  return fn;
}

struct SlotTask {
  const Job* job;
  RunSlot fn;
};

void run_slot_task(void* arg, int64_t slot) {
  const auto* task = static_cast<const SlotTask*>(arg);
  task->fn(*task->job, slot);
}

template <typename I>
Status check_cu_seqlens(const I* cu, int64_t n, int64_t T) {
  if (cu[0] != 0)
    return detail::fail(Status::kInvalidArgument, "cu_seqlens[0] must be 0, got %lld", (long long)cu[0]);
  for (int64_t i = 1; i <= n; ++i) {
    if (cu[i] < cu[i - 1])
      return detail::fail(Status::kInvalidArgument, "cu_seqlens must not decrease, but cu_seqlens[%lld]=%lld < %lld",
                          (long long)i, (long long)cu[i], (long long)cu[i - 1]);
  }
  if (cu[n] != T)
    return detail::fail(Status::kInvalidArgument, "cu_seqlens[-1] must equal T=%lld, got %lld", (long long)T,
                        (long long)cu[n]);
  return Status::kOk;
}

}  // namespace

const char* selected_isa_name() {
  const RunSlot fn = run_slot_fn();
#if defined(GLA_CPU_X86_DISPATCH)
  if (fn == avx512::run_slot) return "avx512";
  if (fn == avx2::run_slot) return "avx2";
#elif defined(GLA_CPU_NEON_DISPATCH)
  if (fn == neon::run_slot) return "neon";
#endif
  return "generic";
}

}  // namespace cpu

size_t cpu_workspace_bytes(const Problem& problem) {
  if (validate(problem) != Status::kOk) return 0;
  return cpu::make_plan(problem).workspace_bytes;
}

Status cpu_forward(const Problem& p, const Tensors& t, void* workspace, size_t workspace_bytes,
                   const Threading* threading) {
  using detail::fail;
  detail::clear_error();
  Status st = validate(p);
  if (st != Status::kOk) return st;

  const bool has_rows = p.batch > 0 && p.seq_len > 0;
  if (has_rows && (!t.query || !t.key || !t.value || !t.output))
    return fail(Status::kInvalidArgument, "query, key, value and output must not be null");
  if (has_rows && p.has_gate && !t.gate) return fail(Status::kInvalidArgument, "has_gate=1 but gate is null");
  if (p.has_past_state && p.num_seqs > 0 && !t.past_state)
    return fail(Status::kInvalidArgument, "has_past_state=1 but past_state is null");
  if (p.has_cu_seqlens && !t.cu_seqlens) return fail(Status::kInvalidArgument, "has_cu_seqlens=1 but cu_seqlens is null");
  if (p.has_g_gamma && !t.g_gamma) return fail(Status::kInvalidArgument, "has_g_gamma=1 but g_gamma is null");
  if (p.has_cu_seqlens) {
    st = p.cu_seqlens_int64 ? cpu::check_cu_seqlens(static_cast<const int64_t*>(t.cu_seqlens), p.num_seqs, p.seq_len)
                            : cpu::check_cu_seqlens(static_cast<const int32_t*>(t.cu_seqlens), p.num_seqs, p.seq_len);
    if (st != Status::kOk) return st;
  }

  cpu::Job job;
  job.p = p;
  job.t = t;
  job.plan = cpu::make_plan(p);
  job.scale = p.scale != 0.f ? p.scale : 1.f / std::sqrt(float(p.head_dim_k));
  if (job.plan.units == 0) return Status::kOk;
  if (workspace_bytes < job.plan.workspace_bytes)
    return fail(Status::kWorkspaceTooSmall, "the CPU workspace has %zu bytes, %zu are needed", workspace_bytes,
                job.plan.workspace_bytes);
  if (!workspace) return fail(Status::kInvalidArgument, "workspace is null");
  const uintptr_t base = reinterpret_cast<uintptr_t>(workspace);
  job.scratch = reinterpret_cast<float*>((base + 63) & ~uintptr_t(63));

  cpu::SlotTask task{&job, cpu::run_slot_fn()};
  if (threading && threading->parallel_for && job.plan.slots > 1) {
    threading->parallel_for(threading->ctx, job.plan.slots, cpu::run_slot_task, &task);
  } else {
    for (int64_t s = 0; s < job.plan.slots; ++s) cpu::run_slot_task(&task, s);
  }
  return Status::kOk;
}

}  // namespace gla
