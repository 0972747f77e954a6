// runtime.cpp: the CPU emulator's execution model (see kernels/emu/README.md).
//
// A launch runs on the calling OS thread. Blocks run one after another, in an order shuffled
// from the seed. The threads of a block are fibers with their own stacks; a fiber runs until
// it reaches a synchronisation point (__syncthreads, a warp collective, an atomic, exit) and
// then switches back to the block scheduler, which picks the next runnable fiber at random.
// Context switches are a few instructions of hand-written assembly on x86-64 (no syscall),
// ucontext elsewhere.
#include <pthread.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "cuda_emu.h"
#include "launch.h"

#if defined(__SANITIZE_ADDRESS__)
#define DFEMU_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define DFEMU_ASAN 1
#endif
#endif

#if DFEMU_ASAN
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

__thread const dfemu::ThreadInfo* dfemu_current __attribute__((tls_model("initial-exec"))) =
    nullptr;

namespace dfemu {
namespace {

// ---------------------------------------------------------------------------------------------
// Context switching
// ---------------------------------------------------------------------------------------------
#if defined(__x86_64__)
extern "C" void dfemu_ctx_switch(void** save_sp, void* new_sp);
extern "C" void dfemu_ctx_start();
// Saves the callee-saved registers, MXCSR and the x87 control word of the System V ABI on the
// current stack, stores the stack pointer in *save_sp, and resumes the context saved at new_sp.
asm(R"(
  .text
  .p2align 4
  .globl dfemu_ctx_switch
  .hidden dfemu_ctx_switch
  .type dfemu_ctx_switch,@function
dfemu_ctx_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size dfemu_ctx_switch,.-dfemu_ctx_switch

  .p2align 4
  .globl dfemu_ctx_start
  .hidden dfemu_ctx_start
  .type dfemu_ctx_start,@function
dfemu_ctx_start:
  movq %r12, %rdi
  callq *%r13
  ud2
  .size dfemu_ctx_start,.-dfemu_ctx_start
)");

struct Context {
  void* sp = nullptr;
};
inline void ctx_init(Context& c, char* lo, std::size_t size, void (*fn)(void*), void* arg) {
  std::uintptr_t top = (reinterpret_cast<std::uintptr_t>(lo) + size) & ~std::uintptr_t{15};
  std::uintptr_t x = top - 16;  // 16-aligned: rsp after `ret` into dfemu_ctx_start
  std::uint64_t* s = reinterpret_cast<std::uint64_t*>(x);
  s[-1] = reinterpret_cast<std::uint64_t>(&dfemu_ctx_start);  // return address
  s[-2] = 0;                                                   // rbp
  s[-3] = 0;                                                   // rbx
  s[-4] = reinterpret_cast<std::uint64_t>(arg);                // r12
  s[-5] = reinterpret_cast<std::uint64_t>(fn);                 // r13
  s[-6] = 0;                                                   // r14
  s[-7] = 0;                                                   // r15
  const std::uint32_t mxcsr = 0x1F80u;                         // all exceptions masked, RNE
  const std::uint16_t fpucw = 0x037Fu;
  std::memcpy(&s[-8], &mxcsr, 4);
  std::memcpy(reinterpret_cast<char*>(&s[-8]) + 4, &fpucw, 2);
  c.sp = &s[-8];
}
inline void ctx_switch(Context& from, Context& to) { dfemu_ctx_switch(&from.sp, to.sp); }
#else
struct Context {
  ucontext_t uc;
};
// makecontext passes int arguments: the function and its argument arrive as 32-bit halves.
void uc_start(unsigned int fh, unsigned int fl, unsigned int ah, unsigned int al) {
  auto fn = reinterpret_cast<void (*)(void*)>((static_cast<std::uintptr_t>(fh) << 32) | fl);
  fn(reinterpret_cast<void*>((static_cast<std::uintptr_t>(ah) << 32) | al));
  std::abort();
}
inline void ctx_init(Context& c, char* lo, std::size_t size, void (*fn)(void*), void* arg) {
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = lo;
  c.uc.uc_stack.ss_size = size;
  c.uc.uc_link = nullptr;
  const std::uintptr_t a = reinterpret_cast<std::uintptr_t>(arg);
  const std::uintptr_t f = reinterpret_cast<std::uintptr_t>(fn);
  makecontext(&c.uc, reinterpret_cast<void (*)()>(&uc_start), 4,
              static_cast<unsigned int>(f >> 32), static_cast<unsigned int>(f),
              static_cast<unsigned int>(a >> 32), static_cast<unsigned int>(a));
}
inline void ctx_switch(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }
#endif

// ---------------------------------------------------------------------------------------------
// State
// ---------------------------------------------------------------------------------------------
#if DFEMU_ASAN
constexpr std::size_t kStackSize = 1u << 20;
#else
constexpr std::size_t kStackSize = 256u << 10;
#endif
constexpr unsigned int kMaxThreads = 1024;
constexpr std::size_t kMaxStaticShared = 48u << 10;
constexpr std::size_t kMaxShared = 227u << 10;
constexpr std::size_t kDynAlign = 128;
constexpr std::size_t kRedzone = 64;
constexpr std::uint64_t kNoProgressLimit = 1ull << 23;

enum class State { Runnable, Barrier, Warp, Done };

struct Copy {
  void* dst;
  const void* src;
  unsigned int bytes, src_bytes;
  std::uint64_t group;
};

struct Fiber {
  ThreadInfo info{};
  Context ctx{};
  char* stack_lo = nullptr;
  State state = State::Done;
  // __syncthreads
  const char* bar_file = nullptr;
  int bar_line = 0;
  int bar_pred = 0;
  int bar_result = 0;
  // warp collective
  unsigned int mask = 0;
  CollectiveFn fn = nullptr;
  const char* op = nullptr;
  LaneIO io{};
  // cp.async
  std::vector<Copy> copies;
  std::uint64_t groups_committed = 0;
  // access recording: synchronisation points this thread has passed in its block (barriers
  // and warp collectives), and the call site of the collective it waits in
  std::uint32_t epoch = 0;
  const void* coll_pc = nullptr;
#if DFEMU_ASAN
  void* fake_stack = nullptr;
#endif
};

// Per warp: which lanes exist, have exited, wait in a collective (bit = lane).
struct WarpState {
  unsigned int exists = 0, exited = 0, waiting = 0;
};

struct StaticAlloc {
  const void* key;
  std::size_t offset, bytes;
  const char* name;
};

// The access record of one launch (dfemu_launch_recorded): global ranges to watch, sorted by
// start, and the accesses so far.
struct Recorder {
  std::vector<std::pair<std::uintptr_t, std::uintptr_t>> global;  // [lo, hi)
  std::vector<dfemu_access> accesses;
  std::uint32_t block_stride = 1;  // record blocks whose linear index % stride == 0
  bool block_on = false;           // the current block is recorded
  bool skip_others = false;        // blocks that are not recorded are not run either
  std::size_t limit = 0;           // stop (fail) past this many accesses; 0 = no limit
};

struct Launch {
  const dfemu_kernel* kernel = nullptr;
  void** args = nullptr;
  dim3 grid, block;
  unsigned int nthreads = 0;
  std::size_t dyn_bytes = 0;
  std::uint64_t rng = 0;
  Context sched{};
#if DFEMU_ASAN
  const void* sched_stack_bottom = nullptr;
  std::size_t sched_stack_size = 0;
  void* sched_fake_stack = nullptr;
#endif
  std::vector<Fiber*> runq;
  Fiber* fibers = nullptr;
  WarpState* warps = nullptr;
  Fiber* running = nullptr;
  // shared memory: [0, dyn) dynamic, then static allocations with redzones in between
  char* arena = nullptr;
  std::size_t arena_cap = 0;
  std::size_t static_base = 0, static_top = 0, static_bytes = 0;
  std::vector<StaticAlloc> statics;
  bool failed = false;
  std::string error;
  // access recording (null when off): see record() below
  Recorder* rec = nullptr;
  std::uint32_t block_linear = 0;
  std::uint32_t barriers = 0;  // __syncthreads completed by the current block
  bool rec_suppress = false;   // inside a collective's computation (reads other lanes' stacks)
  std::uint64_t ticks = 0;
  std::uint64_t idle_yields = 0;
};

// Per OS thread: the fibers (with their stacks) and the shared-memory arena are kept between
// launches; the launch in progress, if any.
struct ThreadPool {
  std::vector<char*> stacks;  // usable low end; a guard page lies below each
  char* arena = nullptr;
  std::size_t arena_cap = 0;
  ~ThreadPool() {
    const std::size_t page = static_cast<std::size_t>(getpagesize());
    for (char* lo : stacks) {
#if DFEMU_ASAN
      // Redzones of frames left on the stack stay in the shadow after munmap; a later mapping
      // at the same address (a file mapped by the symbolizer, say) would read as a stack.
      __asan_unpoison_memory_region(lo, kStackSize);
#endif
      munmap(lo - page, kStackSize + page);
    }
    std::free(arena);
  }
};
// Initial-exec TLS: one fs-relative access (the library is linked into executables only).
thread_local ThreadPool tl_pool;
__thread Launch* tl_launch __attribute__((tls_model("initial-exec"))) = nullptr;
__thread std::uint64_t tl_switches __attribute__((tls_model("initial-exec"))) = 0;

std::uint64_t next_rand(std::uint64_t& s) {  // splitmix64
  std::uint64_t z = (s += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}
std::uint64_t rand_below(std::uint64_t& s, std::uint64_t n) { return next_rand(s) % n; }

std::string vformat(const char* fmt, va_list ap) {
  char buf[1024];
  std::vsnprintf(buf, sizeof buf, fmt, ap);
  return buf;
}
std::string format(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
std::string format(const char* fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  std::string s = vformat(fmt, ap);
  va_end(ap);
  return s;
}

std::string where(const Launch& L, const Fiber& f) {
  return format("kernel %s, block (%u,%u,%u), thread (%u,%u,%u) (warp %u, lane %u)",
                L.kernel->name, f.info.block_idx.x, f.info.block_idx.y, f.info.block_idx.z,
                f.info.thread_idx.x, f.info.thread_idx.y, f.info.thread_idx.z, f.info.warp,
                f.info.lane);
}

// ---------------------------------------------------------------------------------------------
// Fibers and scheduling
// ---------------------------------------------------------------------------------------------
// Removes and returns a random runnable fiber: the order of threads between barriers follows
// the seed.
Fiber* pick_runnable(Launch& L) {
  const std::size_t k = rand_below(L.rng, L.runq.size());
  Fiber* f = L.runq[k];
  L.runq[k] = L.runq.back();
  L.runq.pop_back();
  return f;
}

// Leaves fiber `f` (its new state already recorded): switches straight to the next runnable
// fiber, or to the block scheduler when none is runnable or the launch failed. Returns when
// `f` is resumed. Fiber-to-fiber switches halve the switches of a scheduler round trip.
void switch_away(Launch& L, Fiber& f) {
  Fiber* g = nullptr;
  if (!L.failed && !L.runq.empty()) {
    g = pick_runnable(L);
    if (g == &f) return;  // f itself was runnable and drawn: keep running
  }
  ++tl_switches;
  Context* to = &L.sched;
#if DFEMU_ASAN
  const void* bottom = L.sched_stack_bottom;
  std::size_t size = L.sched_stack_size;
#endif
  if (g) {
    L.running = g;
    dfemu_current = &g->info;
    to = &g->ctx;
#if DFEMU_ASAN
    bottom = g->stack_lo;
    size = kStackSize;
#endif
  } else {
    L.running = nullptr;
    dfemu_current = nullptr;
  }
#if DFEMU_ASAN
  __sanitizer_start_switch_fiber(f.state == State::Done ? nullptr : &f.fake_stack, bottom, size);
#endif
  ctx_switch(f.ctx, *to);
#if DFEMU_ASAN
  __sanitizer_finish_switch_fiber(f.fake_stack, nullptr, nullptr);
#endif
}

// From the scheduler into fiber `f`; returns when some fiber switches back to the scheduler.
void switch_to_fiber(Launch& L, Fiber& f) {
  ++tl_switches;
  L.running = &f;
  dfemu_current = &f.info;
#if DFEMU_ASAN
  __sanitizer_start_switch_fiber(&L.sched_fake_stack, f.stack_lo, kStackSize);
#endif
  ctx_switch(L.sched, f.ctx);
#if DFEMU_ASAN
  __sanitizer_finish_switch_fiber(L.sched_fake_stack, nullptr, nullptr);
#endif
  L.running = nullptr;
  dfemu_current = nullptr;
}

void push_runnable(Launch& L, Fiber* f) {
  f->state = State::Runnable;
  L.runq.push_back(f);
}

// Fails the launch from fiber context: records the message and never returns to the fiber.
[[noreturn]] void fail_from_fiber(Launch& L, Fiber& f, const std::string& what) {
  if (!L.failed) {
    L.failed = true;
    L.error = what;
  }
  f.state = State::Done;
  switch_away(L, f);
  std::abort();  // the scheduler never resumes a fiber of a failed launch
}

void perform_copies(Fiber& f, std::uint64_t below_group, bool all) {
  std::size_t kept = 0;
  for (std::size_t i = 0; i < f.copies.size(); ++i) {
    Copy& c = f.copies[i];
    if (all || c.group < below_group) {
      if (c.src_bytes) std::memcpy(c.dst, c.src, c.src_bytes);
      if (c.bytes > c.src_bytes)
        std::memset(static_cast<char*>(c.dst) + c.src_bytes, 0, c.bytes - c.src_bytes);
    } else {
      f.copies[kept++] = c;
    }
  }
  f.copies.resize(kept);
}

void fiber_main(void* arg) {
  Fiber& f = *static_cast<Fiber*>(arg);
  Launch& L = *tl_launch;
#if DFEMU_ASAN
  __sanitizer_finish_switch_fiber(nullptr, nullptr, nullptr);
#endif
  (void)f;
  L.kernel->entry(L.args);
  perform_copies(f, 0, true);  // the hardware completes outstanding cp.async copies
  f.state = State::Done;
  WarpState& ws = L.warps[f.info.warp];
  ws.exited |= 1u << f.info.lane;
  // A lane exiting while others of its warp wait for it in a collective is a missing lane.
  const unsigned int base = f.info.warp * 32;
  for (unsigned int l = 0; l < 32 && base + l < L.nthreads; ++l) {
    if (!((ws.waiting >> l) & 1u)) continue;
    Fiber& o = L.fibers[base + l];
    if ((o.mask >> f.info.lane) & 1u)
      fail_from_fiber(L, f,
                      format("missing warp lane: %s exited while lane %u waits for it in %s "
                             "(mask 0x%08x)",
                             where(L, f).c_str(), l, o.op, o.mask));
  }
  switch_away(L, f);
  std::abort();  // a finished fiber is never resumed
}

void fill_shared(Launch& L) {
  // NaN in every float format (0xFF.. is a quiet NaN in f32, f16 and bf16): reading shared
  // memory that no thread of this block wrote shows up in the results.
  if (L.dyn_bytes) std::memset(L.arena, 0xFF, L.dyn_bytes);
  for (const StaticAlloc& a : L.statics) std::memset(L.arena + a.offset, 0xFF, a.bytes);
}

std::string describe_wait(const Launch& L, const Fiber& f) {
  switch (f.state) {
    case State::Done:
      return "has exited";
    case State::Barrier:
      return format("waits at __syncthreads() %s:%d", f.bar_file, f.bar_line);
    case State::Warp:
      return format("waits in %s (mask 0x%08x)", f.op, f.mask);
    case State::Runnable:
      break;
  }
  (void)L;
  return "is runnable";
}

// Called when no fiber is runnable: releases a complete barrier, or fails the launch.
bool resolve_idle(Launch& L) {
  Fiber* first_bar = nullptr;
  Fiber* first_warp = nullptr;
  Fiber* first_done = nullptr;
  unsigned int done = 0;
  for (unsigned int i = 0; i < L.nthreads; ++i) {
    Fiber& f = L.fibers[i];
    if (f.state == State::Done) {
      ++done;
      if (!first_done) first_done = &f;
    } else if (f.state == State::Barrier) {
      if (!first_bar) first_bar = &f;
    } else if (f.state == State::Warp) {
      if (!first_warp) first_warp = &f;
    }
  }
  if (done == L.nthreads) return false;  // block finished
  if (first_warp) {
    Fiber& w = *first_warp;
    const unsigned int base = w.info.warp * 32;
    for (unsigned int l = 0; l < 32; ++l) {
      if (!((w.mask >> l) & 1u)) continue;
      Fiber& o = L.fibers[base + l];
      if (o.state == State::Warp && o.mask == w.mask && o.fn == w.fn) continue;
      L.failed = true;
      L.error = format("deadlock: %s waits in %s (mask 0x%08x) for lane %u, which %s",
                       where(L, w).c_str(), w.op, w.mask, l, describe_wait(L, o).c_str());
      return false;
    }
    L.failed = true;
    L.error = format("deadlock: %s waits in %s (mask 0x%08x)", where(L, w).c_str(), w.op, w.mask);
    return false;
  }
  // Every live fiber waits at a barrier.
  if (first_done) {
    L.failed = true;
    L.error = format(
        "barrier divergence: %s exited without reaching the __syncthreads() at %s:%d where %u "
        "other threads wait",
        where(L, *first_done).c_str(), first_bar->bar_file, first_bar->bar_line,
        L.nthreads - done);
    return false;
  }
  int count = 0;
  for (unsigned int i = 0; i < L.nthreads; ++i) {
    Fiber& f = L.fibers[i];
    if (f.bar_line != first_bar->bar_line ||
        (f.bar_file != first_bar->bar_file && std::strcmp(f.bar_file, first_bar->bar_file))) {
      L.failed = true;
      L.error = format(
          "barrier divergence: %s waits at __syncthreads() %s:%d while thread (%u,%u,%u) waits "
          "at %s:%d",
          where(L, f).c_str(), f.bar_file, f.bar_line, first_bar->info.thread_idx.x,
          first_bar->info.thread_idx.y, first_bar->info.thread_idx.z, first_bar->bar_file,
          first_bar->bar_line);
      return false;
    }
    count += f.bar_pred != 0;
  }
  for (unsigned int i = 0; i < L.nthreads; ++i) {
    L.fibers[i].bar_result = count;
    ++L.fibers[i].epoch;
    push_runnable(L, &L.fibers[i]);
  }
  ++L.barriers;
  L.idle_yields = 0;
  return true;
}

void run_block(Launch& L, unsigned int bx, unsigned int by, unsigned int bz) {
  fill_shared(L);
  L.block_linear = bx + L.grid.x * (by + L.grid.y * bz);
  L.barriers = 0;
  if (L.rec) L.rec->block_on = L.block_linear % L.rec->block_stride == 0;
  L.runq.clear();
  for (unsigned int w = 0; w < (L.nthreads + 31) / 32; ++w) {
    const unsigned int n = std::min(32u, L.nthreads - w * 32);
    L.warps[w] = WarpState{n == 32 ? 0xFFFFFFFFu : ((1u << n) - 1u), 0, 0};
  }
  for (unsigned int i = 0; i < L.nthreads; ++i) {
    Fiber& f = L.fibers[i];
    const unsigned int x = i % L.block.x, y = (i / L.block.x) % L.block.y,
                       z = i / (L.block.x * L.block.y);
    f.info.thread_idx = uint3{x, y, z};
    f.info.block_idx = uint3{bx, by, bz};
    f.info.block_dim = L.block;
    f.info.grid_dim = L.grid;
    f.info.linear = i;
    f.info.lane = i % 32;
    f.info.warp = i / 32;
    f.copies.clear();
    f.groups_committed = 0;
    f.epoch = 0;
#if DFEMU_ASAN
    // Frames abandoned by an earlier failed launch may have left their redzones poisoned.
    __asan_unpoison_memory_region(f.stack_lo, kStackSize);
    f.fake_stack = nullptr;
#endif
    ctx_init(f.ctx, f.stack_lo, kStackSize, &fiber_main, &f);
    push_runnable(L, &f);
  }
  for (;;) {
    if (L.failed) return;
    if (L.runq.empty()) {
      if (!resolve_idle(L)) return;
      continue;
    }
    switch_to_fiber(L, *pick_runnable(L));
  }
}

// Appends one access of fiber `f` to the launch's record when `p` lies in the block's shared
// memory or in a watched global range; anything else (stacks, the emulator's own state) is
// not device memory and is ignored.
void record_for(Launch& L, const Fiber& f, const void* p, std::size_t n, std::uint32_t flags,
                const void* pc) {
  Recorder& R = *L.rec;
  const std::uintptr_t a = reinterpret_cast<std::uintptr_t>(p);
  const std::uintptr_t arena = reinterpret_cast<std::uintptr_t>(L.arena);
  if (a >= arena && a < arena + L.arena_cap) {
    flags |= DFEMU_ACCESS_SHARED;
  } else {
    auto it = std::upper_bound(
        R.global.begin(), R.global.end(), a,
        [](std::uintptr_t x, const std::pair<std::uintptr_t, std::uintptr_t>& r) {
          return x < r.first;
        });
    if (it == R.global.begin()) return;
    --it;
    if (a >= it->second) return;
  }
  if (R.limit && R.accesses.size() >= R.limit) {
    if (!L.failed) {
      L.failed = true;
      L.error = format("kernel %s: the access record exceeds %zu accesses (record a smaller "
                       "shape or fewer blocks)",
                       L.kernel->name, R.limit);
    }
    return;
  }
  R.accesses.push_back(dfemu_access{a, reinterpret_cast<std::uint64_t>(pc),
                                    static_cast<std::uint32_t>(n), L.block_linear,
                                    f.info.linear, L.barriers, f.epoch, flags});
}

Fiber& current_fiber(const char* what) {
  Launch* L = tl_launch;
  if (!L || !L->running) {
    std::fprintf(stderr, "dorafuse emulator: %s called outside a kernel launch\n", what);
    std::abort();
  }
  return *L->running;
}

void ensure_stacks(unsigned int n) {
  ThreadPool& p = tl_pool;
  const std::size_t page = static_cast<std::size_t>(getpagesize());
  while (p.stacks.size() < n) {
    void* m = mmap(nullptr, kStackSize + page, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (m == MAP_FAILED) {
      std::fprintf(stderr, "dorafuse emulator: cannot map a fiber stack\n");
      std::abort();
    }
    mprotect(m, page, PROT_NONE);  // guard page: a stack overflow faults instead of corrupting
    p.stacks.push_back(static_cast<char*>(m) + page);
  }
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Interface used by kernel code (cuda_emu.h)
// ---------------------------------------------------------------------------------------------
void fault(const char* fmt, ...) {
  Fiber& f = current_fiber("fault");
  va_list ap;
  va_start(ap, fmt);
  std::string msg = vformat(fmt, ap);
  va_end(ap);
  fail_from_fiber(*tl_launch, f, msg + " (" + where(*tl_launch, f) + ")");
}

void fault_lane(unsigned int lane, const char* fmt, ...) {
  Fiber& f = current_fiber("fault_lane");
  Launch& L = *tl_launch;
  va_list ap;
  va_start(ap, fmt);
  std::string msg = vformat(fmt, ap);
  va_end(ap);
  const unsigned int t = f.info.warp * 32 + lane;
  const Fiber& culprit = t < L.nthreads ? L.fibers[t] : f;
  fail_from_fiber(L, f, msg + " (" + where(L, culprit) + ")");
}

int block_barrier(int kind, int pred, const char* file, int line) {
  Fiber& f = current_fiber("__syncthreads");
  Launch& L = *tl_launch;
  f.state = State::Barrier;
  f.bar_file = file;
  f.bar_line = line;
  f.bar_pred = pred;
  switch_away(L, f);
  const int count = f.bar_result;
  switch (kind) {
    case 1:
      return count;
    case 2:
      return count == static_cast<int>(L.nthreads);
    case 3:
      return count != 0;
    default:
      return 0;
  }
}

void warp_collective(unsigned int mask, CollectiveFn fn, const char* name, const void* in,
                     void* out) {
  Fiber& f = current_fiber(name);
  Launch& L = *tl_launch;
  const unsigned int lane = f.info.lane, base = f.info.warp * 32;
  if (!((mask >> lane) & 1u))
    fail_from_fiber(L, f,
                    format("%s: mask 0x%08x does not include the calling lane %u (%s)", name,
                           mask, lane, where(L, f).c_str()));
  WarpState& ws = L.warps[f.info.warp];
  if (mask & ~ws.exists) {
    const unsigned int l = static_cast<unsigned int>(__builtin_ctz(mask & ~ws.exists));
    fail_from_fiber(L, f,
                    format("missing warp lane: %s names lane %u in mask 0x%08x, but the block "
                           "has only %u threads (%s)",
                           name, l, mask, L.nthreads, where(L, f).c_str()));
  }
  if (mask & ws.exited) {
    const unsigned int l = static_cast<unsigned int>(__builtin_ctz(mask & ws.exited));
    fail_from_fiber(L, f,
                    format("missing warp lane: %s (mask 0x%08x) waits for lane %u, which has "
                           "exited (%s)",
                           name, mask, l, where(L, f).c_str()));
  }
  // Lanes of the same mask already waiting must be in the same operation.
  const unsigned int others = ws.waiting & mask;
  if (others) {
    const Fiber& o = L.fibers[base + static_cast<unsigned int>(__builtin_ctz(others))];
    if (o.mask == mask && o.fn != fn)
      fail_from_fiber(L, f,
                      format("warp divergence: lanes of mask 0x%08x are in different warp "
                             "operations: lane %u in %s, lane %u in %s (%s)",
                             mask, lane, name, o.info.lane, o.op, where(L, f).c_str()));
  }
  f.state = State::Warp;
  f.mask = mask;
  f.fn = fn;
  f.op = name;
  f.io = LaneIO{in, out};
  f.coll_pc = __builtin_return_address(0);
  ws.waiting |= 1u << lane;
  if ((ws.waiting & mask) == mask) {
    bool complete = true;
    for (unsigned int l = 0; l < 32 && complete; ++l)
      if ((mask >> l) & 1u) {
        const Fiber& o = L.fibers[base + l];
        complete = o.mask == mask && o.fn == fn;
      }
    if (complete) {
      LaneIO lanes[32] = {};
      for (unsigned int l = 0; l < 32; ++l)
        if ((mask >> l) & 1u) lanes[l] = L.fibers[base + l].io;
      // ldmatrix reads one 16-byte row per lane of lanes 0..8·x-1: recorded as each lane's
      // own shared-memory read (the collective itself reads other lanes' stacks, unrecorded).
      if (L.rec && L.rec->block_on && std::strncmp(name, "ldmatrix.x", 10) == 0) {
        const unsigned int rows = 8u * static_cast<unsigned int>(name[10] - '0');
        for (unsigned int l = 0; l < rows && l < 32; ++l) {
          const Fiber& o = L.fibers[base + l];
          record_for(L, o, *static_cast<const void* const*>(o.io.in), 16, 0, o.coll_pc);
        }
      }
      L.rec_suppress = true;
      fn(mask, lanes);
      L.rec_suppress = false;
      ws.waiting &= ~mask;
      for (unsigned int l = 0; l < 32; ++l)
        if ((mask >> l) & 1u) {
          ++L.fibers[base + l].epoch;
          push_runnable(L, &L.fibers[base + l]);
        }
      L.idle_yields = 0;
    }
  }
  switch_away(L, f);
}

void yield_point() {
  Fiber& f = current_fiber("yield_point");
  Launch& L = *tl_launch;
  if (++L.idle_yields > kNoProgressLimit)
    fail_from_fiber(L, f,
                    format("no progress: %llu scheduling points without a barrier or warp "
                           "operation completing (a spin loop waiting for another thread?) (%s)",
                           static_cast<unsigned long long>(L.idle_yields), where(L, f).c_str()));
  if (next_rand(L.rng) & 1u) {
    push_runnable(L, &f);
    switch_away(L, f);
  }
}

unsigned int active_mask() {
  Fiber& f = current_fiber("__activemask");
  Launch& L = *tl_launch;
  unsigned int m = 0;
  const unsigned int base = f.info.warp * 32;
  for (unsigned int l = 0; l < 32 && base + l < L.nthreads; ++l)
    if (L.fibers[base + l].state != State::Done) m |= 1u << l;
  return m;
}

void* shared_static_alloc(const void* key, std::size_t bytes, std::size_t align,
                          const char* name) {
  Fiber& f = current_fiber("__shared__");
  Launch& L = *tl_launch;
  for (const StaticAlloc& a : L.statics)
    if (a.key == key) return L.arena + a.offset;
  if (align < 16) align = 16;
  const std::size_t off = (L.static_top + align - 1) / align * align;
  if (L.static_bytes + bytes > kMaxStaticShared)
    fail_from_fiber(L, f,
                    format("__shared__ %s (%zu bytes) takes the block's static shared memory "
                           "past 48 KiB (%s)",
                           name, bytes, where(L, f).c_str()));
  if (off + bytes + kRedzone > L.arena_cap || L.static_bytes + bytes + L.dyn_bytes > kMaxShared)
    fail_from_fiber(L, f,
                    format("__shared__ %s (%zu bytes): static plus dynamic shared memory exceeds "
                           "227 KiB (%s)",
                           name, bytes, where(L, f).c_str()));
  L.statics.push_back(StaticAlloc{key, off, bytes, name});
  L.static_top = off + bytes + kRedzone;
  L.static_bytes += bytes;
#if DFEMU_ASAN
  __asan_unpoison_memory_region(L.arena + off, bytes);
#endif
  std::memset(L.arena + off, 0xFF, bytes);
  return L.arena + off;
}

bool in_shared(const void* p, std::size_t bytes) {
  const Launch& L = *tl_launch;
  const char* c = static_cast<const char*>(p);
  if (c >= L.arena && c + bytes <= L.arena + L.dyn_bytes) return true;
  for (const StaticAlloc& a : L.statics)
    if (c >= L.arena + a.offset && c + bytes <= L.arena + a.offset + a.bytes) return true;
  return false;
}

void* shared_dynamic_base(const char* name) {
  (void)current_fiber(name);
  return tl_launch->arena;
}

void cp_async(void* dst, const void* src, unsigned int bytes, unsigned int src_bytes) {
  Fiber& f = current_fiber("cp.async");
  if (reinterpret_cast<std::uintptr_t>(dst) % bytes || reinterpret_cast<std::uintptr_t>(src) % bytes)
    fault("cp.async of %u bytes with a misaligned address (dst %p, src %p)", bytes, dst, src);
  if (!in_shared(dst, bytes))
    fault("cp.async of %u bytes to %p, which is not in this block's shared memory", bytes, dst);
  Launch& L = *tl_launch;
  if (L.rec && L.rec->block_on) {
    // Recorded when issued: the global read, and the shared write the wait performs.
    const void* pc = __builtin_return_address(0);
    if (src_bytes) record_for(L, f, src, src_bytes, 0, pc);
    record_for(L, f, dst, bytes, DFEMU_ACCESS_WRITE, pc);
  }
  f.copies.push_back(Copy{dst, src, bytes, src_bytes, f.groups_committed});
}

void cp_async_commit() {
  Fiber& f = current_fiber("cp.async.commit_group");
  ++f.groups_committed;
}

void cp_async_wait(int pending_groups_allowed) {
  Fiber& f = current_fiber("cp.async.wait_group");
  if (pending_groups_allowed < 0) {
    perform_copies(f, 0, true);
    return;
  }
  const std::uint64_t n = static_cast<std::uint64_t>(pending_groups_allowed);
  if (f.groups_committed > n) perform_copies(f, f.groups_committed - n, false);
}

long long clock_tick() {
  (void)current_fiber("clock");
  return static_cast<long long>(++tl_launch->ticks);
}

}  // namespace dfemu

// ---------------------------------------------------------------------------------------------
// C ABI
// ---------------------------------------------------------------------------------------------
extern "C" std::uint64_t dfemu_switch_count(void) { return dfemu::tl_switches; }

namespace dfemu {
namespace {
thread_local Recorder tl_rec;
__thread std::size_t tl_last_static_shared = 0;

int launch(const dfemu_kernel* k, const unsigned int grid[3], const unsigned int block[3],
           unsigned int shared_bytes, void** args, std::uint64_t seed, Recorder* rec, char* err,
           std::size_t err_cap) {
  auto fail = [&](const std::string& msg) {
    if (err_cap) {
      std::snprintf(err, err_cap, "%s", msg.c_str());
    }
    return 1;
  };
  if (tl_launch) return fail(std::string("kernel ") + k->name + ": launched from inside a kernel");
  const unsigned long long nthreads =
      static_cast<unsigned long long>(block[0]) * block[1] * block[2];
  const unsigned long long nblocks = static_cast<unsigned long long>(grid[0]) * grid[1] * grid[2];
  if (nthreads == 0 || nthreads > kMaxThreads || block[2] > 64)
    return fail(format("kernel %s: invalid block (%u,%u,%u): 1..1024 threads, z <= 64", k->name,
                       block[0], block[1], block[2]));
  if (nblocks == 0 || grid[1] > 65535 || grid[2] > 65535)
    return fail(format("kernel %s: invalid grid (%u,%u,%u)", k->name, grid[0], grid[1], grid[2]));
  if (nblocks > (1ull << 26))
    return fail(format("kernel %s: grid (%u,%u,%u) has more blocks than the emulator runs "
                       "(2^26)",
                       k->name, grid[0], grid[1], grid[2]));
  if (shared_bytes > kMaxShared)
    return fail(format("kernel %s: %u bytes of dynamic shared memory exceed 227 KiB", k->name,
                       shared_bytes));

  Launch L;
  L.kernel = k;
  L.args = args;
  L.grid = dim3(grid[0], grid[1], grid[2]);
  L.block = dim3(block[0], block[1], block[2]);
  L.nthreads = static_cast<unsigned int>(nthreads);
  L.dyn_bytes = shared_bytes;
  L.rng = seed ^ 0x6A09E667F3BCC909ull;
  L.rec = rec;
  for (const char* c = k->name; *c; ++c) L.rng = (L.rng ^ static_cast<unsigned char>(*c)) * 0x100000001B3ull;

  // Shared-memory arena: dynamic part, a gap, then up to 48 KiB of static variables with
  // redzones; reused between launches of this OS thread.
  const std::size_t dyn_aligned = (L.dyn_bytes + kDynAlign - 1) / kDynAlign * kDynAlign;
  const std::size_t cap = dyn_aligned + kRedzone + kMaxStaticShared + 64 * kRedzone + 4096;
  ThreadPool& pool = tl_pool;
  if (pool.arena_cap < cap) {
    std::free(pool.arena);
    pool.arena_cap = (cap + 4095) / 4096 * 4096;
    pool.arena = static_cast<char*>(std::aligned_alloc(4096, pool.arena_cap));
  }
  L.arena = pool.arena;
  L.arena_cap = pool.arena_cap;
  L.static_base = L.static_top = dyn_aligned + kRedzone;
#if DFEMU_ASAN
  // Only the dynamic part and the static variables (as they are declared) are addressable:
  // shared-memory accesses out of bounds of them fail under AddressSanitizer.
  __asan_poison_memory_region(L.arena, L.arena_cap);
  __asan_unpoison_memory_region(L.arena, L.dyn_bytes);
#endif

  // The fibers of this launch by linear thread index, on the pool's stacks.
  ensure_stacks(L.nthreads);
  std::vector<Fiber> fibers(L.nthreads);
  for (unsigned int i = 0; i < L.nthreads; ++i) fibers[i].stack_lo = pool.stacks[i];
  L.fibers = fibers.data();
#if DFEMU_ASAN
  {
    // The scheduler runs on this OS thread's stack; fibers switching back to it tell ASan so.
    pthread_attr_t attr;
    void* addr = nullptr;
    std::size_t size = 0;
    if (pthread_getattr_np(pthread_self(), &attr) == 0) {
      pthread_attr_getstack(&attr, &addr, &size);
      pthread_attr_destroy(&attr);
    }
    L.sched_stack_bottom = addr;
    L.sched_stack_size = size;
  }
#endif
  std::vector<WarpState> warps((L.nthreads + 31) / 32);
  L.warps = warps.data();
  tl_launch = &L;

  // Blocks in an order shuffled from the seed (a kernel that depends on block order fails).
  std::vector<std::uint32_t> order(nblocks);
  for (std::uint32_t i = 0; i < nblocks; ++i) order[i] = i;
  for (std::size_t i = order.size(); i > 1; --i)
    std::swap(order[i - 1], order[rand_below(L.rng, i)]);
  for (std::uint32_t b : order) {
    if (rec && rec->skip_others && rec->block_stride > 1 && b % rec->block_stride != 0) continue;
    const unsigned int bx = b % grid[0], by = (b / grid[0]) % grid[1],
                       bz = b / (grid[0] * grid[1]);
    run_block(L, bx, by, bz);
    if (L.failed) break;
  }
  tl_launch = nullptr;
  dfemu_current = nullptr;
  tl_last_static_shared = L.static_bytes;
#if DFEMU_ASAN
  __asan_unpoison_memory_region(L.arena, L.arena_cap);
#endif
  if (L.failed) return fail(L.error);
  return 0;
}
}  // namespace
}  // namespace dfemu

extern "C" int dfemu_launch(const dfemu_kernel* k, const unsigned int grid[3],
                            const unsigned int block[3], unsigned int shared_bytes, void** args,
                            std::uint64_t seed, char* err, std::size_t err_cap) {
  return dfemu::launch(k, grid, block, shared_bytes, args, seed, nullptr, err, err_cap);
}

extern "C" int dfemu_launch_recorded(const dfemu_kernel* k, const unsigned int grid[3],
                                     const unsigned int block[3], unsigned int shared_bytes,
                                     void** args, std::uint64_t seed, const std::uint64_t* ranges,
                                     std::size_t nranges, std::uint32_t block_stride,
                                     int skip_others, std::size_t limit, char* err,
                                     std::size_t err_cap) {
  dfemu::Recorder& R = dfemu::tl_rec;
  R.accesses.clear();
  R.global.clear();
  for (std::size_t i = 0; i < nranges; ++i)
    R.global.emplace_back(static_cast<std::uintptr_t>(ranges[2 * i]),
                          static_cast<std::uintptr_t>(ranges[2 * i + 1]));
  std::sort(R.global.begin(), R.global.end());
  R.block_stride = block_stride ? block_stride : 1;
  R.block_on = false;
  R.skip_others = skip_others != 0;
  R.limit = limit;
  return dfemu::launch(k, grid, block, shared_bytes, args, seed, &R, err, err_cap);
}

extern "C" const dfemu_access* dfemu_recorded(std::size_t* n) {
  *n = dfemu::tl_rec.accesses.size();
  return dfemu::tl_rec.accesses.data();
}

extern "C" std::size_t dfemu_last_static_shared(void) { return dfemu::tl_last_static_shared; }

// ---------------------------------------------------------------------------------------------
// Access hooks. The kernels' recording build (build/emu.rs) is compiled with
// -fsanitize=thread, which makes the compiler call __tsan_readN / __tsan_writeN (and the
// range and unaligned forms) before every memory access it cannot prove thread-private; this
// runtime, not ThreadSanitizer's, implements them. The return address is the access's site.
// ---------------------------------------------------------------------------------------------
namespace {
inline void hook(const void* p, std::size_t n, std::uint32_t flags, const void* pc) {
  dfemu::Launch* L = dfemu::tl_launch;
  if (!L || !L->rec || !L->rec->block_on || L->rec_suppress || !L->running) return;
  dfemu::record_for(*L, *L->running, p, n, flags, pc);
}
}  // namespace

extern "C" {
#define DFEMU_HOOKS(N)                                                                        \
  void __tsan_read##N(void* p) { hook(p, N, 0, __builtin_return_address(0)); }                \
  void __tsan_write##N(void* p) {                                                             \
    hook(p, N, DFEMU_ACCESS_WRITE, __builtin_return_address(0));                              \
  }                                                                                           \
  void __tsan_unaligned_read##N(void* p) { hook(p, N, 0, __builtin_return_address(0)); }      \
  void __tsan_unaligned_write##N(void* p) {                                                   \
    hook(p, N, DFEMU_ACCESS_WRITE, __builtin_return_address(0));                              \
  }                                                                                           \
  void __tsan_volatile_read##N(void* p) { hook(p, N, 0, __builtin_return_address(0)); }       \
  void __tsan_volatile_write##N(void* p) {                                                    \
    hook(p, N, DFEMU_ACCESS_WRITE, __builtin_return_address(0));                              \
  }
DFEMU_HOOKS(1)
DFEMU_HOOKS(2)
DFEMU_HOOKS(4)
DFEMU_HOOKS(8)
DFEMU_HOOKS(16)
#undef DFEMU_HOOKS
void __tsan_read_range(void* p, std::size_t n) { hook(p, n, 0, __builtin_return_address(0)); }
void __tsan_write_range(void* p, std::size_t n) {
  hook(p, n, DFEMU_ACCESS_WRITE, __builtin_return_address(0));
}
void __tsan_init(void) {}
void __tsan_func_entry(void*) {}
void __tsan_func_exit(void) {}
// An atomic read-modify-write (cuda_emu.h's atomics in the recording build).
void dfemu_record_atomic(const void* p, std::size_t n) {
  hook(p, n, DFEMU_ACCESS_WRITE | DFEMU_ACCESS_ATOMIC, __builtin_return_address(0));
}
}
