// Every kxkernels op schema, in one TORCH_LIBRARY block, and the Python module init.
// Kernels register by dispatch key in csrc/cpu/<op>.cpp and csrc/cuda/<op>.cu; the fake (meta)
// kernels, autograd formulas and Triton CUDA kernels register from kxkernels/ops/<op>/.
#include <Python.h>
#include <torch/extension.h>
#include <torch/library.h>

#include "common/isa.h"
#include "common/output.h"

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
}
