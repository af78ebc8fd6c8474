// Batched entropic optimal transport on the GPU: log-domain Sinkhorn with epsilon scaling and
// over-relaxation, Word Rotator's Distance, and their envelope gradients, on raw pointers (the
// torch glue is csrc/cuda/sinkhorn.cu). Only CUDA built-ins: tests/cuda/test_nvcc_compile.py
// compiles this header standalone, tests/cuda/test_sinkhorn_emulated.py runs it on the host.
//
// Semantics: kxkernels/ops/sinkhorn/reference.py (Cuturi 2013; Peyré & Cuturi, "Computational
// Optimal Transport", 2019, Remark 4.23; WRD: Yokoi et al. 2020, masses ||x_i|| / sum ||x||, cost
// 1 - cos). Schedule, padding rules and float precision scheme are those of csrc/cpu/sinkhorn.cpp
// without its Newton steps: the `newton` flag of the ops is ignored here, so a problem that plain
// Sinkhorn converges slowly on takes more sweeps (or stops at max_iter with a larger err).
//
// Design: one thread block per problem. The problem's padding (zero-mass rows/columns, masked or
// zero-norm tokens) is dropped first (block-wide compaction), so a block solves a dense m x n
// problem: the cost C and the scaled kernel K (float each, row stride ldk), potentials and masses.
// Each block stops on its own when its error is below tol, and runs at its own eps, as the CPU
// kernel: with `relative` the requested eps times its cost spread max C - min C over the real
// entries (a block reduction of the compacted cost; eps itself where that is 0), and it writes
// eps_reached, the eps its potentials belong to (the stage eps when max_iter stops the schedule
// early). The backward kernels read that per-problem eps.
//
// Any size (plan_batch, the glue's policy): a problem whose C and K fit in one block's shared
// memory keeps them there; a larger one keeps them in a global-memory workspace slice of its
// block (tier kGlobalMat, every sweep reads them through L2), and past that the vectors go there
// too (kGlobalAll): same code, same results. Problems are grouped by the block size and tier
// their own real lengths need, so a 10 x 10 pair in a batch padded to 512 runs in a 64-thread
// block with a few KB of shared memory, beside the 512 x 512 pairs in 256-thread blocks.
// Precision (float32, as on the CPU): the exponent (f_i + g_j - C_ij) / eps is a difference of
// numbers far larger than eps, so the potentials live in two parts -- F, G (double, cost units)
// folded into K_ij = (C_ij - F_i - G_j) / eps, and small offsets u, v (float, units of eps) that
// the sweeps update; offsets above kAbsorbAbove are folded back into F, G (and at every eps change).
// Plan entries are a_i b_j E_ij with E_ij = exp((u_i + v_j) - K_ij); the row and the column
// sweeps compute E_ij with bitwise the same float expression, so the iteration has an exact fixed
// point and the marginal error can go below tol = 1e-6 although __expf (ex2.approx: about 2 ulp,
// plus 6e-8 |x| relative from rounding x log2 e) and float K (relative 6e-8) make E_ij accurate to
// about 1e-6 relative: results agree with float64 math to ~1e-6 relative (value, plan), potentials
// to ~1e-6 of their scale. log s of a row sum near 1 uses log1pf, accurate to 1 ulp of s - 1.
// Sums s_i = sum_j b_j E_ij run without a max pass (the offsets make them ~1 near convergence); a
// sum outside [kSumMin, kSumMax] is redone as an exact max-shifted logsumexp.
//
// Lanes: a row reduction uses G lanes (G a power of two), a column reduction 32 / G lanes, each
// reduced with __shfl_xor_sync; G ~ sqrt(32 n / m) balances the two half-sweeps. The row stride
// ldk is an odd multiple of G (when the room is there), which makes both half-sweeps' shared
// memory accesses bank-conflict free.
//
// Shared memory (kShared): 8 m n bytes (C and K) + about 60 (m + n) + 1 KB for compacted sizes
// m x n (plus row padding when it fits; the cosine tiles of WRD stage in the K region, at least
// 8.4-17 KB by block size): m = n = 128 fits the 163 KB of an sm_80 block, 165 the 227 KB of
// sm_90. Past that, the workspace tiers; indices are int, so m n < 2^31 (the glue checks).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include <vector>  // host-side batch plan

#include "../common/sinkhorn_schedule.h"

namespace kx {
namespace sinkhorn_cuda {

// ---- schedule: common/sinkhorn_schedule.h (the CPU kernel and the reference read it too) ---------
using sinkhorn_schedule::kEpsRatio;
using sinkhorn_schedule::kStageSweeps;
using sinkhorn_schedule::kStageTol;
constexpr float kOmega = float(sinkhorn_schedule::kOmega);
// ---- numerics (csrc/cpu/sinkhorn.cpp) ------------------------------------------------------------
constexpr float kAbsorbAbove = 4.0f;               // fold offsets |u|, |v| above this into F, G
constexpr float kSumMin = 1e-30f, kSumMax = 1e30f; // stabilized sums outside: exact logsumexp
constexpr float kFloatMax = 3.402823466e38f;       // err of a non-finite marginal
// ---- launch shape ------------------------------------------------------------------------------
constexpr int kMaxThreads = 256;     // blocks have 64, 128 or 256 threads (block_threads)
// Registers: sinkhorn_fwd at <= 80 (3 blocks of 256 threads an SM, about what shared memory
// allows for 64 x 64 problems; ptxas of CUDA 13 spills 36 bytes of it on sm_90, none on sm_80);
// wrd_fwd (cosine tiles plus the tiered layout: 88 bytes spilled on sm_80 at 80) and wrd_bwd
// (4-token x 64-dim tiles) up to 128, spilling nothing.
constexpr int kFwdMinBlocks = 3, kWrdFwdMinBlocks = 2, kWrdBwdMinBlocks = 2;
constexpr int kChunk = 32;           // embedding dims staged per step of the cosine tiles
constexpr int kTileJ = 64;           // y tokens per cosine tile (x tokens: threads / 16 * 4)
constexpr int kRowPad = 15;          // ldk <= n + 2 G - 1: room for G <= 8 (G = 16 where it fits)
constexpr unsigned kFull = 0xffffffffu;

// ---- host-side launch policy (shared by the glue and the tests) -------------------------------------

// Threads per block: enough for the row/column reductions of an M x N problem, few enough that a
// batch of small problems does not leave most threads idle.
__host__ __device__ inline int block_threads(int64_t M, int64_t N) {
  const int64_t mn = M * N;
  return mn >= 2048 ? 256 : (mn >= 512 ? 128 : 64);
}

// Floats the cosine tiles stage (x and y chunks) in the K region.
__host__ __device__ inline int64_t stage_floats(int threads) {
  return int64_t(threads / 16 * 4 + kTileJ) * (kChunk + 1);
}

// Dynamic shared memory of the forward kernels and wrd_bwd, carved from one 16-byte aligned base.
struct Smem {
  double *F, *G;          // absorbed potentials, cost units (M, N)
  double* red;            // 2 x 32 block-reduction partials (double-buffered)
  float *C, *K;           // cost, scaled kernel (m x ldk each); K holds T in wrd_bwd
  float* stage;           // cosine tiles of WRD: the K region in shared memory, else its own room
  float *u, *a, *la, *ls, *nx, *ix;  // row side: offsets, masses, log masses, log row sums,
                                     // token norms (original order), inverse norms (compact)
  float *v, *b, *lb, *lt, *ny, *iy;  // column side
  int *ri, *cj;           // compact row / column -> original index
  int* scan;              // 2 x 32 compaction counts
};

// Carves 16-byte aligned arrays from two regions: shared memory and a global workspace slice.
// (Scalar offsets, no reference to one of two carvers: that would put them in local memory.)
struct Carver {
  uintptr_t sbase, gbase;
  size_t soff, goff;
  template <typename T>
  __host__ __device__ T* take(bool global, int64_t count) {
    const size_t bytes = (size_t(count) * sizeof(T) + 15) & ~size_t(15);
    T* p;
    if (global) {
      p = reinterpret_cast<T*>(gbase + goff);
      goff += bytes;
    } else {
      p = reinterpret_cast<T*>(sbase + soff);
      soff += bytes;
    }
    return p;
  }
};

// Where a block keeps its problem. kShared: everything in dynamic shared memory (the fast path).
// kGlobalMat: the C and K matrices in a global-memory workspace (one slice per block, read by
// every sweep through L2/L1), vectors in shared memory. kGlobalAll: vectors in the workspace too;
// shared memory holds only the reduction partials and the cosine staging tiles. The sweeps are
// the same code in every tier (__syncthreads orders global as well as shared accesses within a
// block), so the tiers give the same results.
enum Tier : int { kShared = 0, kGlobalMat = 1, kGlobalAll = 2 };

// One launch's layout: rows/columns the compacted problem may have (mc <= M, nc <= N: the
// largest real lengths of the problems it runs), floats of each matrix region, tier, bytes.
struct Layout {
  int64_t mc, nc, mat, stage;
  int tier, threads;
  size_t smem;        // dynamic shared memory bytes
  int64_t ws_floats;  // workspace floats per block (a multiple of 4; 0 for kShared)
};

// Lays out a block's memory into *s (when s is given): shared memory at `sbase`, the workspace
// slice at `gbase` (unused for kShared). M, N: the padded lengths (token norms are kept in the
// original order). Sets L->smem and L->ws_floats when `L_out` is given.
__host__ __device__ inline void carve(uintptr_t sbase, uintptr_t gbase, int64_t M, int64_t N, const Layout& L,
                                      Smem* s, size_t* smem_bytes = nullptr, int64_t* ws_floats = nullptr) {
  Carver c{sbase, gbase, 0, 0};
  const bool vec = L.tier == kGlobalAll, mat = L.tier != kShared;  // in the workspace?
  Smem t;
  t.F = c.take<double>(vec, L.mc);
  t.G = c.take<double>(vec, L.nc);
  t.red = c.take<double>(false, 64);
  t.C = c.take<float>(mat, L.mat);
  t.K = c.take<float>(mat, L.mat);
  t.stage = mat ? c.take<float>(false, L.stage) : t.K;
  t.u = c.take<float>(vec, L.mc); t.a = c.take<float>(vec, L.mc); t.la = c.take<float>(vec, L.mc);
  t.ls = c.take<float>(vec, L.mc); t.nx = c.take<float>(vec, M); t.ix = c.take<float>(vec, L.mc);
  t.v = c.take<float>(vec, L.nc); t.b = c.take<float>(vec, L.nc); t.lb = c.take<float>(vec, L.nc);
  t.lt = c.take<float>(vec, L.nc); t.ny = c.take<float>(vec, N); t.iy = c.take<float>(vec, L.nc);
  t.ri = c.take<int>(vec, L.mc);
  t.cj = c.take<int>(vec, L.nc);
  t.scan = c.take<int>(false, 64);
  if (s != nullptr) *s = t;
  if (smem_bytes != nullptr) *smem_bytes = c.soff;
  if (ws_floats != nullptr) *ws_floats = mat ? int64_t(c.goff / sizeof(float)) : 0;
}

// The layout for problems of at most mc x nc real rows/columns in an M x N padded batch, under a
// shared memory limit of `limit` bytes per block: the first tier that fits, with room for the
// bank-conflict padding of the rows when it fits. `threads` > 0 overrides the block size (tests).
__host__ inline Layout plan_layout(int64_t M, int64_t N, int64_t mc, int64_t nc, bool tokens, size_t limit,
                                   int threads = 0) {
  Layout L;
  L.mc = mc > 0 ? mc : 1;
  L.nc = nc > 0 ? nc : 1;
  L.threads = threads > 0 ? threads : block_threads(L.mc, L.nc);
  L.stage = tokens ? stage_floats(L.threads) : 0;
  const int64_t pads[2] = {kRowPad, 0};
  for (int tier = kShared; tier <= kGlobalAll; ++tier) {
    for (int i = 0; i < 2; ++i) {
      L.tier = tier;
      L.mat = L.mc * (L.nc + pads[i]);
      if (tier == kShared && L.mat < L.stage) L.mat = L.stage;
      carve(0, 0, M, N, L, nullptr, &L.smem, &L.ws_floats);
      if (L.smem <= limit) return L;
      if (tier != kShared) break;  // padding costs no shared memory there
    }
  }
  return L;  // kGlobalAll past the limit: only when the staging tiles alone do not fit
}

// A group of problems launched together (the same layout): their indices in the batch.
struct Bucket {
  Layout L;
  std::vector<int> problems;
};

// The glue's batch policy, shared with the tests: problems are grouped by the block size their
// own real lengths m[p] x n[p] call for and by the tier they need on their own, so a short pair
// in a batch padded for long ones gets a small block and shared memory; each group runs with the
// layout of its largest lengths. Problems with no mass go with the smallest group (they exit
// at once).
__host__ inline std::vector<Bucket> plan_batch(const int64_t* m, const int64_t* n, int64_t B, int64_t M, int64_t N,
                                               bool tokens, size_t limit, int threads = 0) {
  std::vector<Bucket> out;
  std::vector<int> key(size_t(B > 0 ? B : 0));
  std::vector<int64_t> mx(9, 0), nx(9, 0);
  std::vector<std::vector<int>> groups(9);
  for (int64_t p = 0; p < B; ++p) {
    int k = -1;
    if (m[p] > 0 && n[p] > 0) {
      const Layout one = plan_layout(M, N, m[p], n[p], tokens, limit, threads);
      const int t = one.threads == 64 ? 0 : (one.threads == 128 ? 1 : 2);
      k = 3 * one.tier + t;
    }
    key[size_t(p)] = k;
  }
  int smallest = -1;
  for (int64_t p = 0; p < B; ++p)
    if (key[size_t(p)] >= 0 && (smallest < 0 || key[size_t(p)] < smallest)) smallest = key[size_t(p)];
  if (smallest < 0) smallest = 0;
  for (int64_t p = 0; p < B; ++p) {
    const int k = key[size_t(p)] >= 0 ? key[size_t(p)] : smallest;
    groups[size_t(k)].push_back(int(p));
    if (m[p] > mx[size_t(k)]) mx[size_t(k)] = m[p];
    if (n[p] > nx[size_t(k)]) nx[size_t(k)] = n[p];
  }
  for (int k = 0; k < 9; ++k) {
    if (groups[size_t(k)].empty()) continue;
    Bucket b;
    b.L = plan_layout(M, N, mx[size_t(k)], nx[size_t(k)], tokens, limit, threads);
    b.problems = std::move(groups[size_t(k)]);
    out.push_back(std::move(b));
  }
  return out;
}

// Workspace the glue allocates at most per launch; a group needing more runs in several launches.
constexpr int64_t kWorkspaceBytes = int64_t(1) << 30;
__host__ inline int64_t blocks_per_launch(const Layout& L, int64_t count) {
  if (L.ws_floats == 0) return count;
  const int64_t fit = kWorkspaceBytes / (L.ws_floats * int64_t(sizeof(float)));
  const int64_t c = fit > 0 ? fit : 1;
  return c < count ? c : count;
}

// sinkhorn_bwd: masses and potentials of one problem.
// `base`: shared memory, or (gbase != 0) the block's workspace slice, `red` staying in shared memory.
__host__ __device__ inline size_t bwd_smem(int64_t M, int64_t N, double** red, float** an, float** fv,
                                           float** bn, float** gv, uintptr_t base, uintptr_t gbase = 0) {
  Carver c{base, gbase, 0, 0};
  const bool ws = gbase != 0;
  double* r = c.take<double>(false, 64);
  float* a = c.take<float>(ws, M);
  float* f = c.take<float>(ws, M);
  float* b = c.take<float>(ws, N);
  float* g = c.take<float>(ws, N);
  if (red != nullptr) { *red = r; *an = a; *fv = f; *bn = b; *gv = g; }
  return ws ? c.goff : c.soff;  // with gbase: the workspace bytes (the shared part is 512 bytes)
}
constexpr int kBwdThreads = 256;

// ---- kernel arguments ----------------------------------------------------------------------------
// Outputs value, dual, err, f, g are float32; f (B, M), g (B, N), plan (B, M, N) contiguous.
template <typename T>
struct SinkhornFwdArgs {
  const T *cost, *a, *b;
  int64_t M, N, cs0, cs1, cs2, as0, as1, bs0, bs1;
  double eps, tol;
  int64_t max_iter;
  bool relative;     // each problem at eps * (max C - min C) over its real entries (eps where that is 0)
  Layout L;
  const int* index;  // problem of each block (null: blockIdx.x)
  float* ws;         // workspace, L.ws_floats per block (null for kShared)
  float *value, *dual, *f, *g, *err;
  int64_t* n_iter;
  double* eps_out;   // (B,): the eps each problem's results belong to (eps_reached)
  T* plan;  // null: not requested
};

template <typename T>
struct SinkhornBwdArgs {
  const float *grad, *f, *g;  // (B,), (B, M), (B, N) contiguous
  const T *cost, *a, *b;
  int64_t M, N, cs0, cs1, cs2, as0, as1, bs0, bs1;
  const double* eps;  // (B,) per problem (the forward's eps_reached), on the device
  T *grad_cost, *grad_a, *grad_b;  // (B, M, N), (B, M), (B, N) contiguous
  int64_t first;      // problem of block 0
  float* ws;          // null: vectors in shared memory; else ws_floats per block
  int64_t ws_floats;
};

// Tokens of one side of WRD: x (B, L, D) strided, mask (B, L) bool or null (every token real).
template <typename T>
struct Tokens {
  const T* x;
  const bool* mask;
  int64_t L, D, s0, s1, s2, ms0, ms1;
};

template <typename T>
struct WrdFwdArgs {
  Tokens<T> X, Y;
  double eps, tol;
  int64_t max_iter;
  bool relative;  // as in SinkhornFwdArgs
  Layout L;
  const int* index;
  float* ws;
  float *value, *dual, *f, *g, *err;
  int64_t* n_iter;
  double* eps_out;  // (B,) eps_reached
};

template <typename T>
struct WrdBwdArgs {
  Tokens<T> X, Y;
  const float *grad, *f, *g;  // contiguous
  const double* eps;          // (B,) per problem, on the device
  Layout L;
  const int* index;
  float* ws;
  T *grad_x, *grad_y;         // (B, M, D), (B, N, D) contiguous
};

// ---- device helpers ------------------------------------------------------------------------------
#ifndef KX_DYNAMIC_SMEM
__device__ __forceinline__ unsigned char* dynamic_smem() {
  extern __shared__ __align__(16) unsigned char kx_sinkhorn_smem[];
  return kx_sinkhorn_smem;
}
#define KX_DYNAMIC_SMEM() ::kx::sinkhorn_cuda::dynamic_smem()  // the host emulator defines its own
#endif

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

__device__ __forceinline__ float nan_f() { return __int_as_float(0x7fc00000); }
__device__ __forceinline__ float inf_f() { return __int_as_float(0x7f800000); }

struct Sum {
  template <typename V> __device__ __forceinline__ V operator()(V x, V y) const { return x + y; }
};
struct Max {
  template <typename V> __device__ __forceinline__ V operator()(V x, V y) const { return x > y ? x : y; }
};
struct Min {
  template <typename V> __device__ __forceinline__ V operator()(V x, V y) const { return x < y ? x : y; }
};

// Reduction over aligned groups of `width` lanes (a power of two <= 32); every lane of the warp
// must call it (full mask), every lane of a group gets the group's result.
template <typename V, typename Op>
__device__ __forceinline__ V group_reduce(V x, int width, Op op) {
  for (int o = width >> 1; o > 0; o >>= 1) x = op(x, __shfl_xor_sync(kFull, x, o));
  return x;
}

// Block-wide collectives; every thread of the block must call them in the same order. The
// partial buffers alternate, so a buffer is rewritten only after every thread has passed the
// barrier of the collective in between (no trailing barrier needed).
class Block {
 public:
  __device__ explicit Block(const Smem& s) : red_(s.red), scan_(s.scan) {}

  template <typename Op>
  __device__ double reduce(double x, Op op) {
    x = group_reduce(x, 32, op);
    double* slot = red_ + 32 * rflip_;
    rflip_ ^= 1;
    if ((threadIdx.x & 31) == 0) slot[threadIdx.x >> 5] = x;
    __syncthreads();
    double r = slot[0];
    for (int w = 1; w < int(blockDim.x >> 5); ++w) r = op(r, slot[w]);
    return r;
  }
  __device__ double sum(double x) { return reduce(x, Sum()); }
  __device__ double max(double x) { return reduce(x, Max()); }
  __device__ double min(double x) { return reduce(x, Min()); }

  // Positions k < L with keep(k), in increasing order: put(pos, k) for each. Returns how many.
  // The puts are visible to every thread on return.
  template <typename Keep, typename Put>
  __device__ int compact(int L, Keep keep, Put put) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    int total = 0;
    for (int c = 0; c < L; c += blockDim.x) {
      const int k = c + int(threadIdx.x);
      const bool on = k < L && keep(k);
      const unsigned bal = __ballot_sync(kFull, on);
      int* cnt = scan_ + 32 * sflip_;
      sflip_ ^= 1;
      if (lane == 0) cnt[warp] = __popc(bal);
      __syncthreads();
      int before = total, chunk = 0;
      for (int w = 0; w < nw; ++w) {
        if (w < warp) before += cnt[w];
        chunk += cnt[w];
      }
      if (on) put(before + __popc(bal & ((1u << lane) - 1u)), k);
      total += chunk;
    }
    __syncthreads();
    return total;
  }

 private:
  double* red_;
  int* scan_;
  int rflip_ = 0, sflip_ = 0;
};

// The compacted problem's shape: lanes per row reduction G, row stride ldk of C and K.
struct Dims {
  int m, n, G, ldk;
};

// G ~ sqrt(32 n / m) (a power of two), so that a row (n / G terms a lane) and a column
// (m G / 32 terms a lane) half-sweep take about as long. G = 1: one lane per row (K is read down
// columns then too).
__device__ __forceinline__ int lanes_per_row(int m, int n) {
  const float r = 32.0f * float(n) / float(m);
  int G = 1;
  while (G < 32 && 2.0f * float(G) * float(G) <= r) G *= 2;
  return G;
}

// ldk an odd multiple of G (G < 32) makes the rows of one warp access hit distinct banks in both
// half-sweeps; without room for it (mat floats per matrix), the unpadded n.
__device__ __forceinline__ Dims make_dims(int m, int n, int G, int64_t mat) {
  Dims d;
  d.m = m;
  d.n = n;
  d.G = G;
  d.ldk = n;
  if (G < 32) {
    const int q = ((n + G - 1) / G) | 1;
    if (int64_t(m) * (q * G) <= mat) d.ldk = q * G;
  }
  return d;
}

// E_ij of the plan a_i b_j E_ij. Row sums, column sums and the final plan all call this, with the
// same operands, so they see bitwise the same E.
__device__ __forceinline__ float plan_exp(float ui, float vj, float kij) { return __expf((ui + vj) - kij); }

// log s for a sum s in [kSumMin, kSumMax]: near 1 (where the converging sweeps are) to 1 ulp of
// s - 1 (s - 1 is exact there), elsewhere __logf's 2^-21 absolute error is far below what counts.
__device__ __forceinline__ float log_sum(float s) {
  return (s > 0.5f && s < 2.0f) ? log1pf(s - 1.0f) : __logf(s);
}

// Row half-sweep: s_i = sum_j b_j E_ij (row i of the plan over a_i); log s_i into ls (the update
// of u_i, applied by the caller once omega is known). Returns the row-marginal L1 error
// sum_i a_i |s_i - 1| (every thread; kFloatMax when not finite).
__device__ float row_sums(const Smem& s, Block& blk, const Dims& d) {
  const int G = d.G, grp = int(threadIdx.x) / G, l = int(threadIdx.x) & (G - 1);
  const int ngr = int(blockDim.x) / G;
  float err = 0.0f;
  for (int base = 0; base < d.m; base += ngr) {  // same trip count in every thread: shuffles below
    const int i = base + grp;
    const bool act = i < d.m;
    const float ui = act ? s.u[i] : 0.0f;
    const float* Ki = s.K + (act ? i : 0) * d.ldk;
    float acc = 0.0f;
    if (act)
      for (int j = l; j < d.n; j += G) acc = fmaf(s.b[j], plan_exp(ui, s.v[j], Ki[j]), acc);
    acc = group_reduce(acc, G, Sum());
    const bool bad = act && !(acc >= kSumMin && acc <= kSumMax);
    float lsum = act && !bad ? log_sum(acc) : 0.0f;
    if (__any_sync(kFull, bad)) {  // rare (after an eps change): exact, max-shifted
      float mx = -inf_f();
      if (bad)
        for (int j = l; j < d.n; j += G) mx = fmaxf(mx, s.lb[j] + ((ui + s.v[j]) - Ki[j]));
      mx = group_reduce(mx, G, Max());
      float e = 0.0f;
      if (bad)
        for (int j = l; j < d.n; j += G) e += __expf(s.lb[j] + ((ui + s.v[j]) - Ki[j]) - mx);
      e = group_reduce(e, G, Sum());
      if (bad) lsum = mx + __logf(e);
    }
    if (act && l == 0) {
      s.ls[i] = lsum;
      err += s.a[i] * (bad ? fabsf(expm1f(lsum)) : fabsf(acc - 1.0f));
    }
  }
  const double e = blk.sum(double(err));
  return e < double(kFloatMax) ? float(e) : kFloatMax;  // also NaN -> kFloatMax
}

// Column half-sweep: t_j = sum_i a_i E_ij, v_j <- v_j - omega log t_j. Returns the largest |u|,
// |v| (u: `umax`, this thread's part, reduced here too).
__device__ float col_update(const Smem& s, Block& blk, const Dims& d, float omega, float umax) {
  const int G = 32 / d.G, grp = int(threadIdx.x) / G, l = int(threadIdx.x) & (G - 1);
  const int ngr = int(blockDim.x) / G;
  float vmax = umax;
  for (int base = 0; base < d.n; base += ngr) {
    const int j = base + grp;
    const bool act = j < d.n;
    const float vj = act ? s.v[j] : 0.0f;
    const float* Kj = s.K + (act ? j : 0);
    float acc = 0.0f;
    if (act)
      for (int i = l; i < d.m; i += G) acc = fmaf(s.a[i], plan_exp(s.u[i], vj, Kj[i * d.ldk]), acc);
    acc = group_reduce(acc, G, Sum());
    const bool bad = act && !(acc >= kSumMin && acc <= kSumMax);
    float lsum = act && !bad ? log_sum(acc) : 0.0f;
    if (__any_sync(kFull, bad)) {
      float mx = -inf_f();
      if (bad)
        for (int i = l; i < d.m; i += G) mx = fmaxf(mx, s.la[i] + ((s.u[i] + vj) - Kj[i * d.ldk]));
      mx = group_reduce(mx, G, Max());
      float e = 0.0f;
      if (bad)
        for (int i = l; i < d.m; i += G) e += __expf(s.la[i] + ((s.u[i] + vj) - Kj[i * d.ldk]) - mx);
      e = group_reduce(e, G, Sum());
      if (bad) lsum = mx + __logf(e);
    }
    if (act && l == 0) {
      const float x = vj - omega * lsum;
      s.v[j] = x;
      vmax = fmaxf(vmax, fabsf(x));
    }
  }
  const double r = blk.max(double(vmax));
  return r == r ? float(r) : inf_f();  // NaN offsets: absorb (and fail visibly) rather than ignore
}

// K = (C - F - G) / eps, from double potentials.
__device__ void rebuild(const Smem& s, const Dims& d, double eps) {
  const double inv = 1.0 / eps;
  for (int e = threadIdx.x; e < d.m * d.n; e += blockDim.x) {
    const int k = e / d.n, l = e - k * d.n;
    s.K[k * d.ldk + l] = float((double(s.C[k * d.ldk + l]) - s.F[k] - s.G[l]) * inv);
  }
  __syncthreads();
}

// Fold the offsets into F, G (at the eps they are in units of) and zero them.
__device__ void absorb(const Smem& s, const Dims& d, double eps) {
  for (int k = threadIdx.x; k < d.m; k += blockDim.x) {
    s.F[k] += eps * double(s.u[k]);
    s.u[k] = 0.0f;
  }
  for (int l = threadIdx.x; l < d.n; l += blockDim.x) {
    s.G[l] += eps * double(s.v[l]);
    s.v[l] = 0.0f;
  }
  __syncthreads();
}

struct Solved {
  int64_t n_iter;
  float err;
  double eps;  // the eps the potentials and K are at (the target eps unless max_iter came first)
};

// The reference's schedule on the problem set up in shared memory (C, a, b, la, lb), starting at
// eps0 = max(max C - min C, eps), down to the target eps (the problem's own: relative_eps scales
// it by the spread). Leaves F, G, u, v, K; Solved::eps is the eps they are at.
__device__ Solved solve(const Smem& s, Block& blk, const Dims& d, double eps0, double eps, int64_t max_iter,
                        double tol) {
  for (int k = threadIdx.x; k < d.m; k += blockDim.x) { s.F[k] = 0.0; s.u[k] = 0.0f; }
  for (int l = threadIdx.x; l < d.n; l += blockDim.x) { s.G[l] = 0.0; s.v[l] = 0.0f; }
  __syncthreads();
  double e = eps0;
  rebuild(s, d, e);
  int stage_sweeps = 0;
  bool confirm = false;  // the last sweep was plain: its columns are exact, a check is meaningful
  int64_t it = 0;
  float err;
  while (true) {
    const bool final = e <= eps;
    err = row_sums(s, blk, d);
    if (final && confirm && double(err) < tol) break;
    if (it >= max_iter) {
      // out of iterations: a plain column update makes the columns exact; err is then the row
      // error of the plan returned
      col_update(s, blk, d, 1.0f, 0.0f);
      err = row_sums(s, blk, d);
      // stopped before the schedule reached eps: the results belong to e (reported with them);
      // err is at least tol, so err < tol always means converged at the requested eps (the CPU's rule)
      if (!final && double(err) < tol) err = float(tol);
      break;
    }
    ++it;
    const bool relax = final && !(double(err) < tol);  // plain sweep when close: next check exact
    const float omega = relax ? kOmega : 1.0f;
    float umax = 0.0f;
    for (int k = threadIdx.x; k < d.m; k += blockDim.x) {
      const float x = s.u[k] - omega * s.ls[k];
      s.u[k] = x;
      umax = fmaxf(umax, fabsf(x));
    }
    __syncthreads();
    const float offsets = col_update(s, blk, d, omega, umax);
    confirm = !relax;
    if (!final) {
      if (++stage_sweeps >= kStageSweeps || double(err) < kStageTol) {
        absorb(s, d, e);
        e = fmax(e * kEpsRatio, eps);
        rebuild(s, d, e);
        stage_sweeps = 0;
        confirm = false;
      }
    } else if (!(offsets <= kAbsorbAbove)) {
      absorb(s, d, e);
      rebuild(s, d, e);
    }
  }
  return Solved{it, err, e};
}

// Per-problem outputs of the forward kernels.
struct Out {
  float *value, *dual, *err, *f, *g;  // f, g: this problem's rows (length M, N)
  int64_t* n_iter;
  double* eps_out;  // this problem's eps_reached
};

// No mass on a side: all padding gives zeros; mass on one side only has no plan (nothing can
// move): value 0, err 1, eps_reached the requested eps. Potentials (and plan) are zero already.
__device__ void no_mass(const Out& o, bool both, double eps) {
  if (threadIdx.x == 0) {
    *o.value = 0.0f; *o.dual = 0.0f; *o.n_iter = 0;
    *o.err = both ? 0.0f : 1.0f;
    *o.eps_out = eps;
  }
}
// A non-finite input gives NaN value, dual, err and eps_reached (potentials and plan stay zero).
__device__ void not_finite(const Out& o) {
  if (threadIdx.x == 0) {
    *o.value = nan_f(); *o.dual = nan_f(); *o.n_iter = 0; *o.err = nan_f();
    *o.eps_out = double(nan_f());
  }
}

// Masses of a compacted side in a[0, cnt): normalized to sum 1 (in double), logs in la. Returns
// the raw sum.
__device__ double normalize(float* a, float* la, int cnt, Block& blk) {
  double sum = 0.0;
  for (int k = threadIdx.x; k < cnt; k += blockDim.x) sum += double(a[k]);
  sum = blk.sum(sum);
  for (int k = threadIdx.x; k < cnt; k += blockDim.x) {
    const double q = double(a[k]) / sum;
    a[k] = float(q);
    la[k] = float(log(q));
  }
  __syncthreads();
  return sum;
}

// min / max of C (every thread), and whether an entry is not finite.
__device__ void cost_range(const Smem& s, Block& blk, const Dims& d, float* cmin, float* cmax, bool* finite) {
  float lo = inf_f(), hi = -inf_f();
  bool ok = true;
  for (int e = threadIdx.x; e < d.m * d.n; e += blockDim.x) {
    const int k = e / d.n, l = e - k * d.n;
    const float c = s.C[k * d.ldk + l];
    ok = ok && isfinite(c);
    lo = fminf(lo, c);
    hi = fmaxf(hi, c);
  }
  *finite = blk.max(ok ? 0.0 : 1.0) == 0.0;
  *cmin = float(blk.min(double(lo)));
  *cmax = float(blk.max(double(hi)));
}

// The problem's target eps from the cost range (relative: eps times the spread max C - min C over
// the real entries, eps itself where that is 0), solve from eps0 = max(spread, target), then the
// outputs: potentials f = F + eps u, g = G + eps v shifted so that <f, a> = <g, b>, value <T, C>,
// dual <f, a> + <g, b>, n_iter, err, eps_reached (the eps they belong to: the target, or the stage
// max_iter stopped at), and the plan (scattered to the original positions) when `plan` is given.
template <typename P>
__device__ void solve_and_finish(const Smem& s, Block& blk, const Dims& d, double eps, bool relative,
                                 int64_t max_iter, double tol, const Out& o, P* plan, int64_t N) {
  float cmin, cmax;
  bool finite;
  cost_range(s, blk, d, &cmin, &cmax, &finite);
  if (!finite) return not_finite(o);
  const double spread = double(cmax) - double(cmin);
  const double target = relative && cmax > cmin ? eps * spread : eps;
  const double eps0 = fmax(spread, target);
  const Solved r = solve(s, blk, d, eps0, target, max_iter, tol);
  double fa = 0.0, gb = 0.0;
  for (int k = threadIdx.x; k < d.m; k += blockDim.x) fa += double(s.a[k]) * (s.F[k] + r.eps * double(s.u[k]));
  for (int l = threadIdx.x; l < d.n; l += blockDim.x) gb += double(s.b[l]) * (s.G[l] + r.eps * double(s.v[l]));
  fa = blk.sum(fa);
  gb = blk.sum(gb);
  const double shift = 0.5 * (fa - gb);
  double value = 0.0;
  for (int e = threadIdx.x; e < d.m * d.n; e += blockDim.x) {
    const int k = e / d.n, l = e - k * d.n;
    const float t = s.a[k] * s.b[l] * plan_exp(s.u[k], s.v[l], s.K[k * d.ldk + l]);
    value += double(t) * double(s.C[k * d.ldk + l]);
    if (plan != nullptr) plan[int64_t(s.ri[k]) * N + s.cj[l]] = from_float<P>(t);
  }
  value = blk.sum(value);
  for (int k = threadIdx.x; k < d.m; k += blockDim.x) o.f[s.ri[k]] = float(s.F[k] + r.eps * double(s.u[k]) - shift);
  for (int l = threadIdx.x; l < d.n; l += blockDim.x) o.g[s.cj[l]] = float(s.G[l] + r.eps * double(s.v[l]) + shift);
  if (threadIdx.x == 0) {
    *o.value = float(value);
    *o.dual = float(fa + gb);
    *o.n_iter = r.n_iter;
    *o.err = r.err;
    *o.eps_out = r.eps;
  }
}

// The problem block blockIdx.x solves, and its memory laid out per the launch's layout.
__device__ inline int64_t setup_block(const int* index, float* ws, int64_t M, int64_t N, const Layout& L, Smem* s) {
  float* slice = ws != nullptr ? ws + int64_t(blockIdx.x) * L.ws_floats : nullptr;
  carve(reinterpret_cast<uintptr_t>(KX_DYNAMIC_SMEM()), reinterpret_cast<uintptr_t>(slice), M, N, L, s);
  return index != nullptr ? int64_t(index[blockIdx.x]) : int64_t(blockIdx.x);
}

// ---- sinkhorn_fwd: one block per problem -----------------------------------------------------------
template <typename T>
__global__ void __launch_bounds__(kMaxThreads, kFwdMinBlocks) sinkhorn_fwd_kernel(const SinkhornFwdArgs<T> P) {
  Smem s;
  const int64_t p = setup_block(P.index, P.ws, P.M, P.N, P.L, &s);
  Block blk(s);
  const int M = int(P.M), N = int(P.N);
  const Out o{P.value + p, P.dual + p, P.err + p, P.f + p * P.M, P.g + p * P.N, P.n_iter + p, P.eps_out + p};
  for (int i = threadIdx.x; i < M; i += blockDim.x) o.f[i] = 0.0f;
  for (int j = threadIdx.x; j < N; j += blockDim.x) o.g[j] = 0.0f;
  T* plan = P.plan != nullptr ? P.plan + p * P.M * P.N : nullptr;
  if (plan != nullptr)
    for (int64_t e = threadIdx.x; e < P.M * P.N; e += blockDim.x) plan[e] = from_float<T>(0.0f);

  const T* ap = P.a + p * P.as0;
  const T* bp = P.b + p * P.bs0;
  const int mc = int(P.L.mc), nc = int(P.L.nc);
  const int m = blk.compact(
      M, [&](int i) { return to_float(ap[i * P.as1]) > 0.0f; },
      [&](int pos, int i) { if (pos < mc) { s.ri[pos] = i; s.a[pos] = to_float(ap[i * P.as1]); } });
  const int n = blk.compact(
      N, [&](int j) { return to_float(bp[j * P.bs1]) > 0.0f; },
      [&](int pos, int j) { if (pos < nc) { s.cj[pos] = j; s.b[pos] = to_float(bp[j * P.bs1]); } });
  if (m > mc || n > nc) return not_finite(o);  // more real rows than the glue counted: never silent
  if (m == 0 || n == 0) return no_mass(o, m == 0 && n == 0, P.eps);
  normalize(s.a, s.la, m, blk);
  normalize(s.b, s.lb, n, blk);

  const Dims d = make_dims(m, n, lanes_per_row(m, n), P.L.mat);
  const T* cp = P.cost + p * P.cs0;
  for (int e = threadIdx.x; e < m * n; e += blockDim.x) {
    const int k = e / n, l = e - k * n;
    s.C[k * d.ldk + l] = to_float(cp[s.ri[k] * P.cs1 + s.cj[l] * P.cs2]);
  }
  __syncthreads();
  solve_and_finish(s, blk, d, P.eps, P.relative, P.max_iter, P.tol, o, plan, P.N);
}

// ---- sinkhorn_bwd: envelope gradient of grad * value ----------------------------------------------
// d/dC = grad T, d/da_i = grad (f_i - <f, a>) / sum(a) on non-zero masses (0 on padding), the
// same for b; T recomputed from f, g. One block per problem, the elements of C strided over it.
template <typename T>
__global__ void __launch_bounds__(kBwdThreads) sinkhorn_bwd_kernel(const SinkhornBwdArgs<T> P) {
  double* red;
  float *an, *fv, *bn, *gw;
  float* slice = P.ws != nullptr ? P.ws + int64_t(blockIdx.x) * P.ws_floats : nullptr;
  bwd_smem(P.M, P.N, &red, &an, &fv, &bn, &gw, reinterpret_cast<uintptr_t>(KX_DYNAMIC_SMEM()),
           reinterpret_cast<uintptr_t>(slice));
  Smem s;
  s.red = red;
  s.scan = nullptr;
  Block blk(s);
  const int64_t p = P.first + int64_t(blockIdx.x), M = P.M, N = P.N;
  const float gv = P.grad[p];
  const T* ap = P.a + p * P.as0;
  const T* bp = P.b + p * P.bs0;
  double sa = 0.0, sb = 0.0, fa = 0.0, gb = 0.0;
  for (int64_t i = threadIdx.x; i < M; i += blockDim.x) {
    const float x = to_float(ap[i * P.as1]);
    if (x > 0.0f) { sa += x; fa += double(x) * double(P.f[p * M + i]); }
  }
  for (int64_t j = threadIdx.x; j < N; j += blockDim.x) {
    const float x = to_float(bp[j * P.bs1]);
    if (x > 0.0f) { sb += x; gb += double(x) * double(P.g[p * N + j]); }
  }
  sa = blk.sum(sa);
  sb = blk.sum(sb);
  fa = blk.sum(fa);
  gb = blk.sum(gb);
  const bool live = sa > 0.0 && sb > 0.0;
  if (live) { fa /= sa; gb /= sb; }
  for (int64_t i = threadIdx.x; i < M; i += blockDim.x) {
    const float x = to_float(ap[i * P.as1]);
    const double fi = double(P.f[p * M + i]);
    const bool on = live && x > 0.0f;
    an[i] = on ? float(double(x) / sa) : 0.0f;
    fv[i] = float(fi);
    P.grad_a[p * M + i] = from_float<T>(on ? float(double(gv) * (fi - fa) / sa) : 0.0f);
  }
  for (int64_t j = threadIdx.x; j < N; j += blockDim.x) {
    const float x = to_float(bp[j * P.bs1]);
    const double gj = double(P.g[p * N + j]);
    const bool on = live && x > 0.0f;
    bn[j] = on ? float(double(x) / sb) : 0.0f;
    gw[j] = float(gj);
    P.grad_b[p * N + j] = from_float<T>(on ? float(double(gv) * (gj - gb) / sb) : 0.0f);
  }
  __syncthreads();
  // the exponent in double: f + g - C cancels to O(eps) from O(1) terms; this problem's eps
  const double inv = 1.0 / P.eps[p];
  const T* cp = P.cost + p * P.cs0;
  T* out = P.grad_cost + p * M * N;
  for (int64_t e = threadIdx.x; e < M * N; e += blockDim.x) {
    const int64_t i = e / N, j = e - i * N;
    float t = 0.0f;
    if (an[i] > 0.0f && bn[j] > 0.0f) {
      const double z = (double(fv[i]) + double(gw[j]) - double(to_float(cp[i * P.cs1 + j * P.cs2]))) * inv;
      t = an[i] * bn[j] * __expf(float(z));
    }
    out[e] = from_float<T>(gv * t);
  }
}

// ---- wrd: masses ||x_i|| / sum ||x||, cost 1 - cos, computed here ---------------------------------

// Norms of a side's tokens into nrm (original order; 0 for masked ones), a warp per token.
// Returns whether a real token is not finite (every thread).
template <typename T>
__device__ bool token_norms(const Tokens<T>& X, int64_t p, float* nrm, Block& blk) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  const T* xp = X.x + p * X.s0;
  bool bad = false;
  for (int64_t i = warp; i < X.L; i += nw) {
    const bool on = X.mask == nullptr || X.mask[p * X.ms0 + i * X.ms1];  // same in the whole warp
    float ss = 0.0f;
    if (on)
      for (int64_t k = lane; k < X.D; k += 32) {
        const float x = to_float(xp[i * X.s1 + k * X.s2]);
        ss = fmaf(x, x, ss);
      }
    ss = group_reduce(ss, 32, Sum());
    if (lane == 0) {
      const bool fin = isfinite(ss);
      bad = bad || (on && !fin);
      nrm[i] = on && fin ? float(sqrt(double(ss))) : 0.0f;
    }
  }
  return blk.max(bad ? 1.0 : 0.0) > 0.0;
}

// Real tokens (mask true, norm > 0) of both sides, compacted: ri/cj, raw masses (norms) in a/b,
// inverse norms in ix/iy. Returns false when a real token is not finite (or, which the glue's
// count rules out, a side has more real tokens than the capacity mc / nc).
template <typename T>
__device__ bool gather_tokens(const Smem& s, Block& blk, const Tokens<T>& X, const Tokens<T>& Y, int64_t p,
                              int mc, int nc, int* m, int* n) {
  const bool bad_x = token_norms(X, p, s.nx, blk);
  const bool bad_y = token_norms(Y, p, s.ny, blk);
  *m = blk.compact(
      int(X.L), [&](int i) { return s.nx[i] > 0.0f; },
      [&](int pos, int i) {
        if (pos < mc) { s.ri[pos] = i; s.a[pos] = s.nx[i]; s.ix[pos] = float(1.0 / double(s.nx[i])); }
      });
  *n = blk.compact(
      int(Y.L), [&](int j) { return s.ny[j] > 0.0f; },
      [&](int pos, int j) {
        if (pos < nc) { s.cj[pos] = j; s.b[pos] = s.ny[j]; s.iy[pos] = float(1.0 / double(s.ny[j])); }
      });
  return !(bad_x || bad_y) && *m <= mc && *n <= nc;  // past the capacity: never silent
}

// C_kl = 1 - <x_k, y_l> / (|x_k| |y_l|) over the compacted tokens: tiles of (threads / 16 * 4) x 64
// pairs, 4 x 4 a thread, the embedding dims staged kChunk at a time in the K region.
template <typename T>
__device__ void cosine_cost(const Smem& s, const Dims& d, const Tokens<T>& X, const Tokens<T>& Y, int64_t p) {
  constexpr int ld = kChunk + 1;  // odd: the staged rows are read across lanes conflict-free
  const int TI = int(blockDim.x) / 16 * 4;
  float* xs = s.stage;
  float* ys = s.stage + TI * ld;
  const int tx = threadIdx.x & 15, ty = threadIdx.x >> 4;
  const T* xp = X.x + p * X.s0;
  const T* yp = Y.x + p * Y.s0;
  const int64_t D = X.D;
  for (int k0 = 0; k0 < d.m; k0 += TI) {
    for (int l0 = 0; l0 < d.n; l0 += kTileJ) {
      float acc[4][4];
      for (int q = 0; q < 4; ++q)
        for (int r = 0; r < 4; ++r) acc[q][r] = 0.0f;
      for (int64_t d0 = 0; d0 < D; d0 += kChunk) {
        __syncthreads();  // the previous chunk has been read
        for (int e = threadIdx.x; e < TI * kChunk; e += blockDim.x) {
          const int r = e / kChunk, c = e - r * kChunk, k = k0 + r;
          const int64_t dd = d0 + c;
          xs[r * ld + c] = (k < d.m && dd < D) ? to_float(xp[s.ri[k] * X.s1 + dd * X.s2]) : 0.0f;
        }
        for (int e = threadIdx.x; e < kTileJ * kChunk; e += blockDim.x) {
          const int r = e / kChunk, c = e - r * kChunk, l = l0 + r;
          const int64_t dd = d0 + c;
          ys[r * ld + c] = (l < d.n && dd < D) ? to_float(yp[s.cj[l] * Y.s1 + dd * Y.s2]) : 0.0f;
        }
        __syncthreads();
#pragma unroll 8
        for (int c = 0; c < kChunk; ++c) {
          float xr[4], yr[4];
          for (int q = 0; q < 4; ++q) xr[q] = xs[(ty * 4 + q) * ld + c];
          for (int r = 0; r < 4; ++r) yr[r] = ys[(tx + 16 * r) * ld + c];
          for (int q = 0; q < 4; ++q)
            for (int r = 0; r < 4; ++r) acc[q][r] = fmaf(xr[q], yr[r], acc[q][r]);
        }
      }
      for (int q = 0; q < 4; ++q)
        for (int r = 0; r < 4; ++r) {
          const int k = k0 + ty * 4 + q, l = l0 + tx + 16 * r;
          if (k < d.m && l < d.n) s.C[k * d.ldk + l] = 1.0f - acc[q][r] * s.ix[k] * s.iy[l];
        }
    }
  }
  __syncthreads();
}

template <typename T>
__global__ void __launch_bounds__(kMaxThreads, kWrdFwdMinBlocks) wrd_fwd_kernel(const WrdFwdArgs<T> P) {
  Smem s;
  const int64_t M = P.X.L, N = P.Y.L;
  const int64_t p = setup_block(P.index, P.ws, M, N, P.L, &s);
  Block blk(s);
  const Out o{P.value + p, P.dual + p, P.err + p, P.f + p * M, P.g + p * N, P.n_iter + p, P.eps_out + p};
  for (int i = threadIdx.x; i < M; i += blockDim.x) o.f[i] = 0.0f;
  for (int j = threadIdx.x; j < N; j += blockDim.x) o.g[j] = 0.0f;
  int m, n;
  if (!gather_tokens(s, blk, P.X, P.Y, p, int(P.L.mc), int(P.L.nc), &m, &n)) return not_finite(o);
  if (m == 0 || n == 0) return no_mass(o, m == 0 && n == 0, P.eps);
  normalize(s.a, s.la, m, blk);
  normalize(s.b, s.lb, n, blk);
  const Dims d = make_dims(m, n, lanes_per_row(m, n), P.L.mat);
  cosine_cost(s, d, P.X, P.Y, p);
  solve_and_finish(s, blk, d, P.eps, P.relative, P.max_iter, P.tol, o, static_cast<float*>(nullptr), N);
}

// ---- wrd_bwd: envelope gradient through cost = 1 - cos and masses = norms / sum --------------------
//   dL/dx_i = (grad / |x_i|) (I - xh_i xh_i^T) (-(T yh)_i) + grad (f_i - <f, a>) / sum|x| * xh_i
// and the same for y with T^T and g; zero for padding and zero-norm tokens. <(T yh)_i, xh_i> is
// sum_j T_ij (1 - C_ij), from C instead of a dot product over the embedding.

// One side's gradient rows: out token o (compact), reduction over the other side's tokens r with
// weights W_or = Tm[o * so + r * sr].
template <typename T>
__device__ void token_grads(const Tokens<T>& O, const Tokens<T>& R, int64_t p, int cnt_o, int cnt_r,
                            const int* io, const int* ir, const float* inv_o, const float* inv_r,
                            const float* proj, const float* radial, const float* Tm, int so, int sr, float gv,
                            T* out) {
  const int lane = threadIdx.x & 63, rows = int(blockDim.x >> 6) * 4;
  const T* op = O.x + p * O.s0;
  const T* rp = R.x + p * R.s0;
  const int64_t D = O.D;
  for (int o0 = (threadIdx.x >> 6) * 4; o0 < cnt_o; o0 += rows) {  // this thread's 4 tokens o0..o0+3
    int wo[4];  // weight row offsets, -1 past the last token
#pragma unroll
    for (int q = 0; q < 4; ++q) wo[q] = o0 + q < cnt_o ? (o0 + q) * so : -1;
    for (int64_t d0 = 0; d0 < D; d0 += 64) {
      const int64_t dd = d0 + lane;
      const bool dv = dd < D;
      const T* rcol = rp + (dv ? dd : 0) * R.s2;
      float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
      for (int r = 0; r < cnt_r; ++r) {
        const float y = dv ? to_float(rcol[ir[r] * R.s1]) * inv_r[r] : 0.0f;
#pragma unroll
        for (int q = 0; q < 4; ++q) acc[q] = fmaf(wo[q] >= 0 ? -Tm[wo[q] + r * sr] : 0.0f, y, acc[q]);
      }
      if (!dv) continue;
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const int o = o0 + q;
        if (o < cnt_o) {
          const float xh = to_float(op[io[o] * O.s1 + dd * O.s2]) * inv_o[o];
          out[(p * O.L + io[o]) * D + dd] = from_float<T>(gv * inv_o[o] * (acc[q] - proj[o] * xh) + radial[o] * xh);
        }
      }
    }
  }
}

template <typename T>
__device__ void zero_rows(T* out, int64_t p, int64_t L, int64_t D, const float* nrm, bool all) {
  for (int64_t i = 0; i < L; ++i) {
    if (!all && nrm[i] > 0.0f) continue;
    T* row = out + (p * L + i) * D;
    for (int64_t k = threadIdx.x; k < D; k += blockDim.x) row[k] = from_float<T>(0.0f);
  }
}

template <typename T>
__global__ void __launch_bounds__(kMaxThreads, kWrdBwdMinBlocks) wrd_bwd_kernel(const WrdBwdArgs<T> P) {
  Smem s;
  const int64_t M = P.X.L, N = P.Y.L, D = P.X.D;
  const int64_t p = setup_block(P.index, P.ws, M, N, P.L, &s);
  Block blk(s);
  int m, n;
  const bool finite = gather_tokens(s, blk, P.X, P.Y, p, int(P.L.mc), int(P.L.nc), &m, &n);
  const bool dead = !finite || m == 0 || n == 0;
  zero_rows(P.grad_x, p, M, D, s.nx, dead);
  zero_rows(P.grad_y, p, N, D, s.ny, dead);
  if (dead) return;
  const double sx = normalize(s.a, s.la, m, blk);
  const double sy = normalize(s.b, s.lb, n, blk);
  const Dims d = make_dims(m, n, 1, P.L.mat);  // odd ldk: T read along rows and along columns
  cosine_cost(s, d, P.X, P.Y, p);
  const float* fp = P.f + p * M;
  const float* gp = P.g + p * N;
  double fa = 0.0, gb = 0.0;
  for (int k = threadIdx.x; k < m; k += blockDim.x) fa += double(s.a[k]) * double(fp[s.ri[k]]);
  for (int l = threadIdx.x; l < n; l += blockDim.x) gb += double(s.b[l]) * double(gp[s.cj[l]]);
  fa = blk.sum(fa);
  gb = blk.sum(gb);
  // T into the K region (the exponent in double: f + g - C cancels to O(eps)), at this pair's eps
  const double inv = 1.0 / P.eps[p];
  float* Tm = s.K;
  for (int e = threadIdx.x; e < m * n; e += blockDim.x) {
    const int k = e / n, l = e - k * n;
    const double z = (double(fp[s.ri[k]]) + double(gp[s.cj[l]]) - double(s.C[k * d.ldk + l])) * inv;
    Tm[k * d.ldk + l] = s.a[k] * s.b[l] * __expf(float(z));
  }
  __syncthreads();
  const float gv = P.grad[p];
  // proj_k = <(T yh)_k, xh_k> negated into ls/lt, radial terms into u/v
  for (int k = threadIdx.x; k < m; k += blockDim.x) {
    float acc = 0.0f;
    for (int l = 0; l < n; ++l) acc = fmaf(Tm[k * d.ldk + l], 1.0f - s.C[k * d.ldk + l], acc);
    s.ls[k] = -acc;
    s.u[k] = float(double(gv) * (double(fp[s.ri[k]]) - fa) / sx);
  }
  for (int l = threadIdx.x; l < n; l += blockDim.x) {
    float acc = 0.0f;
    for (int k = 0; k < m; ++k) acc = fmaf(Tm[k * d.ldk + l], 1.0f - s.C[k * d.ldk + l], acc);
    s.lt[l] = -acc;
    s.v[l] = float(double(gv) * (double(gp[s.cj[l]]) - gb) / sy);
  }
  __syncthreads();
  token_grads(P.X, P.Y, p, m, n, s.ri, s.cj, s.ix, s.iy, s.ls, s.u, Tm, d.ldk, 1, gv, P.grad_x);
  token_grads(P.Y, P.X, p, n, m, s.cj, s.ri, s.iy, s.ix, s.lt, s.v, Tm, 1, d.ldk, gv, P.grad_y);
}

}  // namespace sinkhorn_cuda
}  // namespace kx
