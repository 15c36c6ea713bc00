// Internal to the CPU kernels: how a problem is cut into work units and how the workspace is laid
// out. Shared by the dispatcher (cpu_forward.cc) and the per-ISA builds of the hot loops
// (kernels_impl.h), so it holds only plain data.
//
// A work unit is one (sequence, key/value head, block of value columns): the state's columns
// evolve independently (S_t[:, j] only ever meets v_t[j]), so value blocks can run on different
// threads without any exchange. All the query heads of a key/value head stay in one unit because
// they share its state. Each parallel task ("slot") owns a private scratch area and runs units
// slot, slot + slots, ... so no two threads ever touch the same scratch.
#pragma once

#include <cstddef>
#include <cstdint>

#include "gla/kernels.h"

namespace gla {
namespace cpu {

constexpr int64_t kChunk = 64;       // rows per chunk of the chunked form
constexpr int64_t kSub = 16;         // rows per sub-chunk (one decay pivot each, see kernels_impl.h)
constexpr int64_t kLane = 16;        // fp32 row buffers are padded to a multiple of 16 floats
constexpr int64_t kMaxSlots = 64;    // at most this many private scratch areas
constexpr int64_t kMaxVBlock = 128;  // value columns per chunked unit: keeps a dk x vb state block in L2
constexpr int64_t kMinVBlock = 64;   // never narrower than this (narrow blocks waste the GEMMs)
constexpr int64_t kMinUnits = 8;     // split value columns until there are this many units

// The chunked form's per-head scratch (queries, scores, outputs of a chunk) is at most about this
// many floats a slot: many query heads per key/value head are taken a group at a time.
constexpr int64_t kMaxHeadGroupFloats = 1 << 18;

// Sequences shorter than this run step by step (the decode path); longer ones chunk by chunk.
constexpr int64_t kRecurrentMaxLen = 24;

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

struct Plan {
  int64_t G = 1;           // query heads per key/value head
  int64_t gq = 1;          // query heads a chunked unit takes at a time (bounds the scratch)
  int64_t dk = 0, dv = 0;  // head sizes
  int64_t vb = 0;          // value columns per unit (the last block may be narrower)
  int64_t vbp = 0;         // vb rounded up to kLane
  int64_t nvb = 0;         // value blocks per head
  int64_t units = 0;       // num_seqs * kv_heads * nvb
  int64_t slots = 0;       // parallel tasks, each with its own scratch
  int64_t rows = 0;        // rows of the chunk buffers: kChunk, or 1 when every sequence is short
  // offsets (in floats) of the buffers inside one slot's scratch; see kernels_impl.h
  int64_t off_S = 0, off_Kr = 0, off_KTr = 0, off_Gm = 0, off_Q = 0, off_KT = 0, off_V = 0, off_A = 0,
          off_O = 0, off_tmp = 0;
  int64_t slot_floats = 0;
  size_t workspace_bytes = 0;  // slots * slot_floats * 4, plus room to align the start to 64 bytes
};

Plan make_plan(const Problem& problem);

// Which build of the hot loops runs here: "avx512", "avx2", "neon" or "generic".
const char* selected_isa_name();

// Everything a slot needs, resolved once per call.
struct Job {
  Problem p;
  Tensors t;
  Plan plan;
  float scale = 1.f;
  float* scratch = nullptr;  // 64-byte aligned, plan.slots * plan.slot_floats floats
};

// The hot loops, built once per instruction set (kernels_{generic,avx2,avx512,neon}.cc); only the
// ones of the target's architecture are linked in (the dispatcher names no other).
namespace generic {
void run_slot(const Job& job, int64_t slot);
}
namespace avx2 {
void run_slot(const Job& job, int64_t slot);
}
namespace avx512 {
void run_slot(const Job& job, int64_t slot);
}
namespace neon {
void run_slot(const Job& job, int64_t slot);
}

}  // namespace cpu
}  // namespace gla
