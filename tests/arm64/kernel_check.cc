// gla-kernel-check: runs GLA problems through the kernel core's C API (libgla_kernels_capi) and
// writes the results, so that a build for another architecture (aarch64 under qemu-user) can be
// checked against the reference computed on the build machine (tests/arm64/test_arm64.py).
//
//   gla-kernel-check [--threads N] IN OUT [IN OUT ...]
//
// IN:  the GlaProblem struct as bytes (capi.h; the same layout on every LP64 target), then seven
//      little-endian uint64 byte counts (query, key, value, gate, past_state, cu_seqlens, g_gamma;
//      0 = absent), then those bytes in that order.
// OUT: the output's bytes, then present_state's.
// Prints "isa: <build of the hot loops> cuda_compiled: <0|1>" first; exit status 0, or 1 with a message on stderr.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "gla/capi.h"

namespace {

size_t elem_size(int32_t dtype) { return dtype == GLA_DTYPE_FLOAT32 ? 4 : 2; }

bool read_file(const char* path, std::vector<char>& data) {
  FILE* f = std::fopen(path, "rb");
  if (!f) return false;
  char buf[1 << 16];
  size_t n;
  while ((n = std::fread(buf, 1, sizeof buf, f)) > 0) data.insert(data.end(), buf, buf + n);
  const bool ok = !std::ferror(f);
  std::fclose(f);
  return ok;
}

int fail(const std::string& what) {
  std::fprintf(stderr, "gla-kernel-check: %s\n", what.c_str());
  return 1;
}

int run_case(const char* in_path, const char* out_path, int32_t threads) {
  std::vector<char> in;
  if (!read_file(in_path, in)) return fail(std::string("cannot read ") + in_path);
  GlaProblem p;
  const size_t head = sizeof p + 7 * sizeof(uint64_t);
  if (in.size() < head) return fail(std::string(in_path) + ": shorter than its header");
  std::memcpy(&p, in.data(), sizeof p);
  uint64_t sizes[7];
  std::memcpy(sizes, in.data() + sizeof p, sizeof sizes);

  // the sizes this problem implies: a mismatch means the file and this driver disagree
  const size_t act = elem_size(p.act_dtype), st = elem_size(p.state_dtype);
  const uint64_t rows = uint64_t(p.batch) * uint64_t(p.seq_len);
  const uint64_t want[7] = {
      rows * p.q_heads * p.head_dim_k * act,
      rows * p.kv_heads * p.head_dim_k * act,
      rows * p.kv_heads * p.head_dim_v * act,
      p.has_gate ? rows * p.kv_heads * (p.gate_per_head ? 1 : p.head_dim_k) * act : 0,
      p.has_past_state ? uint64_t(p.num_seqs) * p.kv_heads * p.head_dim_k * p.head_dim_v * st : 0,
      p.has_cu_seqlens ? uint64_t(p.num_seqs + 1) * (p.cu_seqlens_int64 ? 8 : 4) : 0,
      p.has_g_gamma ? uint64_t(p.kv_heads) * elem_size(p.g_gamma_dtype) : 0,
  };
  const void* ptr[7];
  size_t off = head;
  for (int i = 0; i < 7; ++i) {
    if (sizes[i] != want[i])
      return fail(std::string(in_path) + ": input " + std::to_string(i) + " has " + std::to_string(sizes[i]) +
                  " bytes, the problem implies " + std::to_string(want[i]));
    ptr[i] = sizes[i] ? in.data() + off : nullptr;
    off += sizes[i];
  }
  if (off != in.size()) return fail(std::string(in_path) + ": trailing bytes");

  std::vector<char> out(rows * p.q_heads * p.head_dim_v * act);
  std::vector<char> present(uint64_t(p.num_seqs) * p.kv_heads * p.head_dim_k * p.head_dim_v * st);
  GlaTensors t = {ptr[0], ptr[1], ptr[2], ptr[3], ptr[4], ptr[5], ptr[6], out.data(), present.data()};
  const size_t ws_bytes = gla_cpu_workspace_bytes(&p);
  std::vector<char> ws(ws_bytes + 1);
  const int32_t status = gla_cpu_forward(&p, &t, ws.data(), ws_bytes, threads);
  if (status != GLA_STATUS_OK)
    return fail(std::string(in_path) + ": " + gla_status_name(status) + ": " + gla_last_error_message());

  FILE* f = std::fopen(out_path, "wb");
  if (!f) return fail(std::string("cannot write ") + out_path);
  const bool ok = std::fwrite(out.data(), 1, out.size(), f) == out.size() &&
                  std::fwrite(present.data(), 1, present.size(), f) == present.size();
  if (std::fclose(f) != 0 || !ok) return fail(std::string("cannot write ") + out_path);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  int32_t threads = 1;
  int i = 1;
  if (i + 1 < argc && std::strcmp(argv[i], "--threads") == 0) {
    threads = std::atoi(argv[i + 1]);
    i += 2;
  }
  if (argc - i < 2 || (argc - i) % 2 != 0) {
    std::fprintf(stderr, "usage: gla-kernel-check [--threads N] IN OUT [IN OUT ...]\n");
    return 2;
  }
  if (gla_capi_version() != GLA_CAPI_VERSION) return fail("C API version mismatch");
  std::printf("isa: %s cuda_compiled: %d\n", gla_cpu_isa(), int(gla_cuda_compiled()));
  std::fflush(stdout);
  for (; i < argc; i += 2)
    if (int rc = run_case(argv[i], argv[i + 1], threads)) return rc;
  return 0;
}
