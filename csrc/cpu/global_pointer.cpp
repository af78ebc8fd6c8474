// GlobalPointer span scores and the ZLPR loss on the CPU: argument checks, RoPE tables, dtype
// dispatch; the kernels (tiles of RoPE'd q/k scored by ATen's cpublas GEMM, masks, biases, the
// streaming log-sum-exps) are in global_pointer_kernels.h, compiled once per ISA level.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <optional>
#include <vector>

#include "common/checks.h"
#include "common/math.h"
#include "common/output.h"
namespace kx {
// One call of a GlobalPointer kernel: q, k pointers and strides, masks, biases, RoPE tables.
template <typename T, typename A>
struct GpProblem {
  const T* q;
  const T* k;
  int64_t qs[4], ks[4];  // strides of q, k (B, H, L, D)
  const bool* mask;      // (B, L) contiguous, or null
  const int64_t* lens;   // (B,): 1 + the last real position (L without a mask)
  const T* start_bias;   // (B, H, L) contiguous, or null
  const T* end_bias;
  const A* cs;           // (L, D/2)
  const A* sn;
  int64_t B, H, L, D;
  bool rope, interleaved, tril;
  A scale;
};
}  // namespace kx

#include "common/isa.h"
#define KX_ISA_KERNELS "cpu/global_pointer_kernels.h"
#include "common/isa_kernels.h"

namespace kx {
namespace {

at::ScalarType acc_type(at::ScalarType s) { return s == at::kDouble ? at::kDouble : at::kFloat; }

void check_qk(const at::Tensor& q, const at::Tensor& k, bool rope) {
  check_floating(q, "q");
  check_floating(k, "k");
  check_dim(q, 4, "q");
  KX_CHECK(k.sizes() == q.sizes(), "k must have the shape of q ", q.sizes(), " (B, H, L, D), got ", k.sizes());
  TORCH_CHECK_TYPE(k.scalar_type() == q.scalar_type(), "kxkernels: k must have the dtype of q (", q.scalar_type(),
                   "), got ", k.scalar_type());
  check_same_device(q, k, "q", "k");
  for (int64_t d = 0; d < 4; ++d) KX_CHECK(q.size(d) > 0, "q must have non-empty dims, got ", q.sizes());
  KX_CHECK(!rope || q.size(3) % 2 == 0, "head_dim D must be even with rope=True, got D=", q.size(3));
}

// mask (B, L) bool or none -> (contiguous mask or undefined, lens (B,): 1 + last real position).
std::pair<at::Tensor, std::vector<int64_t>> mask_and_lens(const std::optional<at::Tensor>& mask, const at::Tensor& q) {
  const int64_t B = q.size(0), L = q.size(2);
  std::vector<int64_t> lens(B, L);
  if (!mask.has_value()) return {at::Tensor(), lens};
  const at::Tensor& m = *mask;
  TORCH_CHECK_TYPE(m.scalar_type() == at::kBool, "kxkernels: mask must be bool (True = token), got ", m.scalar_type());
  check_same_device(m, q, "mask", "q");
  KX_CHECK(m.dim() == 2 && m.size(0) == B && m.size(1) == L, "mask must be (B, L) = (", B, ", ", L, "), got ",
           m.sizes());
  at::Tensor mc = m.contiguous();
  const bool* mp = mc.data_ptr<bool>();
  for (int64_t b = 0; b < B; ++b) {
    int64_t n = L;
    while (n > 0 && !mp[b * L + n - 1]) --n;
    lens[b] = n;
  }
  return {mc, lens};
}

at::Tensor bias_of(const std::optional<at::Tensor>& bias, const at::Tensor& q, const char* name) {
  if (!bias.has_value()) return at::Tensor();
  check_floating(*bias, name);
  check_same_device(*bias, q, name, "q");
  KX_CHECK(bias->dim() == 3 && bias->size(0) == q.size(0) && bias->size(1) == q.size(1) && bias->size(2) == q.size(2),
           name, " must be (B, H, L) = (", q.size(0), ", ", q.size(1), ", ", q.size(2), "), got ", bias->sizes());
  return bias->to(q.scalar_type()).contiguous();
}

// spans (B, H, P, 2) int -> int64 contiguous; every pair is padding (a -1 in it) or 0 <= start <= end < L.
at::Tensor spans_of(const at::Tensor& spans, const at::Tensor& q) {
  TORCH_CHECK_TYPE(spans.scalar_type() == at::kLong || spans.scalar_type() == at::kInt,
                   "kxkernels: spans must be int64 or int32, got ", spans.scalar_type());
  check_same_device(spans, q, "spans", "q");
  const int64_t B = q.size(0), H = q.size(1), L = q.size(2);
  KX_CHECK(spans.dim() == 4 && spans.size(0) == B && spans.size(1) == H && spans.size(3) == 2,
           "spans must be (B, H, P, 2) = (", B, ", ", H, ", P, 2), got ", spans.sizes());
  at::Tensor s = spans.to(at::kLong).contiguous();
  const int64_t* sp = s.data_ptr<int64_t>();
  const int64_t n = s.numel() / 2;
  for (int64_t t = 0; t < n; ++t) {
    const int64_t i = sp[2 * t], j = sp[2 * t + 1];
    KX_CHECK(i >= -1 && j >= -1 && i < L && j < L, "spans positions must be in [0, L=", L,
             ") (or -1 for padding), got (", i, ", ", j, ")");
    if (i == -1 || j == -1) continue;
    KX_CHECK(i <= j, "spans must have start <= end, got (", i, ", ", j, ")");
  }
  return s;
}

// cos / sin of m * theta_i, (L, D/2): theta_i = base^(-2i/D) rounded to float32, the angle formed
// in float32 from the integer position (API.md RoPE), its cos / sin in A.
template <typename A>
void rope_tables(int64_t L, int64_t D, double base, std::vector<A>& cs, std::vector<A>& sn) {
  const int64_t half = D / 2;
  cs.resize(L * half);
  sn.resize(L * half);
  for (int64_t p = 0; p < half; ++p) {
    const float theta = static_cast<float>(std::pow(base, -2.0 * double(p) / double(D)));
    for (int64_t m = 0; m < L; ++m) {
      const float angle = static_cast<float>(m) * theta;
      cs[m * half + p] = static_cast<A>(std::cos(static_cast<A>(angle)));
      sn[m * half + p] = static_cast<A>(std::sin(static_cast<A>(angle)));
    }
  }
}

// Everything of a GpProblem but the pointers of q, k (set by the caller after dispatch).
struct GpInputs {
  at::Tensor mask, start_bias, end_bias;
  std::vector<int64_t> lens;
};

template <typename T, typename A>
GpProblem<T, A> make_problem(const at::Tensor& q, const at::Tensor& k, const GpInputs& in, bool rope, double base,
                             bool interleaved, bool tril, double scale, std::vector<A>& cs, std::vector<A>& sn) {
  GpProblem<T, A> p;
  p.q = q.data_ptr<T>();
  p.k = k.data_ptr<T>();
  for (int d = 0; d < 4; ++d) {
    p.qs[d] = q.stride(d);
    p.ks[d] = k.stride(d);
  }
  p.mask = in.mask.defined() ? in.mask.data_ptr<bool>() : nullptr;
  p.lens = in.lens.data();
  p.start_bias = in.start_bias.defined() ? in.start_bias.data_ptr<T>() : nullptr;
  p.end_bias = in.end_bias.defined() ? in.end_bias.data_ptr<T>() : nullptr;
  p.B = q.size(0);
  p.H = q.size(1);
  p.L = q.size(2);
  p.D = q.size(3);
  if (rope) rope_tables<A>(p.L, p.D, base, cs, sn);
  p.cs = cs.data();
  p.sn = sn.data();
  p.rope = rope;
  p.interleaved = interleaved;
  p.tril = tril;
  p.scale = static_cast<A>(scale);
  return p;
}

void check_settings(double base, double scale) {
  KX_CHECK(base > 0 && std::isfinite(base), "rope_base must be finite and > 0, got ", base);
  KX_CHECK(std::isfinite(scale), "scale must be finite, got ", scale);
}

GpInputs gp_inputs(const at::Tensor& q, const at::Tensor& k, const std::optional<at::Tensor>& mask,
                   const std::optional<at::Tensor>& start_bias, const std::optional<at::Tensor>& end_bias, bool rope,
                   double base, double scale) {
  check_qk(q, k, rope);
  check_settings(base, scale);
  GpInputs in;
  auto ml = mask_and_lens(mask, q);
  in.mask = ml.first;
  in.lens = std::move(ml.second);
  in.start_bias = bias_of(start_bias, q, "start_bias");
  in.end_bias = bias_of(end_bias, q, "end_bias");
  return in;
}

at::Tensor global_pointer_fwd_cpu(const at::Tensor& q, const at::Tensor& k, const std::optional<at::Tensor>& mask,
                                  const std::optional<at::Tensor>& start_bias,
                                  const std::optional<at::Tensor>& end_bias, bool rope, double rope_base,
                                  bool interleaved, bool tril, double scale) {
  const GpInputs in = gp_inputs(q, k, mask, start_bias, end_bias, rope, rope_base, scale);
  const int64_t B = q.size(0), H = q.size(1), L = q.size(2);
  at::Tensor out = new_output({B, H, L, L}, q.options());
  KX_DISPATCH_FLOATING(q.scalar_type(), "global_pointer_fwd", [&] {
    using A = acc_t<scalar_t>;
    std::vector<A> cs, sn;
    const auto p = make_problem<scalar_t, A>(q, k, in, rope, rope_base, interleaved, tril, scale, cs, sn);
    KX_ISA_CALL(gp_scores_forward, p, out.data_ptr<scalar_t>());
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> global_pointer_bwd_cpu(
    const at::Tensor& grad_in, const at::Tensor& q, const at::Tensor& k, const std::optional<at::Tensor>& mask, bool rope,
    double rope_base, bool interleaved, bool tril, double scale) {
  const GpInputs in = gp_inputs(q, k, mask, std::nullopt, std::nullopt, rope, rope_base, scale);
  const int64_t B = q.size(0), H = q.size(1), L = q.size(2), D = q.size(3);
  check_floating(grad_in, "grad");
  KX_CHECK(grad_in.dim() == 4 && grad_in.size(0) == B && grad_in.size(1) == H && grad_in.size(2) == L &&
               grad_in.size(3) == L,
           "grad must be (B, H, L, L) = (", B, ", ", H, ", ", L, ", ", L, "), got ", grad_in.sizes());
  const at::Tensor grad = grad_in.to(q.scalar_type()).contiguous();
  at::Tensor dq = new_output({B, H, L, D}, q.options()), dk = new_output({B, H, L, D}, q.options());
  auto acc = q.options().dtype(acc_type(q.scalar_type()));
  at::Tensor dsb = new_output({B, H, L}, acc), deb = new_output({B, H, L}, acc);
  KX_DISPATCH_FLOATING(q.scalar_type(), "global_pointer_bwd", [&] {
    using A = acc_t<scalar_t>;
    std::vector<A> cs, sn;
    const auto p = make_problem<scalar_t, A>(q, k, in, rope, rope_base, interleaved, tril, scale, cs, sn);
    KX_ISA_CALL(gp_scores_backward, p, grad.data_ptr<scalar_t>(), dq.data_ptr<scalar_t>(),
                dk.data_ptr<scalar_t>(), dsb.data_ptr<A>(), deb.data_ptr<A>());
  });
  return {dq, dk, dsb, deb};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> global_pointer_loss_fwd_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& spans_in, const std::optional<at::Tensor>& mask,
    const std::optional<at::Tensor>& start_bias, const std::optional<at::Tensor>& end_bias, bool rope,
    double rope_base, bool interleaved, bool tril, double scale) {
  const GpInputs in = gp_inputs(q, k, mask, start_bias, end_bias, rope, rope_base, scale);
  const at::Tensor spans = spans_of(spans_in, q);
  const int64_t B = q.size(0), H = q.size(1), P = spans.size(2);
  auto acc = q.options().dtype(acc_type(q.scalar_type()));
  at::Tensor loss = new_output({B, H}, acc), ln = new_output({B, H}, acc), lp = new_output({B, H}, acc);
  KX_DISPATCH_FLOATING(q.scalar_type(), "global_pointer_loss_fwd", [&] {
    using A = acc_t<scalar_t>;
    std::vector<A> cs, sn;
    const auto p = make_problem<scalar_t, A>(q, k, in, rope, rope_base, interleaved, tril, scale, cs, sn);
    KX_ISA_CALL(gp_loss_forward, p, spans.data_ptr<int64_t>(), P, loss.data_ptr<A>(),
                ln.data_ptr<A>(), lp.data_ptr<A>());
  });
  return {loss, ln, lp};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> global_pointer_loss_bwd_cpu(
    const at::Tensor& grad_loss, const at::Tensor& q, const at::Tensor& k, const at::Tensor& spans_in,
    const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& start_bias,
    const std::optional<at::Tensor>& end_bias, const at::Tensor& lse_neg, const at::Tensor& lse_pos, bool rope,
    double rope_base, bool interleaved, bool tril, double scale) {
  const GpInputs in = gp_inputs(q, k, mask, start_bias, end_bias, rope, rope_base, scale);
  const at::Tensor spans = spans_of(spans_in, q);
  const int64_t B = q.size(0), H = q.size(1), L = q.size(2), D = q.size(3), P = spans.size(2);
  const at::ScalarType at_acc = acc_type(q.scalar_type());
  for (const at::Tensor* t : {&grad_loss, &lse_neg, &lse_pos})
    KX_CHECK(t->dim() == 2 && t->size(0) == B && t->size(1) == H, "grad_loss, lse_neg and lse_pos must be (B, H) = (",
             B, ", ", H, "), got ", t->sizes());
  const at::Tensor g = grad_loss.to(at_acc).contiguous(), ln = lse_neg.to(at_acc).contiguous(),
                   lp = lse_pos.to(at_acc).contiguous();
  at::Tensor dq = new_output({B, H, L, D}, q.options()), dk = new_output({B, H, L, D}, q.options());
  auto acc = q.options().dtype(at_acc);
  at::Tensor dsb = new_output({B, H, L}, acc), deb = new_output({B, H, L}, acc);
  KX_DISPATCH_FLOATING(q.scalar_type(), "global_pointer_loss_bwd", [&] {
    using A = acc_t<scalar_t>;
    std::vector<A> cs, sn;
    const auto p = make_problem<scalar_t, A>(q, k, in, rope, rope_base, interleaved, tril, scale, cs, sn);
    KX_ISA_CALL(gp_loss_backward, p, spans.data_ptr<int64_t>(), P, g.data_ptr<A>(), int64_t(1),
                ln.data_ptr<A>(), lp.data_ptr<A>(), dq.data_ptr<scalar_t>(), dk.data_ptr<scalar_t>(),
                dsb.data_ptr<A>(), deb.data_ptr<A>());
  });
  return {dq, dk, dsb, deb};
}

// ---- dense and sparse ZLPR rows ----------------------------------------------------------------
at::Tensor rows_of(const at::Tensor& x) { return x.stride(1) == 1 ? x : x.contiguous(); }

void check_logits(const at::Tensor& logits) {
  check_floating(logits, "logits");
  check_dim(logits, 2, "logits");
  KX_CHECK(logits.size(1) > 0, "logits must have a non-empty last dim, got ", logits.sizes());
}

at::Tensor labels_of(const at::Tensor& labels, const at::Tensor& logits) {
  TORCH_CHECK_TYPE(labels.scalar_type() == at::kBool || labels.scalar_type() == logits.scalar_type(),
                   "kxkernels: labels must be bool or the dtype of logits (", logits.scalar_type(), "), got ",
                   labels.scalar_type());
  check_same_device(labels, logits, "labels", "logits");
  KX_CHECK(labels.sizes() == logits.sizes(), "labels must have the shape of logits ", logits.sizes(), ", got ",
           labels.sizes());
  return rows_of(labels);
}

void check_row_stats(const at::Tensor& t, int64_t N, const char* name) {
  KX_CHECK(t.dim() == 1 && t.size(0) == N, name, " must be (N,) = (", N, ",), got ", t.sizes());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> mcce_fwd_cpu(const at::Tensor& logits_in, const at::Tensor& labels_in) {
  check_logits(logits_in);
  const at::Tensor logits = rows_of(logits_in), labels = labels_of(labels_in, logits_in);
  const int64_t N = logits.size(0), C = logits.size(1);
  auto acc = logits.options().dtype(acc_type(logits.scalar_type()));
  at::Tensor loss = new_output({N}, acc), ln = new_output({N}, acc), lp = new_output({N}, acc);
  std::atomic<bool> bad{false};
  KX_DISPATCH_FLOATING(logits.scalar_type(), "multilabel_categorical_crossentropy_fwd", [&] {
    using A = acc_t<scalar_t>;
    const scalar_t* xp = logits.data_ptr<scalar_t>();
    if (labels.scalar_type() == at::kBool)
      KX_ISA_CALL(mcce_forward, xp, logits.stride(0), labels.data_ptr<bool>(),
                  labels.stride(0), N, C, loss.data_ptr<A>(), ln.data_ptr<A>(), lp.data_ptr<A>(), &bad);
    else
      KX_ISA_CALL(mcce_forward, xp, logits.stride(0),
                  labels.data_ptr<scalar_t>(), labels.stride(0), N, C, loss.data_ptr<A>(), ln.data_ptr<A>(),
                  lp.data_ptr<A>(), &bad);
  });
  KX_CHECK(!bad.load(), "labels must be in [0, 1] (hard or soft), found a value outside (or NaN)");
  return {loss, ln, lp};
}

at::Tensor mcce_bwd_cpu(const at::Tensor& grad_loss, const at::Tensor& logits_in, const at::Tensor& labels_in,
                        const at::Tensor& lse_neg, const at::Tensor& lse_pos) {
  check_logits(logits_in);
  const at::Tensor logits = rows_of(logits_in), labels = labels_of(labels_in, logits_in);
  const int64_t N = logits.size(0), C = logits.size(1);
  check_row_stats(grad_loss, N, "grad_loss");
  check_row_stats(lse_neg, N, "lse_neg");
  check_row_stats(lse_pos, N, "lse_pos");
  const at::ScalarType at_acc = acc_type(logits.scalar_type());
  const at::Tensor g = grad_loss.to(at_acc).contiguous(), ln = lse_neg.to(at_acc).contiguous(),
                   lp = lse_pos.to(at_acc).contiguous();
  at::Tensor out = new_output({N, C}, logits.options());
  KX_DISPATCH_FLOATING(logits.scalar_type(), "multilabel_categorical_crossentropy_bwd", [&] {
    using A = acc_t<scalar_t>;
    const scalar_t* xp = logits.data_ptr<scalar_t>();
    if (labels.scalar_type() == at::kBool)
      KX_ISA_CALL(mcce_backward, g.data_ptr<A>(), int64_t(1), xp, logits.stride(0),
                  labels.data_ptr<bool>(), labels.stride(0), N, C, ln.data_ptr<A>(), lp.data_ptr<A>(),
                  out.data_ptr<scalar_t>());
    else
      KX_ISA_CALL(mcce_backward, g.data_ptr<A>(), int64_t(1), xp,
                  logits.stride(0), labels.data_ptr<scalar_t>(), labels.stride(0), N, C, ln.data_ptr<A>(),
                  lp.data_ptr<A>(), out.data_ptr<scalar_t>());
  });
  return out;
}

at::Tensor pos_index_of(const at::Tensor& pos, const at::Tensor& logits) {
  TORCH_CHECK_TYPE(pos.scalar_type() == at::kLong || pos.scalar_type() == at::kInt,
                   "kxkernels: pos_index must be int64 or int32, got ", pos.scalar_type());
  check_same_device(pos, logits, "pos_index", "logits");
  KX_CHECK(pos.dim() == 2 && pos.size(0) == logits.size(0), "pos_index must be (N, P) with N=", logits.size(0),
           ", got ", pos.sizes());
  at::Tensor p = pos.to(at::kLong).contiguous();
  const int64_t C = logits.size(1);
  const int64_t* pp = p.data_ptr<int64_t>();
  for (int64_t t = 0; t < p.numel(); ++t)
    KX_CHECK(pp[t] >= -1 && pp[t] < C, "pos_index values must be in [0, C=", C, ") or -1 (padding), got ", pp[t]);
  return p;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> smcce_fwd_cpu(const at::Tensor& logits_in, const at::Tensor& pos_in,
                                                             bool mask_zero) {
  check_logits(logits_in);
  const at::Tensor logits = rows_of(logits_in), pos = pos_index_of(pos_in, logits_in);
  const int64_t N = logits.size(0), C = logits.size(1), P = pos.size(1);
  auto acc = logits.options().dtype(acc_type(logits.scalar_type()));
  at::Tensor loss = new_output({N}, acc), ln = new_output({N}, acc), lp = new_output({N}, acc);
  KX_DISPATCH_FLOATING(logits.scalar_type(), "sparse_multilabel_categorical_crossentropy_fwd", [&] {
    using A = acc_t<scalar_t>;
    KX_ISA_CALL(smcce_forward, logits.data_ptr<scalar_t>(), logits.stride(0),
                pos.data_ptr<int64_t>(), P, N, C, mask_zero, loss.data_ptr<A>(), ln.data_ptr<A>(), lp.data_ptr<A>());
  });
  return {loss, ln, lp};
}

at::Tensor smcce_bwd_cpu(const at::Tensor& grad_loss, const at::Tensor& logits_in, const at::Tensor& pos_in,
                         bool mask_zero, const at::Tensor& lse_neg, const at::Tensor& lse_pos) {
  check_logits(logits_in);
  const at::Tensor logits = rows_of(logits_in), pos = pos_index_of(pos_in, logits_in);
  const int64_t N = logits.size(0), C = logits.size(1), P = pos.size(1);
  check_row_stats(grad_loss, N, "grad_loss");
  check_row_stats(lse_neg, N, "lse_neg");
  check_row_stats(lse_pos, N, "lse_pos");
  const at::ScalarType at_acc = acc_type(logits.scalar_type());
  const at::Tensor g = grad_loss.to(at_acc).contiguous(), ln = lse_neg.to(at_acc).contiguous(),
                   lp = lse_pos.to(at_acc).contiguous();
  at::Tensor out = new_output({N, C}, logits.options());
  KX_DISPATCH_FLOATING(logits.scalar_type(), "sparse_multilabel_categorical_crossentropy_bwd", [&] {
    using A = acc_t<scalar_t>;
    KX_ISA_CALL(smcce_backward, g.data_ptr<A>(), int64_t(1), logits.data_ptr<scalar_t>(),
                logits.stride(0), pos.data_ptr<int64_t>(), P, N, C, mask_zero, ln.data_ptr<A>(), lp.data_ptr<A>(),
                out.data_ptr<scalar_t>());
  });
  return out;
}

}  // namespace
}  // namespace kx

TORCH_LIBRARY_IMPL(kxkernels, CPU, m) {
  m.impl("global_pointer_fwd", &kx::global_pointer_fwd_cpu);
  m.impl("global_pointer_bwd", &kx::global_pointer_bwd_cpu);
  m.impl("global_pointer_loss_fwd", &kx::global_pointer_loss_fwd_cpu);
  m.impl("global_pointer_loss_bwd", &kx::global_pointer_loss_bwd_cpu);
  m.impl("multilabel_categorical_crossentropy_fwd", &kx::mcce_fwd_cpu);
  m.impl("multilabel_categorical_crossentropy_bwd", &kx::mcce_bwd_cpu);
  m.impl("sparse_multilabel_categorical_crossentropy_fwd", &kx::smcce_fwd_cpu);
  m.impl("sparse_multilabel_categorical_crossentropy_bwd", &kx::smcce_bwd_cpu);
}
