// gla-run: what the runner's parts share — typed errors (exit codes as gla_export.errors), a small
// JSON reader, the export's metadata, and the backend interface (ONNX Runtime, TensorRT).
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace gla_run {

// ---- errors ---------------------------------------------------------------------------------------

// Same codes as gla_export/errors.py, so scripts treat `gla-export ...` and `gla-run` alike.
enum ExitCode : int {
  kInternal = 1,
  kUsage = 2,
  kModel = 3,
  kMissingRuntime = 5,
};

struct Error : std::runtime_error {
  int code;
  Error(int code_, const std::string& msg) : std::runtime_error(msg), code(code_) {}
};

// ---- JSON -----------------------------------------------------------------------------------------
// The metadata is nested (model, tokenizer, states, graphs), so a flat key=value reader would not do;
// a single-header library fetched at build time would be one more pinned download for ~150 lines of
// need. This is a complete RFC 8259 reader (no extensions), with errors that give the byte offset.

struct Json {
  enum class Type { Null, Bool, Number, String, Array, Object };
  Type type = Type::Null;
  bool boolean = false;
  double number = 0.0;
  std::string string;
  std::vector<Json> array;
  std::vector<std::pair<std::string, Json>> object;  // in document order

  bool is_null() const { return type == Type::Null; }
  const Json* find(const std::string& key) const {
    if (type != Type::Object) return nullptr;
    for (const auto& kv : object)
      if (kv.first == key) return &kv.second;
    return nullptr;
  }
};

// Parses `text`; `origin` names it in error messages. Throws Error(kModel, ...).
Json parse_json(const std::string& text, const std::string& origin);

// ---- metadata -------------------------------------------------------------------------------------

enum class DType { Float32, Float16, BFloat16, Int64, Int32 };
size_t dtype_size(DType t);
const char* dtype_name(DType t);
DType parse_dtype(const std::string& name, const std::string& what);  // the names of metadata.json

struct StateInfo {
  int layer = -1;                    // -1: not a layer's (the hybrids' shared position)
  std::string kind;                  // recurrent_state | conv_state | key | value | position
  std::string input, output;         // past_key_values.{i}.{kind} -> present.{i}.{kind}
  std::vector<int64_t> shape;        // batch dimension as -1; a growing cache's sequence axis as -1 too
  DType dtype = DType::Float32;
  int seq_axis = -1;                 // a full-attention KV cache: the axis that grows by one slot per token

  bool grows() const { return seq_axis >= 0; }
  // product of the non-batch dimensions; for a growing cache, of those but the sequence axis (one slot)
  int64_t elements_per_row() const;
  std::vector<int64_t> shape_at(int64_t length) const;  // batch 1, a growing cache `length` slots long
};

struct Metadata {
  std::string origin;  // where it was read from (for messages)
  int format_version = 0;
  std::string form;    // custom | onnx | decomposed
  std::string dtype, state_dtype;
  int64_t vocab_size = 0;
  int num_layers = 0;
  int64_t bos_token_id = -1;                // -1: none
  std::vector<int64_t> eos_token_ids;       // empty: none; a config may list several end tokens
  bool is_eos(int64_t tok) const { return std::find(eos_token_ids.begin(), eos_token_ids.end(), tok) != eos_token_ids.end(); }
  std::string tokenizer;                          // byte | huggingface | none
  std::string prefill_file = "prefill.onnx", step_file = "step.onnx";
  bool prefill_has_mask = false;
  std::vector<StateInfo> states;

  size_t state_bytes() const;      // one conversation's fixed-size states, all layers
  size_t bytes_per_token() const;  // what the growing KV caches add per token (0: constant memory)
  bool any_growing() const { return bytes_per_token() > 0; }
};

constexpr int kMetadataFormatVersion = 1;  // gla_export/export/metadata.py FORMAT_VERSION
constexpr const char* kMetadataKey = "gla_export.metadata";

Metadata parse_metadata(const std::string& json_text, const std::string& origin);

std::string env(const char* name);  // the variable's value, empty when unset

// ---- backends -------------------------------------------------------------------------------------

// One conversation of batch 1. States live in two preallocated buffers that swap roles each step, so
// decoding allocates nothing per token and its memory does not depend on the context length.
class Backend {
 public:
  virtual ~Backend() = default;
  virtual std::string describe() const = 0;
  virtual bool can_prefill() const = 0;
  // Zero states, run the whole prompt through the prefill graph; returns the last position's logits.
  virtual const float* prefill(const std::vector<int64_t>& ids) = 0;
  // Zero states (the start of a conversation).
  virtual void reset() = 0;
  // Room for `positions` tokens in a conversation (prompt and generated): the growing KV caches of
  // full-attention layers are allocated here once, at that capacity. No-op for fixed-size states.
  virtual void reserve(int64_t positions) { (void)positions; }
  // Positions the growing KV caches hold now (0 without such caches).
  virtual int64_t kv_length() const { return 0; }
  // One token from the current state; returns its logits (vocab_size floats, valid until the next call).
  virtual const float* step(int64_t id) = 0;
};

struct OrtOptions {
  std::string export_dir;
  std::string ort_lib;  // libonnxruntime.so to dlopen ("" = search)
  std::string gla_lib;  // libgla_onnxruntime.so ("" = search; only needed for the custom form)
  std::string provider = "cpu";
  int device_id = 0;
  int threads = 0;  // intra-op threads, 0 = ONNX Runtime's default
  bool use_prefill = true;
  bool cuda_graph = false;  // --cuda-graph with --provider cuda (opt-in until proven on a GPU): replay the step as CUDA graphs captured by ONNX Runtime
  std::string exe_dir;  // where gla-run lives (library search)
};

// Loads ONNX Runtime, reads the metadata from step.onnx's metadata_props (metadata.json beside it
// when the model has none), creates the sessions. `meta` is filled in.
std::unique_ptr<Backend> make_ort_backend(const OrtOptions& opt, Metadata& meta);

struct TrtOptions {
  std::string export_dir;
  std::string engine;      // the step engine (built from step.onnx, e.g. by `gla-export build`)
  std::string trt_lib;     // libnvinfer.so.10 ("" = search)
  std::string plugin_lib;  // libgla_tensorrt.so ("" = search)
  int device_id = 0;
  std::string exe_dir;
  bool cuda_graph = false;  // --cuda-graph: capture the step (both directions of the state swap) in CUDA graphs
};

bool trt_compiled();  // false when built without TensorRT headers
std::unique_ptr<Backend> make_trt_backend(const TrtOptions& opt, const Metadata& meta);

// ---- small helpers --------------------------------------------------------------------------------

std::string read_file(const std::string& path);  // throws Error(kModel)
bool file_exists(const std::string& path);
std::string join_path(const std::string& dir, const std::string& name);
std::string shape_str(const std::vector<int64_t>& shape);

}  // namespace gla_run
