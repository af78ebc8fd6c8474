// Batched entropic optimal transport (log-domain Sinkhorn with epsilon scaling, Newton steps for
// slow problems) and Word Rotator's Distance on the CPU. Semantics: kxkernels/ops/sinkhorn/
// reference.py; the schedule constants below are the reference's.
//
// One problem at a time per thread (problems handed out dynamically: their iteration counts
// differ by 100x). A problem's padding (zero-mass rows/columns) is dropped first, so the solver
// sees a dense m x n problem whose cost, scaled kernel and its transpose stay in the thread's
// L1/L2 (3 x 64 x 64 floats = 48 KB).
//
// Precision in float32: the exponent (f_i + g_j - C_ij) / eps is a difference of numbers far
// larger than eps, so the potentials live in two parts -- F, G (double, cost units) folded into
// the scaled kernel K_ij = (C_ij - F_i - G_j) / eps, and small offsets u, v (float, units of eps)
// that the sweeps update. Near the plan's support K is O(1), so a float exponent u_i + v_j - K_ij
// is accurate to ~1e-7 and a marginal error of 1e-6 is reachable; the offsets are folded back into
// F, G whenever they grow (and at every eps change).
//
// A sweep's row update needs s_i = sum_j b_j exp(u_i + v_j - K_ij) = (row i of the plan) / a_i:
// the current offset u_i is the stabilizer (no max pass), log s_i is the update and
// sum_i a_i |s_i - 1| the row-marginal error, for free. The sum runs over the reduction index
// with the outputs in SIMD lanes (no horizontal reductions); an output whose sum leaves
// [kSumMin, kSumMax] is redone with an exact max-shifted logsumexp.
#include <ATen/Parallel.h>
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <type_traits>
#include <vector>

#include "common/checks.h"
#include "common/math.h"
#include "common/output.h"

#pragma GCC diagnostic ignored "-Wpsabi"  // 32-byte vector types in the non-AVX fallback build

namespace kx {
namespace {

// ---- schedule: the same numbers as kxkernels/ops/sinkhorn/reference.py -------------------------
constexpr double kEpsRatio = 0.25;    // eps_{k+1} = max(kEpsRatio * eps_k, eps)
constexpr int kStageSweeps = 2;       // sweeps per intermediate eps at most ...
constexpr double kStageTol = 0.1;     // ... fewer once the marginal error is below this
constexpr double kOmega = 1.8;        // over-relaxation at the final eps
// ---- CPU additions -----------------------------------------------------------------------------
constexpr int kNewtonAfter = 15;       // final-eps sweeps before Newton steps take over
constexpr double kNewtonMaxStep = 20;  // largest potential change of one Newton step, units of eps
constexpr int kLineSearchHalvings = 8; // step halvings before a Newton step is given up
constexpr double kArmijo = 1e-4;       // sufficient increase of the dual objective
constexpr double kDualNoiseF32 = 1e-5; // resolution of a dual change, units of eps (float offsets)
constexpr double kDualNoiseF64 = 1e-12;
constexpr double kAbsorbAbove = 4.0;   // fold offsets |u|, |v| (units of eps) above this into F, G
constexpr float kSumMin = 1e-30f, kSumMax = 1e30f;  // stabilized sums outside: exact logsumexp
constexpr float kPadK = 1e30f;         // kernel value in SIMD pad lanes: exp(-1e30) = 0

constexpr int64_t kLanes = 8;
typedef float f32x8 __attribute__((vector_size(32)));
typedef int32_t i32x8 __attribute__((vector_size(32)));
typedef double f64x4 __attribute__((vector_size(32)));

#define KX_INLINE inline __attribute__((always_inline))

KX_INLINE int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

KX_INLINE f32x8 load8(const float* p) {
  f32x8 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
KX_INLINE void store8(float* p, f32x8 v) { std::memcpy(p, &v, sizeof(v)); }
// vector + scalar broadcasts in a register (an {x, x, ...} initializer goes through the stack)
KX_INLINE f32x8 splat8(float x) { return f32x8{} + x; }
KX_INLINE f64x4 load4d(const double* p) {
  f64x4 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// exp(x) for float lanes: Cody-Waite reduction to r in [-ln2/2, ln2/2] and the Cephes expf
// polynomial, relative error below 2 ulp (2.4e-7) for x in [-87.3, 88.7]; exactly 0 below.
KX_INLINE f32x8 vexp(f32x8 x) {
  const f32x8 lo = splat8(-87.3f), hi = splat8(88.7f);
  const i32x8 under = x < lo;
  x = x < lo ? lo : x;
  x = x > hi ? hi : x;
  const f32x8 magic = splat8(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  const f32x8 t = x * splat8(1.44269504088896341f) + magic;
  const f32x8 n = t - magic;
  f32x8 r = x - n * splat8(0.693359375f);
  r = r - n * splat8(-2.12194440e-4f);
  f32x8 p = splat8(1.9875691500e-4f);
  p = p * r + splat8(1.3981999507e-3f);
  p = p * r + splat8(8.3334519073e-3f);
  p = p * r + splat8(4.1665795894e-2f);
  p = p * r + splat8(1.6666665459e-1f);
  p = p * r + splat8(5.0000001201e-1f);
  p = p * (r * r) + r + splat8(1.0f);
  i32x8 bits = (i32x8)p + (((i32x8)t - (i32x8)magic) << 23);
  bits &= ~under;
  return (f32x8)bits;
}

// log(x) for positive normal float lanes (the callers guarantee [kSumMin, kSumMax]): Cephes logf,
// relative error below 2 ulp.
KX_INLINE f32x8 vlog(f32x8 x) {
  i32x8 bits = (i32x8)x;
  f32x8 e = __builtin_convertvector(((bits >> 23) & 0xff) - 126, f32x8);
  f32x8 m = (f32x8)((bits & 0x007fffff) | 0x3f000000);  // mantissa in [0.5, 1)
  const i32x8 small = m < splat8(0.707106781186547524f);
  e = e - (f32x8)((i32x8)splat8(1.0f) & small);
  m = (f32x8)(((i32x8)(m + m) & small) | ((i32x8)m & ~small)) - splat8(1.0f);
  const f32x8 z = m * m;
  f32x8 y = splat8(7.0376836292e-2f);
  y = y * m + splat8(-1.1514610310e-1f);
  y = y * m + splat8(1.1676998740e-1f);
  y = y * m + splat8(-1.2420140846e-1f);
  y = y * m + splat8(1.4249322787e-1f);
  y = y * m + splat8(-1.6668057665e-1f);
  y = y * m + splat8(2.0000714765e-1f);
  y = y * m + splat8(-2.4999993993e-1f);
  y = y * m + splat8(3.3333331174e-1f);
  y = y * m * z;
  y = y + e * splat8(-2.12194440e-4f);
  y = y - splat8(0.5f) * z;
  return m + y + e * splat8(0.693359375f);
}

// out_j = exp(c + v_j - K_j) over a padded row (pad lanes of K give 0).
KX_INLINE void exp_row(const float* K, const float* v, float c, int64_t n, float* out) {
  for (int64_t j = 0; j < n; j += kLanes) store8(out + j, vexp(splat8(c) + load8(v + j) - load8(K + j)));
}
KX_INLINE void exp_row(const double* K, const double* v, double c, int64_t n, double* out) {
  for (int64_t j = 0; j < n; ++j) out[j] = std::exp(c + v[j] - K[j]);
}

KX_INLINE float hsum8(f32x8 v) {
  float s = 0;
  for (int l = 0; l < 8; ++l) s += v[l];
  return s;
}

// Dot product of two contiguous float rows (four independent accumulators).
KX_INLINE float dot_f(const float* x, const float* y, int64_t D) {
  f32x8 a0 = splat8(0), a1 = splat8(0), a2 = splat8(0), a3 = splat8(0);
  int64_t k = 0;
  for (; k + 32 <= D; k += 32) {
    a0 += load8(x + k) * load8(y + k);
    a1 += load8(x + k + 8) * load8(y + k + 8);
    a2 += load8(x + k + 16) * load8(y + k + 16);
    a3 += load8(x + k + 24) * load8(y + k + 24);
  }
  for (; k + 8 <= D; k += 8) a0 += load8(x + k) * load8(y + k);
  float s = hsum8((a0 + a1) + (a2 + a3));
  for (; k < D; ++k) s += x[k] * y[k];
  return s;
}
KX_INLINE double dot_f(const double* x, const double* y, int64_t D) {
  double s = 0;
  for (int64_t k = 0; k < D; ++k) s += x[k] * y[k];
  return s;
}

// Dot product of two contiguous double rows, for the Newton system.
KX_INLINE double dot_d(const double* x, const double* y, int64_t n) {
  f64x4 a0 = {0, 0, 0, 0}, a1 = {0, 0, 0, 0};
  int64_t k = 0;
  for (; k + 8 <= n; k += 8) {
    a0 += load4d(x + k) * load4d(y + k);
    a1 += load4d(x + k + 4) * load4d(y + k + 4);
  }
  for (; k + 4 <= n; k += 4) a0 += load4d(x + k) * load4d(y + k);
  a0 += a1;
  double s = (a0[0] + a0[1]) + (a0[2] + a0[3]);
  for (; k < n; ++k) s += x[k] * y[k];
  return s;
}

// Owned, 64-byte aligned scratch that only grows.
template <typename T>
struct Buf {
  std::unique_ptr<T[], void (*)(T*)> p{nullptr, [](T* q) { std::free(q); }};
  int64_t cap = 0;
  T* get(int64_t n) {
    if (n > cap) {
      void* q = nullptr;
      if (posix_memalign(&q, 64, sizeof(T) * std::max<int64_t>(n, 1)) != 0) throw std::bad_alloc();
      p.reset(static_cast<T*>(q));
      cap = n;
    }
    return p.get();
  }
};

// One thread's workspace: a problem with its padding dropped, m x n, strides ldm/ldn rounded up to
// the SIMD width. A = float (float32/float16/bfloat16 inputs) or double (float64).
template <typename A>
struct Work {
  int64_t m = 0, n = 0, ldm = 0, ldn = 0;
  A *C, *K, *KT;         // cost (m x ldn), scaled kernel (m x ldn), its transpose (n x ldm)
  A *u, *v, *la, *lb;    // offsets (units of eps), log masses; padded to ldm / ldn with 0
  A *w, *ls;             // reduction weights, log-sums of one half-sweep
  A *ut, *vt;            // Newton trial offsets
  double *F, *G, *a, *b; // absorbed potentials (cost units), normalized masses
  double *Q, *S, *dF, *r, *sqb;  // Newton: scaled plan (m x ldn), system (m x m), step, row sums, sqrt(b)
  int64_t *ri, *cj;      // compact index -> original row / column
  A *xh, *yh, *gacc;     // wrd: converted token copies (m x D, n x D), a D-long accumulator
  const A **xr, **yr;    // wrd: token rows (into the input or xh / yh)
  A *ixn, *iyn;          // wrd: inverse token norms
  double eps = 0;        // eps of the current stage
  Buf<A> bA;
  Buf<double> bD;
  Buf<int64_t> bI;
  Buf<A> bX;
  Buf<const A*> bR;

  void reserve(int64_t M, int64_t N, int64_t D) {
    const int64_t lm = round_up(std::max<int64_t>(M, 1), kLanes), ln = round_up(std::max<int64_t>(N, 1), kLanes);
    A* pa = bA.get(3 * lm * ln + 6 * lm + 6 * ln);
    C = pa; K = C + lm * ln; KT = K + lm * ln;
    u = KT + lm * ln; la = u + lm; ut = la + lm;
    v = ut + lm; lb = v + ln; vt = lb + ln;
    w = vt + ln; ls = w + std::max(lm, ln);
    double* pd = bD.get(2 * lm + 3 * ln + lm * ln + lm * lm + 2 * lm);
    F = pd; a = F + lm; G = a + lm; b = G + ln; Q = b + ln; S = Q + lm * ln; dF = S + lm * lm; r = dF + lm;
    sqb = r + lm;
    int64_t* pi = bI.get(lm + ln);
    ri = pi; cj = pi + lm;
    if (D > 0) {
      A* px = bX.get((lm + ln + 1) * D + lm + ln);
      xh = px; yh = px + lm * D; gacc = yh + ln * D; ixn = gacc + D; iyn = ixn + lm;
      const A** pr = bR.get(lm + ln);
      xr = pr; yr = pr + lm;
    }
  }
  void set_shape(int64_t m_, int64_t n_) {
    m = m_; n = n_;
    ldm = round_up(std::max<int64_t>(m, 1), kLanes);
    ldn = round_up(std::max<int64_t>(n, 1), kLanes);
  }
};

// ---- the solver ----------------------------------------------------------------------------------
// K = (C - F - G) / eps and its transpose, with pad lanes that contribute exp(-kPadK) = 0.
template <typename A>
KX_INLINE void rebuild(Work<A>& W) {
  const int64_t m = W.m, n = W.n;
  const double inv = 1.0 / W.eps;
  for (int64_t i = 0; i < m; ++i) {
    A* Ki = W.K + i * W.ldn;
    const A* Ci = W.C + i * W.ldn;
    const double Fi = W.F[i];
    for (int64_t j = 0; j < n; ++j) Ki[j] = A((double(Ci[j]) - Fi - W.G[j]) * inv);
    for (int64_t j = n; j < W.ldn; ++j) Ki[j] = A(kPadK);
  }
  for (int64_t j = 0; j < n; ++j) {
    A* KTj = W.KT + j * W.ldm;
    for (int64_t i = 0; i < m; ++i) KTj[i] = W.K[i * W.ldn + j];
    for (int64_t i = m; i < W.ldm; ++i) KTj[i] = A(kPadK);
  }
}

// Fold the offsets into F, G (at the current eps) and zero them.
template <typename A>
KX_INLINE void absorb(Work<A>& W) {
  for (int64_t i = 0; i < W.m; ++i) { W.F[i] += W.eps * double(W.u[i]); W.u[i] = 0; }
  for (int64_t j = 0; j < W.n; ++j) { W.G[j] += W.eps * double(W.v[j]); W.v[j] = 0; }
  rebuild(W);
}

// Exact log sum_r exp(w_r + t - K[r * ld + o]) for one output (the rare fallback).
template <typename A>
KX_INLINE A exact_lse(const A* K, int64_t ld, const A* w, int64_t n_red, A t, int64_t o) {
  double mx = -std::numeric_limits<double>::infinity();
  for (int64_t r = 0; r < n_red; ++r) mx = std::max(mx, double(w[r]) + double(t) - double(K[r * ld + o]));
  if (!(mx > -std::numeric_limits<double>::infinity())) return A(-std::numeric_limits<double>::infinity());
  double s = 0;
  for (int64_t r = 0; r < n_red; ++r) s += std::exp(double(w[r]) + double(t) - double(K[r * ld + o]) - mx);
  return A(mx + std::log(s));
}

// Half-sweep sums: ls_o = log sum_r exp(w_r + t_o - K[r * ld + o]) for o < n_out, over the
// reduction rows r < n_red of K (so outputs are contiguous). Returns sum_o mass_o |exp(ls_o) - 1|,
// the marginal error of the side being updated. t_o is the output's current offset: the sums are
// then ratios near 1, and out-of-range ones are redone exactly.
KX_INLINE double lse_sums(const float* K, int64_t ld, const float* w, int64_t n_red, const float* t,
                          int64_t n_out, const double* mass, float* ls) {
  double err = 0;
  for (int64_t o = 0; o < n_out; o += kLanes) {
    const f32x8 tv = load8(t + o);
    f32x8 acc0 = splat8(0), acc1 = splat8(0);
    int64_t r = 0;
    for (; r + 2 <= n_red; r += 2) {  // two chains: the adds do not wait on each other
      acc0 += vexp(splat8(w[r]) + tv - load8(K + r * ld + o));
      acc1 += vexp(splat8(w[r + 1]) + tv - load8(K + (r + 1) * ld + o));
    }
    if (r < n_red) acc0 += vexp(splat8(w[r]) + tv - load8(K + r * ld + o));
    f32x8 s = acc0 + acc1;
    const int64_t lanes = std::min<int64_t>(kLanes, n_out - o);
    bool ok = true;
    for (int64_t l = 0; l < lanes; ++l) ok &= s[l] >= kSumMin && s[l] <= kSumMax;
    if (ok) {
      for (int64_t l = lanes; l < kLanes; ++l) s[l] = 1.0f;
      store8(ls + o, vlog(s));
      for (int64_t l = 0; l < lanes; ++l) err += mass[o + l] * std::fabs(double(s[l]) - 1.0);
    } else {
      for (int64_t l = 0; l < lanes; ++l) {
        float lv;
        if (s[l] >= kSumMin && s[l] <= kSumMax) {
          lv = std::log(s[l]);
        } else {
          lv = exact_lse(K, ld, w, n_red, t[o + l], o + l);
        }
        ls[o + l] = lv;
        err += mass[o + l] * std::fabs(std::expm1(double(lv)));
      }
    }
  }
  return std::isfinite(err) ? err : std::numeric_limits<double>::max();
}

KX_INLINE double lse_sums(const double* K, int64_t ld, const double* w, int64_t n_red, const double* t,
                          int64_t n_out, const double* mass, double* ls) {
  double err = 0;
  for (int64_t o = 0; o < n_out; ++o) {
    double s = 0;
    for (int64_t r = 0; r < n_red; ++r) s += std::exp(w[r] + t[o] - K[r * ld + o]);
    const double lv = (s >= 1e-300 && s <= 1e300) ? std::log(s) : exact_lse(K, ld, w, n_red, t[o], o);
    ls[o] = lv;
    err += mass[o] * std::fabs(std::expm1(lv));
  }
  return std::isfinite(err) ? err : std::numeric_limits<double>::max();
}

// Row sums of the plan of (u_t, v_t): log ratios in W.ls, returns the row-marginal L1 error.
template <typename A>
KX_INLINE double row_sums(Work<A>& W, const A* ut, const A* vt) {
  for (int64_t j = 0; j < W.n; ++j) W.w[j] = W.lb[j] + vt[j];
  return lse_sums(W.KT, W.ldm, W.w, W.n, ut, W.m, W.a, W.ls);
}
template <typename A>
KX_INLINE double col_sums(Work<A>& W, const A* ut, const A* vt) {
  for (int64_t i = 0; i < W.m; ++i) W.w[i] = W.la[i] + ut[i];
  return lse_sums(W.K, W.ldn, W.w, W.m, vt, W.n, W.b, W.ls);
}
template <typename A>
KX_INLINE void apply(A* x, const A* ls, int64_t n, A omega) {
  for (int64_t k = 0; k < n; ++k) x[k] -= omega * ls[k];
}
template <typename A>
KX_INLINE bool offsets_large(const Work<A>& W) {
  A mx = 0;
  for (int64_t i = 0; i < W.m; ++i) mx = std::max(mx, A(std::fabs(W.u[i])));
  for (int64_t j = 0; j < W.n; ++j) mx = std::max(mx, A(std::fabs(W.v[j])));
  return !(mx <= A(kAbsorbAbove));
}

// In-place Cholesky of the m x m lower triangle of S (row stride m); false if not positive definite.
KX_INLINE bool cholesky(double* S, int64_t m) {
  for (int64_t i = 0; i < m; ++i) {
    double* Si = S + i * m;
    for (int64_t k = 0; k < i; ++k) {
      const double* Sk = S + k * m;
      Si[k] = (Si[k] - dot_d(Si, Sk, k)) / Sk[k];
    }
    const double d = Si[i] - dot_d(Si, Si, i);
    if (!(d > 0)) return false;
    Si[i] = std::sqrt(d);
  }
  return true;
}
KX_INLINE void cholesky_solve(const double* L, int64_t m, double* x) {
  for (int64_t i = 0; i < m; ++i) x[i] = (x[i] - dot_d(L + i * m, x, i)) / L[i * m + i];
  for (int64_t i = m - 1; i >= 0; --i) {
    double s = x[i];
    for (int64_t k = i + 1; k < m; ++k) s -= L[k * m + i] * x[k];
    x[i] = s / L[i * m + i];
  }
}

enum class NewtonEnd { kConverged, kMaxIter, kStalled };

// Newton steps on the semi-dual max_f <f, a> + <g(f), b> (g the exact c-transform of f, so the
// columns stay exact): Hessian -(diag(r) - T diag(1/b) T^T) / eps, a Schur complement of the full
// dual Hessian (Brauer et al. 2017, "A Sinkhorn-Newton method for entropic optimal transport").
// The constant vector spans its null space; adding r_max/m * 1 1^T makes it definite without
// changing the step. Steps are capped at kNewtonMaxStep * eps per potential and backtracked
// until the dual increases enough (Armijo) or the marginal error drops.
template <typename A>
KX_INLINE NewtonEnd newton(Work<A>& W, int64_t& it, int64_t max_iter, double tol, double& err) {
  const int64_t m = W.m, n = W.n;
  for (int64_t j = 0; j < n; ++j) W.sqb[j] = std::sqrt(W.b[j]);
  // exact columns at offsets 0: a plain column update, folded into G
  col_sums(W, W.u, W.v);
  apply(W.v, W.ls, n, A(1));
  absorb(W);
  while (true) {
    // plan at offsets 0: T_ij = a_i b_j exp(-K_ij); Q_ij = T_ij / sqrt(b_j), r = T 1
    err = 0;
    double rmax = 0;
    for (int64_t i = 0; i < m; ++i) {
      exp_row(W.K + i * W.ldn, W.v, A(0), W.ldn, W.ls);  // offsets are 0 here
      double* Qi = W.Q + i * W.ldn;
      double ri = 0;
      for (int64_t j = 0; j < n; ++j) {
        const double e = double(W.ls[j]);
        ri += W.b[j] * e;
        Qi[j] = W.a[i] * W.sqb[j] * e;
      }
      ri *= W.a[i];
      W.r[i] = ri;
      rmax = std::max(rmax, ri);
      err += std::fabs(ri - W.a[i]);
    }
    if (err < tol) return NewtonEnd::kConverged;
    if (it >= max_iter) return NewtonEnd::kMaxIter;
    ++it;
    double delta = 1e-10;
    bool factored = false;
    for (int attempt = 0; attempt < 3 && !factored; ++attempt, delta *= 1e3) {
      for (int64_t i = 0; i < m; ++i) {
        for (int64_t k = 0; k <= i; ++k)
          W.S[i * m + k] = rmax / double(m) - dot_d(W.Q + i * W.ldn, W.Q + k * W.ldn, n);
        W.S[i * m + i] += W.r[i] * (1.0 + delta);
      }
      factored = cholesky(W.S, m);
    }
    if (!factored) return NewtonEnd::kStalled;
    double step_max = 0;
    for (int64_t i = 0; i < m; ++i) W.dF[i] = W.a[i] - W.r[i];
    cholesky_solve(W.S, m, W.dF);
    for (int64_t i = 0; i < m; ++i) {
      W.dF[i] *= W.eps;
      step_max = std::max(step_max, std::fabs(W.dF[i]));
    }
    if (!(step_max > 0) || !std::isfinite(step_max)) return NewtonEnd::kStalled;
    const double cap = kNewtonMaxStep * W.eps;
    if (step_max > cap)
      for (int64_t i = 0; i < m; ++i) W.dF[i] *= cap / step_max;
    double slope = 0, da = 0;
    for (int64_t i = 0; i < m; ++i) {
      slope += (W.a[i] - W.r[i]) * W.dF[i];
      da += W.dF[i] * W.a[i];
    }
    const double noise = W.eps * (std::is_same<A, float>::value ? kDualNoiseF32 : kDualNoiseF64);
    double t = 1;
    bool accepted = false;
    for (int h = 0; h <= kLineSearchHalvings && !accepted; ++h, t *= 0.5) {
      for (int64_t i = 0; i < W.ldm; ++i) W.ut[i] = i < m ? A(t * W.dF[i] / W.eps) : A(0);
      for (int64_t j = 0; j < W.ldn; ++j) W.vt[j] = 0;
      col_sums(W, W.ut, W.vt);  // c-transform of the trial potentials
      double gain = t * da;
      for (int64_t j = 0; j < n; ++j) {
        W.vt[j] = -W.ls[j];
        gain += W.eps * double(W.vt[j]) * W.b[j];
      }
      const double err_new = row_sums(W, W.ut, W.vt);
      // the dual must rise (Armijo); near convergence, where its rise is below float resolution,
      // a step that keeps it level and lowers the marginal error is taken too (never one that
      // lowers the dual: that can cycle)
      accepted = gain >= kArmijo * t * slope || (gain >= -noise && err_new < err);
    }
    if (!accepted) return NewtonEnd::kStalled;
    std::copy(W.ut, W.ut + W.ldm, W.u);
    std::copy(W.vt, W.vt + W.ldn, W.v);
    absorb(W);
  }
}

struct Stats {
  int64_t n_iter = 0;
  double err = 0;
};

// Solve the problem set up in W (C, a, b, la, lb, m, n) at eps (times the problem's cost spread
// max C - min C when `relative`, or 1 where that is 0); leaves F, G, u, v, W.eps.
template <typename A>
KX_INLINE Stats solve(Work<A>& W, double eps, int64_t max_iter, double tol, bool use_newton, bool relative) {
  const int64_t m = W.m, n = W.n;
  double cmin = std::numeric_limits<double>::infinity(), cmax = -cmin;
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < n; ++j) {
      cmin = std::min(cmin, double(W.C[i * W.ldn + j]));
      cmax = std::max(cmax, double(W.C[i * W.ldn + j]));
    }
  if (relative && cmax > cmin) eps *= cmax - cmin;
  W.eps = std::max(cmax - cmin, eps);
  std::fill(W.F, W.F + W.ldm, 0.0);
  std::fill(W.G, W.G + W.ldn, 0.0);
  std::fill(W.u, W.u + W.ldm, A(0));
  std::fill(W.v, W.v + W.ldn, A(0));
  rebuild(W);
  Stats st;
  int stage_sweeps = 0, final_sweeps = 0;
  bool confirm = false;
  while (true) {
    const bool final = W.eps <= eps;
    if (final && use_newton && final_sweeps >= kNewtonAfter && m > 1 && n > 1) {
      const NewtonEnd end = newton(W, st.n_iter, max_iter, tol, st.err);
      if (end != NewtonEnd::kStalled) return st;
      final_sweeps = 0;  // Newton made no progress: more sweeps, then Newton again
      confirm = false;
    }
    const double err = row_sums(W, W.u, W.v);
    st.err = err;
    if (final && confirm && err < tol) return st;
    if (st.n_iter >= max_iter) {
      // out of iterations: a plain column update makes the columns exact; err is then the
      // row-marginal error of the plan returned
      col_sums(W, W.u, W.v);
      apply(W.v, W.ls, n, A(1));
      st.err = row_sums(W, W.u, W.v);
      // stopped before the schedule reached eps: the results belong to W.eps (reported with
      // them); err is at least tol, so err < tol always means converged at the requested eps
      if (!final) st.err = std::max(st.err, tol);
      return st;
    }
    ++st.n_iter;
    const bool relax = final && !(err < tol);
    const A omega = relax ? A(kOmega) : A(1);
    apply(W.u, W.ls, m, omega);
    col_sums(W, W.u, W.v);
    apply(W.v, W.ls, n, omega);
    confirm = !relax;
    if (!final) {
      if (++stage_sweeps >= kStageSweeps || err < kStageTol) {
        for (int64_t i = 0; i < m; ++i) { W.F[i] += W.eps * double(W.u[i]); W.u[i] = 0; }
        for (int64_t j = 0; j < n; ++j) { W.G[j] += W.eps * double(W.v[j]); W.v[j] = 0; }
        W.eps = std::max(W.eps * kEpsRatio, eps);
        rebuild(W);
        stage_sweeps = 0;
        confirm = false;
      }
    } else {
      ++final_sweeps;
      if (offsets_large(W)) absorb(W);
    }
  }
}

// Potentials f = F + eps u, g = G + eps v (shifted so that <f, a> = <g, b>), the transport cost
// <T, C> and the dual <f, a> + <g, b>; the plan row by row through `plan_row` when given.
template <typename A, typename PlanRow>
KX_INLINE void finish(Work<A>& W, double& value, double& dual, PlanRow&& plan_row) {
  const int64_t m = W.m, n = W.n;
  double fa = 0, gb = 0;
  for (int64_t i = 0; i < m; ++i) fa += (W.F[i] + W.eps * double(W.u[i])) * W.a[i];
  for (int64_t j = 0; j < n; ++j) gb += (W.G[j] + W.eps * double(W.v[j])) * W.b[j];
  const double shift = 0.5 * (fa - gb);
  for (int64_t i = 0; i < m; ++i) W.F[i] += W.eps * double(W.u[i]) - shift;
  for (int64_t j = 0; j < n; ++j) W.G[j] += W.eps * double(W.v[j]) + shift;
  dual = fa + gb;
  value = 0;
  for (int64_t i = 0; i < m; ++i) {
    const A* Ci = W.C + i * W.ldn;
    A* row = W.ls;  // scratch of length >= ldn
    exp_row(W.K + i * W.ldn, W.v, W.u[i], W.ldn, row);
    double s = 0;
    for (int64_t j = 0; j < n; ++j) {
      const double t = W.a[i] * W.b[j] * double(row[j]);
      row[j] = A(t);
      s += t * double(Ci[j]);
    }
    value += s;
    plan_row(i, row);
  }
}

// Masses of a problem: compact index lists of the non-zero entries, normalized, logs.
template <typename A>
KX_INLINE void set_masses(Work<A>& W, const double* araw, const double* braw) {
  double sa = 0, sb = 0;
  for (int64_t i = 0; i < W.m; ++i) sa += araw[i];
  for (int64_t j = 0; j < W.n; ++j) sb += braw[j];
  for (int64_t i = 0; i < W.ldm; ++i) {
    W.a[i] = i < W.m ? araw[i] / sa : 0.0;
    W.la[i] = i < W.m ? A(std::log(W.a[i])) : A(0);
  }
  for (int64_t j = 0; j < W.ldn; ++j) {
    W.b[j] = j < W.n ? braw[j] / sb : 0.0;
    W.lb[j] = j < W.n ? A(std::log(W.b[j])) : A(0);
  }
}

// A problem without mass on a side: all padding gives zeros; mass on one side only has no plan
// (nothing can move): value 0, err 1. Potentials are already zero.
template <typename Args>
KX_INLINE void no_mass(const Args& P, int64_t p, bool both) {
  P.value[p] = 0; P.dual[p] = 0; P.n_iter[p] = 0;
  P.err[p] = both ? 0 : 1;
  P.eps_out[p] = P.eps;
}
// A non-finite input at a real entry: recorded (the lowest such problem), and the op raises a
// ValueError once every problem is done. The outputs of the problem are written (NaN) meanwhile.
template <typename Args>
KX_INLINE void not_finite(const Args& P, int64_t p) {
  const double nan = std::numeric_limits<double>::quiet_NaN();
  P.value[p] = nan; P.dual[p] = nan; P.n_iter[p] = 0; P.err[p] = nan; P.eps_out[p] = nan;
  int64_t cur = P.bad->load();
  while (p < cur && !P.bad->compare_exchange_weak(cur, p)) {}
}

// ---- sinkhorn_fwd ---------------------------------------------------------------------------------
template <typename T, typename A>
struct SinkhornArgs {
  const T *cost, *a, *b;
  int64_t M, N, cs0, cs1, cs2, as0, as1, bs0, bs1;
  double eps, tol;
  int64_t max_iter;
  bool newton, relative;
  A *value, *dual, *f, *g, *err;
  double* eps_out;  // the eps the problem's results belong to (> eps: stopped before the schedule ended)
  int64_t* n_iter;
  T* plan;  // (B, M, N) contiguous or null
  std::atomic<int64_t>* bad;  // lowest problem with a non-finite cost at a real entry (B if none)
};

template <typename T, typename A>
KX_INLINE void sinkhorn_problem(const SinkhornArgs<T, A>& P, Work<A>& W, int64_t p, double* araw, double* braw) {
  const T* ap = P.a + p * P.as0;
  const T* bp = P.b + p * P.bs0;
  int64_t m = 0, n = 0;
  for (int64_t i = 0; i < P.M; ++i) {
    const double x = double(ap[i * P.as1]);
    if (x > 0) { W.ri[m] = i; araw[m++] = x; }
  }
  for (int64_t j = 0; j < P.N; ++j) {
    const double x = double(bp[j * P.bs1]);
    if (x > 0) { W.cj[n] = j; braw[n++] = x; }
  }
  A* fo = P.f + p * P.M;
  A* go = P.g + p * P.N;
  std::fill(fo, fo + P.M, A(0));
  std::fill(go, go + P.N, A(0));
  T* plan = P.plan ? P.plan + p * P.M * P.N : nullptr;
  if (plan) std::fill(plan, plan + P.M * P.N, T(0));
  if (m == 0 || n == 0) return no_mass(P, p, m == 0 && n == 0);
  W.set_shape(m, n);
  set_masses(W, araw, braw);
  const T* cp = P.cost + p * P.cs0;
  bool finite = true;
  for (int64_t i = 0; i < m; ++i) {
    const T* row = cp + W.ri[i] * P.cs1;
    A* Ci = W.C + i * W.ldn;
    for (int64_t j = 0; j < n; ++j) {
      Ci[j] = A(row[W.cj[j] * P.cs2]);
      finite &= std::isfinite(Ci[j]);
    }
  }
  if (!finite) return not_finite(P, p);
  const Stats st = solve(W, P.eps, P.max_iter, P.tol, P.newton, P.relative);
  double value, dual;
  finish(W, value, dual, [&](int64_t i, const A* row) {
    if (!plan) return;
    T* out = plan + W.ri[i] * P.N;
    for (int64_t j = 0; j < n; ++j) out[W.cj[j]] = T(row[j]);
  });
  for (int64_t i = 0; i < m; ++i) fo[W.ri[i]] = A(W.F[i]);
  for (int64_t j = 0; j < n; ++j) go[W.cj[j]] = A(W.G[j]);
  P.value[p] = A(value);
  P.dual[p] = A(dual);
  P.n_iter[p] = st.n_iter;
  P.err[p] = A(st.err);
  P.eps_out[p] = W.eps;
}

template <typename T, typename A>
__attribute__((target("avx2,fma"))) void sinkhorn_problem_avx2(const SinkhornArgs<T, A>& P, Work<A>& W,
                                                               int64_t p, double* ar, double* br) {
  sinkhorn_problem(P, W, p, ar, br);
}
template <typename T, typename A>
void sinkhorn_problem_base(const SinkhornArgs<T, A>& P, Work<A>& W, int64_t p, double* ar, double* br) {
  sinkhorn_problem(P, W, p, ar, br);
}

bool cpu_has_avx2() {
  static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return yes;
}

// Run `body(W, p)` over problems [0, B): each thread takes the next problem when it is done.
template <typename A, typename Body>
void for_each_problem(int64_t B, int64_t M, int64_t N, int64_t D, Body&& body) {
  if (B == 0) return;
  std::atomic<int64_t> next{0};
  const int64_t nt = std::min<int64_t>(at::get_num_threads(), B);
  at::parallel_for(0, nt, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      Work<A> W;
      W.reserve(M, N, D);
      std::vector<double> ar(std::max<int64_t>(M, 1)), br(std::max<int64_t>(N, 1));
      for (int64_t p; (p = next.fetch_add(1)) < B;) body(W, p, ar.data(), br.data());
    }
  });
}

at::ScalarType acc_type(at::ScalarType s) { return s == at::kDouble ? at::kDouble : at::kFloat; }

void check_problem_tensors(const at::Tensor& cost, const at::Tensor& a, const at::Tensor& b) {
  check_floating(cost, "cost");
  check_dim(cost, 3, "cost");
  check_dim(a, 2, "a");
  check_dim(b, 2, "b");
  check_same_device(cost, a, "cost", "a");
  check_same_device(cost, b, "cost", "b");
  KX_CHECK(a.scalar_type() == cost.scalar_type() && b.scalar_type() == cost.scalar_type(),
           "a and b must have the dtype of cost (", cost.scalar_type(), "), got ", a.scalar_type(),
           " and ", b.scalar_type());
  KX_CHECK(a.size(0) == cost.size(0) && a.size(1) == cost.size(1), "a must have shape (",
           cost.size(0), ", ", cost.size(1), "), got ", a.sizes());
  KX_CHECK(b.size(0) == cost.size(0) && b.size(1) == cost.size(2), "b must have shape (",
           cost.size(0), ", ", cost.size(2), "), got ", b.sizes());
}

void check_settings(double eps, int64_t max_iter, double tol) {
  KX_CHECK(eps > 0 && std::isfinite(eps), "eps must be a finite number > 0, got ", eps);
  KX_CHECK(max_iter >= 1, "max_iter must be >= 1, got ", max_iter);
  KX_CHECK(tol > 0, "tol must be > 0, got ", tol);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
sinkhorn_fwd_cpu(const at::Tensor& cost, const at::Tensor& a, const at::Tensor& b, double eps,
                 int64_t max_iter, double tol, bool return_plan, bool newton, bool relative_eps) {
  check_problem_tensors(cost, a, b);
  check_settings(eps, max_iter, tol);
  const int64_t B = cost.size(0), M = cost.size(1), N = cost.size(2);
  auto acc = cost.options().dtype(acc_type(cost.scalar_type()));
  at::Tensor value = new_output({B}, acc), dual = new_output({B}, acc);
  at::Tensor f = new_output({B, M}, acc), g = new_output({B, N}, acc), err = new_output({B}, acc);
  at::Tensor n_iter = new_output({B}, cost.options().dtype(at::kLong));
  at::Tensor plan = return_plan ? new_output({B, M, N}, cost.options()) : at::empty({0}, cost.options());
  at::Tensor eps_out = new_output({B}, cost.options().dtype(at::kDouble));
  std::atomic<int64_t> bad{B};
  KX_DISPATCH_FLOATING(cost.scalar_type(), "sinkhorn_fwd", [&] {
    using A = acc_t<scalar_t>;
    SinkhornArgs<scalar_t, A> P{cost.data_ptr<scalar_t>(), a.data_ptr<scalar_t>(), b.data_ptr<scalar_t>(),
                                M, N, cost.stride(0), cost.stride(1), cost.stride(2), a.stride(0),
                                a.stride(1), b.stride(0), b.stride(1), eps, tol, max_iter, newton, relative_eps,
                                value.data_ptr<A>(), dual.data_ptr<A>(), f.data_ptr<A>(), g.data_ptr<A>(),
                                err.data_ptr<A>(), eps_out.data_ptr<double>(), n_iter.data_ptr<int64_t>(),
                                return_plan ? plan.data_ptr<scalar_t>() : nullptr, &bad};
    const bool avx2 = cpu_has_avx2();
    for_each_problem<A>(B, M, N, 0, [&](Work<A>& W, int64_t p, double* ar, double* br) {
      if (avx2) sinkhorn_problem_avx2(P, W, p, ar, br);
      else sinkhorn_problem_base(P, W, p, ar, br);
    });
  });
  KX_CHECK(bad.load() == B, "cost must be finite at real entries (a_i > 0 and b_j > 0): problem ", bad.load(),
           " has an inf or NaN there");
  return {value, dual, f, g, n_iter, err, plan, eps_out};
}

// The backward's per-problem eps (B,) (the forward's eps output) as contiguous float64, checked.
at::Tensor problem_eps(const at::Tensor& eps, int64_t B) {
  check_floating(eps, "eps");
  KX_CHECK(eps.dim() == 1 && eps.size(0) == B, "eps must have shape (", B, ",) (one eps per problem, as the "
           "forward returns it), got ", eps.sizes());
  at::Tensor e = eps.to(at::kDouble).contiguous();
  const double* ep = e.data_ptr<double>();
  for (int64_t p = 0; p < B; ++p)
    KX_CHECK(ep[p] > 0 && std::isfinite(ep[p]), "eps must be finite and > 0 for every problem, got ", ep[p],
             " for problem ", p);
  return e;
}

// Gradient of grad[p] * (value or dual) by the envelope theorem, with masses normalized inside:
// d/dC = grad T, d/da_i = grad (f_i - <f, a>) / sum(a) on non-zero masses (0 on padding).
std::tuple<at::Tensor, at::Tensor, at::Tensor> sinkhorn_bwd_cpu(const at::Tensor& grad, const at::Tensor& cost,
                                                                const at::Tensor& a, const at::Tensor& b,
                                                                const at::Tensor& f, const at::Tensor& g,
                                                                const at::Tensor& eps) {
  check_problem_tensors(cost, a, b);
  const int64_t B = cost.size(0), M = cost.size(1), N = cost.size(2);
  const at::Tensor eps_d = problem_eps(eps, B);
  KX_CHECK(grad.dim() == 1 && grad.size(0) == B, "grad must have shape (", B, ",), got ", grad.sizes());
  KX_CHECK(f.dim() == 2 && f.size(0) == B && f.size(1) == M, "f must have shape (", B, ", ", M, ")");
  KX_CHECK(g.dim() == 2 && g.size(0) == B && g.size(1) == N, "g must have shape (", B, ", ", N, ")");
  at::Tensor gc = new_output({B, M, N}, cost.options());
  at::Tensor ga = new_output({B, M}, cost.options()), gb = new_output({B, N}, cost.options());
  KX_DISPATCH_FLOATING(cost.scalar_type(), "sinkhorn_bwd", [&] {
    using A = acc_t<scalar_t>;
    const at::Tensor gr = grad.to(acc_type(cost.scalar_type())).contiguous();
    const at::Tensor fc = f.to(gr.scalar_type()).contiguous(), gcn = g.to(gr.scalar_type()).contiguous();
    const A *grp = gr.data_ptr<A>(), *fp = fc.data_ptr<A>(), *gp = gcn.data_ptr<A>();
    const scalar_t *cp = cost.data_ptr<scalar_t>(), *ap = a.data_ptr<scalar_t>(), *bp = b.data_ptr<scalar_t>();
    scalar_t *gcp = gc.data_ptr<scalar_t>(), *gap = ga.data_ptr<scalar_t>(), *gbp = gb.data_ptr<scalar_t>();
    const int64_t cs0 = cost.stride(0), cs1 = cost.stride(1), cs2 = cost.stride(2);
    const int64_t as0 = a.stride(0), as1 = a.stride(1), bs0 = b.stride(0), bs1 = b.stride(1);
    const double* epsp = eps_d.data_ptr<double>();
    at::parallel_for(0, B, 1, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) {
        const double gv = double(grp[p]), eps = epsp[p];
        double sa = 0, sb = 0, fa = 0, gbv = 0;
        for (int64_t i = 0; i < M; ++i) {
          const double x = double(ap[p * as0 + i * as1]);
          if (x > 0) { sa += x; fa += x * double(fp[p * M + i]); }
        }
        for (int64_t j = 0; j < N; ++j) {
          const double x = double(bp[p * bs0 + j * bs1]);
          if (x > 0) { sb += x; gbv += x * double(gp[p * N + j]); }
        }
        const bool live = sa > 0 && sb > 0;
        if (live) { fa /= sa; gbv /= sb; }
        for (int64_t i = 0; i < M; ++i) {
          const double ai = double(ap[p * as0 + i * as1]) / (live ? sa : 1.0);
          gap[p * M + i] = scalar_t(live && ai > 0 ? gv * (double(fp[p * M + i]) - fa) / sa : 0.0);
          scalar_t* out = gcp + (p * M + i) * N;
          for (int64_t j = 0; j < N; ++j) {
            const double bj = double(bp[p * bs0 + j * bs1]) / (live ? sb : 1.0);
            double t = 0;
            if (live && ai > 0 && bj > 0)
              t = ai * bj * std::exp((double(fp[p * M + i]) + double(gp[p * N + j]) -
                                      double(cp[p * cs0 + i * cs1 + j * cs2])) / eps);
            out[j] = scalar_t(gv * t);
          }
        }
        for (int64_t j = 0; j < N; ++j) {
          const double bj = double(bp[p * bs0 + j * bs1]);
          gbp[p * N + j] = scalar_t(live && bj > 0 ? gv * (double(gp[p * N + j]) - gbv) / sb : 0.0);
        }
      }
    });
  });
  return {gc, ga, gb};
}

// ---- wrd: masses ||x_i|| / sum ||x||, cost 1 - cos, computed here ------------------------------
template <typename T>
struct Tokens {
  const T* x;
  const bool* mask;  // null: every token is real
  int64_t L, D, s0, s1, s2, ms0, ms1;
};

// A side's real tokens: row pointers (into the input when it is float with unit stride, else
// into a converted copy), norms, inverse norms and original positions. Returns how many, or -1
// when a real token is not finite. Zero-norm tokens carry no mass and are left out.
template <typename T, typename A>
KX_INLINE int64_t gather_tokens(const Tokens<T>& X, int64_t p, A* buf, const A** rows, double* norm,
                                A* inv_norm, int64_t* idx) {
  int64_t k = 0;
  for (int64_t i = 0; i < X.L; ++i) {
    if (X.mask && !X.mask[p * X.ms0 + i * X.ms1]) continue;
    const T* row = X.x + p * X.s0 + i * X.s1;
    const A* r;
    if constexpr (std::is_same<T, A>::value) {
      if (X.s2 == 1) {
        r = row;
      } else {
        A* o = buf + k * X.D;
        for (int64_t d = 0; d < X.D; ++d) o[d] = row[d * X.s2];
        r = o;
      }
    } else {
      A* o = buf + k * X.D;
      for (int64_t d = 0; d < X.D; ++d) o[d] = A(row[d * X.s2]);
      r = o;
    }
    const double nrm = std::sqrt(double(dot_f(r, r, X.D)));
    if (!std::isfinite(nrm)) return -1;
    if (!(nrm > 0)) continue;
    rows[k] = r;
    norm[k] = nrm;
    inv_norm[k] = A(1.0 / nrm);
    idx[k++] = i;
  }
  return k;
}

// C_ij = 1 - <x_i, y_j> / (|x_i| |y_j|), 2 x 4 blocks of dot products over D.
template <typename A>
KX_INLINE void cosine_cost(Work<A>& W, int64_t D) {
  const int64_t m = W.m, n = W.n;
  int64_t i = 0;
  if constexpr (std::is_same<A, float>::value) {
    for (; i + 2 <= m; i += 2) {
      const float *x0 = W.xr[i], *x1 = W.xr[i + 1];
      const float ix0 = W.ixn[i], ix1 = W.ixn[i + 1];
      int64_t j = 0;
      for (; j + 4 <= n; j += 4) {
        const float *y0 = W.yr[j], *y1 = W.yr[j + 1], *y2 = W.yr[j + 2], *y3 = W.yr[j + 3];
        f32x8 c00 = splat8(0), c01 = splat8(0), c02 = splat8(0), c03 = splat8(0);
        f32x8 c10 = splat8(0), c11 = splat8(0), c12 = splat8(0), c13 = splat8(0);
        int64_t d = 0;
        for (; d + 8 <= D; d += 8) {
          const f32x8 a0 = load8(x0 + d), a1 = load8(x1 + d);
          const f32x8 b0 = load8(y0 + d), b1 = load8(y1 + d), b2 = load8(y2 + d), b3 = load8(y3 + d);
          c00 += a0 * b0; c01 += a0 * b1; c02 += a0 * b2; c03 += a0 * b3;
          c10 += a1 * b0; c11 += a1 * b1; c12 += a1 * b2; c13 += a1 * b3;
        }
        float s[8] = {hsum8(c00), hsum8(c01), hsum8(c02), hsum8(c03),
                      hsum8(c10), hsum8(c11), hsum8(c12), hsum8(c13)};
        for (; d < D; ++d) {
          s[0] += x0[d] * y0[d]; s[1] += x0[d] * y1[d]; s[2] += x0[d] * y2[d]; s[3] += x0[d] * y3[d];
          s[4] += x1[d] * y0[d]; s[5] += x1[d] * y1[d]; s[6] += x1[d] * y2[d]; s[7] += x1[d] * y3[d];
        }
        for (int q = 0; q < 4; ++q) {
          W.C[i * W.ldn + j + q] = 1.0f - s[q] * ix0 * W.iyn[j + q];
          W.C[(i + 1) * W.ldn + j + q] = 1.0f - s[4 + q] * ix1 * W.iyn[j + q];
        }
      }
      for (; j < n; ++j) {
        W.C[i * W.ldn + j] = 1.0f - dot_f(x0, W.yr[j], D) * ix0 * W.iyn[j];
        W.C[(i + 1) * W.ldn + j] = 1.0f - dot_f(x1, W.yr[j], D) * ix1 * W.iyn[j];
      }
    }
  }
  for (; i < m; ++i)
    for (int64_t j = 0; j < n; ++j)
      W.C[i * W.ldn + j] = A(1) - dot_f(W.xr[i], W.yr[j], D) * W.ixn[i] * W.iyn[j];
}

template <typename T, typename A>
struct WrdArgs {
  Tokens<T> X, Y;
  double eps, tol;
  int64_t max_iter;
  bool newton, relative;
  A *value, *dual, *f, *g, *err;
  double* eps_out;  // the eps the pair's results belong to (> eps: stopped before the schedule ended)
  int64_t* n_iter;
  std::atomic<int64_t>* bad;  // lowest pair with a non-finite real token (B if none)
};

template <typename T, typename A>
KX_INLINE void wrd_problem(const WrdArgs<T, A>& P, Work<A>& W, int64_t p, double* nx, double* ny) {
  const int64_t D = P.X.D;
  const int64_t m = gather_tokens(P.X, p, W.xh, W.xr, nx, W.ixn, W.ri);
  const int64_t n = gather_tokens(P.Y, p, W.yh, W.yr, ny, W.iyn, W.cj);
  A* fo = P.f + p * P.X.L;
  A* go = P.g + p * P.Y.L;
  std::fill(fo, fo + P.X.L, A(0));
  std::fill(go, go + P.Y.L, A(0));
  if (m < 0 || n < 0) return not_finite(P, p);
  if (m == 0 || n == 0) return no_mass(P, p, m == 0 && n == 0);
  W.set_shape(m, n);
  set_masses(W, nx, ny);
  cosine_cost(W, D);
  const Stats st = solve(W, P.eps, P.max_iter, P.tol, P.newton, P.relative);
  double value, dual;
  finish(W, value, dual, [](int64_t, const A*) {});
  for (int64_t i = 0; i < m; ++i) fo[W.ri[i]] = A(W.F[i]);
  for (int64_t j = 0; j < n; ++j) go[W.cj[j]] = A(W.G[j]);
  P.value[p] = A(value);
  P.dual[p] = A(dual);
  P.n_iter[p] = st.n_iter;
  P.err[p] = A(st.err);
  P.eps_out[p] = W.eps;
}

template <typename T, typename A>
__attribute__((target("avx2,fma"))) void wrd_problem_avx2(const WrdArgs<T, A>& P, Work<A>& W, int64_t p,
                                                          double* nx, double* ny) {
  wrd_problem(P, W, p, nx, ny);
}
template <typename T, typename A>
void wrd_problem_base(const WrdArgs<T, A>& P, Work<A>& W, int64_t p, double* nx, double* ny) {
  wrd_problem(P, W, p, nx, ny);
}

void check_tokens(const at::Tensor& x, const at::Tensor& y, const c10::optional<at::Tensor>& xm,
                  const c10::optional<at::Tensor>& ym) {
  check_floating(x, "x");
  check_dim(x, 3, "x");
  check_dim(y, 3, "y");
  check_same_device(x, y, "x", "y");
  KX_CHECK(y.scalar_type() == x.scalar_type(), "y must have the dtype of x (", x.scalar_type(), "), got ",
           y.scalar_type());
  KX_CHECK(y.size(0) == x.size(0), "x and y must have the same batch size, got ", x.size(0), " and ", y.size(0));
  KX_CHECK(y.size(2) == x.size(2), "x and y must have the same embedding dim, got ", x.size(2), " and ", y.size(2));
  for (auto [mask, t, name] : {std::make_tuple(&xm, &x, "x_mask"), std::make_tuple(&ym, &y, "y_mask")}) {
    if (!mask->has_value()) continue;
    const at::Tensor& mk = mask->value();
    TORCH_CHECK_TYPE(mk.scalar_type() == at::kBool, "kxkernels: ", name, " must be bool, got ", mk.scalar_type());
    KX_CHECK(mk.dim() == 2 && mk.size(0) == t->size(0) && mk.size(1) == t->size(1), name, " must have shape (",
             t->size(0), ", ", t->size(1), "), got ", mk.sizes());
    check_same_device(mk, *t, name, name[0] == 'x' ? "x" : "y");
  }
}

template <typename T>
Tokens<T> tokens_of(const at::Tensor& x, const c10::optional<at::Tensor>& mask) {
  Tokens<T> t{x.data_ptr<T>(), nullptr, x.size(1), x.size(2), x.stride(0), x.stride(1), x.stride(2), 0, 0};
  if (mask.has_value()) {
    t.mask = mask->data_ptr<bool>();
    t.ms0 = mask->stride(0);
    t.ms1 = mask->stride(1);
  }
  return t;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> wrd_fwd_cpu(
    const at::Tensor& x, const at::Tensor& y, const c10::optional<at::Tensor>& x_mask,
    const c10::optional<at::Tensor>& y_mask, double eps, int64_t max_iter, double tol, bool newton,
    bool relative_eps) {
  check_tokens(x, y, x_mask, y_mask);
  check_settings(eps, max_iter, tol);
  const int64_t B = x.size(0), M = x.size(1), N = y.size(1), D = x.size(2);
  auto acc = x.options().dtype(acc_type(x.scalar_type()));
  at::Tensor value = new_output({B}, acc), dual = new_output({B}, acc);
  at::Tensor f = new_output({B, M}, acc), g = new_output({B, N}, acc), err = new_output({B}, acc);
  at::Tensor n_iter = new_output({B}, x.options().dtype(at::kLong));
  at::Tensor eps_out = new_output({B}, x.options().dtype(at::kDouble));
  std::atomic<int64_t> bad{B};
  KX_DISPATCH_FLOATING(x.scalar_type(), "wrd_fwd", [&] {
    using A = acc_t<scalar_t>;
    WrdArgs<scalar_t, A> P{tokens_of<scalar_t>(x, x_mask), tokens_of<scalar_t>(y, y_mask), eps, tol, max_iter,
                           newton, relative_eps, value.data_ptr<A>(), dual.data_ptr<A>(), f.data_ptr<A>(), g.data_ptr<A>(),
                           err.data_ptr<A>(), eps_out.data_ptr<double>(), n_iter.data_ptr<int64_t>(), &bad};
    const bool avx2 = cpu_has_avx2();
    for_each_problem<A>(B, M, N, D, [&](Work<A>& W, int64_t p, double* nx, double* ny) {
      if (avx2) wrd_problem_avx2(P, W, p, nx, ny);
      else wrd_problem_base(P, W, p, nx, ny);
    });
  });
  KX_CHECK(bad.load() == B, "x and y must be finite at real tokens: pair ", bad.load(), " has an inf or NaN there");
  return {value, dual, f, g, n_iter, err, eps_out};
}

// Envelope gradient of grad[p] * wrd through cost = 1 - cos and masses = norms / sum:
//   dL/dx_i = (1/|x_i|) (I - xh_i xh_i^T) (-(T yh)_i) + (f_i - <f, a>) / sum|x| * xh_i,
// xh = x / |x| the unit vectors,
// (and the same for y with T^T, g), zero for padding and zero-norm tokens.
template <typename T, typename A>
KX_INLINE void wrd_grad_problem(const Tokens<T>& X, const Tokens<T>& Y, const A* grad, const A* f, const A* g,
                                double eps, T* gx, T* gy, Work<A>& W, int64_t p, double* nx, double* ny) {
  const int64_t D = X.D;
  std::fill(gx + p * X.L * D, gx + (p + 1) * X.L * D, T(0));
  std::fill(gy + p * Y.L * D, gy + (p + 1) * Y.L * D, T(0));
  const int64_t m = gather_tokens(X, p, W.xh, W.xr, nx, W.ixn, W.ri);
  const int64_t n = gather_tokens(Y, p, W.yh, W.yr, ny, W.iyn, W.cj);
  if (m <= 0 || n <= 0) return;
  W.set_shape(m, n);
  cosine_cost(W, D);
  double sx = 0, sy = 0;
  for (int64_t i = 0; i < m; ++i) sx += nx[i];
  for (int64_t j = 0; j < n; ++j) sy += ny[j];
  double fa = 0, gb = 0;
  for (int64_t i = 0; i < m; ++i) fa += nx[i] / sx * double(f[p * X.L + W.ri[i]]);
  for (int64_t j = 0; j < n; ++j) gb += ny[j] / sy * double(g[p * Y.L + W.cj[j]]);
  const double gv = double(grad[p]);
  // T in W.K (m x ldn)
  for (int64_t i = 0; i < m; ++i) {
    const double fi = double(f[p * X.L + W.ri[i]]), ai = nx[i] / sx;
    for (int64_t j = 0; j < n; ++j)
      W.K[i * W.ldn + j] = A(ai * ny[j] / sy *
                             std::exp((fi + double(g[p * Y.L + W.cj[j]]) - double(W.C[i * W.ldn + j])) / eps));
  }
  A* acc = W.gacc;
  for (int64_t i = 0; i < m; ++i) {  // x side: acc = -(T yh)_i
    std::fill(acc, acc + D, A(0));
    for (int64_t j = 0; j < n; ++j) {
      const A t = W.K[i * W.ldn + j] * W.iyn[j];
      const A* yj = W.yr[j];
      for (int64_t d = 0; d < D; ++d) acc[d] -= t * yj[d];
    }
    const A* xi = W.xr[i];
    const A scale = A(gv / nx[i]);
    const A proj = dot_f(acc, xi, D) * W.ixn[i];
    const A radial = A(gv * (double(f[p * X.L + W.ri[i]]) - fa) / sx);
    const A along = (radial - scale * proj) * W.ixn[i];
    T* out = gx + (p * X.L + W.ri[i]) * D;
    for (int64_t d = 0; d < D; ++d) out[d] = T(scale * acc[d] + along * xi[d]);
  }
  for (int64_t j = 0; j < n; ++j) {  // y side: acc = -(T^T xh)_j
    std::fill(acc, acc + D, A(0));
    for (int64_t i = 0; i < m; ++i) {
      const A t = W.K[i * W.ldn + j] * W.ixn[i];
      const A* xi = W.xr[i];
      for (int64_t d = 0; d < D; ++d) acc[d] -= t * xi[d];
    }
    const A* yj = W.yr[j];
    const A scale = A(gv / ny[j]);
    const A proj = dot_f(acc, yj, D) * W.iyn[j];
    const A radial = A(gv * (double(g[p * Y.L + W.cj[j]]) - gb) / sy);
    const A along = (radial - scale * proj) * W.iyn[j];
    T* out = gy + (p * Y.L + W.cj[j]) * D;
    for (int64_t d = 0; d < D; ++d) out[d] = T(scale * acc[d] + along * yj[d]);
  }
}

template <typename T, typename A>
__attribute__((target("avx2,fma"))) void wrd_grad_avx2(const Tokens<T>& X, const Tokens<T>& Y, const A* grad,
                                                       const A* f, const A* g, double eps, T* gx, T* gy,
                                                       Work<A>& W, int64_t p, double* nx, double* ny) {
  wrd_grad_problem(X, Y, grad, f, g, eps, gx, gy, W, p, nx, ny);
}
template <typename T, typename A>
void wrd_grad_base(const Tokens<T>& X, const Tokens<T>& Y, const A* grad, const A* f, const A* g, double eps,
                   T* gx, T* gy, Work<A>& W, int64_t p, double* nx, double* ny) {
  wrd_grad_problem(X, Y, grad, f, g, eps, gx, gy, W, p, nx, ny);
}

std::tuple<at::Tensor, at::Tensor> wrd_bwd_cpu(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& y,
                                               const c10::optional<at::Tensor>& x_mask,
                                               const c10::optional<at::Tensor>& y_mask, const at::Tensor& f,
                                               const at::Tensor& g, const at::Tensor& eps) {
  check_tokens(x, y, x_mask, y_mask);
  const int64_t B = x.size(0), M = x.size(1), N = y.size(1), D = x.size(2);
  const at::Tensor eps_d = problem_eps(eps, B);
  KX_CHECK(grad.dim() == 1 && grad.size(0) == B, "grad must have shape (", B, ",), got ", grad.sizes());
  KX_CHECK(f.dim() == 2 && f.size(0) == B && f.size(1) == M, "f must have shape (", B, ", ", M, ")");
  KX_CHECK(g.dim() == 2 && g.size(0) == B && g.size(1) == N, "g must have shape (", B, ", ", N, ")");
  at::Tensor gx = new_output({B, M, D}, x.options()), gy = new_output({B, N, D}, y.options());
  KX_DISPATCH_FLOATING(x.scalar_type(), "wrd_bwd", [&] {
    using A = acc_t<scalar_t>;
    const at::ScalarType at_acc = acc_type(x.scalar_type());
    const at::Tensor gr = grad.to(at_acc).contiguous(), fc = f.to(at_acc).contiguous(), gc = g.to(at_acc).contiguous();
    const Tokens<scalar_t> X = tokens_of<scalar_t>(x, x_mask), Y = tokens_of<scalar_t>(y, y_mask);
    const A *grp = gr.data_ptr<A>(), *fp = fc.data_ptr<A>(), *gp = gc.data_ptr<A>();
    scalar_t *gxp = gx.data_ptr<scalar_t>(), *gyp = gy.data_ptr<scalar_t>();
    const bool avx2 = cpu_has_avx2();
    const double* epsp = eps_d.data_ptr<double>();
    for_each_problem<A>(B, M, N, D, [&](Work<A>& W, int64_t p, double* nx, double* ny) {
      if (avx2) wrd_grad_avx2(X, Y, grp, fp, gp, epsp[p], gxp, gyp, W, p, nx, ny);
      else wrd_grad_base(X, Y, grp, fp, gp, epsp[p], gxp, gyp, W, p, nx, ny);
    });
  });
  return {gx, gy};
}

}  // namespace
}  // namespace kx

TORCH_LIBRARY_IMPL(kxkernels, CPU, m) {
  m.impl("sinkhorn_fwd", &kx::sinkhorn_fwd_cpu);
  m.impl("sinkhorn_bwd", &kx::sinkhorn_bwd_cpu);
  m.impl("wrd_fwd", &kx::wrd_fwd_cpu);
  m.impl("wrd_bwd", &kx::wrd_bwd_cpu);
}
