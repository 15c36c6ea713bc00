#include "gla_creator.h"

#include <cmath>
#include <cstdint>
#include <cstring>
#include <exception>
#include <limits>
#include <stdexcept>
#include <string>

#include "logging.h"

namespace gla_trt {

using nvinfer1::PluginField;
using nvinfer1::PluginFieldType;

namespace {

char const* fieldTypeName(PluginFieldType t) {
  switch (t) {
    case PluginFieldType::kFLOAT16: return "float16";
    case PluginFieldType::kFLOAT32: return "float32";
    case PluginFieldType::kFLOAT64: return "float64";
    case PluginFieldType::kINT8: return "int8";
    case PluginFieldType::kINT16: return "int16";
    case PluginFieldType::kINT32: return "int32";
    case PluginFieldType::kINT64: return "int64";
    case PluginFieldType::kCHAR: return "string";
    default: return "an unsupported type";
  }
}

std::invalid_argument badField(PluginField const& f, std::string const& why) {
  return std::invalid_argument(std::string("attribute '") + f.name + "' " + why);
}

void needScalar(PluginField const& f) {
  if (f.data == nullptr) throw badField(f, "has no data");
  if (f.length != 1) throw badField(f, "must be a scalar, got " + std::to_string(f.length) + " values");
}

// ONNX INT attributes arrive as int32 from TensorRT's parser (int64 from other writers); the
// contract checks the range (gla::check_attributes).
int64_t readInt(PluginField const& f) {
  needScalar(f);
  int64_t v = 0;
  switch (f.type) {
    case PluginFieldType::kINT8: v = *static_cast<int8_t const*>(f.data); break;
    case PluginFieldType::kINT16: v = *static_cast<int16_t const*>(f.data); break;
    case PluginFieldType::kINT32: v = *static_cast<int32_t const*>(f.data); break;
    case PluginFieldType::kINT64: v = *static_cast<int64_t const*>(f.data); break;
    default: throw badField(f, std::string("must be an int, got ") + fieldTypeName(f.type));
  }
  return v;
}

float halfToFloat(uint16_t h) {
  uint32_t const sign = (h >> 15) & 1u, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
  float v;
  if (exp == 0) {
    v = std::ldexp(static_cast<float>(man), -24);
  } else if (exp == 31) {
    v = man ? std::numeric_limits<float>::quiet_NaN() : std::numeric_limits<float>::infinity();
  } else {
    v = std::ldexp(static_cast<float>(man | 0x400u), static_cast<int>(exp) - 25);
  }
  return sign ? -v : v;
}

float readFloat(PluginField const& f) {
  needScalar(f);
  switch (f.type) {
    case PluginFieldType::kFLOAT32: return *static_cast<float const*>(f.data);
    case PluginFieldType::kFLOAT64: return static_cast<float>(*static_cast<double const*>(f.data));
    case PluginFieldType::kFLOAT16: return halfToFloat(*static_cast<uint16_t const*>(f.data));
    default: throw badField(f, std::string("must be a float, got ") + fieldTypeName(f.type));
  }
}

std::string readString(PluginField const& f) {
  if (f.type != PluginFieldType::kCHAR) throw badField(f, std::string("must be a string, got ") + fieldTypeName(f.type));
  if (f.data == nullptr || f.length < 0) throw badField(f, "has no data");
  // Some writers count the terminating NUL in the length, some do not.
  std::string s(static_cast<char const*>(f.data), static_cast<size_t>(f.length));
  size_t const end = s.find('\0');
  if (end != std::string::npos) s.resize(end);
  return s;
}

}  // namespace

GlaPluginCreator::GlaPluginCreator(OpKind kind) : mKind(kind) {
  mFieldNames.emplace_back("q_num_heads", nullptr, PluginFieldType::kINT32, 1);
  mFieldNames.emplace_back("kv_num_heads", nullptr, PluginFieldType::kINT32, 1);
  mFieldNames.emplace_back("scale", nullptr, PluginFieldType::kFLOAT32, 1);
  if (kind == OpKind::kGatedLinearAttention) {
    mFieldNames.emplace_back("reverse", nullptr, PluginFieldType::kINT32, 1);
  } else {
    mFieldNames.emplace_back("update_rule", nullptr, PluginFieldType::kCHAR, 0);
  }
  mFieldNames.emplace_back("chunk_size", nullptr, PluginFieldType::kINT32, 1);
  mFieldCollection.nbFields = static_cast<int32_t>(mFieldNames.size());
  mFieldCollection.fields = mFieldNames.data();
}

Config GlaPluginCreator::parse(nvinfer1::PluginFieldCollection const* fc, bool runtime) const {
  // The attributes go through the op contract (gla::check_attributes) as int64, so that no value is
  // narrowed before it is checked; unknown attributes are refused.
  gla::OpAttributes a;
  Config c;
  c.kind = mKind;
  bool const gla = mKind == OpKind::kGatedLinearAttention;
  bool hasRule = false;
  int32_t const n = fc != nullptr ? fc->nbFields : 0;
  if (n > 0 && fc->fields == nullptr) throw std::invalid_argument("the field collection has no fields array");
  for (int32_t i = 0; i < n; ++i) {
    PluginField const& f = fc->fields[i];
    if (f.name == nullptr) throw std::invalid_argument("field " + std::to_string(i) + " has no name");
    std::string const name = f.name;
    if (name == "q_num_heads") {
      a.q_num_heads = readInt(f);
    } else if (name == "kv_num_heads") {
      a.kv_num_heads = readInt(f);
    } else if (name == "scale") {
      a.scale = readFloat(f);
    } else if (name == "chunk_size") {
      a.chunk_size = readInt(f);
    } else if (gla && name == "reverse") {
      a.reverse = readInt(f);
    } else if (!gla && name == "update_rule") {
      c.update_rule = readString(f);
      hasRule = true;
    } else if (runtime && name == "workspace_bytes") {
      // written by getFieldsToSerialize into the plan; never an ONNX attribute
      c.workspace_bytes = readInt(f);
    } else if (name == "plugin_version" || name == "plugin_namespace") {
      // consumed by the ONNX parser to find this creator; nothing for the plugin
    } else {
      throw std::invalid_argument("unknown attribute '" + name + "' (" + opName(mKind) + " takes " +
                                  (gla ? "q_num_heads, kv_num_heads, scale, reverse, chunk_size"
                                       : "q_num_heads, kv_num_heads, scale, update_rule, chunk_size") +
                                  ")");
    }
  }
  a.update_rule = static_cast<int32_t>(updateRule(c.update_rule, hasRule));
  if (gla::check_attributes(mKind, a) != gla::Status::kOk) {
    std::string const why = gla::last_error_message();
    if (!gla && hasRule && a.update_rule == static_cast<int32_t>(gla::UpdateRule::kUnsupported)) {
      // the contract's sentence with the value in it (the C struct carries only the rule's enum)
      throw std::invalid_argument("attribute update_rule='" + c.update_rule +
                                  "' is not supported (supported: 'gated', 'linear')");
    }
    throw std::invalid_argument(why);
  }
  // in range now (check_attributes): narrowing is exact
  c.q_num_heads = static_cast<int32_t>(a.q_num_heads);
  c.kv_num_heads = static_cast<int32_t>(a.kv_num_heads);
  c.reverse = static_cast<int32_t>(a.reverse);
  c.chunk_size = static_cast<int32_t>(a.chunk_size);
  c.scale = a.scale;
  return c;
}

nvinfer1::IPluginV3* GlaPluginCreator::createPlugin(char const* name, nvinfer1::PluginFieldCollection const* fc,
                                                    nvinfer1::TensorRTPhase phase) noexcept {
  std::string const node = name != nullptr ? name : "";
  try {
    return new GlaPlugin(node, parse(fc, phase == nvinfer1::TensorRTPhase::kRUNTIME));
  } catch (std::exception const& e) {
    log(nvinfer1::ILogger::Severity::kERROR,
        std::string(opName(mKind)) + " plugin '" + node + "': cannot create: " + e.what());
  } catch (...) {
    log(nvinfer1::ILogger::Severity::kERROR, std::string(opName(mKind)) + " plugin '" + node + "': cannot create");
  }
  return nullptr;
}

nvinfer1::PluginFieldCollection const* GlaPluginCreator::getFieldNames() noexcept { return &mFieldCollection; }
char const* GlaPluginCreator::getPluginName() const noexcept { return opName(mKind); }
char const* GlaPluginCreator::getPluginVersion() const noexcept { return kPluginVersion; }
char const* GlaPluginCreator::getPluginNamespace() const noexcept { return kPluginNamespace; }

}  // namespace gla_trt
