// The TensorRT backend of gla-run: a step engine (built from step.onnx with our plugin, e.g. by
// `gla-export build`) driven with enqueueV3, states in two device buffers that swap each step.
//
// Compiled only when TensorRT headers are found (cmake/FetchTensorRTHeaders.cmake); TensorRT itself
// (libnvinfer) is dlopen'ed at run time, so the binary starts on machines without it and the ONNX
// Runtime path still works there. Not run in CI: an engine can only be deserialised on a GPU with
// full TensorRT (runtimes/README.md).
#include <NvInferRuntime.h>
#include <cuda_runtime_api.h>
#include <dlfcn.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "common.h"

namespace gla_run {

bool trt_compiled() { return true; }

namespace {

class Logger final : public nvinfer1::ILogger {
 public:
  void log(Severity severity, nvinfer1::AsciiChar const* msg) noexcept override {
    if (severity <= Severity::kWARNING) std::fprintf(stderr, "gla-run: tensorrt: %s\n", msg);
  }
};

void cuda_check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw Error(kInternal, std::string("CUDA: ") + what + ": " + cudaGetErrorString(e));
}

DType from_trt(nvinfer1::DataType t, const std::string& name) {
  switch (t) {
    case nvinfer1::DataType::kFLOAT: return DType::Float32;
    case nvinfer1::DataType::kHALF: return DType::Float16;
    case nvinfer1::DataType::kBF16: return DType::BFloat16;
    case nvinfer1::DataType::kINT64: return DType::Int64;
    case nvinfer1::DataType::kINT32: return DType::Int32;
    default: throw Error(kModel, "engine tensor '" + name + "' has a data type gla-run does not handle");
  }
}

struct DeviceBuffer {
  void* ptr = nullptr;
  size_t bytes = 0;
  explicit DeviceBuffer(size_t n) : bytes(n) { cuda_check(cudaMalloc(&ptr, n ? n : 16), "cudaMalloc"); }
  ~DeviceBuffer() { cudaFree(ptr); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
};

class TrtBackend final : public Backend {
 public:
  TrtBackend(const TrtOptions& opt, const Metadata& meta) : opt_(opt), meta_(meta) {
    load_tensorrt();
    if (cudaError_t e = cudaSetDevice(opt.device_id); e != cudaSuccess)
      throw Error(kMissingRuntime, "no usable CUDA device " + std::to_string(opt.device_id) + ": " + cudaGetErrorString(e));
    load_plugin();

    std::string blob = read_file(opt.engine);
    engine_ = runtime_->deserializeCudaEngine(blob.data(), blob.size());
    if (!engine_)
      throw Error(kModel, "TensorRT cannot deserialise " + opt.engine +
                              " (built by another TensorRT version or for another GPU? see the messages above)");
    context_ = engine_->createExecutionContext();
    if (!context_) throw Error(kInternal, "TensorRT could not create an execution context");
    check_and_shape();
    allocate();
    cuda_check(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "cudaStreamCreate");
    reset();
    if (opt.cuda_graph) capture();
  }

  ~TrtBackend() override {
    for (auto& g : graphs_)
      if (g) cudaGraphExecDestroy(g);
    if (stream_) cudaStreamDestroy(stream_);
    if (host_) cudaFreeHost(host_);
    states_[0].clear();
    states_[1].clear();
    ids_.reset();
    logits_.reset();
    delete context_;
    delete engine_;
    delete runtime_;
    // libnvinfer stays loaded: unloading it while TensorRT's static objects are alive is unsafe
  }

  std::string describe() const override {
    return "TensorRT " + version_ + " (" + lib_ + "), engine " + opt_.engine +
           (graphs_[0] ? ", CUDA graph" : ", no CUDA graph" + (graph_off_.empty() ? "" : ": " + graph_off_));
  }
  bool can_prefill() const override { return false; }
  const float* prefill(const std::vector<int64_t>&) override { throw Error(kInternal, "no prefill engine"); }

  void reset() override {
    for (auto& b : states_[0]) cuda_check(cudaMemsetAsync(b->ptr, 0, b->bytes, stream_), "cudaMemsetAsync");
    cuda_check(cudaStreamSynchronize(stream_), "cudaStreamSynchronize");
    cur_ = 0;
  }

  const float* step(int64_t id) override {
    // host_ is pinned: [logits (V floats) | the token id]
    float* logits = static_cast<float*>(host_);
    void* id_host = static_cast<char*>(host_) + logits_bytes_;
    if (ids_dtype_ == DType::Int64) {
      std::memcpy(id_host, &id, sizeof(int64_t));
    } else {
      int32_t id32 = static_cast<int32_t>(id);
      std::memcpy(id_host, &id32, sizeof(int32_t));
    }
    if (graphs_[cur_]) {
      // one launch: the id's copy in, the engine, the logits' copy out, all captured (capture())
      cuda_check(cudaGraphLaunch(graphs_[cur_], stream_), "cudaGraphLaunch");
    } else {
      enqueue_step(cur_);
    }
    cuda_check(cudaStreamSynchronize(stream_), "cudaStreamSynchronize");
    cur_ = 1 - cur_;
    return logits;
  }

  // Whether direction k (states k in, 1-k out) is a captured graph: for tests and --verbose.
  bool captured(int k) const { return graphs_[k] != nullptr; }

 private:
  // The step of direction k on stream_: the id from the pinned host buffer, enqueueV3 with the
  // states of buffer k in and 1-k out, the logits back to the pinned buffer.
  void enqueue_step(int k) {
    void* id_host = static_cast<char*>(host_) + logits_bytes_;
    cuda_check(cudaMemcpyAsync(ids_->ptr, id_host, dtype_size(ids_dtype_), cudaMemcpyHostToDevice, stream_), "copy input_ids");
    bool ok = context_->setTensorAddress("input_ids", ids_->ptr) && context_->setTensorAddress("logits", logits_->ptr);
    for (size_t s = 0; s < meta_.states.size(); ++s) {
      ok = ok && context_->setTensorAddress(meta_.states[s].input.c_str(), states_[k][s]->ptr);
      ok = ok && context_->setTensorAddress(meta_.states[s].output.c_str(), states_[1 - k][s]->ptr);
    }
    if (!ok) throw Error(kInternal, "TensorRT refused a tensor address");
    if (!context_->enqueueV3(stream_)) throw Error(kInternal, "TensorRT enqueueV3 failed (see the messages above)");
    cuda_check(cudaMemcpyAsync(host_, logits_->ptr, logits_bytes_, cudaMemcpyDeviceToHost, stream_), "copy logits");
  }

  // Both directions of the state swap captured once as CUDA graphs (the addresses are fixed for the
  // backend's life: states, ids, logits, the pinned host buffer). Each direction runs once
  // uncaptured first (TensorRT finishes deferred work at its first enqueue), then is captured in
  // thread-local mode. A capture that fails leaves the uncaptured path (graph_off_ says why); the
  // states are zeroed again after, whatever the runs wrote.
  void capture() {
    for (int k = 0; k < 2; ++k) {
      enqueue_step(k);
      cuda_check(cudaStreamSynchronize(stream_), "cudaStreamSynchronize");
    }
    for (int k = 0; k < 2; ++k) {
      cudaGraph_t graph = nullptr;
      cudaError_t e = cudaStreamBeginCapture(stream_, cudaStreamCaptureModeThreadLocal);
      bool enq = false;
      if (e == cudaSuccess) {
        try {
          enqueue_step(k);
          enq = true;
        } catch (const Error& err) {
          graph_off_ = err.what();
        }
        cudaError_t end = cudaStreamEndCapture(stream_, &graph);
        if (e == cudaSuccess) e = end;
      }
      if (e == cudaSuccess && enq) e = cudaGraphInstantiate(&graphs_[k], graph, 0);
      if (graph) cudaGraphDestroy(graph);
      if (e != cudaSuccess || !enq) {
        if (graph_off_.empty()) graph_off_ = std::string("capture failed: ") + cudaGetErrorString(e);
        (void)cudaGetLastError();  // a failed capture is not sticky: clear it
        for (auto& g : graphs_)
          if (g) cudaGraphExecDestroy(g), g = nullptr;
        break;
      }
    }
    reset();
  }

  void load_tensorrt() {
    std::vector<std::string> candidates;
    if (!opt_.trt_lib.empty()) candidates = {opt_.trt_lib};
    else if (!env("GLA_RUN_TRT_LIB").empty()) candidates = {env("GLA_RUN_TRT_LIB")};
    else candidates = {"libnvinfer.so." + std::to_string(NV_TENSORRT_MAJOR), "libnvinfer.so"};
    std::string errors;
    for (const auto& path : candidates) {
      void* h = ::dlopen(path.c_str(), RTLD_NOW | RTLD_GLOBAL);
      if (!h) {
        const char* e = ::dlerror();
        errors += "\n  " + path + ": " + (e ? e : "dlopen failed");
        continue;
      }
      using CreateFn = void* (*)(void*, int32_t);
      auto create = reinterpret_cast<CreateFn>(::dlsym(h, "createInferRuntime_INTERNAL"));
      if (!create) throw Error(kMissingRuntime, path + " is not TensorRT (no createInferRuntime_INTERNAL)");
      runtime_ = static_cast<nvinfer1::IRuntime*>(create(&logger_, NV_TENSORRT_VERSION));
      if (!runtime_)
        throw Error(kMissingRuntime, "TensorRT at " + path + " refused to create a runtime for headers version " +
                                         std::to_string(NV_TENSORRT_VERSION));
      using VersionFn = int32_t (*)();
      if (auto v = reinterpret_cast<VersionFn>(::dlsym(h, "getInferLibVersion"))) version_ = std::to_string(v());
      lib_ = path;
      return;
    }
    throw Error(kMissingRuntime, "cannot load TensorRT: pass --trt-lib PATH (libnvinfer.so." +
                                     std::to_string(NV_TENSORRT_MAJOR) + ") or set GLA_RUN_TRT_LIB; tried:" + errors);
  }

  void load_plugin() {
    std::string path = !opt_.plugin_lib.empty() ? opt_.plugin_lib : env("GLA_RUN_TRT_PLUGIN");
    if (path.empty()) {
      for (const char* rel : {"../lib/libgla_tensorrt.so", "libgla_tensorrt.so", "../plugins/tensorrt/libgla_tensorrt.so"}) {
        std::string p = join_path(opt_.exe_dir, rel);
        if (file_exists(p)) { path = p; break; }
      }
    }
    if (path.empty()) {
      if (meta_.form == "decomposed") return;  // standard ops only: no plugin in the engine
      throw Error(kMissingRuntime, "the engine needs the gla TensorRT plugin: pass --plugin PATH (libgla_tensorrt.so)");
    }
    if (!file_exists(path)) throw Error(kMissingRuntime, "plugin library " + path + " does not exist");
    // loadLibrary calls the library's getCreators/setLoggerFinder; a null handle means it was refused
    if (!runtime_->getPluginRegistry().loadLibrary(path.c_str()))
      throw Error(kMissingRuntime, "TensorRT refused the plugin library " + path + " (see the messages above)");
  }

  void check_and_shape() {
    bool have_ids = false, have_logits = false;
    const int n = engine_->getNbIOTensors();
    for (int i = 0; i < n; ++i) {
      const char* name = engine_->getIOTensorName(i);
      std::string sname(name);
      const bool input = engine_->getTensorIOMode(name) == nvinfer1::TensorIOMode::kINPUT;
      const DType dt = from_trt(engine_->getTensorDataType(name), sname);
      nvinfer1::Dims dims = engine_->getTensorShape(name);
      if (sname == "input_ids") {
        have_ids = true;
        ids_dtype_ = dt;
        if (dt != DType::Int64 && dt != DType::Int32) throw Error(kModel, "engine input 'input_ids' must be int64 or int32");
      } else if (sname == "logits") {
        have_logits = true;
        if (dt != DType::Float32) throw Error(kModel, "engine output 'logits' must be float32");
      } else {
        const StateInfo* st = nullptr;
        for (const auto& s : meta_.states)
          if ((input && s.input == sname) || (!input && s.output == sname)) st = &s;
        if (!st) throw Error(kModel, "engine tensor '" + sname + "' is not in the export's metadata: is the engine from this export?");
        if (st->dtype != dt)
          throw Error(kModel, "engine tensor '" + sname + "' is " + dtype_name(dt) + ", the metadata says " + dtype_name(st->dtype));
        if (dims.nbDims != int(st->shape.size()))
          throw Error(kModel, "engine tensor '" + sname + "' has rank " + std::to_string(dims.nbDims) + ", the metadata says " +
                                  shape_str(st->shape));
      }
      if (input) {
        // batch 1; the engine's other dimensions are static ([1, 1] for input_ids of a step engine)
        for (int d = 0; d < dims.nbDims; ++d)
          if (dims.d[d] < 0) dims.d[d] = 1;
        if (!context_->setInputShape(name, dims)) throw Error(kModel, "the engine's profile does not admit batch 1 for '" + sname + "'");
      }
    }
    if (!have_ids || !have_logits) throw Error(kModel, "the engine has no input_ids input or logits output: is it a step engine?");
    if (n != int(2 + 2 * meta_.states.size()))
      throw Error(kModel, "the engine has " + std::to_string(n) + " I/O tensors, a step engine of this export has " +
                              std::to_string(2 + 2 * meta_.states.size()));
  }

  void allocate() {
    logits_bytes_ = size_t(meta_.vocab_size) * sizeof(float);
    logits_ = std::make_unique<DeviceBuffer>(logits_bytes_);
    ids_ = std::make_unique<DeviceBuffer>(sizeof(int64_t));
    cuda_check(cudaMallocHost(&host_, logits_bytes_ + sizeof(int64_t)), "cudaMallocHost");
    for (int k = 0; k < 2; ++k)
      for (const auto& st : meta_.states)
        states_[k].push_back(std::make_unique<DeviceBuffer>(size_t(st.elements_per_row()) * dtype_size(st.dtype)));
  }

  TrtOptions opt_;
  const Metadata& meta_;
  Logger logger_;
  std::string lib_, version_ = "?";
  nvinfer1::IRuntime* runtime_ = nullptr;
  nvinfer1::ICudaEngine* engine_ = nullptr;
  nvinfer1::IExecutionContext* context_ = nullptr;
  cudaStream_t stream_ = nullptr;
  DType ids_dtype_ = DType::Int64;
  size_t logits_bytes_ = 0;
  std::unique_ptr<DeviceBuffer> ids_, logits_;
  std::vector<std::unique_ptr<DeviceBuffer>> states_[2];
  void* host_ = nullptr;
  int cur_ = 0;
  cudaGraphExec_t graphs_[2] = {nullptr, nullptr};
  std::string graph_off_;
};

}  // namespace

std::unique_ptr<Backend> make_trt_backend(const TrtOptions& opt, const Metadata& meta) {
  return std::make_unique<TrtBackend>(opt, meta);
}

}  // namespace gla_run
