// CUDA dispatch of sinkhorn_fwd / sinkhorn_bwd / wrd_fwd / wrd_bwd: argument checks, outputs with
// the CPU ops' dtypes and shapes, and one launch each on the current stream. Everything else is in
// sinkhorn_kernel.cuh, which tests/cuda compiles standalone with nvcc and runs in a host emulator;
// this file needs a CUDA build of torch, so it is compiled only by a CUDA build.
//
// Differences from the CPU ops: float64 inputs are refused (float64 is CPU-only, for gradcheck);
// the `newton` flag is ignored (plain log-domain Sinkhorn with the reference's schedule). eps is
// per problem as on the CPU: relative_eps scales it by each problem's cost spread inside the
// kernels, the forward returns eps_reached (B,) from them, and the backward takes that eps (B,),
// checked on the host (common/sinkhorn_checks.h) and copied to the device.
//
// Launch policy (sk::plan_batch): each problem's real lengths are counted on the device (one
// small copy to the host), problems are grouped by the block size and memory tier those lengths
// need, and each group is launched with its own layout; groups that keep their matrices in a
// global workspace run in launches of at most sk::kWorkspaceBytes of workspace.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>  // at::cuda::getCurrentCUDAStream, without ATen/cuda's cuBLAS headers
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <tuple>
#include <vector>
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

template <typename Kernel, typename Args>
void launch(Kernel kernel, const Args& args, int64_t blocks, int threads, size_t smem) {
  if (blocks == 0) return;
  KX_CHECK(blocks <= int64_t(0x7fffffff), "at most 2^31 - 1 problems a call on CUDA, got ", blocks);
  if (smem > 48 * 1024)
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
  kernel<<<unsigned(blocks), threads, smem, at::cuda::getCurrentCUDAStream()>>>(args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Real rows / columns of each problem, as the kernels' compaction counts them (masses > 0; for
// WRD the mask, an upper bound of the non-zero-norm tokens), on the host.
std::vector<int64_t> host_counts(const at::Tensor& c) {
  const at::Tensor h = c.to(at::kLong).contiguous().cpu();
  const int64_t* p = h.const_data_ptr<int64_t>();
  return std::vector<int64_t>(p, p + h.numel());
}

std::vector<int64_t> token_counts(const std::optional<at::Tensor>& mask, int64_t B, int64_t L) {
  if (!mask.has_value()) return std::vector<int64_t>(size_t(B), L);
  return host_counts(mask->sum(1));
}

void check_index_range(const char* op, int64_t M, int64_t N) {
  KX_CHECK(M * N < (int64_t(1) << 31), op, " on CUDA indexes a problem's matrices with 32-bit ints: M * N must "
           "be below 2^31, got M=", M, ", N=", N);
}

// Every group of the batch plan, each in launches of sk::blocks_per_launch blocks:
// make(layout, index (device, int32), workspace or null) gives the kernel's arguments.
template <typename Kernel, typename Make>
void launch_groups(const char* op, const std::vector<int64_t>& m, const std::vector<int64_t>& n, int64_t M,
                   int64_t N, bool tokens, const at::TensorOptions& dev, Kernel kernel, Make make) {
  const size_t limit = smem_limit();
  const int64_t B = int64_t(m.size());
  for (sk::Bucket& bk : sk::plan_batch(m.data(), n.data(), B, M, N, tokens, limit)) {
    const sk::Layout& L = bk.L;
    KX_CHECK(L.smem <= limit, op, " on CUDA: the cosine staging tiles (", L.smem, " bytes) do not fit this device's ",
             limit, " bytes of shared memory per block");
    const int64_t count = int64_t(bk.problems.size());
    const at::Tensor index =
        at::from_blob(bk.problems.data(), {count}, at::TensorOptions().dtype(at::kInt)).to(dev.dtype(at::kInt));
    const int64_t per = sk::blocks_per_launch(L, count);
    at::Tensor ws;
    if (L.ws_floats > 0) ws = at::empty({per * L.ws_floats}, dev.dtype(at::kFloat));
    for (int64_t s0 = 0; s0 < count; s0 += per) {
      const int64_t nb = std::min(per, count - s0);
      launch(kernel, make(L, index.const_data_ptr<int>() + s0, L.ws_floats > 0 ? mptr<float>(ws) : nullptr), nb,
             L.threads, L.smem);
    }
  }
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

// The backward's per-problem eps (B,), checked (shared checks), as contiguous float64 on `like`'s device.
at::Tensor device_eps(const at::Tensor& eps, int64_t B, const at::Tensor& like) {
  return problem_eps(eps, B).to(like.device());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
sinkhorn_fwd_cuda(const at::Tensor& cost, const at::Tensor& a, const at::Tensor& b, double eps, int64_t max_iter,
                  double tol, bool return_plan, bool /*newton: CPU only*/, bool relative_eps) {
  check_problem(cost, a, b);
  check_settings(eps, max_iter, tol);
  const c10::cuda::CUDAGuard guard(cost.device());
  const int64_t B = cost.size(0), M = cost.size(1), N = cost.size(2);
  check_index_range("sinkhorn", M, N);
  const auto f32 = cost.options().dtype(at::kFloat);
  at::Tensor value = new_output({B}, f32), dual = new_output({B}, f32), err = new_output({B}, f32);
  at::Tensor f = new_output({B, M}, f32), g = new_output({B, N}, f32);
  at::Tensor n_iter = new_output({B}, cost.options().dtype(at::kLong));
  at::Tensor plan = return_plan ? new_output({B, M, N}, cost.options()) : at::empty({0}, cost.options());
  at::Tensor eps_out = new_output({B}, cost.options().dtype(at::kDouble));
  const std::vector<int64_t> m = host_counts((a > 0).sum(1)), n = host_counts((b > 0).sum(1));
  dispatch(cost.scalar_type(), [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    launch_groups("sinkhorn", m, n, M, N, false, cost.options(), sk::sinkhorn_fwd_kernel<T>,
                  [&](const sk::Layout& L, const int* index, float* ws) {
                    return sk::SinkhornFwdArgs<T>{
                        cptr<T>(cost), cptr<T>(a), cptr<T>(b), M, N, cost.stride(0), cost.stride(1),
                        cost.stride(2), a.stride(0), a.stride(1), b.stride(0), b.stride(1), eps, tol, max_iter,
                        relative_eps, L, index, ws, mptr<float>(value), mptr<float>(dual), mptr<float>(f),
                        mptr<float>(g), mptr<float>(err), mptr<int64_t>(n_iter), mptr<double>(eps_out),
                        return_plan ? mptr<T>(plan) : nullptr};
                  });
  });
  return {value, dual, f, g, n_iter, err, plan, eps_out};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sinkhorn_bwd_cuda(const at::Tensor& grad, const at::Tensor& cost,
                                                                 const at::Tensor& a, const at::Tensor& b,
                                                                 const at::Tensor& f, const at::Tensor& g,
                                                                 const at::Tensor& eps_b) {
  check_problem(cost, a, b);
  const int64_t B = cost.size(0), M = cost.size(1), N = cost.size(2);
  const at::Tensor eps = device_eps(eps_b, B, cost);
  check_potentials(grad, f, g, cost, B, M, N);
  const c10::cuda::CUDAGuard guard(cost.device());
  // masses and potentials in shared memory when they fit, else in a workspace slice per block
  const size_t vec = sk::bwd_smem(M, N, nullptr, nullptr, nullptr, nullptr, nullptr, 0);
  const bool global = vec > smem_limit();
  const int64_t ws_floats =
      global ? int64_t(sk::bwd_smem(M, N, nullptr, nullptr, nullptr, nullptr, nullptr, 0, 16) / sizeof(float)) : 0;
  const size_t smem = global ? 64 * sizeof(double) : vec;
  const int64_t per = global ? std::max<int64_t>(1, std::min<int64_t>(B, sk::kWorkspaceBytes / (4 * ws_floats))) : B;
  at::Tensor ws;
  if (global) ws = at::empty({per * ws_floats}, cost.options().dtype(at::kFloat));
  at::Tensor gc = new_output({B, M, N}, cost.options());
  at::Tensor ga = new_output({B, M}, cost.options()), gb = new_output({B, N}, cost.options());
  const at::Tensor gr = grad.to(at::kFloat).contiguous();
  const at::Tensor fc = f.to(at::kFloat).contiguous(), gcn = g.to(at::kFloat).contiguous();
  dispatch(cost.scalar_type(), [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    for (int64_t s0 = 0; s0 < B; s0 += per) {
      sk::SinkhornBwdArgs<T> P{cptr<float>(gr), cptr<float>(fc), cptr<float>(gcn), cptr<T>(cost), cptr<T>(a),
                               cptr<T>(b), M, N, cost.stride(0), cost.stride(1), cost.stride(2), a.stride(0),
                               a.stride(1), b.stride(0), b.stride(1), cptr<double>(eps), mptr<T>(gc), mptr<T>(ga),
                               mptr<T>(gb),
                               s0, global ? mptr<float>(ws) : nullptr, ws_floats};
      launch(sk::sinkhorn_bwd_kernel<T>, P, std::min(per, B - s0), sk::kBwdThreads, smem);
    }
  });
  return {gc, ga, gb};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> wrd_fwd_cuda(
    const at::Tensor& x, const at::Tensor& y, const std::optional<at::Tensor>& x_mask,
    const std::optional<at::Tensor>& y_mask, double eps, int64_t max_iter, double tol, bool /*newton*/,
    bool relative_eps) {
  check_cuda_tokens(x, y, x_mask, y_mask);
  check_settings(eps, max_iter, tol);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t B = x.size(0), M = x.size(1), N = y.size(1);
  check_index_range("wrd", M, N);
  const auto f32 = x.options().dtype(at::kFloat);
  at::Tensor value = new_output({B}, f32), dual = new_output({B}, f32), err = new_output({B}, f32);
  at::Tensor f = new_output({B, M}, f32), g = new_output({B, N}, f32);
  at::Tensor n_iter = new_output({B}, x.options().dtype(at::kLong));
  at::Tensor eps_out = new_output({B}, x.options().dtype(at::kDouble));
  const std::vector<int64_t> m = token_counts(x_mask, B, M), n = token_counts(y_mask, B, N);
  dispatch(x.scalar_type(), [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    launch_groups("wrd", m, n, M, N, true, x.options(), sk::wrd_fwd_kernel<T>,
                  [&](const sk::Layout& L, const int* index, float* ws) {
                    return sk::WrdFwdArgs<T>{tokens_of<T>(x, x_mask), tokens_of<T>(y, y_mask), eps, tol, max_iter,
                                             relative_eps, L, index, ws, mptr<float>(value), mptr<float>(dual),
                                             mptr<float>(f), mptr<float>(g), mptr<float>(err),
                                             mptr<int64_t>(n_iter), mptr<double>(eps_out)};
                  });
  });
  return {value, dual, f, g, n_iter, err, eps_out};
}

std::tuple<at::Tensor, at::Tensor> wrd_bwd_cuda(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& y,
                                                const std::optional<at::Tensor>& x_mask,
                                                const std::optional<at::Tensor>& y_mask, const at::Tensor& f,
                                                const at::Tensor& g, const at::Tensor& eps_b) {
  check_cuda_tokens(x, y, x_mask, y_mask);
  const int64_t B = x.size(0), M = x.size(1), N = y.size(1), D = x.size(2);
  const at::Tensor eps = device_eps(eps_b, B, x);
  check_potentials(grad, f, g, x, B, M, N);
  const c10::cuda::CUDAGuard guard(x.device());
  check_index_range("wrd backward", M, N);
  at::Tensor gx = new_output({B, M, D}, x.options()), gy = new_output({B, N, D}, y.options());
  const std::vector<int64_t> m = token_counts(x_mask, B, M), n = token_counts(y_mask, B, N);
  const at::Tensor gr = grad.to(at::kFloat).contiguous();
  const at::Tensor fc = f.to(at::kFloat).contiguous(), gc = g.to(at::kFloat).contiguous();
  dispatch(x.scalar_type(), [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    launch_groups("wrd backward", m, n, M, N, true, x.options(), sk::wrd_bwd_kernel<T>,
                  [&](const sk::Layout& L, const int* index, float* ws) {
                    return sk::WrdBwdArgs<T>{tokens_of<T>(x, x_mask), tokens_of<T>(y, y_mask), cptr<float>(gr),
                                             cptr<float>(fc), cptr<float>(gc), cptr<double>(eps), L, index, ws,
                                             mptr<T>(gx),
                                             mptr<T>(gy)};
                  });
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
