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
#include "common/isa.h"
#include "common/sinkhorn_checks.h"
#include "common/sinkhorn_schedule.h"
#include "common/math.h"
#include "common/output.h"

#pragma GCC diagnostic ignored "-Wpsabi"  // vector types wider than the baseline ABI

namespace kx {
namespace {

// ---- schedule: common/sinkhorn_schedule.h (the CUDA kernel and the reference read it too) ------
using sinkhorn_schedule::kEpsRatio;
using sinkhorn_schedule::kOmega;
using sinkhorn_schedule::kStageSweeps;
using sinkhorn_schedule::kStageTol;
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

#define KX_INLINE inline __attribute__((always_inline))

// ---- arguments of the kernels (csrc/cpu/sinkhorn_kernels.h), built by the host code below -----
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

template <typename T>
struct Tokens {
  const T* x;
  const bool* mask;  // null: every token is real
  int64_t L, D, s0, s1, s2, ms0, ms1;
};

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

}  // namespace
}  // namespace kx

#define KX_ISA_KERNELS "cpu/sinkhorn_kernels.h"
#include "common/isa_kernels.h"

namespace kx {
namespace {

at::ScalarType acc_type(at::ScalarType s) { return s == at::kDouble ? at::kDouble : at::kFloat; }

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
    KX_ISA_CALL(sinkhorn_fwd_batch, P, B);
  });
  KX_CHECK(bad.load() == B, "cost must be finite at real entries (a_i > 0 and b_j > 0): problem ", bad.load(),
           " has an inf or NaN there");
  return {value, dual, f, g, n_iter, err, plan, eps_out};
}

// The backward's per-problem eps (B,) (the forward's eps output) as contiguous float64, checked.

// Gradient of grad[p] * (value or dual) by the envelope theorem, with masses normalized inside:
// d/dC = grad T, d/da_i = grad (f_i - <f, a>) / sum(a) on non-zero masses (0 on padding).
std::tuple<at::Tensor, at::Tensor, at::Tensor> sinkhorn_bwd_cpu(const at::Tensor& grad, const at::Tensor& cost,
                                                                const at::Tensor& a, const at::Tensor& b,
                                                                const at::Tensor& f, const at::Tensor& g,
                                                                const at::Tensor& eps) {
  check_problem_tensors(cost, a, b);
  const int64_t B = cost.size(0), M = cost.size(1), N = cost.size(2);
  const at::Tensor eps_d = problem_eps(eps, B);
  check_potentials(grad, f, g, cost, B, M, N);
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

// ---- wrd: masses ||x_i|| / sum ||x||, cost 1 - cos, computed in the kernels ------------------
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
  const int64_t B = x.size(0), M = x.size(1), N = y.size(1);
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
    KX_ISA_CALL(wrd_fwd_batch, P, B);
  });
  KX_CHECK(bad.load() == B, "x and y must be finite at real tokens: pair ", bad.load(), " has an inf or NaN there");
  return {value, dual, f, g, n_iter, err, eps_out};
}

std::tuple<at::Tensor, at::Tensor> wrd_bwd_cpu(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& y,
                                               const c10::optional<at::Tensor>& x_mask,
                                               const c10::optional<at::Tensor>& y_mask, const at::Tensor& f,
                                               const at::Tensor& g, const at::Tensor& eps) {
  check_tokens(x, y, x_mask, y_mask);
  const int64_t B = x.size(0), M = x.size(1), N = y.size(1), D = x.size(2);
  const at::Tensor eps_d = problem_eps(eps, B);
  check_potentials(grad, f, g, x, B, M, N);
  at::Tensor gx = new_output({B, M, D}, x.options()), gy = new_output({B, N, D}, y.options());
  KX_DISPATCH_FLOATING(x.scalar_type(), "wrd_bwd", [&] {
    using A = acc_t<scalar_t>;
    const at::ScalarType at_acc = acc_type(x.scalar_type());
    const at::Tensor gr = grad.to(at_acc).contiguous(), fc = f.to(at_acc).contiguous(), gc = g.to(at_acc).contiguous();
    const Tokens<scalar_t> X = tokens_of<scalar_t>(x, x_mask), Y = tokens_of<scalar_t>(y, y_mask);
    const A *grp = gr.data_ptr<A>(), *fp = fc.data_ptr<A>(), *gp = gc.data_ptr<A>();
    scalar_t *gxp = gx.data_ptr<scalar_t>(), *gyp = gy.data_ptr<scalar_t>();
    KX_ISA_CALL(wrd_bwd_batch, X, Y, grp, fp, gp, static_cast<const double*>(eps_d.data_ptr<double>()), gxp, gyp, B);
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
