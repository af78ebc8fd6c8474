// Argument checks shared by the C++ kernels. The Python wrappers validate user input first and
// raise ValueError/TypeError naming the argument; these checks guard direct calls of the
// torch.ops.kxkernels.* ops so a bad call is an exception, never an out-of-bounds access.
#pragma once
#include <torch/library.h>
#include <ATen/ATen.h>

#define KX_CHECK(cond, ...) TORCH_CHECK_VALUE(cond, "kxkernels: ", __VA_ARGS__)

namespace kx {

inline void check_floating(const at::Tensor& t, const char* name) {
  auto s = t.scalar_type();
  TORCH_CHECK_TYPE(s == at::kFloat || s == at::kDouble || s == at::kHalf || s == at::kBFloat16,
                   "kxkernels: ", name, " must be float64/float32/float16/bfloat16, got ", s);
}

inline void check_dim(const at::Tensor& t, int64_t dim, const char* name) {
  KX_CHECK(t.dim() == dim, name, " must have ", dim, " dims, got shape ", t.sizes());
}

inline void check_same_device(const at::Tensor& a, const at::Tensor& b, const char* na, const char* nb) {
  KX_CHECK(a.device() == b.device(), na, " and ", nb, " must be on the same device, got ",
           a.device(), " and ", b.device());
}

}  // namespace kx

// Float dispatch over the dtypes every op accepts: math in float (double for float64 gradcheck).
#define KX_DISPATCH_FLOATING(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)
