// gla_trt_plugin_harness: drives libgla_tensorrt.so the way TensorRT does, without TensorRT.
//
//   gla_trt_plugin_harness LIBRARY CASE_DIR [--no-device]
//
// Loads LIBRARY with dlopen, checks that it exports getCreators and setLoggerFinder, creates the
// plugin named in CASE_DIR/case.txt through its creator (build phase), and walks the build
// interface: getOutputDataTypes, getOutputShapes (through a minimal IExprBuilder in which the
// dimensions marked '*' are symbolic), supportsFormatCombination (every accepted combination and a
// few that must be refused), configurePlugin (wildcard dims and a profile), getWorkspaceSize. It
// then serialises the fields, re-creates the plugin from them (runtime phase, as deserialisation
// does) and, with a GPU and without --no-device, attaches it to a context, calls onShapeChange and
// enqueue on device buffers read from CASE_DIR/input<i>.bin (outputs poisoned with NaN first),
// twice, and writes CASE_DIR/output<j>.bin. Everything it saw goes to CASE_DIR/result.json; the
// pytest in tests/tensorrt_plugin compares it with the float64 reference. Exit status 0 when every step
// succeeded, 1 when one failed (result.json says which), 2 on bad usage.
//
// case.txt, one directive per line ('#' starts a comment):
//   op GatedLinearAttention | LinearAttention
//   name <node name>
//   field <name> int32|int64|float32|string <value>
//   input <dtype> <d0> <d1> ...      a dimension written as 12* is symbolic (dynamic) for the builder
//   max <index> <d0> <d1> ...         the profile's maximum of input <index> (default: its dims)
#include <NvInferRuntime.h>
#include <cuda_runtime_api.h>
#include <dlfcn.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <deque>
#include <fstream>
#include <limits>
#include <memory>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

using namespace nvinfer1;

namespace {

// ---- collecting what the library reports -------------------------------------------------------

std::vector<std::string> gMessages;

class HarnessLogger : public ILogger {
 public:
  void log(Severity severity, char const* msg) noexcept override {
    if (severity <= Severity::kWARNING) {
      gMessages.emplace_back(msg);
      std::fprintf(stderr, "[plugin] %s\n", msg);
    }
  }
};

class HarnessLoggerFinder : public ILoggerFinder {
 public:
  ILogger* findLogger() override { return &mLogger; }
  HarnessLogger mLogger;
};

class HarnessRecorder : public IErrorRecorder {
 public:
  int32_t getNbErrors() const noexcept override { return static_cast<int32_t>(mErrors.size()); }
  ErrorCode getErrorCode(int32_t i) const noexcept override {
    return i >= 0 && i < getNbErrors() ? mErrors[i].first : ErrorCode::kUNSPECIFIED_ERROR;
  }
  ErrorDesc getErrorDesc(int32_t i) const noexcept override {
    return i >= 0 && i < getNbErrors() ? mErrors[i].second.c_str() : "";
  }
  bool hasOverflowed() const noexcept override { return false; }
  void clear() noexcept override { mErrors.clear(); }
  bool reportError(ErrorCode code, ErrorDesc desc) noexcept override {
    mErrors.emplace_back(code, desc ? desc : "");
    gMessages.emplace_back(desc ? desc : "");
    std::fprintf(stderr, "[plugin recorder] %s\n", desc ? desc : "");
    return false;
  }
  RefCount incRefCount() noexcept override { return ++mRefs; }
  RefCount decRefCount() noexcept override { return --mRefs; }

 private:
  std::vector<std::pair<ErrorCode, std::string>> mErrors;
  RefCount mRefs{0};
};

class HarnessResourceContext : public IPluginResourceContext {
 public:
  explicit HarnessResourceContext(IErrorRecorder* recorder) : mRecorder(recorder) {}
  IGpuAllocator* getGpuAllocator() const noexcept override { return nullptr; }
  IErrorRecorder* getErrorRecorder() const noexcept override { return mRecorder; }

 private:
  IErrorRecorder* mRecorder;
};

// ---- a minimal expression builder: each expression carries its value at the actual shape and at
// the profile's maximum; symbolic ones report isConstant() == false, as TensorRT's do -----------

class Expr : public IDimensionExpr {
 public:
  Expr(int64_t value, int64_t maxValue, bool constant) {
    mState.value = value;
    mState.maxValue = maxValue;
    mState.constant = constant;
    mImpl = &mState;
  }
  ~Expr() override = default;
  int64_t value() const { return mState.value; }
  int64_t maxValue() const { return mState.maxValue; }

 private:
  struct State : apiv::VDimensionExpr {
    int64_t value = 0, maxValue = 0;
    bool constant = true;
    bool isConstant() const override { return constant; }
    int64_t getConstantValue() const override { return constant ? value : std::numeric_limits<int64_t>::min(); }
    bool isSizeTensor() const override { return false; }
  } mState;
};

int64_t apply(DimensionOperation op, int64_t a, int64_t b) {
  switch (op) {
    case DimensionOperation::kSUM: return a + b;
    case DimensionOperation::kPROD: return a * b;
    case DimensionOperation::kMAX: return a > b ? a : b;
    case DimensionOperation::kMIN: return a < b ? a : b;
    case DimensionOperation::kSUB: return a - b;
    case DimensionOperation::kEQUAL: return a == b;
    case DimensionOperation::kLESS: return a < b;
    case DimensionOperation::kFLOOR_DIV: {
      if (b == 0) throw std::runtime_error("division by zero in a shape expression");
      int64_t q = a / b;
      if ((a % b != 0) && ((a < 0) != (b < 0))) --q;
      return q;
    }
    case DimensionOperation::kCEIL_DIV:
      if (b == 0) throw std::runtime_error("division by zero in a shape expression");
      return (a + b - 1) / b;
  }
  throw std::runtime_error("unknown DimensionOperation");
}

class ExprBuilder : public IExprBuilder {
 public:
  ExprBuilder() { mImpl = &mState; mState.owner = this; }
  ~ExprBuilder() override = default;
  Expr const* make(int64_t value, int64_t maxValue, bool constant) {
    mExprs.push_back(std::make_unique<Expr>(value, maxValue, constant));
    return mExprs.back().get();
  }

 private:
  struct State : apiv::VExprBuilder {
    ExprBuilder* owner = nullptr;
    IDimensionExpr const* constant(int64_t v) override { return owner->make(v, v, true); }
    IDimensionExpr const* operation(DimensionOperation op, IDimensionExpr const& a, IDimensionExpr const& b) override {
      auto const& x = static_cast<Expr const&>(a);
      auto const& y = static_cast<Expr const&>(b);
      return owner->make(apply(op, x.value(), y.value()), apply(op, x.maxValue(), y.maxValue()),
                         a.isConstant() && b.isConstant());
    }
    IDimensionExpr const* declareSizeTensor(int32_t, IDimensionExpr const&, IDimensionExpr const&) override {
      return nullptr;  // the GLA plugin has no size tensors
    }
  } mState;
  std::deque<std::unique_ptr<Expr>> mExprs;
};

// ---- the case ----------------------------------------------------------------------------------

struct Field {
  std::string name, type;
  int32_t i32 = 0;
  int64_t i64 = 0;
  float f32 = 0.f;
  std::string str;
};

struct Input {
  DataType type = DataType::kFLOAT;
  Dims dims{};
  Dims maxDims{};
  std::vector<bool> symbolic;
};

struct Case {
  std::string op, name = "harness";
  std::vector<Field> fields;
  std::vector<Input> inputs;
};

DataType parseType(std::string const& s) {
  if (s == "float32") return DataType::kFLOAT;
  if (s == "float16") return DataType::kHALF;
  if (s == "bfloat16") return DataType::kBF16;
  if (s == "int32") return DataType::kINT32;
  if (s == "int64") return DataType::kINT64;
  throw std::runtime_error("unknown dtype '" + s + "'");
}

char const* typeName(DataType t) {
  switch (t) {
    case DataType::kFLOAT: return "float32";
    case DataType::kHALF: return "float16";
    case DataType::kBF16: return "bfloat16";
    case DataType::kINT32: return "int32";
    case DataType::kINT64: return "int64";
    default: return "other";
  }
}

size_t typeSize(DataType t) {
  switch (t) {
    case DataType::kHALF:
    case DataType::kBF16: return 2;
    case DataType::kINT64: return 8;
    default: return 4;
  }
}

int64_t volume(Dims const& d) {
  int64_t v = 1;
  for (int32_t i = 0; i < d.nbDims; ++i) v *= d.d[i];
  return v;
}

Case readCase(std::string const& path) {
  std::ifstream in(path);
  if (!in) throw std::runtime_error("cannot read " + path);
  Case c;
  std::string line;
  while (std::getline(in, line)) {
    auto hash = line.find('#');
    if (hash != std::string::npos) line.resize(hash);
    std::istringstream s(line);
    std::string key;
    if (!(s >> key)) continue;
    if (key == "op") {
      s >> c.op;
    } else if (key == "name") {
      s >> c.name;
    } else if (key == "field") {
      Field f;
      s >> f.name >> f.type;
      if (f.type == "int32") s >> f.i32;
      else if (f.type == "int64") s >> f.i64;
      else if (f.type == "float32") s >> f.f32;
      else if (f.type == "string") s >> f.str;
      else throw std::runtime_error("unknown field type '" + f.type + "'");
      if (s.fail()) throw std::runtime_error("bad field line: " + line);
      c.fields.push_back(f);
    } else if (key == "input") {
      Input x;
      std::string type, dim;
      s >> type;
      x.type = parseType(type);
      x.dims.nbDims = 0;
      while (s >> dim) {
        bool sym = !dim.empty() && dim.back() == '*';
        if (sym) dim.pop_back();
        x.dims.d[x.dims.nbDims++] = std::stoll(dim);
        x.symbolic.push_back(sym);
      }
      x.maxDims = x.dims;
      c.inputs.push_back(x);
    } else if (key == "max") {
      size_t index;
      s >> index;
      if (index >= c.inputs.size()) throw std::runtime_error("max: no input " + std::to_string(index));
      Dims& m = c.inputs[index].maxDims;
      for (int32_t i = 0; i < m.nbDims; ++i) s >> m.d[i];
    } else {
      throw std::runtime_error("unknown directive '" + key + "'");
    }
  }
  if (c.op.empty()) throw std::runtime_error("case.txt names no op");
  return c;
}

std::vector<char> readFile(std::string const& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("cannot read " + path);
  return std::vector<char>((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

void writeFile(std::string const& path, void const* data, size_t bytes) {
  std::ofstream out(path, std::ios::binary);
  out.write(static_cast<char const*>(data), static_cast<std::streamsize>(bytes));
  if (!out) throw std::runtime_error("cannot write " + path);
}

// ---- result.json -------------------------------------------------------------------------------

std::string quote(std::string const& s) {
  std::string o = "\"";
  for (char ch : s) {
    switch (ch) {
      case '"': o += "\\\""; break;
      case '\\': o += "\\\\"; break;
      case '\n': o += "\\n"; break;
      case '\t': o += "\\t"; break;
      default:
        if (static_cast<unsigned char>(ch) < 0x20) {
          char buf[8];
          std::snprintf(buf, sizeof(buf), "\\u%04x", ch);
          o += buf;
        } else {
          o += ch;
        }
    }
  }
  return o + "\"";
}

std::string dimsJson(Dims const& d) {
  std::string s = "[";
  for (int32_t i = 0; i < d.nbDims; ++i) s += (i ? ", " : "") + std::to_string(d.d[i]);
  return s + "]";
}

struct Result {
  std::vector<std::pair<std::string, std::string>> items;  // key -> JSON value
  void set(std::string const& k, std::string const& jsonValue) { items.emplace_back(k, jsonValue); }
  std::string json() const {
    std::string msgs = "[";
    for (size_t i = 0; i < gMessages.size(); ++i) msgs += (i ? ", " : "") + quote(gMessages[i]);
    auto all = items;
    all.emplace_back("messages", msgs + "]");
    std::string s = "{\n";
    for (size_t i = 0; i < all.size(); ++i) s += "  " + quote(all[i].first) + ": " + all[i].second + (i + 1 < all.size() ? ",\n" : "\n");
    return s + "}\n";
  }
};

struct Failure : std::runtime_error {
  Failure(std::string stage, std::string const& what) : std::runtime_error(what), stage(std::move(stage)) {}
  std::string stage;
};

std::string lastMessage() { return gMessages.empty() ? std::string("(no message)") : gMessages.back(); }

std::string fieldsJson(PluginFieldCollection const* fc) {
  if (fc == nullptr) return "null";
  std::string s = "[";
  for (int32_t i = 0; i < fc->nbFields; ++i) {
    PluginField const& f = fc->fields[i];
    std::string value;
    switch (f.type) {
      case PluginFieldType::kINT32: value = std::to_string(*static_cast<int32_t const*>(f.data)); break;
      case PluginFieldType::kINT64: value = std::to_string(*static_cast<int64_t const*>(f.data)); break;
      case PluginFieldType::kFLOAT32: {
        char buf[64];
        std::snprintf(buf, sizeof(buf), "%.9g", static_cast<double>(*static_cast<float const*>(f.data)));
        value = buf;
        break;
      }
      case PluginFieldType::kCHAR: {
        std::string str(static_cast<char const*>(f.data), static_cast<size_t>(f.length));
        auto nul = str.find('\0');
        if (nul != std::string::npos) str.resize(nul);
        value = quote(str);
        break;
      }
      default: value = "null";
    }
    s += std::string(i ? ", " : "") + "{\"name\": " + quote(f.name) + ", \"type\": " +
         std::to_string(static_cast<int>(f.type)) + ", \"length\": " + std::to_string(f.length) +
         ", \"value\": " + value + "}";
  }
  return s + "]";
}

IPluginCreatorV3One* findCreator(IPluginCreatorInterface* const* creators, int32_t n, std::string const& op,
                                 Result& result) {
  IPluginCreatorV3One* found = nullptr;
  std::string list = "[";
  for (int32_t i = 0; i < n; ++i) {
    if (creators[i] == nullptr) throw Failure("getCreators", "creator " + std::to_string(i) + " is null");
    InterfaceInfo const info = creators[i]->getInterfaceInfo();
    if (std::string(info.kind) != "PLUGIN CREATOR_V3ONE") {
      throw Failure("getCreators", std::string("creator ") + std::to_string(i) + " is a " + info.kind);
    }
    auto* c = static_cast<IPluginCreatorV3One*>(creators[i]);
    list += std::string(i ? ", " : "") + "[" + quote(c->getPluginName()) + ", " + quote(c->getPluginVersion()) + ", " +
            quote(c->getPluginNamespace()) + "]";
    if (op == c->getPluginName()) found = c;
  }
  result.set("creators", list + "]");
  if (found == nullptr) throw Failure("getCreators", "the library has no creator named " + op);
  return found;
}

struct Capabilities {
  IPluginV3OneCore* core;
  IPluginV3OneBuild* build;
  IPluginV3OneRuntime* runtime;
};

Capabilities capabilitiesOf(IPluginV3* p, bool needBuild) {
  Capabilities c{static_cast<IPluginV3OneCore*>(p->getCapabilityInterface(PluginCapabilityType::kCORE)),
                 static_cast<IPluginV3OneBuild*>(p->getCapabilityInterface(PluginCapabilityType::kBUILD)),
                 static_cast<IPluginV3OneRuntime*>(p->getCapabilityInterface(PluginCapabilityType::kRUNTIME))};
  if (c.core == nullptr || c.runtime == nullptr || (needBuild && c.build == nullptr)) {
    throw Failure("getCapabilityInterface", "a capability interface is missing");
  }
  return c;
}

#define CUDA_CHECK(call)                                                                             \
  do {                                                                                               \
    cudaError_t e_ = (call);                                                                         \
    if (e_ != cudaSuccess) throw Failure("cuda", std::string(#call) + ": " + cudaGetErrorString(e_)); \
  } while (0)

struct DeviceBuffer {
  void* ptr = nullptr;
  size_t bytes = 0;
  DeviceBuffer() = default;
  DeviceBuffer(DeviceBuffer const&) = delete;
  DeviceBuffer& operator=(DeviceBuffer const&) = delete;
  DeviceBuffer(DeviceBuffer&& o) noexcept : ptr(o.ptr), bytes(o.bytes) { o.ptr = nullptr; }
  ~DeviceBuffer() {
    if (ptr) cudaFree(ptr);
  }
  void allocate(size_t n) {
    bytes = n;
    if (n) CUDA_CHECK(cudaMalloc(&ptr, n));
  }
};

int run(std::string const& library, std::string const& dir, bool noDevice, Result& result) {
  Case const c = readCase(dir + "/case.txt");
  int32_t const nIn = static_cast<int32_t>(c.inputs.size());
  result.set("op", quote(c.op));

  // -- loading, as IPluginRegistry::loadLibrary does
  void* handle = dlopen(library.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (handle == nullptr) throw Failure("dlopen", dlerror());
  using GetCreators = IPluginCreatorInterface* const* (*)(int32_t&);
  using SetLoggerFinder = void (*)(ILoggerFinder*);
  auto getCreators = reinterpret_cast<GetCreators>(dlsym(handle, "getCreators"));
  auto setLoggerFinder = reinterpret_cast<SetLoggerFinder>(dlsym(handle, "setLoggerFinder"));
  if (getCreators == nullptr) throw Failure("dlsym", "the library does not export getCreators");
  if (setLoggerFinder == nullptr) throw Failure("dlsym", "the library does not export setLoggerFinder");
  static HarnessLoggerFinder finder;
  setLoggerFinder(&finder);
  int32_t nCreators = 0;
  IPluginCreatorInterface* const* creators = getCreators(nCreators);
  IPluginCreatorV3One* creator = findCreator(creators, nCreators, c.op, result);

  // -- creation from the node's attributes (build phase)
  std::vector<PluginField> fields;
  for (Field const& f : c.fields) {
    if (f.type == "int32") fields.emplace_back(f.name.c_str(), &f.i32, PluginFieldType::kINT32, 1);
    if (f.type == "int64") fields.emplace_back(f.name.c_str(), &f.i64, PluginFieldType::kINT64, 1);
    if (f.type == "float32") fields.emplace_back(f.name.c_str(), &f.f32, PluginFieldType::kFLOAT32, 1);
    if (f.type == "string") {
      fields.emplace_back(f.name.c_str(), f.str.c_str(), PluginFieldType::kCHAR, static_cast<int32_t>(f.str.size()));
    }
  }
  PluginFieldCollection fc{static_cast<int32_t>(fields.size()), fields.data()};
  std::unique_ptr<IPluginV3> plugin(creator->createPlugin(c.name.c_str(), &fc, TensorRTPhase::kBUILD));
  if (!plugin) throw Failure("createPlugin", lastMessage());
  Capabilities const caps = capabilitiesOf(plugin.get(), true);
  result.set("plugin", "[" + quote(caps.core->getPluginName()) + ", " + quote(caps.core->getPluginVersion()) + ", " +
                           quote(caps.core->getPluginNamespace()) + "]");
  int32_t const nOut = caps.build->getNbOutputs();
  result.set("nb_outputs", std::to_string(nOut));
  if (nOut != 2) throw Failure("getNbOutputs", "expected 2 outputs");

  // -- types
  std::vector<DataType> inTypes, outTypes(2);
  for (auto const& x : c.inputs) inTypes.push_back(x.type);
  if (caps.build->getOutputDataTypes(outTypes.data(), 2, inTypes.data(), nIn) != 0) {
    throw Failure("getOutputDataTypes", lastMessage());
  }
  result.set("output_types", std::string("[") + quote(typeName(outTypes[0])) + ", " + quote(typeName(outTypes[1])) + "]");

  // -- shapes through the expression builder
  ExprBuilder eb;
  std::vector<DimsExprs> inExprs(nIn);
  for (int32_t i = 0; i < nIn; ++i) {
    inExprs[i].nbDims = c.inputs[i].dims.nbDims;
    for (int32_t d = 0; d < inExprs[i].nbDims; ++d) {
      inExprs[i].d[d] = eb.make(c.inputs[i].dims.d[d], c.inputs[i].maxDims.d[d], !c.inputs[i].symbolic[d]);
    }
  }
  DimsExprs outExprs[2]{};
  if (caps.build->getOutputShapes(inExprs.data(), nIn, nullptr, 0, outExprs, 2, eb) != 0) {
    throw Failure("getOutputShapes", lastMessage());
  }
  Dims outDims[2], outMax[2];
  std::string dynamic = "[";
  for (int32_t o = 0; o < 2; ++o) {
    outDims[o].nbDims = outMax[o].nbDims = outExprs[o].nbDims;
    dynamic += o ? ", [" : "[";
    for (int32_t d = 0; d < outExprs[o].nbDims; ++d) {
      if (outExprs[o].d[d] == nullptr) throw Failure("getOutputShapes", "a null dimension expression");
      auto const* e = static_cast<Expr const*>(outExprs[o].d[d]);
      outDims[o].d[d] = e->value();
      outMax[o].d[d] = e->maxValue();
      dynamic += std::string(d ? ", " : "") + (e->isConstant() ? "false" : "true");
    }
    dynamic += "]";
  }
  result.set("output_shapes", "[" + dimsJson(outDims[0]) + ", " + dimsJson(outDims[1]) + "]");
  result.set("output_max_shapes", "[" + dimsJson(outMax[0]) + ", " + dimsJson(outMax[1]) + "]");
  result.set("output_dynamic", dynamic + "]");

  // -- formats: the actual combination must be accepted, position by position
  std::vector<DynamicPluginTensorDesc> io(nIn + 2);
  for (int32_t i = 0; i < nIn + 2; ++i) {
    Dims const& dims = i < nIn ? c.inputs[i].dims : outDims[i - nIn];
    Dims const& maxDims = i < nIn ? c.inputs[i].maxDims : outMax[i - nIn];
    io[i].desc.dims = dims;
    io[i].desc.type = i < nIn ? inTypes[i] : outTypes[i - nIn];
    io[i].desc.format = TensorFormat::kLINEAR;
    io[i].desc.scale = 1.f;
    io[i].min = dims;
    io[i].opt = dims;
    io[i].max = maxDims;
    // wildcards where the builder would not know the extent
    for (int32_t d = 0; d < dims.nbDims; ++d) {
      bool sym = i < nIn ? c.inputs[i].symbolic[d] : !outExprs[i - nIn].d[d]->isConstant();
      if (sym) io[i].desc.dims.d[d] = -1;
    }
  }
  bool accepted = true;
  for (int32_t pos = 0; pos < nIn + 2; ++pos) accepted = caps.build->supportsFormatCombination(pos, io.data(), nIn, 2) && accepted;
  result.set("formats_accepted", accepted ? "true" : "false");
  // ...and these must be refused (each checked with the positions before it valid)
  auto refused = [&](int32_t pos, DataType type, TensorFormat format) {
    std::vector<DynamicPluginTensorDesc> alt = io;
    alt[pos].desc.type = type;
    alt[pos].desc.format = format;
    return !caps.build->supportsFormatCombination(pos, alt.data(), nIn, 2);
  };
  DataType const other = inTypes[0] == DataType::kFLOAT ? DataType::kHALF : DataType::kFLOAT;
  DataType const otherState = outTypes[1] == DataType::kFLOAT ? DataType::kHALF : DataType::kFLOAT;
  std::string refusals = "{";
  refusals += "\"query_int32\": " + std::string(refused(0, DataType::kINT32, TensorFormat::kLINEAR) ? "true" : "false");
  refusals += ", \"query_chw32\": " + std::string(refused(0, inTypes[0], TensorFormat::kCHW32) ? "true" : "false");
  refusals += ", \"key_other_type\": " + std::string(refused(1, other, TensorFormat::kLINEAR) ? "true" : "false");
  refusals += ", \"output_other_type\": " + std::string(refused(nIn, other, TensorFormat::kLINEAR) ? "true" : "false");
  refusals += ", \"state_other_type\": " + std::string(refused(nIn + 1, otherState, TensorFormat::kLINEAR) ? "true" : "false");
  result.set("formats_refused", refusals + "}");

  // -- configure and workspace, as the builder does before timing
  if (caps.build->configurePlugin(io.data(), nIn, io.data() + nIn, 2) != 0) {
    throw Failure("configurePlugin", lastMessage());
  }
  size_t const workspace = caps.build->getWorkspaceSize(io.data(), nIn, io.data() + nIn, 2);
  result.set("workspace_bytes", std::to_string(workspace));
  char const* timingId = caps.build->getTimingCacheID();
  result.set("timing_cache_id", timingId ? quote(timingId) : "null");

  // -- serialisation: the fields go back through createPlugin (runtime phase)
  PluginFieldCollection const* serialized = caps.runtime->getFieldsToSerialize();
  if (serialized == nullptr) throw Failure("getFieldsToSerialize", lastMessage());
  result.set("fields", fieldsJson(serialized));
  std::unique_ptr<IPluginV3> runtimePlugin(creator->createPlugin(c.name.c_str(), serialized, TensorRTPhase::kRUNTIME));
  if (!runtimePlugin) throw Failure("createPlugin(runtime)", lastMessage());
  Capabilities const rcaps = capabilitiesOf(runtimePlugin.get(), false);
  result.set("fields_roundtrip", fieldsJson(rcaps.runtime->getFieldsToSerialize()));
  std::unique_ptr<IPluginV3> cloned(runtimePlugin->clone());
  if (!cloned) throw Failure("clone", lastMessage());

  // -- execution
  int deviceCount = 0;
  bool const haveDevice = !noDevice && cudaGetDeviceCount(&deviceCount) == cudaSuccess && deviceCount > 0;
  result.set("device", haveDevice ? "true" : "false");
  if (!haveDevice) return 0;

  HarnessRecorder recorder;
  HarnessResourceContext context(&recorder);
  std::unique_ptr<IPluginV3> attached(rcaps.runtime->attachToContext(&context));
  if (!attached) throw Failure("attachToContext", lastMessage());
  Capabilities const acaps = capabilitiesOf(attached.get(), false);

  std::vector<PluginTensorDesc> inDesc(nIn), outDesc(2);
  std::vector<DeviceBuffer> inBuf(nIn), outBuf(2);
  std::vector<void const*> inPtr(nIn);
  std::vector<void*> outPtr(2);
  for (int32_t i = 0; i < nIn; ++i) {
    inDesc[i] = PluginTensorDesc{c.inputs[i].dims, inTypes[i], TensorFormat::kLINEAR, 1.f};
    size_t const bytes = static_cast<size_t>(volume(c.inputs[i].dims)) * typeSize(inTypes[i]);
    std::vector<char> host = readFile(dir + "/input" + std::to_string(i) + ".bin");
    if (host.size() != bytes) {
      throw Failure("inputs", "input" + std::to_string(i) + ".bin has " + std::to_string(host.size()) + " bytes, expected " +
                                  std::to_string(bytes));
    }
    inBuf[i].allocate(bytes);
    if (bytes) CUDA_CHECK(cudaMemcpy(inBuf[i].ptr, host.data(), bytes, cudaMemcpyHostToDevice));
    inPtr[i] = inBuf[i].ptr;
  }
  for (int32_t o = 0; o < 2; ++o) {
    outDesc[o] = PluginTensorDesc{outDims[o], outTypes[o], TensorFormat::kLINEAR, 1.f};
    outBuf[o].allocate(static_cast<size_t>(volume(outDims[o])) * typeSize(outTypes[o]));
    outPtr[o] = outBuf[o].ptr;
  }
  DeviceBuffer ws;
  ws.allocate(workspace);
  cudaStream_t stream;
  CUDA_CHECK(cudaStreamCreate(&stream));
  if (acaps.runtime->onShapeChange(inDesc.data(), nIn, outDesc.data(), 2) != 0) {
    throw Failure("onShapeChange", lastMessage());
  }
  std::vector<std::vector<char>> first(2);
  bool deterministic = true;
  for (int32_t run = 0; run < 2; ++run) {
    // poison: every element an output keeps from before the call is NaN and fails the comparison
    for (int32_t o = 0; o < 2; ++o) {
      if (outBuf[o].bytes) CUDA_CHECK(cudaMemsetAsync(outBuf[o].ptr, 0xFF, outBuf[o].bytes, stream));
    }
    if (acaps.runtime->enqueue(inDesc.data(), outDesc.data(), inPtr.data(), outPtr.data(), ws.ptr, stream) != 0) {
      throw Failure("enqueue", lastMessage());
    }
    CUDA_CHECK(cudaStreamSynchronize(stream));
    CUDA_CHECK(cudaGetLastError());
    for (int32_t o = 0; o < 2; ++o) {
      std::vector<char> host(outBuf[o].bytes);
      if (!host.empty()) CUDA_CHECK(cudaMemcpy(host.data(), outBuf[o].ptr, host.size(), cudaMemcpyDeviceToHost));
      if (run == 0) {
        first[o] = host;
        writeFile(dir + "/output" + std::to_string(o) + ".bin", host.data(), host.size());
      } else if (host != first[o]) {
        deterministic = false;
      }
    }
  }
  CUDA_CHECK(cudaStreamDestroy(stream));
  result.set("enqueue", "\"ok\"");
  result.set("deterministic", deterministic ? "true" : "false");
  result.set("recorded_errors", std::to_string(recorder.getNbErrors()));
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 3 || argc > 4 || (argc == 4 && std::string(argv[3]) != "--no-device")) {
    std::fprintf(stderr, "usage: %s LIBRARY CASE_DIR [--no-device]\n", argv[0]);
    return 2;
  }
  std::string const dir = argv[2];
  Result result;
  int status = 0;
  try {
    run(argv[1], dir, argc == 4, result);
    result.set("ok", "true");
  } catch (Failure const& f) {
    result.set("ok", "false");
    result.set("stage", quote(f.stage));
    result.set("error", quote(f.what()));
    std::fprintf(stderr, "harness: %s failed: %s\n", f.stage.c_str(), f.what());
    status = 1;
  } catch (std::exception const& e) {
    result.set("ok", "false");
    result.set("stage", quote("harness"));
    result.set("error", quote(e.what()));
    std::fprintf(stderr, "harness: %s\n", e.what());
    status = 1;
  }
  std::ofstream out(dir + "/result.json");
  out << result.json();
  return out ? status : 1;
}
