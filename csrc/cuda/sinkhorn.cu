// CUDA dispatch of sinkhorn_fwd / sinkhorn_bwd / wrd_fwd / wrd_bwd: argument checks, outputs with
// the CPU ops' dtypes and shapes, and one launch each on the current stream. Everything else is in
// sinkhorn_kernel.cuh, which tests/cuda compiles standalone with nvcc and runs in a host emulator;
// this file needs a CUDA build of torch, so it is compiled only by a CUDA build.
//
// Differences from the CPU ops: float64 inputs are refused (float64 is CPU-only, for gradcheck);
// a problem must fit in one block's shared memory; the `newton` flag is ignored (plain
// log-domain Sinkhorn with the reference's schedule).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>  // at::cuda::getCurrentCUDAStream, without ATen/cuda's cuBLAS headers
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <tuple>
#include <type_traits>

#include "common/checks.h"
#include "common/sinkhorn_checks.h"
#include "common/output.h"
#include "sinkhorn_kernel.cuh"

namespace kx {
namespace {

namespace sk = ::kx::sinkhorn_cuda;

// f(T*) with T the kernel's element type for a float32 / float16 / bfloat16 tensor.
template <typename F>
void dispatch(at::ScalarType t, F&& f) {
  switch (t) {
    case at::kFloat: return f(static_cast<float*>(nullptr));
    case at::kHalf: return f(static_cast<__half*>(nullptr));
    case at::kBFloat16: return f(static_cast<__nv_bfloat16*>(nullptr));
    default: TORCH_CHECK(false, "kxkernels: unexpected dtype ", t);
  }
}

template <typename T>
const T* cptr(const at::Tensor& t) { return reinterpret_cast<const T*>(t.const_data_ptr()); }
template <typename T>
T* mptr(at::Tensor& t) { return reinterpret_cast<T*>(t.mutable_data_ptr()); }

void check_cuda_float(const at::Tensor& t, const char* name) {
  check_floating(t, name);
  TORCH_CHECK_TYPE(t.scalar_type() != at::kDouble, "kxkernels: ", name,
                   " is float64, which the CUDA kernels do not take (float64 is CPU-only, for "
                   "gradcheck): cast it to float32 or run on the CPU");
}

// The shared checks (common/sinkhorn_checks.h) plus the CUDA dtype rule.
void check_problem(const at::Tensor& cost, const at::Tensor& a, const at::Tensor& b) {
  check_cuda_float(cost, "cost");
  check_problem_tensors(cost, a, b);
}

void check_cuda_tokens(const at::Tensor& x, const at::Tensor& y, const std::optional<at::Tensor>& xm,
                       const std::optional<at::Tensor>& ym) {
  check_cuda_float(x, "x");
  check_tokens(x, y, xm, ym);
}

size_t smem_limit() {
  int dev = 0, bytes = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  return size_t(bytes);
}

// A problem lives in one block's shared memory: refuse the ones that do not fit.
sk::LaunchPlan plan_or_refuse(const char* op, int64_t M, int64_t N, bool tokens) {
  const size_t limit = smem_limit();
  const sk::LaunchPlan lp = sk::plan_launch(M, N, tokens, limit);
  KX_CHECK(lp.smem <= limit, op, " on CUDA keeps a problem in one block's shared memory (cost and "
           "kernel matrices, 8 bytes per entry, plus about 60 bytes per row and column): M=", M, ", N=", N,
           " needs ", lp.smem, " bytes, above this device's ", limit, " bytes per block (128 x 128 fits on "
           "sm_80 and sm_90). Run larger problems on the CPU.");
  return lp;
}

template <typename Kernel, typename Args>
void launch(Kernel kernel, const Args& args, int64_t blocks, int threads, size_t smem) {
  if (blocks == 0) return;
  KX_CHECK(blocks <= int64_t(0x7fffffff), "at most 2^31 - 1 problems a call on CUDA, got ", blocks);
  if (smem > 48 * 1024)
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
  kernel<<<unsigned(blocks), threads, smem, at::cuda::getCurrentCUDAStream()>>>(args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
sk::Tokens<T> tokens_of(const at::Tensor& x, const std::optional<at::Tensor>& mask) {
  sk::Tokens<T> t{cptr<T>(x), nullptr, x.size(1), x.size(2), x.stride(0), x.stride(1), x.stride(2), 0, 0};
  if (mask.has_value()) {
    t.mask = mask->const_data_ptr<bool>();
    t.ms0 = mask->stride(0);
    t.ms1 = mask->stride(1);
  }
  return t;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> sinkhorn_fwd_cuda(
    const at::Tensor& cost, const at::Tensor& a, const at::Tensor& b, double eps, int64_t max_iter, double tol,
    bool return_plan, bool /*newton: CPU only*/) {
  check_problem(cost, a, b);
  check_settings(eps, max_iter, tol);
  const c10::cuda::CUDAGuard guard(cost.device());
  const int64_t B = cost.size(0), M = cost.size(1), N = cost.size(2);
  const sk::LaunchPlan lp = plan_or_refuse("sinkhorn", M, N, false);
  const auto f32 = cost.options().dtype(at::kFloat);
  at::Tensor value = new_output({B}, f32), dual = new_output({B}, f32), err = new_output({B}, f32);
  at::Tensor f = new_output({B, M}, f32), g = new_output({B, N}, f32);
  at::Tensor n_iter = new_output({B}, cost.options().dtype(at::kLong));
  at::Tensor plan = return_plan ? new_output({B, M, N}, cost.options()) : at::empty({0}, cost.options());
  dispatch(cost.scalar_type(), [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    sk::SinkhornFwdArgs<T> P{cptr<T>(cost), cptr<T>(a), cptr<T>(b), M, N, cost.stride(0), cost.stride(1),
                             cost.stride(2), a.stride(0), a.stride(1), b.stride(0), b.stride(1), eps, tol,
                             max_iter, lp.mat, mptr<float>(value), mptr<float>(dual), mptr<float>(f),
                             mptr<float>(g), mptr<float>(err), mptr<int64_t>(n_iter),
                             return_plan ? mptr<T>(plan) : nullptr};
    launch(sk::sinkhorn_fwd_kernel<T>, P, B, lp.threads, lp.smem);
  });
  return {value, dual, f, g, n_iter, err, plan};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sinkhorn_bwd_cuda(const at::Tensor& grad, const at::Tensor& cost,
                                                                 const at::Tensor& a, const at::Tensor& b,
                                                                 const at::Tensor& f, const at::Tensor& g,
                                                                 double eps) {
  check_problem(cost, a, b);
  check_bwd_eps(eps);
  const int64_t B = cost.size(0), M = cost.size(1), N = cost.size(2);
  check_potentials(grad, f, g, cost, B, M, N);
  const c10::cuda::CUDAGuard guard(cost.device());
  const size_t smem = sk::bwd_smem(M, N, nullptr, nullptr, nullptr, nullptr, nullptr, 0);
  KX_CHECK(smem <= smem_limit(), "sinkhorn backward on CUDA keeps a problem's masses and potentials in "
           "shared memory: M + N = ", M + N, " is too large for this device");
  at::Tensor gc = new_output({B, M, N}, cost.options());
  at::Tensor ga = new_output({B, M}, cost.options()), gb = new_output({B, N}, cost.options());
  const at::Tensor gr = grad.to(at::kFloat).contiguous();
  const at::Tensor fc = f.to(at::kFloat).contiguous(), gcn = g.to(at::kFloat).contiguous();
  dispatch(cost.scalar_type(), [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    sk::SinkhornBwdArgs<T> P{cptr<float>(gr), cptr<float>(fc), cptr<float>(gcn), cptr<T>(cost), cptr<T>(a),
                             cptr<T>(b), M, N, cost.stride(0), cost.stride(1), cost.stride(2), a.stride(0),
                             a.stride(1), b.stride(0), b.stride(1), eps, mptr<T>(gc), mptr<T>(ga), mptr<T>(gb)};
    launch(sk::sinkhorn_bwd_kernel<T>, P, B, sk::kBwdThreads, smem);
  });
  return {gc, ga, gb};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> wrd_fwd_cuda(
    const at::Tensor& x, const at::Tensor& y, const std::optional<at::Tensor>& x_mask,
    const std::optional<at::Tensor>& y_mask, double eps, int64_t max_iter, double tol, bool /*newton*/) {
  check_cuda_tokens(x, y, x_mask, y_mask);
  check_settings(eps, max_iter, tol);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t B = x.size(0), M = x.size(1), N = y.size(1);
  const sk::LaunchPlan lp = plan_or_refuse("wrd", M, N, true);
  const auto f32 = x.options().dtype(at::kFloat);
  at::Tensor value = new_output({B}, f32), dual = new_output({B}, f32), err = new_output({B}, f32);
  at::Tensor f = new_output({B, M}, f32), g = new_output({B, N}, f32);
  at::Tensor n_iter = new_output({B}, x.options().dtype(at::kLong));
  dispatch(x.scalar_type(), [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    sk::WrdFwdArgs<T> P{tokens_of<T>(x, x_mask), tokens_of<T>(y, y_mask), eps, tol, max_iter, lp.mat,
                        mptr<float>(value), mptr<float>(dual), mptr<float>(f), mptr<float>(g), mptr<float>(err),
                        mptr<int64_t>(n_iter)};
    launch(sk::wrd_fwd_kernel<T>, P, B, lp.threads, lp.smem);
  });
  return {value, dual, f, g, n_iter, err};
}

std::tuple<at::Tensor, at::Tensor> wrd_bwd_cuda(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& y,
                                                const std::optional<at::Tensor>& x_mask,
                                                const std::optional<at::Tensor>& y_mask, const at::Tensor& f,
                                                const at::Tensor& g, double eps) {
  check_cuda_tokens(x, y, x_mask, y_mask);
  check_bwd_eps(eps);
  const int64_t B = x.size(0), M = x.size(1), N = y.size(1), D = x.size(2);
  check_potentials(grad, f, g, x, B, M, N);
  const c10::cuda::CUDAGuard guard(x.device());
  const sk::LaunchPlan lp = plan_or_refuse("wrd backward", M, N, true);
  at::Tensor gx = new_output({B, M, D}, x.options()), gy = new_output({B, N, D}, y.options());
  const at::Tensor gr = grad.to(at::kFloat).contiguous();
  const at::Tensor fc = f.to(at::kFloat).contiguous(), gc = g.to(at::kFloat).contiguous();
  dispatch(x.scalar_type(), [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    sk::WrdBwdArgs<T> P{tokens_of<T>(x, x_mask), tokens_of<T>(y, y_mask), cptr<float>(gr), cptr<float>(fc),
                        cptr<float>(gc), eps, lp.mat, mptr<T>(gx), mptr<T>(gy)};
    launch(sk::wrd_bwd_kernel<T>, P, B, lp.threads, lp.smem);
  });
  return {gx, gy};
}

}  // namespace
}  // namespace kx

TORCH_LIBRARY_IMPL(kxkernels, CUDA, m) {
  m.impl("sinkhorn_fwd", &kx::sinkhorn_fwd_cuda);
  m.impl("sinkhorn_bwd", &kx::sinkhorn_bwd_cuda);
  m.impl("wrd_fwd", &kx::wrd_fwd_cuda);
  m.impl("wrd_bwd", &kx::wrd_bwd_cuda);
}
