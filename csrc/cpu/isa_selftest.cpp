// kxkernels::_isa_selftest: runs the vector helpers of common/simd.h at the running ISA level,
// so the tests can check every level against torch (exp accuracy, fp16/bf16 rounding, tails).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "common/checks.h"
#include "common/isa.h"
#define KX_ISA_KERNELS "cpu/isa_selftest_kernels.h"
#include "common/isa_kernels.h"

namespace kx {
namespace {

// x float32 (n,): returns exp(x), x -> bf16, x -> fp16, and those two back to float32.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> isa_selftest(const at::Tensor& x_in) {
  KX_CHECK(x_in.scalar_type() == at::kFloat && x_in.dim() == 1, "x must be a 1-D float32 tensor");
  const at::Tensor x = x_in.contiguous();
  const int64_t n = x.numel();
  at::Tensor e = at::empty_like(x), bf = at::empty({n}, x.options().dtype(at::kBFloat16)),
             hf = at::empty({n}, x.options().dtype(at::kHalf)), bfb = at::empty_like(x), hfb = at::empty_like(x);
  const float* xp = x.data_ptr<float>();
  KX_ISA_CALL(selftest_exp, xp, e.data_ptr<float>(), n);
  KX_ISA_CALL(selftest_convert, xp, bf.data_ptr<at::BFloat16>(), n);
  KX_ISA_CALL(selftest_convert, xp, hf.data_ptr<at::Half>(), n);
  KX_ISA_CALL(selftest_convert, static_cast<const at::BFloat16*>(bf.data_ptr<at::BFloat16>()), bfb.data_ptr<float>(), n);
  KX_ISA_CALL(selftest_convert, static_cast<const at::Half*>(hf.data_ptr<at::Half>()), hfb.data_ptr<float>(), n);
  return {e, bf, hf, bfb, hfb};
}

}  // namespace
}  // namespace kx

TORCH_LIBRARY_IMPL(kxkernels, CPU, m) { m.impl("_isa_selftest", &kx::isa_selftest); }
