// A host-side emulator of the CUDA features the kernel headers in csrc/cuda use, so their logic
// runs (slowly) without a GPU: tests/cuda/test_sinkhorn_emulated.py compiles a kernel header
// with g++ against this file and the shim headers next to it.
//
// A launch runs its blocks one after another. Each CUDA thread of a block is a coroutine
// (ucontext) that runs until it reaches __syncthreads() or a warp collective (__shfl_xor_sync,
// __ballot_sync, __any_sync); a barrier releases when every thread of the block waits at one, a
// collective when all 32 lanes of its warp wait at one. The order threads are resumed in is
// random (seeded; see run_block), so shared memory read without the barrier it needs sees stale
// or poisoned data in some orders.
// Detected and reported (launch() returns the message): a barrier that some threads never
// reach, a collective that not all lanes of a warp reach (or that they reach with different
// operations), a partial mask. Dynamic shared memory is exactly as large as the launch asks,
// filled with 0xff bytes (NaN floats, -1 ints) at block start, and followed by an inaccessible
// page, so reading uninitialized shared memory shows up as NaN and overrunning it faults.
//
// Not emulated: the numerics of the fast-math intrinsics (__expf is expf here), memory
// ordering between blocks, atomics, warp-synchronous code without *_sync collectives.
#pragma once
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
};

using std::isfinite;

// ---- float16 / bfloat16 (cuda_fp16.h / cuda_bf16.h) -------------------------------------------------
struct __half {
  _Float16 h;
};
struct __nv_bfloat16 {
  uint16_t bits;
};
inline float __half2float(__half x) { return float(x.h); }
inline __half __float2half_rn(float x) { return __half{_Float16(x)}; }  // IEEE round to nearest even
inline float __bfloat162float(__nv_bfloat16 x) {
  uint32_t u = uint32_t(x.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline __nv_bfloat16 __float2bfloat16_rn(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  if (std::isnan(x)) return __nv_bfloat16{uint16_t(0x7fc0)};
  u += 0x7fffu + ((u >> 16) & 1u);
  return __nv_bfloat16{uint16_t(u >> 16)};
}

// ---- math intrinsics ----------------------------------------------------------------------------
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __int_as_float(int x) {
  float f;
  std::memcpy(&f, &x, 4);
  return f;
}
inline int __popc(unsigned x) { return __builtin_popcount(x); }

namespace emu {

enum class State { kRun, kBarrier, kWarp, kDone };
enum class Op { kNone, kShflXor, kBallot, kAny };

struct Thread {
  ucontext_t ctx;
  State state = State::kRun;
  dim3 idx;
  std::vector<char> stack;
  Op op = Op::kNone;
  int arg = 0;
  uint64_t val = 0, result = 0;
};

struct Emu {
  std::vector<Thread> threads;
  Thread* cur = nullptr;
  ucontext_t main;
  dim3 block_idx, block_dim, grid_dim;
  unsigned char* smem = nullptr;
  std::string error;
  std::function<void()> body;
  std::mt19937 rng{12345};
};

inline Emu& E() {
  static Emu e;
  return e;
}

inline void yield_to_scheduler() { swapcontext(&E().cur->ctx, &E().main); }

inline void fail(const std::string& msg) {
  if (E().error.empty()) E().error = msg;
  E().cur->state = State::kDone;
  yield_to_scheduler();  // never resumed
}

template <typename V>
inline V collective(Op op, unsigned mask, V v, int arg) {
  if (mask != 0xffffffffu) fail("warp collective with a partial mask");
  Thread* t = E().cur;
  static_assert(sizeof(V) <= 8, "collective value too wide");
  t->val = 0;
  std::memcpy(&t->val, &v, sizeof(V));
  t->op = op;
  t->arg = arg;
  t->state = State::kWarp;
  yield_to_scheduler();
  V r;
  std::memcpy(&r, &t->result, sizeof(V));
  return r;
}

// All 32 lanes of warp w wait at a collective: compute the results, let them run.
inline bool resolve_warp(int w) {
  Thread* lanes = &E().threads[size_t(w) * 32];
  for (int l = 0; l < 32; ++l)
    if (lanes[l].state != State::kWarp) return false;
  for (int l = 1; l < 32; ++l)
    if (lanes[l].op != lanes[0].op || lanes[l].arg != lanes[0].arg) {
      E().error = "warp " + std::to_string(w) + ": lanes reach different collectives";
      return false;
    }
  uint64_t ballot = 0;
  for (int l = 0; l < 32; ++l) ballot |= uint64_t(lanes[l].val != 0) << l;
  for (int l = 0; l < 32; ++l) {
    switch (lanes[0].op) {
      case Op::kShflXor: lanes[l].result = lanes[(l ^ lanes[0].arg) & 31].val; break;
      case Op::kBallot: lanes[l].result = ballot; break;
      case Op::kAny: lanes[l].result = ballot != 0; break;
      default: break;
    }
    lanes[l].state = State::kRun;
  }
  return true;
}

inline void trampoline() {
  E().body();
  E().cur->state = State::kDone;
  // returning switches to uc_link (the scheduler)
}

// Runs one block to completion; false (with E().error) on a detected error. Two schedules, by
// seed: odd seeds give the warps a random priority (reshuffled at every barrier) and always run
// the first warp that can run, so a warp gets as far ahead of the others as barriers allow (this
// exposes a buffer rewritten before a slower warp has read it); even seeds resume a uniformly
// random runnable thread at every step.
inline bool run_block(int nthreads, bool warp_priority) {
  Emu& e = E();
  const int nwarps = nthreads / 32;
  e.threads.assign(size_t(nthreads), Thread());
  for (int t = 0; t < nthreads; ++t) {
    Thread& th = e.threads[size_t(t)];
    th.idx.x = unsigned(t);
    th.stack.resize(256 * 1024);
    getcontext(&th.ctx);
    th.ctx.uc_stack.ss_sp = th.stack.data();
    th.ctx.uc_stack.ss_size = th.stack.size();
    th.ctx.uc_link = &e.main;
    makecontext(&th.ctx, trampoline, 0);
  }
  std::vector<int> rank(static_cast<size_t>(nwarps)), runnable;
  auto reshuffle = [&] {
    for (int w = 0; w < nwarps; ++w) rank[size_t(w)] = w;
    std::shuffle(rank.begin(), rank.end(), e.rng);
  };
  reshuffle();
  while (true) {
    runnable.clear();
    if (warp_priority) {
      for (int w : rank) {
        for (int l = 0; l < 32; ++l)
          if (e.threads[size_t(w) * 32 + size_t(l)].state == State::kRun) runnable.push_back(w * 32 + l);
        if (!runnable.empty()) break;
      }
    } else {
      for (int t = 0; t < nthreads; ++t)
        if (e.threads[size_t(t)].state == State::kRun) runnable.push_back(t);
    }
    if (!runnable.empty()) {
      const int t = runnable[std::uniform_int_distribution<size_t>(0, runnable.size() - 1)(e.rng)];
      Thread& th = e.threads[size_t(t)];
      e.cur = &th;
      swapcontext(&e.main, &th.ctx);
      if (!e.error.empty()) return false;
      if (th.state == State::kWarp) resolve_warp(t / 32);
      if (!e.error.empty()) return false;
      continue;
    }
    int done = 0, barrier = 0, warp = 0;
    for (auto& th : e.threads) {
      done += th.state == State::kDone;
      barrier += th.state == State::kBarrier;
      warp += th.state == State::kWarp;
    }
    if (done == nthreads) return true;
    if (barrier == nthreads) {
      for (auto& th : e.threads) th.state = State::kRun;
      reshuffle();
      continue;
    }
    e.error = "deadlock: " + std::to_string(barrier) + " threads at __syncthreads, " + std::to_string(warp) +
              " at a warp collective, " + std::to_string(done) + " exited (a barrier or collective not "
              "reached by all)";
    return false;
  }
}

// Shared memory of `bytes` right below an inaccessible page.
struct SmemArena {
  unsigned char* map = nullptr;
  size_t map_len = 0;
  unsigned char* get(size_t bytes) {
    release();
    const size_t page = size_t(sysconf(_SC_PAGESIZE));
    const size_t body = (bytes + page - 1) / page * page;
    map_len = body + page;
    void* p = mmap(nullptr, map_len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    map = static_cast<unsigned char*>(p);
    mprotect(map + body, page, PROT_NONE);
    return map + body - ((bytes + 15) / 16 * 16);
  }
  void release() {
    if (map) munmap(map, map_len);
    map = nullptr;
  }
  ~SmemArena() { release(); }
};

// Launch `kernel(args...)` on a grid of `blocks` x `threads` with `smem` bytes of dynamic shared
// memory. Returns "" or the first error found.
template <typename Kernel, typename... Args>
std::string launch(int64_t blocks, int threads, size_t smem, uint32_t seed, Kernel kernel, const Args&... args) {
  Emu& e = E();
  if (threads % 32 != 0 || threads <= 0) return "block size must be a positive multiple of 32";
  e.error.clear();
  e.rng.seed(seed);
  e.block_dim.x = unsigned(threads);
  e.grid_dim.x = unsigned(blocks);
  SmemArena arena;
  e.body = [&] { kernel(args...); };
  for (int64_t b = 0; b < blocks; ++b) {
    e.block_idx.x = unsigned(b);
    e.smem = arena.get(smem);
    std::memset(e.smem, 0xff, smem);
    if (!run_block(threads, seed % 2 == 1)) return "block " + std::to_string(b) + ": " + e.error;
  }
  return "";
}

}  // namespace emu

#define threadIdx (::emu::E().cur->idx)
#define blockIdx (::emu::E().block_idx)
#define blockDim (::emu::E().block_dim)
#define gridDim (::emu::E().grid_dim)
#define KX_DYNAMIC_SMEM() (::emu::E().smem)

inline void __syncthreads() {
  ::emu::E().cur->state = ::emu::State::kBarrier;
  ::emu::yield_to_scheduler();
}
template <typename V>
inline V __shfl_xor_sync(unsigned mask, V v, int lane_mask) {
  return ::emu::collective(::emu::Op::kShflXor, mask, v, lane_mask);
}
inline unsigned __ballot_sync(unsigned mask, int pred) {
  return unsigned(::emu::collective(::emu::Op::kBallot, mask, uint32_t(pred != 0), 0));
}
inline int __any_sync(unsigned mask, int pred) {
  return int(::emu::collective(::emu::Op::kAny, mask, uint32_t(pred != 0), 0));
}
