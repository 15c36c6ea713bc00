#include "gla_plugin.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <exception>
#include <sstream>
#include <stdexcept>

#include "logging.h"

namespace gla_trt {

using nvinfer1::DataType;
using nvinfer1::DimensionOperation;
using nvinfer1::Dims;
using nvinfer1::DimsExprs;
using nvinfer1::DynamicPluginTensorDesc;
using nvinfer1::ErrorCode;
using nvinfer1::IDimensionExpr;
using nvinfer1::IExprBuilder;
using nvinfer1::PluginField;
using nvinfer1::PluginFieldType;
using nvinfer1::PluginTensorDesc;
using nvinfer1::TensorFormat;
using Severity = nvinfer1::ILogger::Severity;

namespace {

// The kernel core wants a 256-byte aligned workspace; TensorRT's is aligned in practice, but the
// slack makes that an assumption we do not have to rely on.
constexpr size_t kWorkspaceAlign = 256;

// A shape or type that does not fit the op: the message names the input and its shape.
struct ShapeError : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};

gla::ElemType elemType(DataType t) {
  switch (t) {
    case DataType::kFLOAT: return gla::ElemType::kFloat32;
    case DataType::kHALF: return gla::ElemType::kFloat16;
    case DataType::kBF16: return gla::ElemType::kBFloat16;
    case DataType::kINT32: return gla::ElemType::kInt32;
    case DataType::kINT64: return gla::ElemType::kInt64;
    case DataType::kINT8: return gla::ElemType::kInt8;
    case DataType::kBOOL: return gla::ElemType::kBool;
    case DataType::kUINT8: return gla::ElemType::kUInt8;
    default: return gla::ElemType::kOther;
  }
}

DataType trtType(gla::DType t) {
  switch (t) {
    case gla::DType::kFloat16: return DataType::kHALF;
    case gla::DType::kBFloat16: return DataType::kBF16;
    default: return DataType::kFLOAT;
  }
}

bool isActivationType(DataType t) { return t == DataType::kFLOAT || t == DataType::kHALF || t == DataType::kBF16; }

std::string dimsString(Dims const& d) {
  std::string s = "[";
  for (int32_t i = 0; i < d.nbDims; ++i) {
    if (i) s += ",";
    s += d.d[i] < 0 ? std::string("?") : std::to_string(d.d[i]);
  }
  return s + "]";
}

// rank < 0: not known; dims < 0: not known (build time)
gla::TensorDesc desc(DataType type, int32_t rank, int64_t const* dims) {
  gla::TensorDesc d;
  d.present = 1;
  d.elem_type = static_cast<int32_t>(elemType(type));
  d.rank = rank;
  for (int32_t i = 0; i < rank && i < gla::kMaxDescRank; ++i) d.dims[i] = dims[i];
  return d;
}

gla::TensorDesc desc(PluginTensorDesc const& t) { return desc(t.type, t.dims.nbDims, t.dims.d); }

gla::Problem inferOrThrow(OpKind kind, gla::OpAttributes const& a, std::vector<gla::TensorDesc> const& in,
                          int32_t flags) {
  gla::Problem p;
  if (gla::infer_problem(kind, a, in.data(), static_cast<int32_t>(in.size()), flags, &p) != gla::Status::kOk) {
    throw ShapeError(gla::last_error_message());
  }
  return p;
}

// Input positions (the ONNX schemas; TensorRT's parser keeps them and cannot pass an empty input
// in the middle, so only trailing optional inputs may be omitted).
struct Roles {
  int32_t gate, past_state, cu_seqlens, g_gamma;
};
Roles rolesOf(OpKind kind, int32_t nbInputs) {
  auto at = [&](int32_t i) { return i < nbInputs ? i : -1; };
  if (kind == OpKind::kLinearAttention) return Roles{at(4), at(3), -1, -1};
  return Roles{3, at(4), at(5), at(6)};
}

}  // namespace

gla::UpdateRule updateRule(std::string const& rule, bool present) {
  if (!present) return gla::UpdateRule::kMissing;
  if (rule == "gated") return gla::UpdateRule::kGated;
  if (rule == "linear") return gla::UpdateRule::kLinear;
  return gla::UpdateRule::kUnsupported;
}

gla::OpAttributes Config::attributes() const {
  gla::OpAttributes a;
  a.q_num_heads = q_num_heads;
  a.kv_num_heads = kv_num_heads;
  a.reverse = reverse;
  a.chunk_size = chunk_size;
  a.scale = scale;
  a.update_rule = static_cast<int32_t>(updateRule(update_rule, kind == OpKind::kLinearAttention));
  return a;
}

std::string Config::describe() const {
  std::ostringstream s;
  s << opName(kind) << " q_num_heads=" << q_num_heads << " kv_num_heads=" << kv_num_heads << " scale=" << scale;
  if (kind == OpKind::kGatedLinearAttention) {
    s << " reverse=" << reverse;
  } else {
    s << " update_rule=" << update_rule;
  }
  s << " chunk_size=" << chunk_size;
  return s.str();
}

// ---- the plugin -------------------------------------------------------------------------------

GlaPlugin::GlaPlugin(std::string name, Config config) : mName(std::move(name)), mConfig(std::move(config)) {}

GlaPlugin::GlaPlugin(GlaPlugin const& other)
    : nvinfer1::IPluginV3(),
      nvinfer1::IPluginV3OneCore(),
      nvinfer1::IPluginV3OneBuild(),
      nvinfer1::IPluginV3OneRuntime(),
      mName(other.mName),
      mConfig(other.mConfig),
      mRecorder(other.mRecorder),
      mNbInputs(other.mNbInputs),
      mProblem(other.mProblem),
      mShapes(other.mShapes),
      mHaveProblem(other.mHaveProblem),
      mDeclaredWorkspace(other.mDeclaredWorkspace) {}

std::string GlaPlugin::where() const {
  return std::string(opName(mConfig.kind)) + " plugin '" + mName + "'";
}

void GlaPlugin::reportError(ErrorCode code, std::string const& message) const noexcept {
  try {
    std::string const text = where() + ": " + message;
    if (mRecorder != nullptr) {
      mRecorder->reportError(code, text.c_str());
    } else {
      log(Severity::kERROR, text);
    }
  } catch (...) {
  }
}

nvinfer1::IPluginCapability* GlaPlugin::getCapabilityInterface(nvinfer1::PluginCapabilityType type) noexcept {
  switch (type) {
    case nvinfer1::PluginCapabilityType::kCORE: return static_cast<nvinfer1::IPluginV3OneCore*>(this);
    case nvinfer1::PluginCapabilityType::kBUILD: return static_cast<nvinfer1::IPluginV3OneBuild*>(this);
    case nvinfer1::PluginCapabilityType::kRUNTIME: return static_cast<nvinfer1::IPluginV3OneRuntime*>(this);
  }
  return nullptr;
}

nvinfer1::IPluginV3* GlaPlugin::clone() noexcept {
  try {
    return new GlaPlugin(*this);
  } catch (std::exception const& e) {
    reportError(ErrorCode::kINTERNAL_ERROR, std::string("clone failed: ") + e.what());
  } catch (...) {
    reportError(ErrorCode::kINTERNAL_ERROR, "clone failed");
  }
  return nullptr;
}

char const* GlaPlugin::getPluginName() const noexcept { return opName(mConfig.kind); }
char const* GlaPlugin::getPluginVersion() const noexcept { return kPluginVersion; }
char const* GlaPlugin::getPluginNamespace() const noexcept { return kPluginNamespace; }
int32_t GlaPlugin::getNbOutputs() const noexcept { return 2; }

int32_t GlaPlugin::getOutputDataTypes(DataType* outputTypes, int32_t nbOutputs, DataType const* inputTypes,
                                      int32_t nbInputs) const noexcept {
  try {
    // types only: every shape is unknown here, and the contract checks what it can (the types)
    std::vector<gla::TensorDesc> in;
    for (int32_t i = 0; i < nbInputs; ++i) in.push_back(desc(inputTypes[i], -1, nullptr));
    gla::Problem const p = inferOrThrow(mConfig.kind, mConfig.attributes(), in, gla::kInferAllowUnknownDims);
    if (nbOutputs < 1 || nbOutputs > 2) {
      throw ShapeError("has " + std::to_string(nbOutputs) + " outputs; it takes output and, optionally, present_state");
    }
    outputTypes[0] = trtType(p.act_dtype);
    // the state keeps its own type; without a past state it is float32, so that float16
    // activations still accumulate their history in float32
    if (nbOutputs > 1) outputTypes[1] = trtType(p.state_dtype);
    return 0;
  } catch (std::exception const& e) {
    reportError(ErrorCode::kINVALID_ARGUMENT, e.what());
  } catch (...) {
    reportError(ErrorCode::kINTERNAL_ERROR, "getOutputDataTypes failed");
  }
  return 1;
}

int32_t GlaPlugin::getOutputShapes(DimsExprs const* inputs, int32_t nbInputs, DimsExprs const* /*shapeInputs*/,
                                   int32_t /*nbShapeInputs*/, DimsExprs* outputs, int32_t nbOutputs,
                                   IExprBuilder& eb) noexcept {
  try {
    // what is constant is checked now (head sizes, ranks); the rest in configurePlugin and onShapeChange
    std::vector<gla::TensorDesc> in;
    for (int32_t i = 0; i < nbInputs; ++i) {
      int64_t dims[nvinfer1::Dims::MAX_DIMS];
      for (int32_t j = 0; j < inputs[i].nbDims; ++j) {
        IDimensionExpr const* e = inputs[i].d[j];
        dims[j] = e != nullptr && e->isConstant() ? e->getConstantValue() : -1;
      }
      // types are getOutputDataTypes' business: the query's type stands in for every float input
      gla::TensorDesc d = desc(DataType::kFLOAT, inputs[i].nbDims, dims);
      if (mConfig.kind == OpKind::kGatedLinearAttention && i == 5) d.elem_type = static_cast<int32_t>(gla::ElemType::kInt32);
      in.push_back(d);
    }
    inferOrThrow(mConfig.kind, mConfig.attributes(), in, gla::kInferAllowUnknownDims);
    if (nbOutputs < 1 || nbOutputs > 2) {
      throw ShapeError("has " + std::to_string(nbOutputs) + " outputs; it takes output and, optionally, present_state");
    }
    Roles const r = rolesOf(mConfig.kind, nbInputs);
    int64_t const hq = mConfig.q_num_heads;
    int64_t const hkv = mConfig.kv_num_heads;
    auto div = [&](IDimensionExpr const* e, int64_t by) -> IDimensionExpr const* {
      if (by == 1) return e;
      if (e->isConstant()) return eb.constant(e->getConstantValue() / by);
      return eb.operation(DimensionOperation::kFLOOR_DIV, *e, *eb.constant(by));
    };
    auto mul = [&](IDimensionExpr const* e, int64_t by) -> IDimensionExpr const* {
      if (by == 1) return e;
      if (e->isConstant()) return eb.constant(e->getConstantValue() * by);
      return eb.operation(DimensionOperation::kPROD, *e, *eb.constant(by));
    };

    DimsExprs const& q = inputs[0];
    IDimensionExpr const* dv = div(inputs[2].d[2], hkv);
    outputs[0].nbDims = 3;
    outputs[0].d[0] = q.d[0];
    outputs[0].d[1] = q.d[1];
    outputs[0].d[2] = mul(dv, hq);
    if (nbOutputs > 1) {
      if (r.past_state >= 0) {
        // the state passes through with the shape it came in with (checked against the others later)
        outputs[1] = inputs[r.past_state];
      } else {
        IDimensionExpr const* n = q.d[0];
        if (r.cu_seqlens >= 0) {
          IDimensionExpr const* len = inputs[r.cu_seqlens].d[0];
          n = len->isConstant() ? eb.constant(len->getConstantValue() - 1)
                                : eb.operation(DimensionOperation::kSUB, *len, *eb.constant(1));
        }
        outputs[1].nbDims = 4;
        outputs[1].d[0] = n;
        outputs[1].d[1] = eb.constant(hkv);
        outputs[1].d[2] = div(inputs[1].d[2], hkv);
        outputs[1].d[3] = dv;
      }
    }
    for (int32_t o = 0; o < nbOutputs; ++o) {
      for (int32_t i = 0; i < outputs[o].nbDims; ++i) {
        if (outputs[o].d[i] == nullptr) throw ShapeError("could not build the output shape expressions");
      }
    }
    return 0;
  } catch (std::exception const& e) {
    reportError(ErrorCode::kINVALID_ARGUMENT, e.what());
  } catch (...) {
    reportError(ErrorCode::kINTERNAL_ERROR, "getOutputShapes failed");
  }
  return 1;
}

bool GlaPlugin::supportsFormatCombination(int32_t pos, DynamicPluginTensorDesc const* inOut, int32_t nbInputs,
                                          int32_t nbOutputs) noexcept {
  try {
    if (pos < 0 || pos >= nbInputs + nbOutputs) return false;
    if (inOut[pos].desc.format != TensorFormat::kLINEAR) return false;
    // Decisions may only look at inOut[0..pos]: the contract on the types seen so far (later
    // inputs count as absent; a type mismatch was already reported by getOutputDataTypes).
    if (pos >= nbInputs) {
      std::vector<gla::TensorDesc> in;
      for (int32_t i = 0; i < nbInputs; ++i) in.push_back(desc(inOut[i].desc.type, -1, nullptr));
      gla::Problem p;
      if (gla::infer_problem(mConfig.kind, mConfig.attributes(), in.data(), nbInputs, gla::kInferAllowUnknownDims,
                             &p) != gla::Status::kOk) {
        return false;
      }
      return inOut[pos].desc.type == trtType(pos == nbInputs ? p.act_dtype : p.state_dtype);
    }
    if (pos == 0) return isActivationType(inOut[0].desc.type);
    // an input's type is right when the contract accepts it next to the inputs before it
    std::vector<gla::TensorDesc> in;
    for (int32_t i = 0; i < nbInputs; ++i) {
      in.push_back(i <= pos ? desc(inOut[i].desc.type, -1, nullptr) : desc(inOut[0].desc.type, -1, nullptr));
    }
    Roles const r = rolesOf(mConfig.kind, nbInputs);
    if (r.cu_seqlens > pos) in[static_cast<size_t>(r.cu_seqlens)].elem_type = static_cast<int32_t>(gla::ElemType::kInt32);
    gla::Problem p;
    return gla::infer_problem(mConfig.kind, mConfig.attributes(), in.data(), nbInputs, gla::kInferAllowUnknownDims,
                              &p) == gla::Status::kOk;
  } catch (...) {
    return false;
  }
}

gla::Problem GlaPlugin::infer(PluginTensorDesc const* in, int32_t nbInputs, int32_t flags) const {
  std::vector<gla::TensorDesc> d;
  for (int32_t i = 0; i < nbInputs; ++i) d.push_back(desc(in[i]));
  return inferOrThrow(mConfig.kind, mConfig.attributes(), d, flags);
}

void GlaPlugin::checkOutputs(gla::Problem const& p, PluginTensorDesc const* out, int32_t nbOutputs) const {
  int64_t dims[2][4];
  gla::output_dims(p, dims[0], dims[1]);
  char const* const names[2] = {"output", "present_state"};
  DataType const types[2] = {trtType(p.act_dtype), trtType(p.state_dtype)};
  int32_t const ranks[2] = {3, 4};
  for (int32_t o = 0; o < nbOutputs && o < 2; ++o) {
    bool ok = out[o].type == types[o] && out[o].dims.nbDims == ranks[o];
    for (int32_t i = 0; ok && i < ranks[o]; ++i) {
      ok = out[o].dims.d[i] < 0 || dims[o][i] < 0 || out[o].dims.d[i] == dims[o][i];
    }
    if (!ok) {
      std::ostringstream m;
      m << "output '" << names[o] << "' is " << dimsString(out[o].dims) << " of type " << static_cast<int>(out[o].type)
        << ", the inputs make it [";
      for (int32_t i = 0; i < ranks[o]; ++i) m << (i ? "," : "") << (dims[o][i] < 0 ? std::string("?") : std::to_string(dims[o][i]));
      m << "] of type " << static_cast<int>(types[o]);
      throw ShapeError(m.str());
    }
  }
}

int32_t GlaPlugin::configurePlugin(DynamicPluginTensorDesc const* in, int32_t nbInputs,
                                   DynamicPluginTensorDesc const* out, int32_t nbOutputs) noexcept {
  try {
    // desc.dims hold -1 wildcards here; the kernels that will run are the CUDA ones, so their
    // limits apply now, at build time, not at the first enqueue
    std::vector<PluginTensorDesc> ins(static_cast<size_t>(nbInputs)), outs(static_cast<size_t>(nbOutputs));
    for (int32_t i = 0; i < nbInputs; ++i) ins[i] = in[i].desc;
    for (int32_t i = 0; i < nbOutputs; ++i) outs[i] = out[i].desc;
    checkOutputs(infer(ins.data(), nbInputs, gla::kInferAllowUnknownDims | gla::kInferForCuda), outs.data(), nbOutputs);
    mNbInputs = nbInputs;
    return 0;
  } catch (std::exception const& e) {
    reportError(ErrorCode::kINVALID_ARGUMENT, e.what());
  } catch (...) {
    reportError(ErrorCode::kINTERNAL_ERROR, "configurePlugin failed");
  }
  return 1;
}

size_t GlaPlugin::getWorkspaceSize(DynamicPluginTensorDesc const* inputs, int32_t nbInputs,
                                   DynamicPluginTensorDesc const* /*outputs*/, int32_t /*nbOutputs*/) const noexcept {
  try {
    // The profile's largest problem: the contract on the descriptors (head sizes, flags), then B, T
    // and N at their maxima; the kernel core's closed-form bound covers every smaller problem.
    // Arithmetic only: the builder may run on a machine without a GPU.
    std::vector<PluginTensorDesc> ins(static_cast<size_t>(nbInputs));
    for (int32_t i = 0; i < nbInputs; ++i) ins[i] = inputs[i].desc;
    gla::Problem p = infer(ins.data(), nbInputs, gla::kInferAllowUnknownDims);
    Roles const r = rolesOf(mConfig.kind, nbInputs);
    Dims const& q = inputs[0].max;
    int64_t n = std::max<int64_t>(q.d[0], 1);
    if (r.past_state >= 0) n = std::max(n, inputs[r.past_state].max.d[0]);
    if (r.cu_seqlens >= 0) n = std::max(n, inputs[r.cu_seqlens].max.d[0] - 1);
    p.batch = r.cu_seqlens >= 0 ? 1 : n;
    p.num_seqs = n;
    p.seq_len = std::max<int64_t>(q.d[1], 1);
    if (p.head_dim_k < 0) {
      p.head_dim_k = static_cast<int32_t>(std::max(q.d[2] / p.q_heads, inputs[1].max.d[2] / p.kv_heads));
    }
    size_t need = 0;
    if (p.head_dim_v >= 0) {
      need = gla::cuda_workspace_bound(p);
    } else {
      // a head size d_v known only at run time (never in our exports): every value-block count
      int64_t const vmax = inputs[2].max.d[2] / p.kv_heads;
      for (int64_t v = 64; v < vmax + 64; v += 64) {
        p.head_dim_v = static_cast<int32_t>(std::min(v, vmax));
        need = std::max(need, gla::cuda_workspace_bound(p));
      }
    }
    size_t const declared = need == 0 ? 0 : need + kWorkspaceAlign;
    mDeclaredWorkspace = std::max(mDeclaredWorkspace, static_cast<int64_t>(declared));
    return declared;
  } catch (std::exception const& e) {
    reportError(ErrorCode::kINVALID_ARGUMENT, std::string("getWorkspaceSize: ") + e.what());
  } catch (...) {
    reportError(ErrorCode::kINTERNAL_ERROR, "getWorkspaceSize failed");
  }
  return 0;
}

char const* GlaPlugin::getTimingCacheID() noexcept {
  try {
    mTimingId = mConfig.describe();
    return mTimingId.c_str();
  } catch (...) {
    return nullptr;
  }
}

char const* GlaPlugin::getMetadataString() noexcept { return getTimingCacheID(); }

int32_t GlaPlugin::onShapeChange(PluginTensorDesc const* in, int32_t nbInputs, PluginTensorDesc const* out,
                                 int32_t nbOutputs) noexcept {
  try {
    mHaveProblem = false;
    gla::Problem const p = infer(in, nbInputs, gla::kInferForCuda);
    checkOutputs(p, out, nbOutputs);
    mProblem = p;
    for (int32_t i = 0; i < nbInputs && i < static_cast<int32_t>(mShapes.size()); ++i) mShapes[i] = in[i].dims;
    mNbInputs = nbInputs;
    mHaveProblem = true;
    return 0;
  } catch (std::exception const& e) {
    reportError(ErrorCode::kINVALID_ARGUMENT, e.what());
  } catch (...) {
    reportError(ErrorCode::kINTERNAL_ERROR, "onShapeChange failed");
  }
  return 1;
}

int32_t GlaPlugin::enqueue(PluginTensorDesc const* inputDesc, PluginTensorDesc const* outputDesc,
                           void const* const* inputs, void* const* outputs, void* workspace,
                           cudaStream_t stream) noexcept {
  try {
    if (mNbInputs <= 0) {
      throw std::logic_error("enqueue before onShapeChange/configurePlugin: the number of inputs is unknown");
    }
    // onShapeChange validated these shapes; only a caller that skipped it costs a second inference
    bool same = mHaveProblem;
    for (int32_t i = 0; same && i < mNbInputs; ++i) {
      Dims const& a = inputDesc[i].dims;
      Dims const& b = mShapes[i];
      same = a.nbDims == b.nbDims && std::equal(a.d, a.d + a.nbDims, b.d);
    }
    if (!same) {
      mProblem = infer(inputDesc, mNbInputs, gla::kInferForCuda);
      checkOutputs(mProblem, outputDesc, getNbOutputs());
      for (int32_t i = 0; i < mNbInputs; ++i) mShapes[i] = inputDesc[i].dims;
      mHaveProblem = true;
    }
    gla::Problem const& p = mProblem;
    Roles const r = rolesOf(mConfig.kind, mNbInputs);
    gla::Tensors t;
    t.query = inputs[0];
    t.key = inputs[1];
    t.value = inputs[2];
    t.gate = p.has_gate ? inputs[r.gate] : nullptr;
    t.past_state = p.has_past_state ? inputs[r.past_state] : nullptr;
    t.cu_seqlens = p.has_cu_seqlens ? inputs[r.cu_seqlens] : nullptr;
    t.g_gamma = p.has_g_gamma ? inputs[r.g_gamma] : nullptr;
    t.output = outputs[0];
    t.present_state = outputs[1];

    // the workspace TensorRT holds for this layer is what the build declared (carried in the
    // plan); the kernel core checks the problem's need against it
    int64_t const declared = std::max(mConfig.workspace_bytes, mDeclaredWorkspace);
    size_t size = declared >= 0 ? static_cast<size_t>(declared) : gla::cuda_workspace_bytes(p) + kWorkspaceAlign;
    void* ws = nullptr;
    if (workspace != nullptr && size >= kWorkspaceAlign) {
      auto const addr = reinterpret_cast<uintptr_t>(workspace);
      uintptr_t const aligned = (addr + kWorkspaceAlign - 1) / kWorkspaceAlign * kWorkspaceAlign;
      ws = reinterpret_cast<void*>(aligned);
      size -= static_cast<size_t>(aligned - addr);
    } else {
      size = 0;
    }
    gla::Status const st = gla::cuda_forward(p, t, ws, size, static_cast<void*>(stream));
    if (st != gla::Status::kOk) {
      reportError(ErrorCode::kFAILED_EXECUTION,
                  std::string("kernel failed (") + gla::status_name(st) + "): " + gla::last_error_message());
      return 1;
    }
    return 0;
  } catch (std::exception const& e) {
    reportError(ErrorCode::kFAILED_EXECUTION, e.what());
  } catch (...) {
    reportError(ErrorCode::kINTERNAL_ERROR, "enqueue failed");
  }
  return 1;
}

nvinfer1::IPluginV3* GlaPlugin::attachToContext(nvinfer1::IPluginResourceContext* context) noexcept {
  try {
    auto* copy = new GlaPlugin(*this);
    copy->mRecorder = context != nullptr ? context->getErrorRecorder() : nullptr;
    return copy;
  } catch (std::exception const& e) {
    reportError(ErrorCode::kINTERNAL_ERROR, std::string("attachToContext failed: ") + e.what());
  } catch (...) {
    reportError(ErrorCode::kINTERNAL_ERROR, "attachToContext failed");
  }
  return nullptr;
}

nvinfer1::PluginFieldCollection const* GlaPlugin::getFieldsToSerialize() noexcept {
  try {
    // Exactly what the creator reads: deserialisation goes back through createPlugin.
    mFields.clear();
    mFields.emplace_back("q_num_heads", &mConfig.q_num_heads, PluginFieldType::kINT32, 1);
    mFields.emplace_back("kv_num_heads", &mConfig.kv_num_heads, PluginFieldType::kINT32, 1);
    mFields.emplace_back("scale", &mConfig.scale, PluginFieldType::kFLOAT32, 1);
    if (mConfig.kind == OpKind::kGatedLinearAttention) {
      mFields.emplace_back("reverse", &mConfig.reverse, PluginFieldType::kINT32, 1);
    } else {
      mFields.emplace_back("update_rule", mConfig.update_rule.c_str(), PluginFieldType::kCHAR,
                           static_cast<int32_t>(mConfig.update_rule.size() + 1));
    }
    mFields.emplace_back("chunk_size", &mConfig.chunk_size, PluginFieldType::kINT32, 1);
    mConfig.workspace_bytes = std::max(mConfig.workspace_bytes, mDeclaredWorkspace);
    if (mConfig.workspace_bytes >= 0) {
      mFields.emplace_back("workspace_bytes", &mConfig.workspace_bytes, PluginFieldType::kINT64, 1);
    }
    mFieldCollection.nbFields = static_cast<int32_t>(mFields.size());
    mFieldCollection.fields = mFields.data();
    return &mFieldCollection;
  } catch (std::exception const& e) {
    reportError(ErrorCode::kINTERNAL_ERROR, std::string("getFieldsToSerialize failed: ") + e.what());
  } catch (...) {
    reportError(ErrorCode::kINTERNAL_ERROR, "getFieldsToSerialize failed");
  }
  return nullptr;
}

}  // namespace gla_trt
