// The C entry point (capi.h): thin wrappers over the kernel core, plus a small pool of worker
// threads that plays the role ONNX Runtime's thread pool plays for the custom-op library.
#include "gla/capi.h"

#include <pthread.h>

#include <atomic>
#include <condition_variable>
#include <cstddef>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

#include "common/error.h"
#include "cpu/plan.h"
#include "gla/contract.h"
#include "gla/kernels.h"

// The C structs must be the C++ ones, field for field.
#define GLA_SAME_FIELD(field)                                                   \
  static_assert(offsetof(GlaProblem, field) == offsetof(gla::Problem, field) && \
                    sizeof(GlaProblem::field) == sizeof(gla::Problem::field),   \
                "GlaProblem." #field " does not match gla::Problem")
GLA_SAME_FIELD(batch);
GLA_SAME_FIELD(seq_len);
GLA_SAME_FIELD(num_seqs);
GLA_SAME_FIELD(q_heads);
GLA_SAME_FIELD(kv_heads);
GLA_SAME_FIELD(head_dim_k);
GLA_SAME_FIELD(head_dim_v);
GLA_SAME_FIELD(act_dtype);
GLA_SAME_FIELD(state_dtype);
GLA_SAME_FIELD(g_gamma_dtype);
GLA_SAME_FIELD(has_gate);
GLA_SAME_FIELD(gate_per_head);
GLA_SAME_FIELD(has_past_state);
GLA_SAME_FIELD(has_cu_seqlens);
GLA_SAME_FIELD(cu_seqlens_int64);
GLA_SAME_FIELD(has_g_gamma);
GLA_SAME_FIELD(reverse);
GLA_SAME_FIELD(scale);
#undef GLA_SAME_FIELD
static_assert(sizeof(GlaProblem) == sizeof(gla::Problem), "GlaProblem and gla::Problem differ in size");

#define GLA_SAME_PTR(field)                                                      \
  static_assert(offsetof(GlaTensors, field) == offsetof(gla::Tensors, field), \
                "GlaTensors." #field " does not match gla::Tensors")
GLA_SAME_PTR(query);
GLA_SAME_PTR(key);
GLA_SAME_PTR(value);
GLA_SAME_PTR(gate);
GLA_SAME_PTR(past_state);
GLA_SAME_PTR(cu_seqlens);
GLA_SAME_PTR(g_gamma);
GLA_SAME_PTR(output);
GLA_SAME_PTR(present_state);
#undef GLA_SAME_PTR
static_assert(sizeof(GlaTensors) == sizeof(gla::Tensors), "GlaTensors and gla::Tensors differ in size");

#define GLA_SAME_DESC(type, ctype, field)                                                   \
  static_assert(offsetof(ctype, field) == offsetof(type, field) && sizeof(ctype::field) == sizeof(type::field), \
                #ctype "." #field " does not match")
GLA_SAME_DESC(gla::TensorDesc, GlaTensorDesc, present);
GLA_SAME_DESC(gla::TensorDesc, GlaTensorDesc, elem_type);
GLA_SAME_DESC(gla::TensorDesc, GlaTensorDesc, rank);
GLA_SAME_DESC(gla::TensorDesc, GlaTensorDesc, dims);
GLA_SAME_DESC(gla::OpAttributes, GlaOpAttributes, q_num_heads);
GLA_SAME_DESC(gla::OpAttributes, GlaOpAttributes, kv_num_heads);
GLA_SAME_DESC(gla::OpAttributes, GlaOpAttributes, reverse);
GLA_SAME_DESC(gla::OpAttributes, GlaOpAttributes, chunk_size);
GLA_SAME_DESC(gla::OpAttributes, GlaOpAttributes, scale);
GLA_SAME_DESC(gla::OpAttributes, GlaOpAttributes, update_rule);
#undef GLA_SAME_DESC
static_assert(sizeof(GlaTensorDesc) == sizeof(gla::TensorDesc) && sizeof(GlaOpAttributes) == sizeof(gla::OpAttributes),
              "the C descriptors differ in size");
static_assert(GLA_ATTR_MISSING == gla::kAttrMissing, "GLA_ATTR_MISSING");

namespace {

// Persistent workers: a call hands out indices [0, n) through an atomic counter, the calling
// thread works too, and the call returns when every index has run. Calls take turns.
class Pool {
 public:
  void parallel_for(int threads, int64_t n, void (*fn)(void*, int64_t), void* arg) {
    std::lock_guard<std::mutex> call(call_mu_);
    const int helpers = int(std::min<int64_t>(threads - 1, n - 1));
    {
      std::unique_lock<std::mutex> lock(mu_);
      while (int(workers_) < helpers) {
        std::thread(&Pool::worker, this, int(workers_)).detach();
        ++workers_;
      }
      fn_ = fn;
      arg_ = arg;
      n_ = n;
      next_.store(0);
      helpers_ = helpers;
      running_ = helpers;
      ++generation_;
    }
    cv_work_.notify_all();
    drain();
    std::unique_lock<std::mutex> lock(mu_);
    cv_done_.wait(lock, [&] { return running_ == 0; });
  }

 private:
  void drain() {
    for (int64_t i = next_.fetch_add(1); i < n_; i = next_.fetch_add(1)) fn_(arg_, i);
  }

  void worker(int index) {
    uint64_t seen = 0;
    for (;;) {
      {
        std::unique_lock<std::mutex> lock(mu_);
        cv_work_.wait(lock, [&] { return generation_ != seen; });
        seen = generation_;
        if (index >= helpers_) continue;
      }
      drain();
      {
        std::lock_guard<std::mutex> lock(mu_);
        --running_;
      }
      cv_done_.notify_all();
    }
  }

  std::mutex call_mu_, mu_;
  std::condition_variable cv_work_, cv_done_;
  size_t workers_ = 0;
  uint64_t generation_ = 0;
  int helpers_ = 0, running_ = 0;
  void (*fn_)(void*, int64_t) = nullptr;
  void* arg_ = nullptr;
  int64_t n_ = 0;
  std::atomic<int64_t> next_{0};
};

// Never destroyed: detached workers may still be waiting when the process exits. A forked child
// has none of the parent's threads, so it starts a fresh pool.
std::atomic<Pool*> g_pool{nullptr};
std::once_flag g_atfork_once;

Pool& pool() {
  std::call_once(g_atfork_once, [] { pthread_atfork(nullptr, nullptr, [] { g_pool.store(new Pool); }); });
  Pool* p = g_pool.load();
  if (!p) {
    Pool* fresh = new Pool;
    if (g_pool.compare_exchange_strong(p, fresh)) return *fresh;
    delete fresh;
  }
  return *g_pool.load();
}

struct PoolCtx {
  int threads;
};

void pool_parallel_for(void* ctx, int64_t n, void (*fn)(void*, int64_t), void* arg) {
  pool().parallel_for(static_cast<PoolCtx*>(ctx)->threads, n, fn, arg);
}

const gla::Problem& as_problem(const GlaProblem* p) { return *reinterpret_cast<const gla::Problem*>(p); }
const gla::Tensors& as_tensors(const GlaTensors* t) { return *reinterpret_cast<const gla::Tensors*>(t); }

int32_t null_argument(const char* name) {
  return int32_t(gla::detail::fail(gla::Status::kInvalidArgument, "%s is null", name));
}

template <typename F>
int32_t guarded(F&& body) {
  try {
    return body();
  } catch (const std::exception& e) {
    return int32_t(gla::detail::fail(gla::Status::kInternal, "unexpected C++ exception: %s", e.what()));
  } catch (...) {
    return int32_t(gla::detail::fail(gla::Status::kInternal, "unexpected C++ exception"));
  }
}

}  // namespace

extern "C" {

int32_t gla_capi_version(void) { return GLA_CAPI_VERSION; }

const char* gla_last_error_message(void) { return gla::last_error_message(); }

const char* gla_status_name(int32_t status) { return gla::status_name(static_cast<gla::Status>(status)); }

int32_t gla_validate(const GlaProblem* problem) {
  gla::detail::clear_error();
  if (!problem) return null_argument("problem");
  return int32_t(gla::validate(as_problem(problem)));
}

int32_t gla_check_attributes(int32_t op, const GlaOpAttributes* attrs) {
  return guarded([&]() -> int32_t {
    gla::detail::clear_error();
    if (!attrs) return null_argument("attrs");
    return int32_t(gla::check_attributes(static_cast<gla::OpKind>(op), *reinterpret_cast<const gla::OpAttributes*>(attrs)));
  });
}

int32_t gla_infer_problem(int32_t op, const GlaOpAttributes* attrs, const GlaTensorDesc* inputs, int32_t num_inputs,
                          int32_t flags, GlaProblem* problem) {
  return guarded([&]() -> int32_t {
    gla::detail::clear_error();
    if (!attrs) return null_argument("attrs");
    if (!problem) return null_argument("problem");
    if (num_inputs > 0 && !inputs) return null_argument("inputs");
    return int32_t(gla::infer_problem(static_cast<gla::OpKind>(op), *reinterpret_cast<const gla::OpAttributes*>(attrs),
                                      reinterpret_cast<const gla::TensorDesc*>(inputs), num_inputs, flags,
                                      reinterpret_cast<gla::Problem*>(problem)));
  });
}

size_t gla_cpu_workspace_bytes(const GlaProblem* problem) {
  return problem ? gla::cpu_workspace_bytes(as_problem(problem)) : 0;
}

int32_t gla_cpu_forward(const GlaProblem* problem, const GlaTensors* tensors, void* workspace,
                        size_t workspace_bytes, int32_t num_threads) {
  return guarded([&]() -> int32_t {
    gla::detail::clear_error();
    if (!problem) return null_argument("problem");
    if (!tensors) return null_argument("tensors");
    int threads = num_threads;
    if (threads <= 0) threads = int(std::thread::hardware_concurrency());
    if (threads <= 1) return int32_t(gla::cpu_forward(as_problem(problem), as_tensors(tensors), workspace, workspace_bytes, nullptr));
    PoolCtx ctx{threads};
    gla::Threading threading;
    threading.parallel_for = pool_parallel_for;
    threading.ctx = &ctx;
    return int32_t(gla::cpu_forward(as_problem(problem), as_tensors(tensors), workspace, workspace_bytes, &threading));
  });
}

const char* gla_cpu_isa(void) { return gla::cpu::selected_isa_name(); }

int32_t gla_cuda_compiled(void) { return gla::cuda_compiled() ? 1 : 0; }

size_t gla_cuda_workspace_bytes(const GlaProblem* problem) {
  return problem ? gla::cuda_workspace_bytes(as_problem(problem)) : 0;
}

size_t gla_cuda_workspace_bound(const GlaProblem* largest) {
  return largest ? gla::cuda_workspace_bound(as_problem(largest)) : 0;
}

int32_t gla_cuda_forward(const GlaProblem* problem, const GlaTensors* tensors, void* workspace,
                         size_t workspace_bytes, void* stream) {
  return guarded([&]() -> int32_t {
    gla::detail::clear_error();
    if (!problem) return null_argument("problem");
    if (!tensors) return null_argument("tensors");
    return int32_t(gla::cuda_forward(as_problem(problem), as_tensors(tensors), workspace, workspace_bytes, stream));
  });
}

}  // extern "C"
