// RoPE (Su et al., "RoFormer: Enhanced Transformer with Rotary Position Embedding", 2021) and
// fused RoPE attention on the CPU. Host code: argument checks, the cos/sin tables (angles in
// float32 from integer positions, then cos/sin evaluated in double and rounded once), and the
// ISA-dispatched kernels of rope_attention_kernels.h.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "common/blas.h"
#include "common/checks.h"
#include "common/math.h"
#include "common/output.h"
#include "common/isa.h"

namespace kx {

struct RopeArgs {
  const void* x;
  void* y;
  const void* table;  // (nb, L, 2 * rd) in the accumulation type
  int64_t tab_bs;     // table rows a batch step (0 when shared)
  int64_t B, H, L, D, rd;
  int64_t sxb, sxh, sxl, sxd;
  bool interleaved, inverse;
};

struct AttnArgs {
  int64_t B, Hq, Hk, Lq, Lk, D, Dv;
  const void *q, *k, *v;
  int64_t sqb, sqh, sql, sqd, skb, skh, skl, skd, svb, svh, svl, svd;
  const bool* mask;  // (B, Lk) or nullptr
  int64_t smb, sml;
  bool rope, interleaved, causal;
  int64_t rd;
  const void *qtab, *ktab;  // rotation tables (rows, 2 * rd)
  int64_t qtab_bs, qtab_row0, ktab_bs, ktab_row0;
  double scale;
  int64_t q_block, k_block;
  void* out;  // forward: (B, Hq, Lq, Dv) contiguous
  void* lse;  // forward: (B, Hq, Lq) contiguous
  // backward
  const void *gout, *out_in, *lse_in;
  int64_t sgb, sgh, sgl, sgd, sob, soh, sol, sod;
  void *dq, *dk, *dv;  // contiguous like q, k, v
};

}  // namespace kx

#define KX_ISA_KERNELS "cpu/rope_attention_kernels.h"
#include "common/isa_kernels.h"

namespace kx {

namespace {

at::ScalarType acc_type(at::ScalarType s) { return s == at::kDouble ? at::kDouble : at::kFloat; }

// Rotation table for positions (nb, L) (int64, stride-0 batch allowed) or, when undefined,
// offset + arange(L). Returns (nb, L, 2 * rd): per position C (cos per channel) then S (signed sin).
// *bstride gets the table's batch step in rows (0 when one row set serves every batch).
at::Tensor rope_table(const c10::optional<at::Tensor>& positions, int64_t L, int64_t offset, double base,
                      int64_t rd, bool interleaved, at::ScalarType acc, int64_t* bstride) {
  const bool given = positions.has_value() && positions->defined();
  at::Tensor pos;
  int64_t nb = 1;
  if (given) {
    pos = positions->stride(0) == 0 ? positions->select(0, 0).unsqueeze(0) : *positions;
    pos = pos.contiguous();
    nb = pos.size(0);
  }
  *bstride = nb == 1 ? 0 : L;
  at::Tensor tab = at::empty({nb, L, 2 * rd}, at::TensorOptions().dtype(acc));
  const int64_t h = rd / 2;
  std::vector<float> theta(h);
  for (int64_t i = 0; i < h; ++i) theta[i] = static_cast<float>(std::pow(base, -2.0 * double(i) / double(rd)));
  const int64_t* pp = given ? pos.data_ptr<int64_t>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES(acc, "rope_table", [&] {
    scalar_t* tp = tab.data_ptr<scalar_t>();
    at::parallel_for(0, nb * L, 256, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t p = given ? pp[r] : offset + r;
        const float pf = static_cast<float>(p);
        scalar_t* C = tp + r * 2 * rd;
        scalar_t* S = C + rd;
        for (int64_t i = 0; i < h; ++i) {
          const float ang = pf * theta[i];  // the angle is a float32 product, as API.md says
          const double c = std::cos(double(ang)), s = std::sin(double(ang));
          const int64_t j0 = interleaved ? 2 * i : i, j1 = interleaved ? 2 * i + 1 : i + h;
          C[j0] = C[j1] = static_cast<scalar_t>(c);
          S[j0] = static_cast<scalar_t>(-s);
          S[j1] = static_cast<scalar_t>(s);
        }
      }
    });
  });
  return tab;
}

void check_positions(const c10::optional<at::Tensor>& positions, int64_t B, int64_t L, const char* name) {
  if (!positions.has_value() || !positions->defined()) return;
  const at::Tensor& p = *positions;
  TORCH_CHECK_TYPE(p.scalar_type() == at::kLong, "kxkernels: ", name, " must be int64, got ", p.scalar_type());
  KX_CHECK(p.dim() == 2 && p.size(0) == B && p.size(1) == L, name, " must have shape (", B, ", ", L,
           ") (batch, seq_len), got ", p.sizes());
  KX_CHECK(p.device().is_cpu(), name, " must be on the CPU like the inputs, got ", p.device());
}

void check_rope_args(int64_t D, double base, int64_t rd) {
  KX_CHECK(rd >= 2 && rd <= D && rd % 2 == 0, "rotary_dim must be even and in [2, head_dim=", D, "], got ", rd,
           D % 2 != 0 && rd == D ? " (head_dim is odd: RoPE rotates channel pairs)" : "");
  KX_CHECK(std::isfinite(base) && base > 0, "rope base must be finite and > 0, got ", base);
}

at::Tensor apply_rope_fwd_cpu(const at::Tensor& x, const c10::optional<at::Tensor>& positions, int64_t offset,
                              double base, bool interleaved, int64_t rotary_dim, bool inverse) {
  check_floating(x, "x");
  check_dim(x, 4, "x");
  const int64_t B = x.size(0), H = x.size(1), L = x.size(2), D = x.size(3);
  check_rope_args(D, base, rotary_dim);
  check_positions(positions, B, L, "positions");
  at::Tensor y = new_output({B, H, L, D}, x.options());
  if (y.numel() == 0) return y;
  RopeArgs a{};
  at::Tensor tab = rope_table(positions, L, offset, base, rotary_dim, interleaved, acc_type(x.scalar_type()), &a.tab_bs);
  a.x = x.data_ptr();
  a.y = y.data_ptr();
  a.table = tab.data_ptr();
  a.B = B, a.H = H, a.L = L, a.D = D, a.rd = rotary_dim;
  a.sxb = x.stride(0), a.sxh = x.stride(1), a.sxl = x.stride(2), a.sxd = x.stride(3);
  a.interleaved = interleaved, a.inverse = inverse;
  KX_DISPATCH_FLOATING(x.scalar_type(), "apply_rope_fwd", [&] {
    KX_ISA_CALL(rope_apply<scalar_t>, a);
  });
  return y;
}

// Shared argument checks of the attention forward and backward; fills sizes, strides, mask and
// the rotation tables (kept alive in *qtab, *ktab).
void setup_attention(AttnArgs& a, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const c10::optional<at::Tensor>& mask, const c10::optional<at::Tensor>& q_positions,
                     const c10::optional<at::Tensor>& k_positions, bool causal, double scale, bool rope,
                     double rope_base, bool interleaved, int64_t rotary_dim, at::Tensor* qtab, at::Tensor* ktab) {
  check_floating(q, "q");
  check_dim(q, 4, "q");
  check_dim(k, 4, "k");
  check_dim(v, 4, "v");
  TORCH_CHECK_TYPE(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
                   "kxkernels: q, k, v must have one dtype, got ", q.scalar_type(), ", ", k.scalar_type(), ", ",
                   v.scalar_type());
  check_same_device(q, k, "q", "k");
  check_same_device(q, v, "q", "v");
  const int64_t B = q.size(0), Hq = q.size(1), Lq = q.size(2), D = q.size(3);
  const int64_t Hk = k.size(1), Lk = k.size(2), Dv = v.size(3);
  KX_CHECK(k.size(0) == B && v.size(0) == B, "q, k, v must have one batch size, got ", B, ", ", k.size(0), ", ",
           v.size(0));
  KX_CHECK(k.size(3) == D, "k head_dim must equal q head_dim ", D, ", got ", k.size(3));
  KX_CHECK(v.size(1) == Hk && v.size(2) == Lk, "v must have k's heads and length (", Hk, ", ", Lk, "), got (",
           v.size(1), ", ", v.size(2), ")");
  KX_CHECK(D > 0 && Dv > 0, "head dims must be > 0, got q/k ", D, " and v ", Dv);
  KX_CHECK(Hk > 0 && Hq % Hk == 0, "q heads (", Hq, ") must be a multiple of k heads (", Hk, ")");
  KX_CHECK(std::isfinite(scale), "scale must be finite, got ", scale);
  if (rope) check_rope_args(D, rope_base, rotary_dim);
  if (mask.has_value() && mask->defined()) {
    TORCH_CHECK_TYPE(mask->scalar_type() == at::kBool, "kxkernels: key_padding_mask must be bool, got ",
                     mask->scalar_type());
    KX_CHECK(mask->dim() == 2 && mask->size(0) == B && mask->size(1) == Lk, "key_padding_mask must have shape (",
             B, ", ", Lk, "), got ", mask->sizes());
    check_same_device(q, *mask, "q", "key_padding_mask");
    a.mask = mask->data_ptr<bool>();
    a.smb = mask->stride(0), a.sml = mask->stride(1);
  } else {
    a.mask = nullptr;
  }
  check_positions(q_positions, B, Lq, "q_positions");
  check_positions(k_positions, B, Lk, "k_positions");
  a.B = B, a.Hq = Hq, a.Hk = Hk, a.Lq = Lq, a.Lk = Lk, a.D = D, a.Dv = Dv;
  a.q = q.data_ptr(), a.k = k.data_ptr(), a.v = v.data_ptr();
  a.sqb = q.stride(0), a.sqh = q.stride(1), a.sql = q.stride(2), a.sqd = q.stride(3);
  a.skb = k.stride(0), a.skh = k.stride(1), a.skl = k.stride(2), a.skd = k.stride(3);
  a.svb = v.stride(0), a.svh = v.stride(1), a.svl = v.stride(2), a.svd = v.stride(3);
  a.rope = rope, a.interleaved = interleaved, a.causal = causal, a.rd = rope ? rotary_dim : 0;
  a.scale = scale;
  // Query / key block sizes as ATen's CPU flash attention picks them (rows of S a task owns,
  // keys a gemm covers).
  a.q_block = Lq >= 768 ? 256 : (Lq >= 192 ? 64 : 32);
  a.k_block = 512;
  a.qtab = a.ktab = nullptr;
  a.qtab_bs = a.ktab_bs = a.qtab_row0 = a.ktab_row0 = 0;
  if (!rope || Lq == 0 || Lk == 0) return;
  const at::ScalarType acc = acc_type(q.scalar_type());
  const bool qdef = !(q_positions.has_value() && q_positions->defined());
  const bool kdef = !(k_positions.has_value() && k_positions->defined());
  if (qdef && kdef) {
    // Defaults: keys arange(Lk), queries Lk - Lq + arange(Lq): one table over both ranges.
    const int64_t lo = std::min<int64_t>(0, Lk - Lq);
    *ktab = rope_table(c10::nullopt, Lk - lo, lo, rope_base, rotary_dim, interleaved, acc, &a.ktab_bs);
    *qtab = *ktab;
    a.ktab_row0 = -lo;
    a.qtab_row0 = Lk - Lq - lo;
    a.qtab_bs = a.ktab_bs;
  } else {
    *qtab = rope_table(q_positions, Lq, Lk - Lq, rope_base, rotary_dim, interleaved, acc, &a.qtab_bs);
    *ktab = rope_table(k_positions, Lk, 0, rope_base, rotary_dim, interleaved, acc, &a.ktab_bs);
  }
  a.qtab = qtab->data_ptr();
  a.ktab = ktab->data_ptr();
}

std::tuple<at::Tensor, at::Tensor> rope_attention_fwd_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const c10::optional<at::Tensor>& mask,
    const c10::optional<at::Tensor>& q_positions, const c10::optional<at::Tensor>& k_positions, bool causal,
    double scale, bool rope, double rope_base, bool interleaved, int64_t rotary_dim) {
  AttnArgs a{};
  at::Tensor qtab, ktab;
  setup_attention(a, q, k, v, mask, q_positions, k_positions, causal, scale, rope, rope_base, interleaved,
                  rotary_dim, &qtab, &ktab);
  at::Tensor out = new_output({a.B, a.Hq, a.Lq, a.Dv}, q.options());
  at::Tensor lse = new_output({a.B, a.Hq, a.Lq}, q.options().dtype(acc_type(q.scalar_type())));
  if (lse.numel() == 0) return {out, lse};
  if (a.Lk == 0) {  // no keys: every row is fully masked
    out.zero_();
    lse.fill_(std::numeric_limits<double>::infinity());
    return {out, lse};
  }
  a.out = out.data_ptr();
  a.lse = lse.data_ptr();
  KX_DISPATCH_FLOATING(q.scalar_type(), "rope_attention_fwd", [&] {
    KX_ISA_CALL(attn_forward<scalar_t>, a);
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> rope_attention_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const c10::optional<at::Tensor>& mask,
    const c10::optional<at::Tensor>& q_positions, const c10::optional<at::Tensor>& k_positions, bool causal,
    double scale, bool rope, double rope_base, bool interleaved, int64_t rotary_dim) {
  AttnArgs a{};
  at::Tensor qtab, ktab;
  setup_attention(a, q, k, v, mask, q_positions, k_positions, causal, scale, rope, rope_base, interleaved,
                  rotary_dim, &qtab, &ktab);
  const std::vector<int64_t> oshape{a.B, a.Hq, a.Lq, a.Dv};
  KX_CHECK(grad_out.sizes() == at::IntArrayRef(oshape), "grad_out must have shape ", at::IntArrayRef(oshape),
           ", got ", grad_out.sizes());
  KX_CHECK(out.sizes() == at::IntArrayRef(oshape), "out must have shape ", at::IntArrayRef(oshape), ", got ",
           out.sizes());
  TORCH_CHECK_TYPE(grad_out.scalar_type() == q.scalar_type() && out.scalar_type() == q.scalar_type(),
                   "kxkernels: grad_out and out must have q's dtype ", q.scalar_type());
  const at::ScalarType acc = acc_type(q.scalar_type());
  KX_CHECK(lse.dim() == 3 && lse.size(0) == a.B && lse.size(1) == a.Hq && lse.size(2) == a.Lq,
           "lse must have shape (", a.B, ", ", a.Hq, ", ", a.Lq, "), got ", lse.sizes());
  TORCH_CHECK_TYPE(lse.scalar_type() == acc, "kxkernels: lse must be ", acc, ", got ", lse.scalar_type());
  at::Tensor dq = new_output(q.sizes(), q.options());
  at::Tensor dk = new_output(k.sizes(), k.options());
  at::Tensor dv = new_output(v.sizes(), v.options());
  if (a.Lq == 0 || a.Lk == 0 || a.B == 0 || a.Hq == 0) {
    dq.zero_(), dk.zero_(), dv.zero_();
    return {dq, dk, dv};
  }
  const at::Tensor lse_c = lse.contiguous();
  a.gout = grad_out.data_ptr(), a.out_in = out.data_ptr(), a.lse_in = lse_c.data_ptr();
  a.sgb = grad_out.stride(0), a.sgh = grad_out.stride(1), a.sgl = grad_out.stride(2), a.sgd = grad_out.stride(3);
  a.sob = out.stride(0), a.soh = out.stride(1), a.sol = out.stride(2), a.sod = out.stride(3);
  a.dq = dq.data_ptr(), a.dk = dk.data_ptr(), a.dv = dv.data_ptr();
  KX_DISPATCH_FLOATING(q.scalar_type(), "rope_attention_bwd", [&] {
    KX_ISA_CALL(attn_backward<scalar_t>, a);
  });
  return {dq, dk, dv};
}

}  // namespace
}  // namespace kx

TORCH_LIBRARY_IMPL(kxkernels, CPU, m) {
  m.impl("apply_rope_fwd", &kx::apply_rope_fwd_cpu);
  m.impl("rope_attention_fwd", &kx::rope_attention_fwd_cpu);
  m.impl("rope_attention_bwd", &kx::rope_attention_bwd_cpu);
}
