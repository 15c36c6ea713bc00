#include "common.h"

#include <sys/stat.h>

#include <cmath>
#include <cstdlib>
#include <fstream>
#include <sstream>

namespace gla_run {

// ---- JSON -----------------------------------------------------------------------------------------

namespace {

class JsonReader {
 public:
  JsonReader(const std::string& text, const std::string& origin) : s_(text), origin_(origin) {}

  Json document() {
    Json v = value(0);
    skip_ws();
    if (i_ != s_.size()) fail("unexpected data after the JSON value");
    return v;
  }

 private:
  static constexpr int kMaxDepth = 256;  // the metadata is a handful of levels deep; stops stack abuse
  const std::string& s_;
  const std::string& origin_;
  size_t i_ = 0;

  [[noreturn]] void fail(const std::string& why) const {
    throw Error(kModel, origin_ + ": invalid JSON at byte " + std::to_string(i_) + ": " + why);
  }

  void skip_ws() {
    while (i_ < s_.size() && (s_[i_] == ' ' || s_[i_] == '\t' || s_[i_] == '\n' || s_[i_] == '\r')) ++i_;
  }

  char peek() {
    skip_ws();
    if (i_ >= s_.size()) fail("unexpected end of input");
    return s_[i_];
  }

  void expect_word(const char* word) {
    for (const char* p = word; *p; ++p, ++i_)
      if (i_ >= s_.size() || s_[i_] != *p) fail(std::string("expected '") + word + "'");
  }

  Json value(int depth) {
    if (depth > kMaxDepth) fail("nested too deeply");
    Json v;
    switch (peek()) {
      case '{': {
        v.type = Json::Type::Object;
        ++i_;
        if (peek() == '}') { ++i_; return v; }
        for (;;) {
          if (peek() != '"') fail("expected a string key");
          std::string key = string_body();
          if (peek() != ':') fail("expected ':'");
          ++i_;
          v.object.emplace_back(std::move(key), value(depth + 1));
          char c = peek();
          ++i_;
          if (c == '}') return v;
          if (c != ',') fail("expected ',' or '}'");
        }
      }
      case '[': {
        v.type = Json::Type::Array;
        ++i_;
        if (peek() == ']') { ++i_; return v; }
        for (;;) {
          v.array.push_back(value(depth + 1));
          char c = peek();
          ++i_;
          if (c == ']') return v;
          if (c != ',') fail("expected ',' or ']'");
        }
      }
      case '"':
        v.type = Json::Type::String;
        v.string = string_body();
        return v;
      case 't': expect_word("true"); v.type = Json::Type::Bool; v.boolean = true; return v;
      case 'f': expect_word("false"); v.type = Json::Type::Bool; v.boolean = false; return v;
      case 'n': expect_word("null"); return v;
      default:
        v.type = Json::Type::Number;
        v.number = number();
        return v;
    }
  }

  double number() {
    size_t start = i_;
    auto digits = [&] {
      size_t d = i_;
      while (i_ < s_.size() && s_[i_] >= '0' && s_[i_] <= '9') ++i_;
      return i_ - d;
    };
    if (i_ < s_.size() && s_[i_] == '-') ++i_;
    if (i_ < s_.size() && s_[i_] == '0') {
      ++i_;
    } else if (digits() == 0) {
      fail("expected a value");
    }
    if (i_ < s_.size() && s_[i_] == '.') {
      ++i_;
      if (digits() == 0) fail("expected digits after '.'");
    }
    if (i_ < s_.size() && (s_[i_] == 'e' || s_[i_] == 'E')) {
      ++i_;
      if (i_ < s_.size() && (s_[i_] == '+' || s_[i_] == '-')) ++i_;
      if (digits() == 0) fail("expected digits in the exponent");
    }
    // the grammar is checked above, so strtod sees only a valid number (C locale: '.' separator)
    return std::strtod(s_.substr(start, i_ - start).c_str(), nullptr);
  }

  unsigned hex4() {
    if (i_ + 4 > s_.size()) fail("truncated \\u escape");
    unsigned v = 0;
    for (int k = 0; k < 4; ++k) {
      char c = s_[i_++];
      v <<= 4;
      if (c >= '0' && c <= '9') v |= unsigned(c - '0');
      else if (c >= 'a' && c <= 'f') v |= unsigned(c - 'a' + 10);
      else if (c >= 'A' && c <= 'F') v |= unsigned(c - 'A' + 10);
      else fail("bad hex digit in \\u escape");
    }
    return v;
  }

  static void put_utf8(std::string& out, unsigned cp) {
    if (cp < 0x80) {
      out += char(cp);
    } else if (cp < 0x800) {
      out += char(0xC0 | (cp >> 6));
      out += char(0x80 | (cp & 0x3F));
    } else if (cp < 0x10000) {
      out += char(0xE0 | (cp >> 12));
      out += char(0x80 | ((cp >> 6) & 0x3F));
      out += char(0x80 | (cp & 0x3F));
    } else {
      out += char(0xF0 | (cp >> 18));
      out += char(0x80 | ((cp >> 12) & 0x3F));
      out += char(0x80 | ((cp >> 6) & 0x3F));
      out += char(0x80 | (cp & 0x3F));
    }
  }

  std::string string_body() {
    ++i_;  // opening quote
    std::string out;
    for (;;) {
      if (i_ >= s_.size()) fail("unterminated string");
      char c = s_[i_++];
      if (c == '"') return out;
      if (static_cast<unsigned char>(c) < 0x20) fail("control character in a string");
      if (c != '\\') { out += c; continue; }
      if (i_ >= s_.size()) fail("unterminated escape");
      char e = s_[i_++];
      switch (e) {
        case '"': out += '"'; break;
        case '\\': out += '\\'; break;
        case '/': out += '/'; break;
        case 'b': out += '\b'; break;
        case 'f': out += '\f'; break;
        case 'n': out += '\n'; break;
        case 'r': out += '\r'; break;
        case 't': out += '\t'; break;
        case 'u': {
          unsigned cp = hex4();
          if (cp >= 0xD800 && cp <= 0xDBFF) {
            if (i_ + 2 > s_.size() || s_[i_] != '\\' || s_[i_ + 1] != 'u') fail("unpaired surrogate");
            i_ += 2;
            unsigned lo = hex4();
            if (lo < 0xDC00 || lo > 0xDFFF) fail("unpaired surrogate");
            cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
          } else if (cp >= 0xDC00 && cp <= 0xDFFF) {
            fail("unpaired surrogate");
          }
          put_utf8(out, cp);
          break;
        }
        default: fail(std::string("bad escape \\") + e);
      }
    }
  }
};

}  // namespace

Json parse_json(const std::string& text, const std::string& origin) { return JsonReader(text, origin).document(); }

// ---- metadata -------------------------------------------------------------------------------------

size_t dtype_size(DType t) {
  switch (t) {
    case DType::Float32: case DType::Int32: return 4;
    case DType::Float16: case DType::BFloat16: return 2;
    case DType::Int64: return 8;
  }
  return 0;
}

const char* dtype_name(DType t) {
  switch (t) {
    case DType::Float32: return "float32";
    case DType::Float16: return "float16";
    case DType::BFloat16: return "bfloat16";
    case DType::Int64: return "int64";
    case DType::Int32: return "int32";
  }
  return "?";
}

DType parse_dtype(const std::string& name, const std::string& what) {
  if (name == "float32") return DType::Float32;
  if (name == "float16") return DType::Float16;
  if (name == "bfloat16") return DType::BFloat16;
  if (name == "int64") return DType::Int64;
  if (name == "int32") return DType::Int32;
  throw Error(kModel, what + ": unsupported dtype '" + name + "'");
}

size_t Metadata::state_bytes() const {
  size_t n = 0;
  for (const auto& st : states)
    if (!st.grows()) n += size_t(st.elements_per_row()) * dtype_size(st.dtype);
  return n;
}

size_t Metadata::bytes_per_token() const {
  size_t n = 0;
  for (const auto& st : states)
    if (st.grows()) n += size_t(st.elements_per_row()) * dtype_size(st.dtype);
  return n;
}

std::string env(const char* name) {
  const char* v = std::getenv(name);
  return v ? std::string(v) : std::string();
}

int64_t StateInfo::elements_per_row() const {
  int64_t n = 1;
  for (size_t d = 1; d < shape.size(); ++d)
    if (int(d) != seq_axis) n *= shape[d];
  return n;
}

std::vector<int64_t> StateInfo::shape_at(int64_t length) const {
  std::vector<int64_t> s = shape;
  s[0] = 1;
  if (seq_axis >= 0) s[size_t(seq_axis)] = length;
  return s;
}

namespace {

struct Reader {
  const std::string& origin;

  [[noreturn]] void bad(const std::string& path, const std::string& why) const {
    throw Error(kModel, origin + ": metadata field '" + path + "' " + why);
  }
  const Json& member(const Json& obj, const std::string& key, const std::string& path) const {
    const Json* v = obj.find(key);
    if (!v) bad(path + key, "is missing");
    return *v;
  }
  const Json& object(const Json& obj, const std::string& key, const std::string& path) const {
    const Json& v = member(obj, key, path);
    if (v.type != Json::Type::Object) bad(path + key, "must be an object");
    return v;
  }
  const Json& array(const Json& obj, const std::string& key, const std::string& path) const {
    const Json& v = member(obj, key, path);
    if (v.type != Json::Type::Array) bad(path + key, "must be an array");
    return v;
  }
  std::string str(const Json& obj, const std::string& key, const std::string& path) const {
    const Json& v = member(obj, key, path);
    if (v.type != Json::Type::String) bad(path + key, "must be a string");
    return v.string;
  }
  static bool integral(const Json& v) {
    return v.type == Json::Type::Number && std::isfinite(v.number) && v.number == std::floor(v.number) &&
           std::fabs(v.number) < 9.0e15;
  }
  int64_t integer(const Json& obj, const std::string& key, const std::string& path) const {
    const Json& v = member(obj, key, path);
    if (!integral(v)) bad(path + key, "must be an integer");
    return static_cast<int64_t>(v.number);
  }
  // null or absent: none; an integer: one id; an array of integers: several (transformers' configs allow both)
  std::vector<int64_t> integers_or_none(const Json& obj, const std::string& key, const std::string& path) const {
    const Json* v = obj.find(key);
    if (!v || v->is_null()) return {};
    if (v->type != Json::Type::Array) {
      if (!integral(*v)) bad(path + key, "must be an integer, a list of integers or null");
      return {static_cast<int64_t>(v->number)};
    }
    std::vector<int64_t> out;
    for (const Json& e : v->array) {
      if (!integral(e)) bad(path + key, "must be an integer, a list of integers or null");
      out.push_back(static_cast<int64_t>(e.number));
    }
    return out;
  }
  int64_t integer_or_none(const Json& obj, const std::string& key, const std::string& path) const {
    const Json* v = obj.find(key);
    if (!v || v->is_null()) return -1;
    if (!integral(*v)) bad(path + key, "must be an integer or null");
    return static_cast<int64_t>(v->number);
  }
};

}  // namespace

Metadata parse_metadata(const std::string& json_text, const std::string& origin) {
  Json doc = parse_json(json_text, origin);
  if (doc.type != Json::Type::Object) throw Error(kModel, origin + ": the metadata is not a JSON object");
  Reader r{origin};
  Metadata m;
  m.origin = origin;
  if (r.str(doc, "format", "") != "gla-export") throw Error(kModel, origin + ": not gla-export metadata (format != 'gla-export')");
  m.format_version = int(r.integer(doc, "format_version", ""));
  if (m.format_version > kMetadataFormatVersion)
    throw Error(kModel, origin + ": format_version " + std::to_string(m.format_version) +
                            " is newer than this gla-run reads (" + std::to_string(kMetadataFormatVersion) + "); rebuild gla-run");
  m.form = r.str(r.object(doc, "gla_op", ""), "form", "gla_op.");
  m.dtype = r.str(doc, "dtype", "");
  m.state_dtype = r.str(doc, "state_dtype", "");
  if (const Json* files = doc.find("files"); files && files->type == Json::Type::Object) {
    if (const Json* p = files->find("prefill"); p && p->type == Json::Type::String) m.prefill_file = p->string;
    if (const Json* s = files->find("step"); s && s->type == Json::Type::String) m.step_file = s->string;
  }

  const Json& model = r.object(doc, "model", "");
  m.vocab_size = r.integer(model, "vocab_size", "model.");
  m.num_layers = int(r.integer(model, "num_layers", "model."));
  m.bos_token_id = r.integer_or_none(model, "bos_token_id", "model.");
  m.eos_token_ids = r.integers_or_none(model, "eos_token_id", "model.");
  if (m.vocab_size < 1) r.bad("model.vocab_size", "must be positive");

  const Json& tok = r.object(doc, "tokenizer", "");
  m.tokenizer = r.str(tok, "kind", "tokenizer.");
  if (m.tokenizer == "byte") {
    m.bos_token_id = r.integer(tok, "bos_token_id", "tokenizer.");
    m.eos_token_ids = {r.integer(tok, "eos_token_id", "tokenizer.")};
  }

  const Json& graphs = r.object(doc, "graphs", "");
  const Json& prefill = r.object(graphs, "prefill", "graphs.");
  for (const Json& io : r.array(prefill, "inputs", "graphs.prefill.").array)
    if (const Json* name = io.find("name"); name && name->string == "attention_mask") m.prefill_has_mask = true;

  const Json& states = r.array(doc, "states", "");
  for (size_t k = 0; k < states.array.size(); ++k) {
    const Json& s = states.array[k];
    std::string path = "states[" + std::to_string(k) + "].";
    if (s.type != Json::Type::Object) r.bad(path, "must be an object");
    StateInfo st;
    st.layer = int(r.integer_or_none(s, "layer", path));  // null: the hybrids' position
    st.kind = r.str(s, "kind", path);
    st.input = r.str(s, "input", path);
    st.output = r.str(s, "output", path);
    st.dtype = parse_dtype(r.str(s, "dtype", path), origin + ": " + path + "dtype");
    // a full-attention layer's KV cache ("memory": "grows") has a symbolic sequence axis after the
    // batch; every other state has a fixed size but the batch
    const Json* memory = s.find("memory");
    const bool grows = memory && memory->type == Json::Type::String && memory->string == "grows";
    if (memory && !(memory->type == Json::Type::String && (memory->string == "grows" || memory->string == "fixed")))
      r.bad(path + "memory", "must be \"fixed\" or \"grows\"");
    const Json& shape = r.array(s, "shape", path);
    for (size_t d = 0; d < shape.array.size(); ++d) {
      const Json& dim = shape.array[d];
      if (dim.type == Json::Type::String) {
        if (d != 0 && (!grows || st.seq_axis >= 0))
          r.bad(path + "shape", grows ? "has more than one growing dimension"
                                      : "may only have a symbolic batch dimension first (a fixed-size state)");
        if (d != 0) st.seq_axis = int(d);
        st.shape.push_back(-1);
      } else if (Reader::integral(dim) && dim.number > 0) {
        st.shape.push_back(static_cast<int64_t>(dim.number));
      } else {
        r.bad(path + "shape", "has a bad dimension");
      }
    }
    if (st.shape.empty() || st.shape[0] != -1) r.bad(path + "shape", "must start with the batch dimension");
    if (grows && st.seq_axis < 0) r.bad(path + "shape", "has no symbolic sequence dimension, but memory is \"grows\"");
    m.states.push_back(std::move(st));
  }
  if (m.states.empty()) r.bad("states", "is empty: a step graph needs at least one state");
  return m;
}

// ---- helpers --------------------------------------------------------------------------------------

std::string read_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw Error(kModel, "cannot read " + path);
  std::ostringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

bool file_exists(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}

std::string join_path(const std::string& dir, const std::string& name) {
  if (dir.empty() || (!name.empty() && name[0] == '/')) return name;
  return dir.back() == '/' ? dir + name : dir + "/" + name;
}

std::string shape_str(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t d = 0; d < shape.size(); ++d) {
    if (d) s += ",";
    s += shape[d] < 0 ? std::string("batch") : std::to_string(shape[d]);
  }
  return s + "]";
}

}  // namespace gla_run
