// Fiber scheduler of the CPU emulation (see emu.h). x86-64 System V only: a fiber switch saves the
// callee-saved registers on the fiber's own stack and swaps stack pointers.
#include "cuda/emu/emu.h"

#include <cstdio>
#include <cstdlib>
#include <vector>

#if !defined(__x86_64__)
#error "the CUDA emulation used by the tests needs x86-64"
#endif

extern "C" void gla_emu_switch(void** save_sp, void* next_sp);
asm(R"(
.text
.globl gla_emu_switch
.type gla_emu_switch,@function
gla_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
.size gla_emu_switch,.-gla_emu_switch
.section .note.GNU-stack,"",@progbits
.text
)");

namespace gla_emu {

Dim3 g_block_idx, g_block_dim, g_grid_dim;

namespace {

constexpr size_t kStackBytes = 256 * 1024;

struct Fiber {
  ThreadState state;
  void* sp = nullptr;
  std::vector<unsigned char> stack;
  bool done = false;
};

struct Barrier {
  int arrived = 0;
  unsigned generation = 0;
  int or_accumulator = 0;
  int or_result = 0;
};

struct WarpExchange {
  Barrier barrier;
  const void* table[32];
};

std::vector<Fiber> g_fibers;
int g_current = -1;
void* g_scheduler_sp = nullptr;
const std::function<void()>* g_body = nullptr;
Barrier g_block_barrier;
std::vector<WarpExchange> g_warps;
std::vector<unsigned char> g_smem;
unsigned long long g_progress = 0;

void yield() { gla_emu_switch(&g_fibers[g_current].sp, g_scheduler_sp); }

// Returns once all `count` participants have arrived; the last one to arrive does not wait.
void arrive_and_wait(Barrier& b, int count) {
  ++g_progress;
  const unsigned generation = b.generation;
  if (++b.arrived == count) {
    b.arrived = 0;
    b.or_result = b.or_accumulator;
    b.or_accumulator = 0;
    ++b.generation;
    return;
  }
  while (b.generation == generation) yield();
}

[[noreturn]] void fiber_entry() {
  (*g_body)();
  g_fibers[g_current].done = true;
  ++g_progress;
  gla_emu_switch(&g_fibers[g_current].sp, g_scheduler_sp);
  std::abort();  // a finished fiber is never resumed
}

void prepare(Fiber& f) {
  f.stack.assign(kStackBytes, 0);
  uintptr_t top = reinterpret_cast<uintptr_t>(f.stack.data() + f.stack.size()) & ~uintptr_t(15);
  void** sp = reinterpret_cast<void**>(top);
  *--sp = nullptr;                                      // fake return address of fiber_entry
  *--sp = reinterpret_cast<void*>(&fiber_entry);         // where the first switch "returns" to
  for (int i = 0; i < 6; ++i) *--sp = nullptr;           // rbp rbx r12 r13 r14 r15
  f.sp = sp;
  f.done = false;
}

// GLA_EMU_ORDER=reverse runs the threads of a block last to first between barriers: a read that
// lacks a barrier after another thread's write sees stale data in one of the two orders.
bool reverse_order() {
  static const bool rev = [] {
    const char* e = std::getenv("GLA_EMU_ORDER");
    return e && std::strcmp(e, "reverse") == 0;
  }();
  return rev;
}

int block_threads() { return int(g_block_dim.x * g_block_dim.y * g_block_dim.z); }

}  // namespace

ThreadState* current() { return &g_fibers[g_current].state; }

void syncthreads() { arrive_and_wait(g_block_barrier, block_threads()); }

int syncthreads_or(int predicate) {
  g_block_barrier.or_accumulator |= (predicate != 0);
  arrive_and_wait(g_block_barrier, block_threads());
  return g_block_barrier.or_result;
}

void syncwarp() { arrive_and_wait(g_warps[g_current / 32].barrier, 32); }

const void* const* warp_exchange_begin(const void* mine) {
  WarpExchange& w = g_warps[g_current / 32];
  w.table[g_current & 31] = mine;
  arrive_and_wait(w.barrier, 32);
  return w.table;
}

void warp_exchange_end() { arrive_and_wait(g_warps[g_current / 32].barrier, 32); }

unsigned char* dynamic_smem() { return g_smem.data(); }

void launch(Dim3 grid, Dim3 block, size_t dynamic_smem_bytes, const std::function<void()>& body) {
  const int n = int(block.x * block.y * block.z);
  if (n <= 0 || n % 32 != 0 || n > 1024) {
    std::fprintf(stderr, "gla_emu: block of %d threads (must be a multiple of 32, at most 1024)\n", n);
    std::abort();
  }
  g_grid_dim = grid;
  g_block_dim = block;
  g_body = &body;
  g_fibers.resize(n);
  g_warps.assign(n / 32, WarpExchange{});
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        g_block_idx = Dim3{bx, by, bz};
        // shared memory starts as NaN bytes so that a read of something never written shows
        g_smem.assign(dynamic_smem_bytes + 16, 0xff);
        g_block_barrier = Barrier{};
        for (auto& w : g_warps) w.barrier = Barrier{};
        for (int i = 0; i < n; ++i) {
          Fiber& f = g_fibers[i];
          f.state.linear = i;
          f.state.tid = Dim3{unsigned(i) % block.x, (unsigned(i) / block.x) % block.y, unsigned(i) / (block.x * block.y)};
          prepare(f);
        }
        int alive = n;
        while (alive > 0) {
          const unsigned long long before = g_progress;
          for (int i = 0; i < n; ++i) {
            g_current = reverse_order() ? n - 1 - i : i;
            Fiber& f = g_fibers[g_current];
            if (f.done) continue;
            gla_emu_switch(&g_scheduler_sp, f.sp);
            if (f.done) --alive;
          }
          if (alive > 0 && g_progress == before) {
            std::fprintf(stderr, "gla_emu: deadlock in block (%u,%u,%u): threads wait at different barriers\n", bx, by,
                         bz);
            std::abort();
          }
        }
        g_current = -1;
      }
}

}  // namespace gla_emu
