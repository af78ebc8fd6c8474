// Argument checks of the Sinkhorn / WRD ops, shared by the CPU (csrc/cpu/sinkhorn.cpp) and CUDA
// (csrc/cuda/sinkhorn.cu) kernels. Device-specific dtype rules (CUDA refuses float64) stay with
// each backend; everything about shapes, dtypes agreeing, devices agreeing and settings is here.
#pragma once
#include <cmath>
#include <optional>

#include "common/checks.h"

namespace kx {

// cost (B, M, N), a (B, M), b (B, N): one floating dtype, one device.
inline void check_problem_tensors(const at::Tensor& cost, const at::Tensor& a, const at::Tensor& b) {
  check_floating(cost, "cost");
  check_dim(cost, 3, "cost");
  check_dim(a, 2, "a");
  check_dim(b, 2, "b");
  check_same_device(cost, a, "cost", "a");
  check_same_device(cost, b, "cost", "b");
  KX_CHECK(a.scalar_type() == cost.scalar_type() && b.scalar_type() == cost.scalar_type(),
           "a and b must have the dtype of cost (", cost.scalar_type(), "), got ", a.scalar_type(), " and ",
           b.scalar_type());
  KX_CHECK(a.size(0) == cost.size(0) && a.size(1) == cost.size(1), "a must have shape (", cost.size(0), ", ",
           cost.size(1), "), got ", a.sizes());
  KX_CHECK(b.size(0) == cost.size(0) && b.size(1) == cost.size(2), "b must have shape (", cost.size(0), ", ",
           cost.size(2), "), got ", b.sizes());
}

// The solver settings of sinkhorn_fwd / wrd_fwd.
inline void check_settings(double eps, int64_t max_iter, double tol) {
  KX_CHECK(eps > 0 && std::isfinite(eps), "eps must be a finite number > 0, got ", eps);
  KX_CHECK(max_iter >= 1, "max_iter must be >= 1, got ", max_iter);
  KX_CHECK(tol > 0, "tol must be > 0, got ", tol);
}

// x (B, M, D), y (B, N, D) of one floating dtype and device; masks bool (B, M) / (B, N) there too.
inline void check_tokens(const at::Tensor& x, const at::Tensor& y, const std::optional<at::Tensor>& x_mask,
                         const std::optional<at::Tensor>& y_mask) {
  check_floating(x, "x");
  check_dim(x, 3, "x");
  check_dim(y, 3, "y");
  check_same_device(x, y, "x", "y");
  KX_CHECK(y.scalar_type() == x.scalar_type(), "y must have the dtype of x (", x.scalar_type(), "), got ",
           y.scalar_type());
  KX_CHECK(y.size(0) == x.size(0), "x and y must have the same batch size, got ", x.size(0), " and ", y.size(0));
  KX_CHECK(y.size(2) == x.size(2), "x and y must have the same embedding dim, got ", x.size(2), " and ",
           y.size(2));
  const std::optional<at::Tensor>* masks[2] = {&x_mask, &y_mask};
  const at::Tensor* owners[2] = {&x, &y};
  const char* names[2] = {"x_mask", "y_mask"};
  const char* owner_names[2] = {"x", "y"};
  for (int s = 0; s < 2; ++s) {
    if (!masks[s]->has_value()) continue;
    const at::Tensor& mk = masks[s]->value();
    const at::Tensor& t = *owners[s];
    TORCH_CHECK_TYPE(mk.scalar_type() == at::kBool, "kxkernels: ", names[s], " must be bool, got ",
                     mk.scalar_type());
    KX_CHECK(mk.dim() == 2 && mk.size(0) == t.size(0) && mk.size(1) == t.size(1), names[s], " must have shape (",
             t.size(0), ", ", t.size(1), "), got ", mk.sizes());
    check_same_device(mk, t, names[s], owner_names[s]);
  }
}

// The backward ops' grad (B,) and potentials f (B, M), g (B, N), on the inputs' device.
inline void check_potentials(const at::Tensor& grad, const at::Tensor& f, const at::Tensor& g,
                             const at::Tensor& like, int64_t B, int64_t M, int64_t N) {
  KX_CHECK(grad.dim() == 1 && grad.size(0) == B, "grad must have shape (", B, ",), got ", grad.sizes());
  KX_CHECK(f.dim() == 2 && f.size(0) == B && f.size(1) == M, "f must have shape (", B, ", ", M, "), got ",
           f.sizes());
  KX_CHECK(g.dim() == 2 && g.size(0) == B && g.size(1) == N, "g must have shape (", B, ", ", N, "), got ",
           g.sizes());
  check_same_device(grad, like, "grad", "the inputs");
  check_same_device(f, like, "f", "the inputs");
  check_same_device(g, like, "g", "the inputs");
}

// The backward ops' per-problem eps (B,) (the forward's eps_reached), checked finite and > 0;
// returned as a contiguous float64 host tensor.
inline at::Tensor problem_eps(const at::Tensor& eps, int64_t B) {
  check_floating(eps, "eps");
  KX_CHECK(eps.dim() == 1 && eps.size(0) == B, "eps must have shape (", B, ",) (one eps per problem, as the "
           "forward returns it), got ", eps.sizes());
  at::Tensor e = eps.to(at::kCPU, at::kDouble).contiguous();
  const double* ep = e.data_ptr<double>();
  for (int64_t p = 0; p < B; ++p)
    KX_CHECK(ep[p] > 0 && std::isfinite(ep[p]), "eps must be finite and > 0 for every problem, got ", ep[p],
             " for problem ", p);
  return e;
}

}  // namespace kx
