// Causal linear attention as a cumulative sum (Katharopoulos et al. 2020, "Transformers are RNNs";
// Su Jianlin 2020, 线性Attention的探索) with the normalizer, feature map, RoPE on the numerator
// (Su, Transformer升级之路:2), key padding and a carried state fused; and the non-causal form.
// Semantics: kxkernels/ops/linear_attention/reference.py; kernels: linear_attention_kernels.h.
//
// The sequence runs in chunks: inside a chunk the masked products are small GEMMs, across chunks
// only the state S (Dk x Dv) and z (Dk) is carried, in float32 (float64 for float64 inputs). The
// (L, Dk, Dv) cumulative sum is never formed. The backward recomputes the feature maps, RoPE and
// the running state chunk by chunk (a forward pass for dq, a reverse pass for dk, dv) instead of
// storing per-position states; the forward saves only the per-position denominator (B, H, L).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#include "common/blas.h"
#include "common/checks.h"
#include "common/math.h"
#include "common/output.h"

namespace kx {

// Everything a kernel needs, as raw pointers and element strides (see the kernels header).
struct LaArgs {
  int64_t B = 0, H = 0, L = 0, Dk = 0, Dv = 0, P = 1;
  int64_t chunk = 32;                         // positions per chunk (<= kMaxChunk of the kernels)
  const void *q = nullptr, *k = nullptr, *v = nullptr;
  int64_t qs[4] = {}, ks[4] = {}, vs[4] = {};
  const bool* mask = nullptr;                 // (B, L) contiguous, True = keep
  const void *cosF = nullptr, *sinS = nullptr;  // RoPE tables (P, L, Dk), accumulation type
  int fm = 0;                                 // 0 elu+1, 1 relu, 2 identity
  bool normalize = true, rope = false, interleaved = true;
  double eps = 1e-6;
  const void *S0 = nullptr, *z0 = nullptr;    // initial state (B, H, Dk, Dv), (B, H, Dk) contiguous
  void *outw = nullptr, *denw = nullptr, *Sw = nullptr, *zw = nullptr;  // forward outputs
  const void* gout = nullptr;                 // backward inputs
  int64_t gs[4] = {};
  const void* out = nullptr;
  int64_t os[4] = {};
  const void* den = nullptr;
  const void *gS = nullptr, *gz = nullptr;
  void *gqw = nullptr, *gkw = nullptr, *gvw = nullptr, *gS0w = nullptr, *gz0w = nullptr;  // grads
};

}  // namespace kx

#include "common/isa.h"
#define KX_ISA_KERNELS "cpu/linear_attention_kernels.h"
#include "common/isa_kernels.h"

namespace kx {
namespace {

int parse_feature_map(const std::string& s) {
  if (s == "elu+1") return 0;
  if (s == "relu") return 1;
  if (s == "identity") return 2;
  KX_CHECK(false, "feature_map must be 'elu+1', 'relu' or 'identity', got '", s, "'");
  return -1;
}

// Positions per chunk: intra-chunk products cost 2 C (Dk + Dv) per position, the state products
// 4 Dk Dv whatever C; smaller chunks waste less on the masked triangle but make thinner GEMMs.
// KX_LINEAR_ATTENTION_CHUNK (1..128) overrides the default, for tuning.
int64_t chunk_size() {
  static const int64_t c = [] {
    const char* e = std::getenv("KX_LINEAR_ATTENTION_CHUNK");
    const int64_t v = e != nullptr ? std::atoll(e) : 0;
    return v >= 1 && v <= 128 ? v : int64_t(32);
  }();
  return c;
}

at::ScalarType acc_type(at::ScalarType s) { return s == at::kDouble ? at::kDouble : at::kFloat; }

void strides4(const at::Tensor& t, int64_t* s) {
  for (int i = 0; i < 4; ++i) s[i] = t.stride(i);
}

struct Prepared {
  LaArgs a;
  std::vector<at::Tensor> keep;  // tensors the pointers in `a` point into
};

// Checks every argument of a forward / backward call and fills the shared part of LaArgs.
Prepared prepare(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::string& feature_map,
                 bool normalize, double eps, bool rope, double rope_base, bool interleaved,
                 const c10::optional<at::Tensor>& positions, int64_t pos_offset,
                 const c10::optional<at::Tensor>& mask, const c10::optional<at::Tensor>& S0,
                 const c10::optional<at::Tensor>& z0) {
  check_floating(q, "q");
  check_dim(q, 4, "q (B, H, L, Dk)");
  check_dim(k, 4, "k (B, H, L, Dk)");
  check_dim(v, 4, "v (B, H, L, Dv)");
  TORCH_CHECK_TYPE(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
                   "kxkernels: q, k, v must have the same dtype, got ", q.scalar_type(), ", ",
                   k.scalar_type(), ", ", v.scalar_type());
  check_same_device(q, k, "q", "k");
  check_same_device(q, v, "q", "v");
  const int64_t B = q.size(0), H = q.size(1), L = q.size(2), Dk = q.size(3), Dv = v.size(3);
  KX_CHECK(B > 0 && H > 0 && L > 0 && Dk > 0 && Dv > 0, "every size must be positive, got q ", q.sizes(),
           ", v ", v.sizes());
  KX_CHECK(k.sizes() == q.sizes(), "k must have the shape of q ", q.sizes(), " (B, H, L, Dk), got ", k.sizes());
  KX_CHECK(v.size(0) == B && v.size(1) == H && v.size(2) == L, "v must have shape (", B, ", ", H, ", ", L,
           ", Dv) like q, got ", v.sizes());
  Prepared pr;
  LaArgs& a = pr.a;
  a.fm = parse_feature_map(feature_map);
  KX_CHECK(!(a.fm == 2 && normalize), "feature_map='identity' requires normalize=False (phi(q) . z can be "
           "zero or negative)");
  KX_CHECK(std::isfinite(eps) && eps >= 0, "eps must be a finite number >= 0, got ", eps);
  KX_CHECK(!rope || Dk % 2 == 0, "rope=True needs an even Dk (channel pairs), got Dk=", Dk);
  KX_CHECK(!rope || (std::isfinite(rope_base) && rope_base > 0), "rope_base must be > 0, got ", rope_base);
  a.B = B; a.H = H; a.L = L; a.Dk = Dk; a.Dv = Dv;
  a.chunk = chunk_size();
  a.q = q.data_ptr(); a.k = k.data_ptr(); a.v = v.data_ptr();
  strides4(q, a.qs); strides4(k, a.ks); strides4(v, a.vs);
  a.normalize = normalize; a.eps = eps; a.rope = rope; a.interleaved = interleaved;
  const auto acc = acc_type(q.scalar_type());
  if (mask.has_value()) {
    const at::Tensor& m = *mask;
    TORCH_CHECK_TYPE(m.scalar_type() == at::kBool, "kxkernels: key_padding_mask must be bool, got ", m.scalar_type());
    KX_CHECK(m.dim() == 2 && m.size(0) == B && m.size(1) == L, "key_padding_mask must have shape (", B, ", ", L,
             "), got ", m.sizes());
    check_same_device(q, m, "q", "key_padding_mask");
    at::Tensor mc = m.contiguous();
    a.mask = mc.data_ptr<bool>();
    pr.keep.push_back(mc);
  }
  KX_CHECK(S0.has_value() == z0.has_value(), "initial_state needs both S and z");
  if (S0.has_value()) {
    for (const at::Tensor* t : {&*S0, &*z0}) {
      TORCH_CHECK_TYPE(t->scalar_type() == acc, "kxkernels: initial_state must be ", acc, " for ",
                       q.scalar_type(), " inputs, got ", t->scalar_type());
      check_same_device(q, *t, "q", "initial_state");
    }
    KX_CHECK(S0->dim() == 4 && S0->size(0) == B && S0->size(1) == H && S0->size(2) == Dk && S0->size(3) == Dv,
             "initial_state S must have shape (", B, ", ", H, ", ", Dk, ", ", Dv, "), got ", S0->sizes());
    KX_CHECK(z0->dim() == 3 && z0->size(0) == B && z0->size(1) == H && z0->size(2) == Dk,
             "initial_state z must have shape (", B, ", ", H, ", ", Dk, "), got ", z0->sizes());
    at::Tensor s = S0->contiguous(), z = z0->contiguous();
    a.S0 = s.data_ptr(); a.z0 = z.data_ptr();
    pr.keep.push_back(s);
    pr.keep.push_back(z);
  }
  if (rope) {
    const int64_t* pos = nullptr;
    if (positions.has_value()) {
      const at::Tensor& pt = *positions;
      TORCH_CHECK_TYPE(pt.scalar_type() == at::kLong || pt.scalar_type() == at::kInt,
                       "kxkernels: positions must be int64 or int32, got ", pt.scalar_type());
      KX_CHECK((pt.dim() == 1 && pt.size(0) == L) || (pt.dim() == 2 && pt.size(0) == B && pt.size(1) == L),
               "positions must have shape (", L, ",) or (", B, ", ", L, "), got ", pt.sizes());
      check_same_device(q, pt, "q", "positions");
      at::Tensor pc = pt.to(at::kLong).contiguous();
      a.P = pt.dim() == 2 ? B : 1;
      pos = pc.data_ptr<int64_t>();
      pr.keep.push_back(pc);
    }
    std::vector<float> theta(size_t(Dk / 2));
    for (int64_t i = 0; i < Dk / 2; ++i)
      theta[size_t(i)] = static_cast<float>(std::pow(rope_base, -2.0 * double(i) / double(Dk)));
    at::Tensor cosF = at::empty({a.P, L, Dk}, q.options().dtype(acc));
    at::Tensor sinS = at::empty({a.P, L, Dk}, q.options().dtype(acc));
    if (acc == at::kDouble)
      KX_ISA_CALL(rope_table<double>, pos, pos_offset, a.P, L, Dk, theta.data(), interleaved,
                  cosF.data_ptr<double>(), sinS.data_ptr<double>());
    else
      KX_ISA_CALL(rope_table<float>, pos, pos_offset, a.P, L, Dk, theta.data(), interleaved,
                  cosF.data_ptr<float>(), sinS.data_ptr<float>());
    a.cosF = cosF.data_ptr(); a.sinS = sinS.data_ptr();
    pr.keep.push_back(cosF);
    pr.keep.push_back(sinS);
  }
  return pr;
}

// Backward inputs: grad_out / out like the output (B, H, L, Dv), den (B, H, L) when normalizing.
void prepare_grad(Prepared& pr, const at::Tensor& q, const at::Tensor& grad_out, const at::Tensor& out,
                  const at::Tensor& den) {
  LaArgs& a = pr.a;
  const std::vector<int64_t> oshape = {a.B, a.H, a.L, a.Dv};
  KX_CHECK(grad_out.sizes() == at::IntArrayRef(oshape), "grad_out must have shape ", at::IntArrayRef(oshape),
           ", got ", grad_out.sizes());
  at::Tensor g = grad_out.scalar_type() == q.scalar_type() ? grad_out : grad_out.to(q.scalar_type());
  a.gout = g.data_ptr();
  strides4(g, a.gs);
  pr.keep.push_back(g);
  if (a.normalize) {
    KX_CHECK(out.sizes() == at::IntArrayRef(oshape) && out.scalar_type() == q.scalar_type(),
             "out must be the forward output, shape ", at::IntArrayRef(oshape), " dtype ", q.scalar_type());
    KX_CHECK(den.dim() == 3 && den.size(0) == a.B && den.size(1) == a.H && den.size(2) == a.L &&
             den.scalar_type() == acc_type(q.scalar_type()),
             "den must be the forward denominator, shape (", a.B, ", ", a.H, ", ", a.L, ")");
    at::Tensor dc = den.contiguous();
    a.out = out.data_ptr();
    strides4(out, a.os);
    a.den = dc.data_ptr();
    pr.keep.push_back(out);
    pr.keep.push_back(dc);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> causal_linear_attention_fwd_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, c10::string_view feature_map,
    bool normalize, double eps, bool rope, double rope_base, bool interleaved,
    const c10::optional<at::Tensor>& positions, int64_t pos_offset, const c10::optional<at::Tensor>& mask,
    const c10::optional<at::Tensor>& S0, const c10::optional<at::Tensor>& z0) {
  Prepared pr = prepare(q, k, v, std::string(feature_map), normalize, eps, rope, rope_base, interleaved,
                        positions, pos_offset, mask, S0, z0);
  LaArgs& a = pr.a;
  const auto acc = q.options().dtype(acc_type(q.scalar_type()));
  at::Tensor out = new_resident_output({a.B, a.H, a.L, a.Dv}, q.options());
  at::Tensor den = new_output({a.B, a.H, normalize ? a.L : 0}, acc);
  at::Tensor S = new_output({a.B, a.H, a.Dk, a.Dv}, acc);
  at::Tensor z = new_output({a.B, a.H, a.Dk}, acc);
  a.outw = out.data_ptr(); a.denw = den.data_ptr(); a.Sw = S.data_ptr(); a.zw = z.data_ptr();
  KX_DISPATCH_FLOATING(q.scalar_type(), "causal_linear_attention_fwd", [&] {
    KX_ISA_CALL(causal_forward<scalar_t>, a);
  });
  return {out, den, S, z};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> causal_linear_attention_bwd_cpu(
    const at::Tensor& grad_out, const c10::optional<at::Tensor>& grad_S, const c10::optional<at::Tensor>& grad_z,
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out, const at::Tensor& den,
    c10::string_view feature_map, bool normalize, double eps, bool rope, double rope_base, bool interleaved,
    const c10::optional<at::Tensor>& positions, int64_t pos_offset, const c10::optional<at::Tensor>& mask,
    const c10::optional<at::Tensor>& S0, const c10::optional<at::Tensor>& z0) {
  Prepared pr = prepare(q, k, v, std::string(feature_map), normalize, eps, rope, rope_base, interleaved,
                        positions, pos_offset, mask, S0, z0);
  prepare_grad(pr, q, grad_out, out, den);
  LaArgs& a = pr.a;
  const auto acc_s = acc_type(q.scalar_type());
  const auto acc = q.options().dtype(acc_s);
  if (grad_S.has_value()) {
    KX_CHECK(grad_S->dim() == 4 && grad_S->size(0) == a.B && grad_S->size(1) == a.H && grad_S->size(2) == a.Dk &&
             grad_S->size(3) == a.Dv, "grad_S must have shape (B, H, Dk, Dv), got ", grad_S->sizes());
    at::Tensor g = grad_S->to(acc_s).contiguous();
    a.gS = g.data_ptr();
    pr.keep.push_back(g);
  }
  if (grad_z.has_value()) {
    KX_CHECK(grad_z->dim() == 3 && grad_z->size(0) == a.B && grad_z->size(1) == a.H && grad_z->size(2) == a.Dk,
             "grad_z must have shape (B, H, Dk), got ", grad_z->sizes());
    at::Tensor g = grad_z->to(acc_s).contiguous();
    a.gz = g.data_ptr();
    pr.keep.push_back(g);
  }
  at::Tensor gq = new_resident_output({a.B, a.H, a.L, a.Dk}, q.options());
  at::Tensor gk = new_resident_output({a.B, a.H, a.L, a.Dk}, q.options());
  at::Tensor gv = new_resident_output({a.B, a.H, a.L, a.Dv}, q.options());
  at::Tensor gS0 = new_output({a.B, a.H, a.Dk, a.Dv}, acc);
  at::Tensor gz0 = new_output({a.B, a.H, a.Dk}, acc);
  a.gqw = gq.data_ptr(); a.gkw = gk.data_ptr(); a.gvw = gv.data_ptr();
  a.gS0w = gS0.data_ptr(); a.gz0w = gz0.data_ptr();
  KX_DISPATCH_FLOATING(q.scalar_type(), "causal_linear_attention_bwd", [&] {
    KX_ISA_CALL(causal_backward<scalar_t>, a);
  });
  return {gq, gk, gv, gS0, gz0};
}

std::tuple<at::Tensor, at::Tensor> linear_attention_fwd_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, c10::string_view feature_map,
    bool normalize, double eps, bool rope, double rope_base, bool interleaved,
    const c10::optional<at::Tensor>& positions, int64_t pos_offset, const c10::optional<at::Tensor>& mask) {
  Prepared pr = prepare(q, k, v, std::string(feature_map), normalize, eps, rope, rope_base, interleaved,
                        positions, pos_offset, mask, c10::nullopt, c10::nullopt);
  LaArgs& a = pr.a;
  const auto acc = q.options().dtype(acc_type(q.scalar_type()));
  at::Tensor out = new_resident_output({a.B, a.H, a.L, a.Dv}, q.options());
  at::Tensor den = new_output({a.B, a.H, normalize ? a.L : 0}, acc);
  a.outw = out.data_ptr(); a.denw = den.data_ptr();
  KX_DISPATCH_FLOATING(q.scalar_type(), "linear_attention_fwd", [&] {
    KX_ISA_CALL(full_forward<scalar_t>, a);
  });
  return {out, den};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_attention_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& den, c10::string_view feature_map, bool normalize, double eps,
    bool rope, double rope_base, bool interleaved, const c10::optional<at::Tensor>& positions,
    int64_t pos_offset, const c10::optional<at::Tensor>& mask) {
  Prepared pr = prepare(q, k, v, std::string(feature_map), normalize, eps, rope, rope_base, interleaved,
                        positions, pos_offset, mask, c10::nullopt, c10::nullopt);
  prepare_grad(pr, q, grad_out, out, den);
  LaArgs& a = pr.a;
  at::Tensor gq = new_resident_output({a.B, a.H, a.L, a.Dk}, q.options());
  at::Tensor gk = new_resident_output({a.B, a.H, a.L, a.Dk}, q.options());
  at::Tensor gv = new_resident_output({a.B, a.H, a.L, a.Dv}, q.options());
  a.gqw = gq.data_ptr(); a.gkw = gk.data_ptr(); a.gvw = gv.data_ptr();
  KX_DISPATCH_FLOATING(q.scalar_type(), "linear_attention_bwd", [&] {
    KX_ISA_CALL(full_backward<scalar_t>, a);
  });
  return {gq, gk, gv};
}

}  // namespace
}  // namespace kx

TORCH_LIBRARY_IMPL(kxkernels, CPU, m) {
  m.impl("causal_linear_attention_fwd", &kx::causal_linear_attention_fwd_cpu);
  m.impl("causal_linear_attention_bwd", &kx::causal_linear_attention_bwd_cpu);
  m.impl("linear_attention_fwd", &kx::linear_attention_fwd_cpu);
  m.impl("linear_attention_bwd", &kx::linear_attention_bwd_cpu);
}
