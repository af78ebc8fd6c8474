// Sparse softmax top-k (SPACES) on the CPU: argument checks, outputs and dispatch. The hot loops
// (the top-k scan, logsumexp, backward scatter) are in cpu/sparse_softmax_kernels.h, compiled at
// baseline / AVX2 / AVX-512 and chosen at run time (common/isa.h).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "common/checks.h"
#include "common/math.h"
#include "common/output.h"
#include "common/isa.h"
#define KX_ISA_KERNELS "cpu/sparse_softmax_kernels.h"
#include "common/isa_kernels.h"

namespace kx {
namespace {

constexpr int64_t kGrainElems = 1 << 16;  // elements per parallel task, to amortize scheduling

void check_index_dtype(const at::Tensor& index, const char* name) {
  TORCH_CHECK_TYPE(index.scalar_type() == at::kLong, "kxkernels: ", name, " must be int64, got ", index.scalar_type());
}

int64_t grain_rows(int64_t V) { return std::max<int64_t>(1, kGrainElems / std::max<int64_t>(V, 1)); }

at::Tensor rows_of(const at::Tensor& logits) {
  return logits.stride(1) == 1 ? logits : logits.contiguous();
}

void check_logits(const at::Tensor& logits, int64_t k) {
  check_floating(logits, "logits");
  check_dim(logits, 2, "logits");
  KX_CHECK(logits.size(1) > 0, "logits must have a non-empty last dim");
  KX_CHECK(k >= 1 && k <= logits.size(1), "k must be in [1, V=", logits.size(1), "], got ", k);
}

std::tuple<at::Tensor, at::Tensor> sparse_softmax_fwd_cpu(const at::Tensor& logits_in, int64_t k) {
  check_logits(logits_in, k);
  const at::Tensor logits = rows_of(logits_in);
  const int64_t N = logits.size(0), V = logits.size(1), ld = logits.stride(0);
  at::Tensor probs = new_zeroed_output({N, V}, logits.options());
  at::Tensor index = new_output({N, k}, logits.options().dtype(at::kLong));
  int64_t* ip = index.data_ptr<int64_t>();
  KX_DISPATCH_FLOATING(logits.scalar_type(), "sparse_softmax_fwd", [&] {
    KX_ISA_CALL(sparse_softmax_fwd_rows<scalar_t>, logits.data_ptr<scalar_t>(), ld, N, V, k, grain_rows(V),
                probs.data_ptr<scalar_t>(), ip);
  });
  return {probs, index};
}

at::Tensor sparse_softmax_bwd_cpu(const at::Tensor& grad, const at::Tensor& probs,
                                  const at::Tensor& index) {
  check_floating(probs, "probs");
  check_floating(grad, "grad_probs");
  check_dim(probs, 2, "probs");
  check_dim(index, 2, "topk_index");
  check_index_dtype(index, "topk_index");
  KX_CHECK(grad.sizes() == probs.sizes(), "grad_probs must match probs ", probs.sizes(), ", got ", grad.sizes());
  KX_CHECK(index.size(0) == probs.size(0), "topk_index must have ", probs.size(0), " rows (one per probs row), got ",
           index.size(0));
  const int64_t N = probs.size(0), V = probs.size(1), k = index.size(1);
  const at::Tensor idx = index.contiguous();
  const at::Tensor g = grad.to(probs.scalar_type());
  at::Tensor out = new_zeroed_output({N, V}, probs.options());
  const int64_t* ip = idx.data_ptr<int64_t>();
  IndexGuard guard;
  KX_DISPATCH_FLOATING(probs.scalar_type(), "sparse_softmax_bwd", [&] {
    KX_ISA_CALL(sparse_softmax_bwd_rows<scalar_t>, g.data_ptr<scalar_t>(), g.stride(0), g.stride(1),
                probs.data_ptr<scalar_t>(), probs.stride(0), probs.stride(1), ip, N, V, k, grain_rows(V),
                out.data_ptr<scalar_t>(), guard);
  });
  guard.raise_if_bad("topk_index", V);
  return out;
}

// Type and shape of target; its values are checked inside the kernels' own pass (IndexGuard).
void check_target(const at::Tensor& target, int64_t N) {
  TORCH_CHECK_TYPE(target.scalar_type() == at::kLong || target.scalar_type() == at::kInt,
                   "kxkernels: target must be int64 or int32, got ", target.scalar_type());
  check_dim(target, 1, "target");
  KX_CHECK(target.size(0) == N, "target must have ", N, " rows (one per logits row), got ", target.size(0));
}

// Raised by both cross-entropy ops for a target outside [0, V) that is not ignore_index.
void raise_bad_target(const IndexGuard& guard, int64_t V, int64_t ignore_index) {
  const std::string extra = " or ignore_index=" + std::to_string(ignore_index);
  guard.raise_if_bad("target", V, extra.c_str());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sparse_softmax_cross_entropy_fwd_cpu(
    const at::Tensor& logits_in, const at::Tensor& target_in, int64_t k, int64_t ignore_index,
    bool include_target) {
  check_logits(logits_in, k);
  const int64_t N = logits_in.size(0), V = logits_in.size(1);
  check_target(target_in, N);
  const at::Tensor logits = rows_of(logits_in);
  const at::Tensor target = target_in.to(at::kLong).contiguous();
  const int64_t ld = logits.stride(0);
  auto f32 = logits.options().dtype(logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat);
  at::Tensor loss = new_output({N}, f32), lse = new_output({N}, f32);
  at::Tensor index = new_output({N, k}, logits.options().dtype(at::kLong));
  const int64_t* tp = target.data_ptr<int64_t>();
  int64_t* ip = index.data_ptr<int64_t>();
  IndexGuard guard;
  KX_DISPATCH_FLOATING(logits.scalar_type(), "sparse_softmax_cross_entropy_fwd", [&] {
    using A = acc_t<scalar_t>;
    KX_ISA_CALL(cross_entropy_fwd_rows<scalar_t>, logits.data_ptr<scalar_t>(), ld, tp, N, V, k, ignore_index,
                include_target, grain_rows(V), loss.data_ptr<A>(), lse.data_ptr<A>(), ip, guard);
  });
  raise_bad_target(guard, V, ignore_index);
  return {loss, lse, index};
}

at::Tensor sparse_softmax_cross_entropy_bwd_cpu(const at::Tensor& grad_loss, const at::Tensor& logits_in,
                                                const at::Tensor& target_in, const at::Tensor& lse,
                                                const at::Tensor& index_in, int64_t ignore_index,
                                                bool include_target) {
  check_floating(logits_in, "logits");
  check_floating(grad_loss, "grad_loss");
  check_dim(logits_in, 2, "logits");
  check_dim(index_in, 2, "topk_index");
  check_index_dtype(index_in, "topk_index");
  const int64_t N = logits_in.size(0), V = logits_in.size(1), k = index_in.size(1);
  check_target(target_in, N);
  KX_CHECK(grad_loss.dim() == 1 && grad_loss.size(0) == N, "grad_loss must have shape (", N, ",), got ",
           grad_loss.sizes());
  const auto acc_type = logits_in.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK_TYPE(lse.scalar_type() == acc_type, "kxkernels: lse must be ", acc_type, " for ",
                   logits_in.scalar_type(), " logits, got ", lse.scalar_type());
  KX_CHECK(lse.dim() == 1 && lse.size(0) == N, "lse must have shape (", N, ",), got ", lse.sizes());
  KX_CHECK(index_in.size(0) == N, "topk_index must have ", N, " rows (one per logits row), got ", index_in.size(0));
  const at::Tensor logits = rows_of(logits_in);
  const at::Tensor target = target_in.to(at::kLong).contiguous();
  const at::Tensor index = index_in.contiguous();
  const int64_t ld = logits.stride(0);
  at::Tensor grad = new_zeroed_output({N, V}, logits.options());
  const int64_t* tp = target.data_ptr<int64_t>();
  const int64_t* ip = index.data_ptr<int64_t>();
  IndexGuard guard, index_guard;
  KX_DISPATCH_FLOATING(logits.scalar_type(), "sparse_softmax_cross_entropy_bwd", [&] {
    using A = acc_t<scalar_t>;
    const at::Tensor gl = grad_loss.to(lse.scalar_type());
    const at::Tensor sl = lse.contiguous();
    KX_ISA_CALL(cross_entropy_bwd_rows<scalar_t>, gl.data_ptr<A>(), gl.stride(0), logits.data_ptr<scalar_t>(), ld,
                tp, sl.data_ptr<A>(), ip, N, V, k, ignore_index, include_target, grain_rows(V),
                grad.data_ptr<scalar_t>(), guard, index_guard);
  });
  raise_bad_target(guard, V, ignore_index);
  index_guard.raise_if_bad("topk_index", V);
  return grad;
}

}  // namespace
}  // namespace kx

TORCH_LIBRARY_IMPL(kxkernels, CPU, m) {
  m.impl("sparse_softmax_fwd", &kx::sparse_softmax_fwd_cpu);
  m.impl("sparse_softmax_bwd", &kx::sparse_softmax_bwd_cpu);
  m.impl("sparse_softmax_cross_entropy_fwd", &kx::sparse_softmax_cross_entropy_fwd_cpu);
  m.impl("sparse_softmax_cross_entropy_bwd", &kx::sparse_softmax_cross_entropy_bwd_cpu);
}
