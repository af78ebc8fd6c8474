// Every kxkernels op schema, in one TORCH_LIBRARY block, and the Python module init.
// Kernels register by dispatch key in csrc/cpu/<op>.cpp and csrc/cuda/<op>.cu; the fake (meta)
// kernels, autograd formulas and Triton CUDA kernels register from kxkernels/ops/<op>/.
#include <Python.h>
#include <torch/extension.h>
#include <torch/library.h>

#include "common/isa.h"
#include "common/output.h"
#include "common/sinkhorn_schedule.h"

#ifndef KX_TORCH_VERSION
#define KX_TORCH_VERSION "unknown"
#endif
#ifndef KX_WITH_CUDA
#define KX_WITH_CUDA 0
#endif
#ifndef KX_CUDA_ARCHS
#define KX_CUDA_ARCHS ""
#endif
#ifndef KX_CUDA_VERSION
#define KX_CUDA_VERSION ""
#endif

TORCH_LIBRARY(kxkernels, m) {
  // ---- CPU ISA dispatch self-test (common/simd.h at the running level; tests only) ----------
  // x float32 (n,) -> (exp(x), x as bf16, x as fp16, bf16 back to float32, fp16 back to float32).
  m.def("_isa_selftest(Tensor x) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // ---- sparse softmax top-k (SPACES) --------------------------------------------------------
  // logits (N, V), softmax over the k largest entries of each row, zero elsewhere.
  // Returns (probs (N, V) in logits dtype, topk_index (N, k) int64, sorted by value desc then index asc).
  m.def("sparse_softmax_fwd(Tensor logits, int k) -> (Tensor, Tensor)");
  m.def("sparse_softmax_bwd(Tensor grad_probs, Tensor probs, Tensor topk_index) -> Tensor");
  // Per-row loss logsumexp(top_k(x) [u {target}]) - x[target] (0 for ignored rows), float32.
  // Returns (loss (N,) float32, lse (N,) float32, topk_index (N, k) int64).
  m.def("sparse_softmax_cross_entropy_fwd(Tensor logits, Tensor target, int k, int ignore_index, "
        "bool include_target) -> (Tensor, Tensor, Tensor)");
  // Gradient of sum(grad_loss * loss) w.r.t. logits, (N, V) in logits dtype: k (+1) non-zeros a row.
  m.def("sparse_softmax_cross_entropy_bwd(Tensor grad_loss, Tensor logits, Tensor target, Tensor lse, "
        "Tensor topk_index, int ignore_index, bool include_target) -> Tensor");
  // ---- GlobalPointer span scores and the ZLPR loss -----------------------------------------
  // q, k (B, H, L, D), mask bool (B, L) (True = token), start_bias / end_bias (B, H, L). Logits
  // (B, H, L, L) in q dtype: scale * R_i q_i . R_j k_j + start_bias_i + end_bias_j, -inf at padded
  // rows / columns and (tril) j < i. RoPE angles in float32 from arange(L).
  m.def("global_pointer_fwd(Tensor q, Tensor k, Tensor? mask, Tensor? start_bias, Tensor? end_bias, "
        "bool rope, float rope_base, bool interleaved, bool tril, float scale) -> Tensor");
  // Gradient of <grad, logits>: (dq, dk in q dtype, d_start_bias, d_end_bias (B, H, L) float32/64);
  // masked cells contribute nothing.
  m.def("global_pointer_bwd(Tensor grad, Tensor q, Tensor k, Tensor? mask, bool rope, float rope_base, "
        "bool interleaved, bool tril, float scale) -> (Tensor, Tensor, Tensor, Tensor)");
  // ZLPR per row of logits (N, C), labels (N, C) bool or logits dtype in [0, 1]:
  // (loss, lse_neg = log(1 + sum (1-y) e^s), lse_pos = log(1 + sum y e^-s)), each (N,) float32/64.
  m.def("multilabel_categorical_crossentropy_fwd(Tensor logits, Tensor labels) -> (Tensor, Tensor, Tensor)");
  m.def("multilabel_categorical_crossentropy_bwd(Tensor grad_loss, Tensor logits, Tensor labels, "
        "Tensor lse_neg, Tensor lse_pos) -> Tensor");
  // Sparse ZLPR: positives pos_index (N, P) int in [-1, C) (-1 padding; 0 too when mask_zero).
  m.def("sparse_multilabel_categorical_crossentropy_fwd(Tensor logits, Tensor pos_index, bool mask_zero) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("sparse_multilabel_categorical_crossentropy_bwd(Tensor grad_loss, Tensor logits, Tensor pos_index, "
        "bool mask_zero, Tensor lse_neg, Tensor lse_pos) -> Tensor");
  // Fused GlobalPointer + ZLPR, one row per (batch, head) over the L*L cells; spans (B, H, P, 2)
  // int (start, end), a pair with -1 is padding. Returns (loss, lse_neg, lse_pos), each (B, H).
  m.def("global_pointer_loss_fwd(Tensor q, Tensor k, Tensor spans, Tensor? mask, Tensor? start_bias, "
        "Tensor? end_bias, bool rope, float rope_base, bool interleaved, bool tril, float scale) "
        "-> (Tensor, Tensor, Tensor)");
  // Gradient of sum(grad_loss * loss): (dq, dk, d_start_bias, d_end_bias), tiles recomputed.
  m.def("global_pointer_loss_bwd(Tensor grad_loss, Tensor q, Tensor k, Tensor spans, Tensor? mask, "
        "Tensor? start_bias, Tensor? end_bias, Tensor lse_neg, Tensor lse_pos, bool rope, float rope_base, "
        "bool interleaved, bool tril, float scale) -> (Tensor, Tensor, Tensor, Tensor)");
  // ---- batched Sinkhorn / WRD ---------------------------------------------------------------
  // cost (B, M, N), a (B, M), b (B, N): zero mass = padding. Returns value <T, C> (B,),
  // dual <f, a> + <g, b> (B,), potentials f (B, M), g (B, N) (float32, float64 for float64 input),
  // n_iter (B,) int64, err (B,) L1 row-marginal error, plan (B, M, N) in cost dtype or (0,),
  // eps_reached (B,) float64: the eps the results belong to (> eps when max_iter stopped the schedule).
  // relative_eps: each problem's eps is eps * (max C - min C) over its real entries (1 where 0).
  m.def("sinkhorn_fwd(Tensor cost, Tensor a, Tensor b, float eps, int max_iter, float tol, "
        "bool return_plan, bool newton, bool relative_eps=False) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Envelope gradient of grad * value: (grad_cost, grad_a, grad_b), plan recomputed from f, g at
  // each problem's eps (B,) (the forward's eps_reached).
  m.def("sinkhorn_bwd(Tensor grad, Tensor cost, Tensor a, Tensor b, Tensor f, Tensor g, Tensor eps) "
        "-> (Tensor, Tensor, Tensor)");
  // Word Rotator's Distance: x (B, M, D), y (B, N, D), masks bool (True = token); masses
  // ||x_i|| / sum ||x||, cost 1 - cos computed in the kernel. Returns (value, dual, f, g, n_iter, err,
  // eps_reached).
  m.def("wrd_fwd(Tensor x, Tensor y, Tensor? x_mask, Tensor? y_mask, float eps, int max_iter, "
        "float tol, bool newton, bool relative_eps=False) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("wrd_bwd(Tensor grad, Tensor x, Tensor y, Tensor? x_mask, Tensor? y_mask, Tensor f, "
        "Tensor g, Tensor eps) -> (Tensor, Tensor)");
  // ---- RoPE and fused RoPE attention (RoFormer) ----------------------------------------------
  // x (B, H, L, D); positions None (= offset + arange(L)) or int64 (B, L) (a stride-0 expanded
  // (L,) view is fine). Rotates the first rotary_dim channels by positions * base^(-2i/rotary_dim)
  // (angles float32), pairs (2i, 2i+1) when interleaved else (i, i + rotary_dim/2); inverse
  // rotates by the negative angle (the backward). Returns x's shape and dtype.
  m.def("apply_rope_fwd(Tensor x, Tensor? positions, int offset, float base, bool interleaved, "
        "int rotary_dim, bool inverse) -> Tensor");
  // q (B, Hq, Lq, D), k (B, Hk, Lk, D), v (B, Hk, Lk, Dv), Hq % Hk == 0; key_padding_mask bool
  // (B, Lk) True = keep; positions int64 (B, L) or None (k: arange(Lk), q: Lk - Lq + arange(Lq)).
  // softmax(scale * R(q) R(k)^T + masks) v, causal bottom-right aligned. Returns out (B, Hq, Lq, Dv)
  // in q's dtype and lse (B, Hq, Lq) float32 (float64 for float64 input): log-sum-exp of the
  // scaled masked scores, +inf for a fully masked row (whose out is 0).
  m.def("rope_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? key_padding_mask, Tensor? q_positions, "
        "Tensor? k_positions, bool causal, float scale, bool rope, float rope_base, bool interleaved, "
        "int rotary_dim) -> (Tensor, Tensor)");
  // Returns (grad_q, grad_k, grad_v) shaped and typed like q, k, v; rotated tiles recomputed.
  m.def("rope_attention_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
        "Tensor? key_padding_mask, Tensor? q_positions, Tensor? k_positions, bool causal, float scale, "
        "bool rope, float rope_base, bool interleaved, int rotary_dim) -> (Tensor, Tensor, Tensor)");
  // ---- linear attention (cumulative-sum form) -----------------------------------------------
  // q, k (B, H, L, Dk), v (B, H, L, Dv); feature_map 'elu+1' | 'relu' | 'identity'; RoPE on the
  // numerator at positions (L,) / (B, L) int, or pos_offset + arange(L) when None; key_padding_mask
  // bool (B, L). Causal: returns (out (B, H, L, Dv) in q's dtype, den (B, H, L) float32 (0 wide
  // without normalize), final state S (B, H, Dk, Dv), z (B, H, Dk) float32; float64 for float64).
  m.def("causal_linear_attention_fwd(Tensor q, Tensor k, Tensor v, str feature_map, bool normalize, "
        "float eps, bool rope, float rope_base, bool interleaved, Tensor? positions, int pos_offset, "
        "Tensor? key_padding_mask, Tensor? initial_S, Tensor? initial_z) -> (Tensor, Tensor, Tensor, Tensor)");
  // Returns (grad_q, grad_k, grad_v, grad_initial_S, grad_initial_z).
  m.def("causal_linear_attention_bwd(Tensor grad_out, Tensor? grad_S, Tensor? grad_z, Tensor q, Tensor k, "
        "Tensor v, Tensor out, Tensor den, str feature_map, bool normalize, float eps, bool rope, "
        "float rope_base, bool interleaved, Tensor? positions, int pos_offset, Tensor? key_padding_mask, "
        "Tensor? initial_S, Tensor? initial_z) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Non-causal: every query sees every (unpadded) key. Returns (out, den).
  m.def("linear_attention_fwd(Tensor q, Tensor k, Tensor v, str feature_map, bool normalize, float eps, "
        "bool rope, float rope_base, bool interleaved, Tensor? positions, int pos_offset, "
        "Tensor? key_padding_mask) -> (Tensor, Tensor)");
  m.def("linear_attention_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor den, "
        "str feature_map, bool normalize, float eps, bool rope, float rope_base, bool interleaved, "
        "Tensor? positions, int pos_offset, Tensor? key_padding_mask) -> (Tensor, Tensor, Tensor)");
}

static pybind11::dict build_info() {
  pybind11::dict d;
  d["torch_version"] = KX_TORCH_VERSION;
  d["cuda"] = bool(KX_WITH_CUDA);
  d["cuda_version"] = KX_CUDA_VERSION;
  d["cuda_archs"] = KX_CUDA_ARCHS;
#if defined(__clang__)
  d["compiler"] = "clang " __clang_version__;
#elif defined(__GNUC__)
  d["compiler"] = "gcc " __VERSION__;
#else
  d["compiler"] = "unknown";
#endif
  d["openmp"] = bool(AT_PARALLEL_OPENMP);
  d["cpu_isa"] = kx::isa_name(kx::cpu_isa());                      // the level the kernels run
  d["cpu_isa_supported"] = kx::isa_name(kx::cpu_isa_supported());  // the best this CPU runs
  d["cpu_isa_levels"] = pybind11::make_tuple("baseline", "avx2", "avx512");  // compiled in
  return d;
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "kxkernels compiled kernels: ops live in torch.ops.kxkernels";
  m.def("build_info", &build_info, "How this extension was built");
  m.def("cached_bytes", &kx::zeroed_pool_held_bytes, "Bytes the output pool keeps for reuse");
  m.def("cpu_isa", [] { return std::string(kx::isa_name(kx::cpu_isa())); },
        "The ISA level the CPU kernels run now (baseline, avx2, avx512)");
  m.def("set_cpu_isa", [](const std::string& name) {
        kx::Isa want;
        if (!kx::parse_isa(name.c_str(), &want))
          throw pybind11::value_error("kxkernels: isa must be 'baseline', 'avx2' or 'avx512', got '" + name + "'");
        return std::string(kx::isa_name(kx::set_cpu_isa(want)));
      }, "Cap the CPU kernels' ISA level (a level above the CPU's runs the CPU's); returns the level in force");
  m.def("empty_cache", &kx::zeroed_pool_release, "Unmap every mapping the output pool keeps");
  m.def("sinkhorn_schedule", [] {
        namespace S = kx::sinkhorn_schedule;
        pybind11::dict d;
        d["eps_ratio"] = S::kEpsRatio;
        d["stage_sweeps"] = S::kStageSweeps;
        d["stage_tol"] = S::kStageTol;
        d["omega"] = S::kOmega;
        return d;
      }, "The Sinkhorn eps schedule the CPU and CUDA kernels run (common/sinkhorn_schedule.h)");
  m.def("pool_stats", [] {
        const kx::ZeroedPoolStats st = kx::zeroed_pool_stats();
        pybind11::dict d;
        d["cached_bytes"] = st.cached_bytes;
        d["cap_bytes"] = st.cap_bytes;
        d["live_bytes"] = st.live_bytes;
        d["cached_mappings"] = st.cached_mappings;
        d["hits"] = st.hits;
        d["misses"] = st.misses;
        d["evictions"] = st.evictions;
        return d;
      }, "Output pool: bytes kept, cap, bytes handed out and alive, hits, misses, evictions");
  m.def("set_pool_cap", &kx::zeroed_pool_set_cap, "Set the output pool's cap in bytes (evicts down to it)");
  m.def("reset_pool_counters", &kx::zeroed_pool_reset_counters, "Zero the pool's hit/miss/eviction counters");
}
