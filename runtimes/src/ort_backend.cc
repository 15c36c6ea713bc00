// The ONNX Runtime backend of gla-run.
//
// ONNX Runtime is dlopen'ed at run time (ORT_API_MANUAL_INIT + Ort::InitApi with the OrtApi that the
// loaded library's OrtGetApiBase returns), so gla-run builds against headers only and runs with
// whichever onnxruntime the device has: a system package, a release tarball, or the library inside
// the Python wheel.
#define ORT_API_MANUAL_INIT
#include <onnxruntime_cxx_api.h>
#undef ORT_API_MANUAL_INIT

#include <dlfcn.h>
#include <glob.h>

#include <cstdlib>
#include <cstring>
#include <map>

#include "common.h"

namespace gla_run {
namespace {

using GetApiBaseFn = const OrtApiBase* (*)();

std::vector<std::string> glob_paths(const std::string& pattern) {
  std::vector<std::string> out;
  glob_t g;
  if (::glob(pattern.c_str(), 0, nullptr, &g) == 0)
    for (size_t i = 0; i < g.gl_pathc; ++i) out.emplace_back(g.gl_pathv[i]);
  ::globfree(&g);
  return out;
}

// Loads libonnxruntime and installs its API for the C++ wrappers. Returns a description.
std::string load_onnxruntime(const OrtOptions& opt) {
  std::vector<std::string> candidates;
  std::string why_flag;
  if (!opt.ort_lib.empty()) {
    candidates = {opt.ort_lib};
  } else if (!env("GLA_RUN_ORT_LIB").empty()) {
    candidates = {env("GLA_RUN_ORT_LIB")};
  } else {
    // beside the binary first (a self-contained install), then the loader's search path
    for (const auto& p : glob_paths(join_path(opt.exe_dir, "libonnxruntime.so*"))) candidates.push_back(p);
    candidates.push_back("libonnxruntime.so.1");
    candidates.push_back("libonnxruntime.so");
  }
  std::string errors;
  for (const auto& path : candidates) {
    // RTLD_GLOBAL: provider libraries loaded later by ONNX Runtime itself resolve its symbols
    void* handle = ::dlopen(path.c_str(), RTLD_NOW | RTLD_GLOBAL);
    if (!handle) {
      const char* e = ::dlerror();
      errors += "\n  " + path + ": " + (e ? e : "dlopen failed");
      continue;
    }
    auto get_base = reinterpret_cast<GetApiBaseFn>(::dlsym(handle, "OrtGetApiBase"));
    if (!get_base) throw Error(kMissingRuntime, path + " is not ONNX Runtime (no OrtGetApiBase)");
    const OrtApiBase* base = get_base();
    const OrtApi* api = base->GetApi(ORT_API_VERSION);
    if (!api)
      throw Error(kMissingRuntime, "ONNX Runtime " + std::string(base->GetVersionString()) + " at " + path +
                                       " is too old: gla-run needs API version " + std::to_string(ORT_API_VERSION) +
                                       " (onnxruntime 1." + std::to_string(ORT_API_VERSION) + " or later)");
    Ort::InitApi(api);
    return "onnxruntime " + std::string(base->GetVersionString()) + " (" + path + ")";
  }
  throw Error(kMissingRuntime,
              "cannot load ONNX Runtime: pass --ort-lib PATH (libonnxruntime.so, e.g. the one inside the Python "
              "package: onnxruntime/capi/libonnxruntime.so.*) or set GLA_RUN_ORT_LIB; tried:" + errors);
}

std::string find_gla_library(const OrtOptions& opt) {
  if (!opt.gla_lib.empty()) {
    if (!file_exists(opt.gla_lib)) throw Error(kMissingRuntime, "--gla-lib " + opt.gla_lib + " does not exist");
    return opt.gla_lib;
  }
  if (std::string e = env("GLA_RUN_GLA_LIB"); !e.empty()) {
    if (!file_exists(e)) throw Error(kMissingRuntime, "GLA_RUN_GLA_LIB=" + e + " does not exist");
    return e;
  }
  // the installed layout (gla_export/bin/gla-run, gla_export/lib/libgla_onnxruntime.so) and the
  // CMake build tree (runtimes/gla-run, plugins/onnxruntime/libgla_onnxruntime.so)
  for (const char* rel : {"../lib/libgla_onnxruntime.so", "libgla_onnxruntime.so",
                          "../plugins/onnxruntime/libgla_onnxruntime.so", "../lib/lib/libgla_onnxruntime.so"}) {
    std::string p = join_path(opt.exe_dir, rel);
    if (file_exists(p)) return p;
  }
  throw Error(kMissingRuntime,
              "this export uses the custom gla::GatedLinearAttention op: pass --gla-lib PATH "
              "(libgla_onnxruntime.so, `python -c \"import gla_export; print(gla_export.library_path('ort'))\"`) "
              "or set GLA_RUN_GLA_LIB");
}

ONNXTensorElementDataType ort_type(DType t) {
  switch (t) {
    case DType::Float32: return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
    case DType::Float16: return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;
    case DType::BFloat16: return ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16;
    case DType::Int64: return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64;
    case DType::Int32: return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32;
  }
  return ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
}

const char* ort_type_name(ONNXTensorElementDataType t) {
  switch (t) {
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT: return "float32";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16: return "float16";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16: return "bfloat16";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64: return "int64";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32: return "int32";
    default: return "another type";
  }
}

struct TensorSig {
  ONNXTensorElementDataType type;
  std::vector<int64_t> shape;  // -1 for symbolic dimensions
};

std::map<std::string, TensorSig> signatures(const Ort::Session& s, bool inputs) {
  std::map<std::string, TensorSig> out;
  Ort::AllocatorWithDefaultOptions alloc;
  size_t n = inputs ? s.GetInputCount() : s.GetOutputCount();
  for (size_t i = 0; i < n; ++i) {
    auto name = inputs ? s.GetInputNameAllocated(i, alloc) : s.GetOutputNameAllocated(i, alloc);
    auto info = inputs ? s.GetInputTypeInfo(i) : s.GetOutputTypeInfo(i);
    if (info.GetONNXType() != ONNX_TYPE_TENSOR) continue;
    auto t = info.GetTensorTypeAndShapeInfo();
    out[name.get()] = TensorSig{t.GetElementType(), t.GetShape()};
  }
  return out;
}

// Checks that a graph has the tensor the metadata promises: name, element type, rank, static dims.
void check_tensor(const std::map<std::string, TensorSig>& sigs, const std::string& graph, const char* io,
                  const std::string& name, ONNXTensorElementDataType type, const std::vector<int64_t>& shape) {
  auto it = sigs.find(name);
  if (it == sigs.end()) throw Error(kModel, graph + " has no " + io + " '" + name + "' (the metadata names it)");
  const TensorSig& sig = it->second;
  if (sig.type != type)
    throw Error(kModel, graph + " " + io + " '" + name + "' is " + ort_type_name(sig.type) + ", the metadata says " +
                            ort_type_name(type));
  bool ok = sig.shape.size() == shape.size();
  for (size_t d = 0; ok && d < shape.size(); ++d)
    if (shape[d] >= 0 && sig.shape[d] >= 0 && sig.shape[d] != shape[d]) ok = false;
  if (!ok)
    throw Error(kModel, graph + " " + io + " '" + name + "' has shape " + shape_str(sig.shape) + ", the metadata says " +
                            shape_str(shape));
}

struct HostBuffer {
  void* data = nullptr;
  size_t bytes = 0;
  explicit HostBuffer(size_t n) : bytes(n) {
    // 64-byte aligned: what MLAS and the GLA kernels vectorise best on
    if (::posix_memalign(&data, 64, n ? n : 64) != 0) throw std::bad_alloc();
    std::memset(data, 0, n);
  }
  ~HostBuffer() { std::free(data); }
  HostBuffer(const HostBuffer&) = delete;
  HostBuffer& operator=(const HostBuffer&) = delete;
};

// cudaMemcpy of the CUDA runtime that ONNX Runtime's CUDA provider loaded (gla-run links no CUDA):
// the captured step reads its token id from, and writes its logits to, device buffers at fixed
// addresses, and ONNX Runtime's C API 21 has no tensor copy.
struct CudaMemcpy {
  using Fn = int (*)(void* dst, const void* src, size_t bytes, int kind);  // cudaError_t, cudaMemcpyKind
  static constexpr int kHostToDevice = 1, kDeviceToHost = 2;
  Fn fn = nullptr;
  bool load() {
    for (const char* name : {"libcudart.so.13", "libcudart.so.12", "libcudart.so.11.0", "libcudart.so"}) {
      void* h = ::dlopen(name, RTLD_NOW | RTLD_NOLOAD);  // only one already loaded
      if (!h) continue;
      fn = reinterpret_cast<Fn>(::dlsym(h, "cudaMemcpy"));
      if (fn) return true;
    }
    return false;
  }
  void operator()(void* dst, const void* src, size_t bytes, int kind) const {
    if (int e = fn(dst, src, bytes, kind)) throw Error(kInternal, "cudaMemcpy failed (CUDA error " + std::to_string(e) + ")");
  }
};

class OrtBackend final : public Backend {
 public:
  // `runtime` describes the ONNX Runtime already loaded (load_onnxruntime): the members' destructors
  // call into its API, so it must be in place before any of them exists.
  OrtBackend(const OrtOptions& opt, Metadata& meta, std::string runtime) : opt_(opt), meta_(meta), runtime_(std::move(runtime)) {
    env_ = Ort::Env(ORT_LOGGING_LEVEL_ERROR, "gla-run");

    const std::string step_path = join_path(opt.export_dir, "step.onnx");
    if (!file_exists(step_path)) throw Error(kModel, step_path + " does not exist (is " + opt.export_dir + " a gla-export directory?)");
    session_options_ = make_session_options(false);
    graph_ = opt.provider == "cuda" && opt.cuda_graph;
    if (graph_) step_options_ = make_session_options(true);

    step_ = open_step(step_path);
    meta = read_metadata(step_, step_path);
    if (graph_ && meta.any_growing()) {  // the metadata is only known now: reopen the step uncaptured
      graph_ = false;
      graph_off_ = "full-attention KV caches change shape every step";
      step_ = Ort::Session(env_, step_path.c_str(), session_options_);
    }
    if (meta.step_file != "step.onnx")
      throw Error(kModel, meta.origin + ": files.step is '" + meta.step_file + "', gla-run expects step.onnx");
    check_graph(step_, step_path, /*prefill=*/false);

    prefill_path_ = join_path(opt.export_dir, meta.prefill_file);
    has_prefill_ = opt.use_prefill && file_exists(prefill_path_);
    if (has_prefill_) {
      try {
        prefill_ = Ort::Session(env_, prefill_path_.c_str(), session_options_);
      } catch (const Ort::Exception& e) {
        throw Error(kModel, "ONNX Runtime cannot open " + prefill_path_ + ": " + e.what());
      }
      check_graph(prefill_, prefill_path_, /*prefill=*/true);
    }

    cpu_info_ = Ort::MemoryInfo::CreateCpu(OrtDeviceAllocator, OrtMemTypeDefault);
    if (opt.provider == "cuda") device_info_ = Ort::MemoryInfo("Cuda", OrtDeviceAllocator, opt.device_id, OrtMemTypeDefault);

    allocate_states();
    ids_value_ = Ort::Value::CreateTensor<int64_t>(cpu_info_, &next_id_, 1, kOneByOne, 2);
    logits_.resize(static_cast<size_t>(meta.vocab_size));
    const int64_t logits_shape[3] = {1, 1, meta.vocab_size};
    logits_value_ = Ort::Value::CreateTensor<float>(cpu_info_, logits_.data(), logits_.size(), logits_shape, 3);

    if (graph_) start_graphs();
    // two bindings made once: state in buffer k -> state in buffer 1-k; a step only picks one (on
    // CUDA it also binds the token id again: see step())
    for (int k = 0; k < 2 && !graph_; ++k) {
      step_bindings_[k] = std::make_unique<Ort::IoBinding>(step_);
      auto& b = *step_bindings_[k];
      b.BindInput("input_ids", ids_value_);
      for (size_t s = 0; s < meta.states.size(); ++s) {
        if (meta.states[s].grows()) continue;  // bound per call, at the cache's length (bind_growing)
        b.BindInput(meta.states[s].input.c_str(), states_[k][s]);
        b.BindOutput(meta.states[s].output.c_str(), states_[1 - k][s]);
      }
      b.BindOutput("logits", logits_value_);
    }
    reset();
  }

  std::string describe() const override {
    std::string what = opt_.provider == "cuda" ? "CUDAExecutionProvider" : "CPUExecutionProvider";
    if (opt_.provider == "cuda") what += graph_ ? " (CUDA graph)" : " (no CUDA graph" + (graph_off_.empty() ? "" : ": " + graph_off_) + ")";
    return runtime_ + ", " + what + (gla_lib_.empty() ? "" : ", custom ops " + gla_lib_);
  }

  bool can_prefill() const override { return has_prefill_; }

  int64_t kv_length() const override { return meta_.any_growing() ? kv_len_ : 0; }

  // The growing caches: two buffers per state (past and present swap, as for the fixed states) of
  // `positions` slots each, allocated once; each call views them at the cache's current length.
  // A [1, H, L, d] cache is contiguous at every L, and the present of one call (L + T slots) is the
  // past of the next, so the views need no copy between calls.
  void reserve(int64_t positions) override {
    if (!meta_.any_growing() || positions <= capacity_) return;
    if (kv_len_ > 0) throw Error(kInternal, "reserve() after the conversation started");
    for (int k = 0; k < 2; ++k)
      for (size_t s = 0; s < meta_.states.size(); ++s) {
        const StateInfo& st = meta_.states[s];
        if (!st.grows()) continue;
        const size_t bytes = size_t(positions) * size_t(st.elements_per_row()) * dtype_size(st.dtype);
        if (opt_.provider == "cuda") {
          std::vector<int64_t> shape = st.shape_at(positions);
          kv_device_[k][s] = Ort::Value::CreateTensor(*device_alloc(), shape.data(), shape.size(), ort_type(st.dtype));
        } else {
          host_states_[k][s] = std::make_unique<HostBuffer>(bytes);
        }
      }
    capacity_ = positions;
  }

  void reset() override {
    // Host states are zeroed in place; device states are zeroed by the first run of a conversation,
    // which reads host zeros instead of the device buffer (no CUDA calls needed here).
    cur_ = 0;
    kv_len_ = 0;  // a growing cache starts empty: nothing to zero
    if (opt_.provider == "cuda") {
      first_from_zeros_ = true;
    } else {
      for (size_t s = 0; s < meta_.states.size(); ++s)
        if (!meta_.states[s].grows()) std::memset(host_states_[0][s]->data, 0, host_states_[0][s]->bytes);
      first_from_zeros_ = false;
    }
  }

  const float* prefill(const std::vector<int64_t>& ids) override {
    if (!has_prefill_) throw Error(kInternal, "no prefill graph");
    if (!prefill_) throw Error(kInternal, "gla-run prefills once per run (the prefill session is released after it)");
    reset();
    const int64_t T = static_cast<int64_t>(ids.size());
    check_room(T);
    const int64_t shape[2] = {1, T};
    std::vector<int64_t> input_ids(ids), mask(ids.size(), 1);
    Ort::Value ids_v = Ort::Value::CreateTensor<int64_t>(cpu_info_, input_ids.data(), input_ids.size(), shape, 2);
    Ort::Value mask_v = Ort::Value::CreateTensor<int64_t>(cpu_info_, mask.data(), mask.size(), shape, 2);
    Ort::IoBinding b(prefill_);
    b.BindInput("input_ids", ids_v);
    if (meta_.prefill_has_mask) b.BindInput("attention_mask", mask_v);
    bind_past(b, /*present_to=*/1, T);
    b.BindOutput("logits", cpu_info_);  // [1, T, V]: ONNX Runtime allocates it, once per prompt
    prefill_.Run(Ort::RunOptions{nullptr}, b);
    if (opt_.provider == "cuda") b.SynchronizeOutputs();
    std::vector<Ort::Value> outs = b.GetOutputValues();
    const Ort::Value* logits = nullptr;
    std::vector<std::string> names = b.GetOutputNames();
    for (size_t i = 0; i < names.size(); ++i)
      if (names[i] == "logits") logits = &outs[i];
    if (!logits) throw Error(kInternal, "prefill.onnx produced no logits");
    const float* last = logits->GetTensorData<float>() + (T - 1) * meta_.vocab_size;
    std::memcpy(logits_.data(), last, sizeof(float) * logits_.size());
    cur_ = 1;
    kv_len_ += T;
    first_from_zeros_ = false;
    // Prompts come once per run: the prefill session (its weights and arena) is released here, so
    // the decode loop holds one copy of the weights.
    prefill_ = Ort::Session(nullptr);
    return logits_.data();
  }

  const float* step(int64_t id) override {
    next_id_ = id;
    check_room(1);
    if (first_from_zeros_) {
      Ort::IoBinding b(step_);
      b.BindInput("input_ids", ids_value_);
      bind_past(b, /*present_to=*/1, 1);
      b.BindOutput("logits", logits_value_);
      if (graph_)
        step_.Run(no_graph_, b);
      else
        step_.Run(Ort::RunOptions{nullptr}, b);
      if (opt_.provider == "cuda") b.SynchronizeOutputs();
      first_from_zeros_ = false;
      cur_ = 1;
      kv_len_ += 1;
      zeros_.clear();  // needed once per conversation only
      return logits_.data();
    }
    if (graph_) {
      // the captured graph of this direction reads the id from, and writes the logits to, device
      // buffers at the addresses it was captured with
      copy_(ids_dev_.GetTensorMutableData<void>(), &next_id_, sizeof next_id_, CudaMemcpy::kHostToDevice);
      step_.Run(graph_runs_[cur_], *step_bindings_[cur_]);
      step_bindings_[cur_]->SynchronizeOutputs();
      copy_(logits_.data(), logits_dev_.GetTensorMutableData<void>(), sizeof(float) * logits_.size(),
            CudaMemcpy::kDeviceToHost);
      cur_ = 1 - cur_;
      return logits_.data();
    }
    if (opt_.provider == "cuda") {
      // ONNX Runtime copies a host input to the device when it is bound, not when the graph runs:
      // the token id, which changes every step, must be bound again (a 8-byte copy) or every step
      // would read the id the binding was made with.
      step_bindings_[cur_]->BindInput("input_ids", ids_value_);
    }
    bind_growing(*step_bindings_[cur_], cur_, 1);
    step_.Run(Ort::RunOptions{nullptr}, *step_bindings_[cur_]);
    if (opt_.provider == "cuda") step_bindings_[cur_]->SynchronizeOutputs();
    cur_ = 1 - cur_;
    kv_len_ += 1;
    return logits_.data();
  }

 private:
  static constexpr int64_t kOneByOne[2] = {1, 1};

  // The captured step: device buffers for the id and the logits, one binding and one graph id per
  // direction of the state swap (1 and 2: a run without the annotation is ONNX Runtime's graph 0;
  // the first step of a conversation, bound to host zeros, runs as -1, no graph). Both graphs are
  // captured here (at their second run), on garbage states that reset() never reads; a step
  // graph ONNX Runtime cannot capture falls back to the uncaptured session.
  void start_graphs() {
    if (!copy_.load()) return fall_back("the CUDA runtime (libcudart) is not loaded");
    const int64_t one[2] = {1, 1}, logits_shape[3] = {1, 1, meta_.vocab_size};
    ids_dev_ = Ort::Value::CreateTensor(*device_alloc_, one, 2, ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64);
    logits_dev_ = Ort::Value::CreateTensor(*device_alloc_, logits_shape, 3, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT);
    no_graph_.AddConfigEntry("gpu_graph_id", "-1");
    for (int k = 0; k < 2; ++k) {
      graph_runs_[k].AddConfigEntry("gpu_graph_id", std::to_string(k + 1).c_str());
      step_bindings_[k] = std::make_unique<Ort::IoBinding>(step_);
      auto& b = *step_bindings_[k];
      b.BindInput("input_ids", ids_dev_);
      for (size_t s = 0; s < meta_.states.size(); ++s) {
        b.BindInput(meta_.states[s].input.c_str(), states_[k][s]);
        b.BindOutput(meta_.states[s].output.c_str(), states_[1 - k][s]);
      }
      b.BindOutput("logits", logits_dev_);
    }
    try {
      for (int k : {0, 1, 0, 1, 0, 1}) {
        step_.Run(graph_runs_[k], *step_bindings_[k]);
        step_bindings_[k]->SynchronizeOutputs();
      }
    } catch (const Ort::Exception& e) {
      fall_back(std::string("capture failed: ") + e.what());
    }
  }

  void fall_back(const std::string& why) {
    graph_ = false;
    graph_off_ = why;
    step_bindings_[0].reset();
    step_bindings_[1].reset();
    retired_step_ = std::move(step_);  // it owns the allocator of the state buffers: kept alive
    step_ = Ort::Session(env_, join_path(opt_.export_dir, "step.onnx").c_str(), session_options_);
  }

  Ort::SessionOptions make_session_options(bool cuda_graph) {
    Ort::SessionOptions so;
    if (opt_.threads > 0) so.SetIntraOpNumThreads(opt_.threads);
    so.SetInterOpNumThreads(1);
    so.SetGraphOptimizationLevel(GraphOptimizationLevel::ORT_ENABLE_ALL);
    if (opt_.provider == "cuda") {
      OrtCUDAProviderOptionsV2* cuda = nullptr;
      OrtStatus* st = Ort::GetApi().CreateCUDAProviderOptions(&cuda);
      if (st) {
        std::string msg = Ort::GetApi().GetErrorMessage(st);
        Ort::GetApi().ReleaseStatus(st);
        throw Error(kMissingRuntime, "--provider cuda: this ONNX Runtime has no CUDA execution provider (" + msg +
                                         "); use the library of onnxruntime-gpu");
      }
      std::unique_ptr<OrtCUDAProviderOptionsV2, void (*)(OrtCUDAProviderOptionsV2*)> guard(
          cuda, Ort::GetApi().ReleaseCUDAProviderOptions);
      std::string dev = std::to_string(opt_.device_id);
      // TF32 off: ONNX Runtime's default TF32 MatMul moves float32 logits by ~1e-2 and flips greedy tokens
      const char* keys[] = {"device_id", "use_tf32", "enable_cuda_graph"};
      const char* values[] = {dev.c_str(), "0", "1"};
      Ort::ThrowOnError(Ort::GetApi().UpdateCUDAProviderOptions(cuda, keys, values, cuda_graph ? 3 : 2));
      so.AppendExecutionProvider_CUDA_V2(*cuda);
    } else if (opt_.provider != "cpu") {
      throw Error(kUsage, "--provider must be cpu or cuda, got '" + opt_.provider + "'");
    }
    return so;
  }

  // The custom-op library must be registered before a session opens a custom export, and the form
  // is only known from the model's metadata: so the library is registered whenever it is given or
  // found (harmless for the other forms), and a custom export without it gets a precise error.
  Ort::Session open_step(const std::string& step_path) {
    bool explicit_lib = !opt_.gla_lib.empty() || !env("GLA_RUN_GLA_LIB").empty();
    std::string lib;
    try {
      lib = find_gla_library(opt_);
    } catch (const Error&) {
      if (explicit_lib) throw;
    }
    if (!lib.empty()) {
      try {
        session_options_.RegisterCustomOpsLibrary(lib.c_str());
        if (graph_) step_options_.RegisterCustomOpsLibrary(lib.c_str());
        gla_lib_ = lib;
      } catch (const Ort::Exception& e) {
        if (explicit_lib) throw Error(kMissingRuntime, "cannot register the custom-op library " + lib + ": " + e.what());
      }
    }
    if (graph_) {
      try {
        return Ort::Session(env_, step_path.c_str(), step_options_);
      } catch (const Ort::Exception& e) {  // ONNX Runtime refuses to capture this graph: go on without
        graph_ = false;
        graph_off_ = std::string("ONNX Runtime refused: ") + e.what();
      }
    }
    try {
      return Ort::Session(env_, step_path.c_str(), session_options_);
    } catch (const Ort::Exception& e) {
      std::string what = e.what();
      if (gla_lib_.empty() && (what.find("GatedLinearAttention") != std::string::npos || what.find("gla") != std::string::npos)) {
        try {
          find_gla_library(opt_);
        } catch (const Error& missing) {
          throw Error(kMissingRuntime, missing.what());
        }
      }
      throw Error(kModel, "ONNX Runtime cannot open " + step_path + ": " + what);
    }
  }

  Metadata read_metadata(Ort::Session& session, const std::string& path) {
    Ort::AllocatorWithDefaultOptions alloc;
    Ort::ModelMetadata mm = session.GetModelMetadata();
    Ort::AllocatedStringPtr text = mm.LookupCustomMetadataMapAllocated(kMetadataKey, alloc);
    if (text) return parse_metadata(text.get(), path + " (metadata_props['" + kMetadataKey + "'])");
    std::string file = join_path(opt_.export_dir, "metadata.json");
    if (!file_exists(file))
      throw Error(kModel, path + " has no '" + std::string(kMetadataKey) + "' metadata_props and " + file + " does not exist");
    return parse_metadata(read_file(file), file);
  }

  void check_graph(Ort::Session& s, const std::string& path, bool prefill) {
    auto ins = signatures(s, true), outs = signatures(s, false);
    const std::vector<int64_t> ids_shape = {-1, prefill ? -1 : 1};
    check_tensor(ins, path, "input", "input_ids", ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64, ids_shape);
    check_tensor(outs, path, "output", "logits", ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, {-1, prefill ? -1 : 1, meta_.vocab_size});
    if (prefill && meta_.prefill_has_mask)
      check_tensor(ins, path, "input", "attention_mask", ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64, ids_shape);
    size_t expected_inputs = 1 + meta_.states.size() + (prefill && meta_.prefill_has_mask ? 1 : 0);
    for (const auto& st : meta_.states) {
      check_tensor(ins, path, "input", st.input, ort_type(st.dtype), st.shape);
      check_tensor(outs, path, "output", st.output, ort_type(st.dtype), st.shape);
    }
    if (ins.size() != expected_inputs)
      throw Error(kModel, path + " has " + std::to_string(ins.size()) + " inputs, the metadata describes " +
                              std::to_string(expected_inputs));
  }

  void allocate_states() {
    const size_t n = meta_.states.size();
    for (int k = 0; k < 2; ++k) {
      states_[k].reserve(n);
      for (const auto& st : meta_.states) {
        kv_device_[k].emplace_back(nullptr);
        if (st.grows()) {  // allocated by reserve(), viewed per call (kv_view)
          states_[k].emplace_back(nullptr);
          host_states_[k].emplace_back();
          continue;
        }
        std::vector<int64_t> shape = st.shape_at(0);
        const size_t count = size_t(st.elements_per_row());
        if (opt_.provider == "cuda") {
          states_[k].push_back(Ort::Value::CreateTensor(*device_alloc(), shape.data(), shape.size(), ort_type(st.dtype)));
        } else {
          host_states_[k].push_back(std::make_unique<HostBuffer>(count * dtype_size(st.dtype)));
          states_[k].push_back(Ort::Value::CreateTensor(cpu_info_, host_states_[k].back()->data, host_states_[k].back()->bytes,
                                                        shape.data(), shape.size(), ort_type(st.dtype)));
        }
      }
    }
  }

  Ort::Allocator* device_alloc() {
    if (!device_alloc_) device_alloc_ = std::make_unique<Ort::Allocator>(step_, device_info_);
    return device_alloc_.get();
  }

  void check_room(int64_t new_positions) {
    if (!meta_.any_growing()) return;
    if (kv_len_ + new_positions > capacity_)
      throw Error(kInternal, "the KV caches hold " + std::to_string(capacity_) + " positions (reserve), " +
                                 std::to_string(kv_len_ + new_positions) + " are needed");
  }

  // Buffer k of growing state s, viewed as a cache of `length` slots.
  Ort::Value kv_view(int k, size_t s, int64_t length) {
    const StateInfo& st = meta_.states[s];
    std::vector<int64_t> shape = st.shape_at(length);
    const size_t bytes = size_t(capacity_) * size_t(st.elements_per_row()) * dtype_size(st.dtype);
    if (opt_.provider == "cuda")
      return Ort::Value::CreateTensor(device_info_, kv_device_[k][s].GetTensorMutableData<void>(), bytes, shape.data(),
                                      shape.size(), ort_type(st.dtype));
    return Ort::Value::CreateTensor(cpu_info_, host_states_[k][s]->data, bytes, shape.data(), shape.size(),
                                    ort_type(st.dtype));
  }

  // The growing caches of a call that reads buffer k (kv_len_ slots) and writes buffer 1-k (T more).
  void bind_growing(Ort::IoBinding& b, int k, int64_t T) {
    for (size_t s = 0; s < meta_.states.size(); ++s) {
      if (!meta_.states[s].grows()) continue;
      b.BindInput(meta_.states[s].input.c_str(), kv_view(k, s, kv_len_));
      b.BindOutput(meta_.states[s].output.c_str(), kv_view(1 - k, s, kv_len_ + T));
    }
  }

  // Binds the current state as `past` (host zeros on the first run of a device conversation) and
  // buffer `present_to` as `present`; the growing caches `T` slots longer.
  void bind_past(Ort::IoBinding& b, int present_to, int64_t T) {
    if (first_from_zeros_ && zeros_.empty()) {
      for (const auto& st : meta_.states) {
        std::vector<int64_t> shape = st.shape_at(0);  // a growing cache: empty (unused: bind_growing)
        auto buf = std::make_unique<HostBuffer>(size_t(st.elements_per_row()) * dtype_size(st.dtype));
        zeros_.emplace_back(Ort::Value::CreateTensor(cpu_info_, buf->data, buf->bytes, shape.data(), shape.size(),
                                                     ort_type(st.dtype)),
                            std::move(buf));
      }
    }
    for (size_t s = 0; s < meta_.states.size(); ++s) {
      if (meta_.states[s].grows()) continue;  // empty at the start: bind_growing
      b.BindInput(meta_.states[s].input.c_str(), first_from_zeros_ ? zeros_[s].first : states_[1 - present_to][s]);
      b.BindOutput(meta_.states[s].output.c_str(), states_[present_to][s]);
    }
    bind_growing(b, 1 - present_to, T);
  }

  OrtOptions opt_;
  Metadata& meta_;
  std::string runtime_, gla_lib_, prefill_path_;
  bool has_prefill_ = false;
  Ort::Env env_{nullptr};
  Ort::SessionOptions session_options_{nullptr}, step_options_{nullptr};
  bool graph_ = false;  // the step replays CUDA graphs (start_graphs)
  std::string graph_off_;
  CudaMemcpy copy_;
  Ort::RunOptions graph_runs_[2], no_graph_;
  Ort::Session retired_step_{nullptr};
  Ort::Session step_{nullptr}, prefill_{nullptr};
  Ort::MemoryInfo cpu_info_{nullptr}, device_info_{nullptr};
  std::unique_ptr<Ort::Allocator> device_alloc_;
  Ort::Value ids_dev_{nullptr}, logits_dev_{nullptr};  // from device_alloc_: declared after it, freed before
  std::vector<Ort::Value> kv_device_[2];  // growing caches on the device at capacity_ (reserve), else null
  int64_t capacity_ = 0, kv_len_ = 0;     // slots of each growing cache buffer; slots in use
  std::vector<std::unique_ptr<HostBuffer>> host_states_[2];
  std::vector<Ort::Value> states_[2];
  std::vector<std::pair<Ort::Value, std::unique_ptr<HostBuffer>>> zeros_;
  std::unique_ptr<Ort::IoBinding> step_bindings_[2];
  int64_t next_id_ = 0;
  Ort::Value ids_value_{nullptr};
  std::vector<float> logits_;
  Ort::Value logits_value_{nullptr};
  int cur_ = 0;
  bool first_from_zeros_ = false;
};

}  // namespace

std::unique_ptr<Backend> make_ort_backend(const OrtOptions& opt, Metadata& meta) {
  std::string runtime = load_onnxruntime(opt);
  return std::make_unique<OrtBackend>(opt, meta, std::move(runtime));
}

}  // namespace gla_run
