#include "gla_plugin.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
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

char const* typeName(DataType t) {
  switch (t) {
    case DataType::kFLOAT: return "float32";
    case DataType::kHALF: return "float16";
    case DataType::kBF16: return "bfloat16";
    case DataType::kINT32: return "int32";
    case DataType::kINT64: return "int64";
    case DataType::kINT8: return "int8";
    case DataType::kBOOL: return "bool";
    case DataType::kUINT8: return "uint8";
    default: return "an unsupported type";
  }
}

bool isActivationType(DataType t) { return t == DataType::kFLOAT || t == DataType::kHALF || t == DataType::kBF16; }
bool isIndexType(DataType t) { return t == DataType::kINT32 || t == DataType::kINT64; }

gla::DType glaType(DataType t) {
  switch (t) {
    case DataType::kHALF: return gla::DType::kFloat16;
    case DataType::kBF16: return gla::DType::kBFloat16;
    default: return gla::DType::kFloat32;
  }
}

std::string dimText(int64_t v) { return v < 0 ? std::string("?") : std::to_string(v); }

std::string dimsString(Dims const& d) {
  std::ostringstream s;
  s << '[';
  for (int32_t i = 0; i < d.nbDims; ++i) {
    if (i) s << ", ";
    if (d.d[i] < 0) {
      s << '?';
    } else {
      s << d.d[i];
    }
  }
  s << ']';
  return s.str();
}

// Equal, or not known yet (a wildcard -1 during the build): only definite mismatches are errors.
bool fits(int64_t got, int64_t want) { return got < 0 || want < 0 || got == want; }

}  // namespace

char const* opName(OpKind kind) {
  return kind == OpKind::kLinearAttention ? "LinearAttention" : "GatedLinearAttention";
}

std::string Config::check() const {
  std::ostringstream e;
  if (q_num_heads <= 0) {
    e << "q_num_heads must be a positive integer, got " << q_num_heads << " (is the attribute missing?)";
  } else if (kv_num_heads <= 0) {
    e << "kv_num_heads must be a positive integer, got " << kv_num_heads << " (is the attribute missing?)";
  } else if (q_num_heads % kv_num_heads != 0) {
    e << "q_num_heads (" << q_num_heads << ") must be a multiple of kv_num_heads (" << kv_num_heads << ")";
  } else if (!std::isfinite(scale)) {
    e << "scale must be finite, got " << scale;
  } else if (reverse != 0 && reverse != 1) {
    e << "reverse must be 0 or 1, got " << reverse;
  } else if (chunk_size < 0) {
    // a hint only; 0 (what TensorRT-RTX's LinearAttention importer passes when the attribute is
    // absent) leaves the choice to the kernels
    e << "chunk_size must be >= 0, got " << chunk_size;
  } else if (kind == OpKind::kLinearAttention && update_rule != "gated" && update_rule != "linear") {
    e << "update_rule '" << update_rule
      << "' is not supported by the gla-export plugin (supported: 'gated', 'linear'; the ONNX default is "
         "'gated_delta', so set the attribute explicitly)";
  }
  return e.str();
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

std::string resolveRoles(Config const& config, int32_t nbInputs, Roles& roles) {
  roles = Roles{};
  bool const gla = config.kind == OpKind::kGatedLinearAttention;
  int32_t const required = gla ? 4 : 3;
  if (nbInputs < required || nbInputs > required + 3) {
    std::ostringstream e;
    e << opName(config.kind) << " takes " << required << " to " << required + 3 << " inputs ("
      << (gla ? "query, key, value, gate, [past_state], [cu_seqlens], [g_gamma]"
              : "query, key, value, [past_state], [decay], [beta]")
      << "), got " << nbInputs;
    return e.str();
  }
  auto at = [&](int32_t index) { return index < nbInputs ? index : -1; };
  if (gla) {
    roles.gate = 3;
    roles.past_state = at(4);
    roles.cu_seqlens = at(5);
    roles.g_gamma = at(6);
  } else {
    roles.past_state = at(3);
    roles.gate = at(4);
    roles.beta = at(5);
    if (config.update_rule == "gated" && roles.gate < 0) {
      return "update_rule 'gated' needs the decay input (input 4), which is absent";
    }
  }
  return {};
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
      mNbInputs(other.mNbInputs) {}

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
    if (nbOutputs != 2) throw ShapeError("expects 2 outputs (output, present_state), got " + std::to_string(nbOutputs));
    Roles roles;
    std::string const err = resolveRoles(mConfig, nbInputs, roles);
    if (!err.empty()) throw ShapeError(err);
    DataType const act = inputTypes[roles.query];
    if (!isActivationType(act)) {
      throw ShapeError(std::string("query must be float32, float16 or bfloat16, got ") + typeName(act));
    }
    outputTypes[0] = act;
    // The state keeps its own type; without a past state it is float32, so that float16
    // activations still accumulate their history in float32. (The other inputs' types are
    // checked by supportsFormatCombination and configurePlugin.)
    DataType const state = roles.past_state >= 0 ? inputTypes[roles.past_state] : DataType::kFLOAT;
    outputTypes[1] = isActivationType(state) ? state : DataType::kFLOAT;
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
    if (nbOutputs != 2) throw ShapeError("expects 2 outputs (output, present_state), got " + std::to_string(nbOutputs));
    Roles r;
    std::string const err = resolveRoles(mConfig, nbInputs, r);
    if (!err.empty()) throw ShapeError(err);

    auto expectRank = [&](char const* name, int32_t index, int32_t rank, char const* layout) {
      if (index >= 0 && inputs[index].nbDims != rank) {
        throw ShapeError(std::string(name) + " must be " + std::to_string(rank) + "-D " + layout + ", got rank " +
                         std::to_string(inputs[index].nbDims));
      }
    };
    expectRank("query", r.query, 3, "[B, T, q_num_heads * d_k]");
    expectRank("key", r.key, 3, "[B, T, kv_num_heads * d_k]");
    expectRank("value", r.value, 3, "[B, T, kv_num_heads * d_v]");
    expectRank(mConfig.kind == OpKind::kLinearAttention ? "decay" : "gate", r.gate, 3, "[B, T, kv_num_heads * d_k]");
    expectRank("past_state", r.past_state, 4, "[N, kv_num_heads, d_k, d_v]");
    expectRank("cu_seqlens", r.cu_seqlens, 1, "[N + 1]");
    expectRank("g_gamma", r.g_gamma, 1, "[kv_num_heads]");

    int64_t const hq = mConfig.q_num_heads;
    int64_t const hkv = mConfig.kv_num_heads;
    auto constant = [](IDimensionExpr const* e) { return e->isConstant() ? e->getConstantValue() : int64_t{-1}; };
    // Static sizes are checked here so that a bad graph fails while it is built, naming the input.
    auto divisible = [&](char const* name, IDimensionExpr const* e, int64_t by, char const* attr) {
      int64_t const v = constant(e);
      if (v >= 0 && v % by != 0) {
        throw ShapeError(std::string(name) + " last dimension " + std::to_string(v) + " is not a multiple of " + attr +
                         " = " + std::to_string(by));
      }
    };
    divisible("query", inputs[r.query].d[2], hq, "q_num_heads");
    divisible("key", inputs[r.key].d[2], hkv, "kv_num_heads");
    divisible("value", inputs[r.value].d[2], hkv, "kv_num_heads");
    int64_t const qd = constant(inputs[r.query].d[2]);
    int64_t const kd = constant(inputs[r.key].d[2]);
    if (qd >= 0 && kd >= 0 && qd / hq != kd / hkv) {
      throw ShapeError("query head size " + std::to_string(qd / hq) + " (last dimension " + std::to_string(qd) +
                       " / q_num_heads " + std::to_string(hq) + ") differs from key head size " +
                       std::to_string(kd / hkv) + " (" + std::to_string(kd) + " / kv_num_heads " +
                       std::to_string(hkv) + ")");
    }

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

    DimsExprs const& q = inputs[r.query];
    IDimensionExpr const* dv = div(inputs[r.value].d[2], hkv);
    outputs[0].nbDims = 3;
    outputs[0].d[0] = q.d[0];
    outputs[0].d[1] = q.d[1];
    outputs[0].d[2] = mul(dv, hq);

    if (r.past_state >= 0) {
      // the state passes through with the shape it came in with (checked against the others at run time)
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
      outputs[1].d[2] = div(inputs[r.key].d[2], hkv);
      outputs[1].d[3] = dv;
    }
    for (int32_t o = 0; o < 2; ++o) {
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
    if (nbOutputs != 2 || pos < 0 || pos >= nbInputs + nbOutputs) return false;
    PluginTensorDesc const& desc = inOut[pos].desc;
    if (desc.format != TensorFormat::kLINEAR) return false;
    Roles r;
    if (!resolveRoles(mConfig, nbInputs, r).empty()) return false;
    // Decisions may only look at inOut[0..pos]; the activation type is query's (position 0).
    DataType const act = inOut[r.query].desc.type;
    if (pos == r.query) return isActivationType(desc.type);
    if (pos == r.key || pos == r.value || pos == r.gate || pos == r.beta) return desc.type == act;
    if (pos == r.past_state || pos == r.g_gamma) return isActivationType(desc.type);
    if (pos == r.cu_seqlens) return isIndexType(desc.type);
    if (pos == nbInputs) return desc.type == act;
    // present_state
    DataType const state = r.past_state >= 0 ? inOut[r.past_state].desc.type : DataType::kFLOAT;
    return desc.type == state;
  } catch (...) {
    return false;
  }
}

int32_t GlaPlugin::configurePlugin(DynamicPluginTensorDesc const* in, int32_t nbInputs,
                                   DynamicPluginTensorDesc const* out, int32_t nbOutputs) noexcept {
  try {
    // desc.dims may hold -1 wildcards here: problemFor checks what is known and skips the rest.
    std::vector<PluginTensorDesc> ins(static_cast<size_t>(nbInputs)), outs(static_cast<size_t>(nbOutputs));
    for (int32_t i = 0; i < nbInputs; ++i) ins[i] = in[i].desc;
    for (int32_t i = 0; i < nbOutputs; ++i) outs[i] = out[i].desc;
    problemFor(ins.data(), nbInputs, outs.data(), nbOutputs);
    mNbInputs = nbInputs;
    return 0;
  } catch (std::exception const& e) {
    reportError(ErrorCode::kINVALID_ARGUMENT, e.what());
  } catch (...) {
    reportError(ErrorCode::kINTERNAL_ERROR, "configurePlugin failed");
  }
  return 1;
}

size_t GlaPlugin::declaredWorkspace(gla::Problem const& largest) {
  // The kernel core's workspace is not monotonic in the sizes: fewer sequences can mean more
  // segments of T run in parallel, each with a state to pass on. The engine gets one workspace
  // for every call in the profile, so take the largest need over the sequence counts and lengths
  // the profile allows (every count up to 1024, then a geometric sample; lengths near the
  // maximum, every multiple of 64 up to 32768 and a geometric sample above). All arithmetic: no
  // CUDA call.
  auto counts = [](int64_t hi) {
    std::vector<int64_t> v;
    for (int64_t n = 1; n <= std::min<int64_t>(hi, 1024); ++n) v.push_back(n);
    for (double x = 1024; x < static_cast<double>(hi); x *= 1.05) v.push_back(static_cast<int64_t>(x));
    v.push_back(std::max<int64_t>(hi, 1));
    return v;
  };
  auto lengths = [](int64_t hi) {
    std::vector<int64_t> v{1, hi};
    for (int64_t t = 64; t < std::min<int64_t>(hi, 32768); t += 64) v.push_back(t);
    for (double x = 32768; x < static_cast<double>(hi); x *= 1.02) v.push_back(static_cast<int64_t>(x));
    for (int64_t i = 1; i <= 64 && hi - 64 * i > 0; ++i) v.push_back(hi - 64 * i);
    return v;
  };
  size_t need = 0;
  int64_t const maxSeqs = largest.has_cu_seqlens ? largest.num_seqs : largest.batch;
  std::vector<int64_t> const ts = lengths(std::max<int64_t>(largest.seq_len, 1));
  for (int64_t n : counts(maxSeqs)) {
    gla::Problem p = largest;
    p.num_seqs = n;
    if (!largest.has_cu_seqlens) p.batch = n;
    for (int64_t t : ts) {
      p.seq_len = t;
      need = std::max(need, gla::cuda_workspace_bytes(p));
    }
  }
  return need == 0 ? 0 : need + kWorkspaceAlign;
}

size_t GlaPlugin::getWorkspaceSize(DynamicPluginTensorDesc const* inputs, int32_t nbInputs,
                                   DynamicPluginTensorDesc const* outputs, int32_t nbOutputs) const noexcept {
  try {
    // The largest problem of the profile: every extent at its maximum. No CUDA call here (the
    // builder may run on a machine without a GPU); cuda_workspace_bytes is arithmetic only.
    std::vector<PluginTensorDesc> ins(static_cast<size_t>(nbInputs)), outs(static_cast<size_t>(nbOutputs));
    for (int32_t i = 0; i < nbInputs; ++i) {
      ins[i] = inputs[i].desc;
      ins[i].dims = inputs[i].max;
    }
    for (int32_t i = 0; i < nbOutputs; ++i) {
      outs[i] = outputs[i].desc;
      outs[i].dims = outputs[i].max;
    }
    Roles r;
    std::string const err = resolveRoles(mConfig, nbInputs, r);
    if (!err.empty()) throw ShapeError(err);
    // Maxima of different inputs need not come from one consistent shape, so build the problem
    // from them directly instead of through the consistency checks of problemFor.
    gla::Problem p;
    Dims const& q = ins[r.query].dims;
    Dims const& k = ins[r.key].dims;
    Dims const& v = ins[r.value].dims;
    p.q_heads = mConfig.q_num_heads;
    p.kv_heads = mConfig.kv_num_heads;
    p.batch = std::max(q.d[0], int64_t{1});
    p.seq_len = std::max(q.d[1], int64_t{1});
    p.head_dim_k = static_cast<int32_t>(std::max(q.d[2] / p.q_heads, k.d[2] / p.kv_heads));
    p.head_dim_v = static_cast<int32_t>(v.d[2] / p.kv_heads);
    p.num_seqs = p.batch;
    if (r.cu_seqlens >= 0) {
      p.batch = 1;
      p.has_cu_seqlens = 1;
      p.cu_seqlens_int64 = ins[r.cu_seqlens].type == DataType::kINT64;
      p.num_seqs = std::max(ins[r.cu_seqlens].dims.d[0] - 1, int64_t{1});
    }
    if (r.past_state >= 0) {
      p.has_past_state = 1;
      if (r.cu_seqlens < 0) {
        p.batch = std::max(p.batch, ins[r.past_state].dims.d[0]);
      } else {
        p.num_seqs = std::max(p.num_seqs, ins[r.past_state].dims.d[0]);
      }
    }
    if (r.cu_seqlens < 0) p.num_seqs = p.batch;
    p.act_dtype = glaType(ins[r.query].type);
    p.state_dtype = nbOutputs > 1 ? glaType(outs[1].type) : gla::DType::kFloat32;
    p.has_gate = mConfig.gated() && r.gate >= 0;
    if (p.has_gate && mConfig.kind == OpKind::kLinearAttention) {
      p.gate_per_head = ins[r.gate].dims.d[2] == p.kv_heads && p.head_dim_k != 1;
    }
    if (r.g_gamma >= 0) {
      p.has_g_gamma = 1;
      p.g_gamma_dtype = glaType(ins[r.g_gamma].type);
    }
    p.reverse = mConfig.reverse;
    p.scale = mConfig.scale;
    return declaredWorkspace(p);
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

gla::Problem GlaPlugin::problemFor(PluginTensorDesc const* in, int32_t nbInputs, PluginTensorDesc const* out,
                                   int32_t nbOutputs) const {
  if (nbOutputs != 2) throw ShapeError("expects 2 outputs (output, present_state), got " + std::to_string(nbOutputs));
  Roles r;
  std::string const err = resolveRoles(mConfig, nbInputs, r);
  if (!err.empty()) throw ShapeError(err);

  bool const la = mConfig.kind == OpKind::kLinearAttention;
  char const* const gateName = la ? "decay" : "gate";
  int64_t const hq = mConfig.q_num_heads;
  int64_t const hkv = mConfig.kv_num_heads;

  auto shapeOf = [&](int32_t index) { return dimsString(in[index].dims); };
  auto rank = [&](char const* name, int32_t index, int32_t want) {
    if (in[index].dims.nbDims != want) {
      throw ShapeError(std::string(name) + " must have rank " + std::to_string(want) + ", got shape " + shapeOf(index));
    }
  };
  rank("query", r.query, 3);
  rank("key", r.key, 3);
  rank("value", r.value, 3);
  Dims const& q = in[r.query].dims;
  Dims const& k = in[r.key].dims;
  Dims const& v = in[r.value].dims;
  int64_t const B = q.d[0];
  int64_t const T = q.d[1];
  if (q.d[2] >= 0 && q.d[2] % hq != 0) {
    throw ShapeError("query shape " + shapeOf(r.query) + ": last dimension is not a multiple of q_num_heads = " +
                     std::to_string(hq));
  }
  int64_t const dk = q.d[2] >= 0 ? q.d[2] / hq : (k.d[2] >= 0 ? k.d[2] / hkv : -1);
  if (v.d[2] >= 0 && v.d[2] % hkv != 0) {
    throw ShapeError("value shape " + shapeOf(r.value) + ": last dimension is not a multiple of kv_num_heads = " +
                     std::to_string(hkv));
  }
  int64_t const dv = v.d[2] >= 0 ? v.d[2] / hkv : -1;
  auto expect3 = [&](char const* name, int32_t index, int64_t last, char const* lastText) {
    Dims const& d = in[index].dims;
    if (!fits(d.d[0], B) || !fits(d.d[1], T) || !fits(d.d[2], last)) {
      std::ostringstream s;
      s << name << " has shape " << shapeOf(index) << ", expected [" << dimText(B) << ", " << dimText(T) << ", " << lastText
        << "] from query " << shapeOf(r.query) << " (q_num_heads=" << hq << ", kv_num_heads=" << hkv << ")";
      throw ShapeError(s.str());
    }
  };
  expect3("key", r.key, dk < 0 ? -1 : hkv * dk, "kv_num_heads * d_k");
  expect3("value", r.value, -1, "kv_num_heads * d_v");

  gla::Problem p;
  p.batch = B;
  p.seq_len = T;
  p.q_heads = mConfig.q_num_heads;
  p.kv_heads = mConfig.kv_num_heads;
  p.head_dim_k = static_cast<int32_t>(dk);
  p.head_dim_v = static_cast<int32_t>(dv);
  p.act_dtype = glaType(in[r.query].type);
  p.scale = mConfig.scale;
  p.reverse = mConfig.reverse;
  if (!isActivationType(in[r.query].type)) {
    throw ShapeError(std::string("query must be float32, float16 or bfloat16, got ") + typeName(in[r.query].type));
  }
  auto sameType = [&](char const* name, int32_t index) {
    if (in[index].type != in[r.query].type) {
      throw ShapeError(std::string(name) + " is " + typeName(in[index].type) + " but query is " +
                       typeName(in[r.query].type) + ": query, key, value and " + gateName + " share one type");
    }
  };
  sameType("key", r.key);
  sameType("value", r.value);

  p.has_gate = mConfig.gated() && r.gate >= 0;
  if (r.gate >= 0) {
    rank(gateName, r.gate, 3);
    sameType(gateName, r.gate);
    Dims const& g = in[r.gate].dims;
    bool const perKey = fits(g.d[2], dk < 0 ? -1 : hkv * dk);
    bool const perHead = la && fits(g.d[2], hkv);
    if (!fits(g.d[0], B) || !fits(g.d[1], T) || !(perKey || perHead)) {
      std::ostringstream s;
      s << gateName << " has shape " << shapeOf(r.gate) << ", expected [" << dimText(B) << ", " << dimText(T)
        << ", kv_num_heads * d_k = " << (dk < 0 ? std::string("?") : std::to_string(hkv * dk)) << "]"
        << (la ? " or one decay per head [B, T, kv_num_heads = " + std::to_string(hkv) + "]" : std::string());
      throw ShapeError(s.str());
    }
    // a lone kv_num_heads-wide decay is per head unless d_k == 1 makes the two layouts one
    p.gate_per_head = p.has_gate && la && g.d[2] >= 0 && g.d[2] == hkv && !(dk >= 0 && dk == 1);
  }
  if (r.beta >= 0) sameType("beta", r.beta);

  int64_t N = B;
  if (r.cu_seqlens >= 0) {
    rank("cu_seqlens", r.cu_seqlens, 1);
    if (!isIndexType(in[r.cu_seqlens].type)) {
      throw ShapeError(std::string("cu_seqlens must be int32 or int64, got ") + typeName(in[r.cu_seqlens].type));
    }
    if (!fits(B, 1)) {
      throw ShapeError("cu_seqlens packs sequences along T and needs B = 1, got query " + shapeOf(r.query));
    }
    int64_t const len = in[r.cu_seqlens].dims.d[0];
    if (len >= 0 && len < 2) {
      throw ShapeError("cu_seqlens has shape " + shapeOf(r.cu_seqlens) + "; it needs N + 1 >= 2 offsets");
    }
    N = len < 0 ? -1 : len - 1;
    p.has_cu_seqlens = 1;
    p.cu_seqlens_int64 = in[r.cu_seqlens].type == DataType::kINT64;
  }
  p.num_seqs = N;

  DataType stateType = out[1].type;
  if (r.past_state >= 0) {
    rank("past_state", r.past_state, 4);
    Dims const& s = in[r.past_state].dims;
    if (!fits(s.d[0], N) || !fits(s.d[1], hkv) || !fits(s.d[2], dk) || !fits(s.d[3], dv)) {
      std::ostringstream m;
      m << "past_state has shape " << shapeOf(r.past_state) << ", expected [N, kv_num_heads, d_k, d_v] = ["
        << dimText(N) << ", " << hkv << ", " << dimText(dk) << ", " << dimText(dv) << "]"
        << (r.cu_seqlens >= 0 ? " (N = len(cu_seqlens) - 1)" : " (N = B)");
      throw ShapeError(m.str());
    }
    if (!isActivationType(in[r.past_state].type)) {
      throw ShapeError(std::string("past_state must be float32, float16 or bfloat16, got ") +
                       typeName(in[r.past_state].type));
    }
    if (N < 0) N = s.d[0];
    p.num_seqs = N;
    p.has_past_state = 1;
    stateType = in[r.past_state].type;
  }
  if (out[1].type != stateType) {
    throw ShapeError(std::string("present_state is ") + typeName(out[1].type) + " but the state type is " +
                     typeName(stateType));
  }
  if (!isActivationType(stateType)) {
    throw ShapeError(std::string("the state must be float32, float16 or bfloat16, got ") + typeName(stateType));
  }
  p.state_dtype = glaType(stateType);

  if (r.g_gamma >= 0) {
    rank("g_gamma", r.g_gamma, 1);
    if (!fits(in[r.g_gamma].dims.d[0], hkv)) {
      throw ShapeError("g_gamma has shape " + shapeOf(r.g_gamma) + ", expected [kv_num_heads] = [" +
                       std::to_string(hkv) + "]");
    }
    if (!isActivationType(in[r.g_gamma].type)) {
      throw ShapeError(std::string("g_gamma must be float32, float16 or bfloat16, got ") + typeName(in[r.g_gamma].type));
    }
    p.has_g_gamma = 1;
    p.g_gamma_dtype = glaType(in[r.g_gamma].type);
  }

  Dims const& o0 = out[0].dims;
  Dims const& o1 = out[1].dims;
  if (o0.nbDims != 3 || !fits(o0.d[0], B) || !fits(o0.d[1], T) || !fits(o0.d[2], dv < 0 ? -1 : hq * dv)) {
    throw ShapeError("output has shape " + dimsString(o0) + ", expected [B, T, q_num_heads * d_v]");
  }
  if (o1.nbDims != 4 || !fits(o1.d[0], N) || !fits(o1.d[1], hkv) || !fits(o1.d[2], dk) || !fits(o1.d[3], dv)) {
    throw ShapeError("present_state has shape " + dimsString(o1) + ", expected [N, kv_num_heads, d_k, d_v]");
  }
  if (out[0].type != in[r.query].type) {
    throw ShapeError(std::string("output is ") + typeName(out[0].type) + " but query is " + typeName(in[r.query].type));
  }
  return p;
}

int32_t GlaPlugin::onShapeChange(PluginTensorDesc const* in, int32_t nbInputs, PluginTensorDesc const* out,
                                 int32_t nbOutputs) noexcept {
  try {
    gla::Problem const p = problemFor(in, nbInputs, out, nbOutputs);
    if (gla::validate(p) != gla::Status::kOk) throw ShapeError(gla::last_error_message());
    mNbInputs = nbInputs;
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
    gla::Problem const p = problemFor(inputDesc, mNbInputs, outputDesc, 2);
    Roles r;
    resolveRoles(mConfig, mNbInputs, r);  // succeeded inside problemFor

    gla::Tensors t;
    t.query = inputs[r.query];
    t.key = inputs[r.key];
    t.value = inputs[r.value];
    t.gate = p.has_gate ? inputs[r.gate] : nullptr;
    t.past_state = p.has_past_state ? inputs[r.past_state] : nullptr;
    t.cu_seqlens = p.has_cu_seqlens ? inputs[r.cu_seqlens] : nullptr;
    t.g_gamma = p.has_g_gamma ? inputs[r.g_gamma] : nullptr;
    t.output = outputs[0];
    t.present_state = outputs[1];

    size_t const need = gla::cuda_workspace_bytes(p);
    void* ws = nullptr;
    if (need > 0) {
      if (workspace == nullptr) throw std::runtime_error("TensorRT passed no workspace; " + std::to_string(need) + " bytes needed");
      auto const addr = reinterpret_cast<uintptr_t>(workspace);
      ws = reinterpret_cast<void*>((addr + kWorkspaceAlign - 1) / kWorkspaceAlign * kWorkspaceAlign);
    }
    gla::Status const st = gla::cuda_forward(p, t, ws, need, static_cast<void*>(stream));
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
