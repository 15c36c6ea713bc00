// gla-ort-node: runs one ONNX model on ONNX Runtime's CPU execution provider with our custom-op
// library registered, reading and writing raw tensors, so that the aarch64 builds of both libraries
// can be checked under qemu-user against the reference computed on the build machine
// (tests/arm64/test_arm64.py, tools/arm64/emulated_checks.py).
//
//   gla-ort-node ORT_LIB GLA_LIB MODEL DIR
//
// For every graph input NAME: DIR/NAME.shape (the dimensions, space-separated) and DIR/NAME.bin
// (its bytes; the element type is the graph's). Every output is written to DIR/out.NAME.bin and its
// dimensions to DIR/out.NAME.shape. ONNX Runtime is dlopen'ed (as gla-run does), so this builds
// against the headers only. Exit status 0, or 1 with ONNX Runtime's message on stderr.
#define ORT_API_MANUAL_INIT
#include <onnxruntime_cxx_api.h>
#undef ORT_API_MANUAL_INIT

#include <dlfcn.h>

#include <cstdio>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

namespace {

size_t elem_bytes(ONNXTensorElementDataType t) {
  switch (t) {
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_DOUBLE:
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64:
      return 8;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT:
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32:
      return 4;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16:
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16:
      return 2;
    default:
      throw std::runtime_error("unsupported element type " + std::to_string(int(t)));
  }
}

std::string slurp(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw std::runtime_error("cannot read " + path);
  std::ostringstream s;
  s << f.rdbuf();
  return s.str();
}

void spit(const std::string& path, const void* data, size_t n) {
  std::ofstream f(path, std::ios::binary);
  f.write(static_cast<const char*>(data), std::streamsize(n));
  if (!f) throw std::runtime_error("cannot write " + path);
}

int run(int argc, char** argv) {
  if (argc != 5) {
    std::fprintf(stderr, "usage: gla-ort-node ORT_LIB GLA_LIB MODEL DIR\n");
    return 2;
  }
  const std::string ort_lib = argv[1], gla_lib = argv[2], model = argv[3], dir = argv[4];
  void* handle = ::dlopen(ort_lib.c_str(), RTLD_NOW | RTLD_GLOBAL);
  if (!handle) throw std::runtime_error(std::string("dlopen: ") + ::dlerror());
  using GetApiBaseFn = const OrtApiBase* (*)();
  auto get_base = reinterpret_cast<GetApiBaseFn>(::dlsym(handle, "OrtGetApiBase"));
  if (!get_base) throw std::runtime_error(ort_lib + " has no OrtGetApiBase");
  const OrtApi* api = get_base()->GetApi(ORT_API_VERSION);
  if (!api) throw std::runtime_error("ONNX Runtime too old for API version " + std::to_string(ORT_API_VERSION));
  Ort::InitApi(api);

  Ort::Env env(ORT_LOGGING_LEVEL_WARNING, "gla-ort-node");
  Ort::SessionOptions so;
  so.SetIntraOpNumThreads(2);
  so.RegisterCustomOpsLibrary(gla_lib.c_str());
  Ort::Session session(env, model.c_str(), so);
  Ort::AllocatorWithDefaultOptions alloc;
  Ort::MemoryInfo mem = Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault);

  std::vector<std::string> in_names, out_names;
  std::vector<std::string> buffers;
  std::vector<Ort::Value> inputs;
  for (size_t i = 0; i < session.GetInputCount(); ++i) {
    const std::string name = session.GetInputNameAllocated(i, alloc).get();
    const auto type = session.GetInputTypeInfo(i).GetTensorTypeAndShapeInfo().GetElementType();
    std::vector<int64_t> shape;
    std::istringstream dims(slurp(dir + "/" + name + ".shape"));
    for (int64_t d; dims >> d;) shape.push_back(d);
    buffers.push_back(slurp(dir + "/" + name + ".bin"));
    size_t count = 1;
    for (int64_t d : shape) count *= size_t(d);
    if (buffers.back().size() != count * elem_bytes(type))
      throw std::runtime_error(name + ".bin has " + std::to_string(buffers.back().size()) + " bytes, its shape needs " +
                               std::to_string(count * elem_bytes(type)));
    inputs.push_back(Ort::Value::CreateTensor(mem, buffers.back().data(), buffers.back().size(), shape.data(),
                                              shape.size(), type));
    in_names.push_back(name);
  }
  for (size_t i = 0; i < session.GetOutputCount(); ++i)
    out_names.push_back(session.GetOutputNameAllocated(i, alloc).get());

  std::vector<const char*> in_c, out_c;
  for (const auto& n : in_names) in_c.push_back(n.c_str());
  for (const auto& n : out_names) out_c.push_back(n.c_str());
  auto outputs = session.Run(Ort::RunOptions{}, in_c.data(), inputs.data(), inputs.size(), out_c.data(), out_c.size());
  for (size_t i = 0; i < outputs.size(); ++i) {
    const auto info = outputs[i].GetTensorTypeAndShapeInfo();
    const auto shape = info.GetShape();
    std::string dims;
    for (int64_t d : shape) dims += std::to_string(d) + " ";
    spit(dir + "/out." + out_names[i] + ".shape", dims.data(), dims.size());
    spit(dir + "/out." + out_names[i] + ".bin", outputs[i].GetTensorRawData(),
         info.GetElementCount() * elem_bytes(info.GetElementType()));
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "gla-ort-node: %s\n", e.what());
    return 1;
  }
}
