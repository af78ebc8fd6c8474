// Sparse softmax top-k (SPACES) on the CPU: one streaming pass per row keeps the running top-k
// (sorted by value desc, index asc, so ties go to the lower index), then a k-term logsumexp.
// Rows run in parallel; the scan tests blocks of 64 logits against the current k-th value with
// vector compares and only touches the scalar insert path when a block holds a candidate.
#include <ATen/Parallel.h>
#include <cstring>
#if defined(__SSE2__)
#include <immintrin.h>
#endif

#include "common/checks.h"
#include "common/math.h"
#include "common/output.h"

namespace kx {
namespace {

constexpr int64_t kBlock = 64;  // logits tested per vector step of the scan (bits of a uint64_t mask)
constexpr int64_t kGrainElems = 1 << 16;  // elements per parallel task, to amortize scheduling

// Insert (x, j) into the sorted keeper; j exceeds every kept index, so equal values stay ahead.
template <typename A>
inline void topk_insert(A* tv, int64_t* ti, int64_t& n, int64_t k, A x, int64_t j) {
  int64_t p = n < k ? n : k - 1;
  while (p > 0 && tv[p - 1] < x) {
    tv[p] = tv[p - 1];
    ti[p] = ti[p - 1];
    --p;
  }
  tv[p] = x;
  ti[p] = j;
  if (n < k) ++n;
}

// Bit s set when b[s] is not <= thr (a candidate, or a NaN). A quick OR over the block first:
// most blocks hold no candidate once the k-th value has risen. SSE is the x86-64 baseline, and
// 4 lanes a compare keep the scan faster than memory bandwidth on one core.
inline uint64_t block_candidates(const float* b, float thr) {
#if defined(__SSE2__)
  const __m128 t = _mm_set1_ps(thr);
  __m128 any = _mm_setzero_ps();
  for (int64_t s = 0; s < kBlock; s += 16) {
    any = _mm_or_ps(any, _mm_cmpnle_ps(_mm_loadu_ps(b + s), t));
    any = _mm_or_ps(any, _mm_cmpnle_ps(_mm_loadu_ps(b + s + 4), t));
    any = _mm_or_ps(any, _mm_cmpnle_ps(_mm_loadu_ps(b + s + 8), t));
    any = _mm_or_ps(any, _mm_cmpnle_ps(_mm_loadu_ps(b + s + 12), t));
  }
  if (_mm_movemask_ps(any) == 0) return 0;
  uint64_t m = 0;
  for (int64_t s = 0; s < kBlock; s += 4)
    m |= uint64_t(_mm_movemask_ps(_mm_cmpnle_ps(_mm_loadu_ps(b + s), t))) << s;
  return m;
#else
  uint64_t m = 0;
  for (int64_t s = 0; s < kBlock; ++s) m |= uint64_t(!(b[s] <= thr)) << s;
  return m;
#endif
}

template <typename A>
inline uint64_t block_candidates(const A* b, A thr) {
  uint64_t m = 0;
  for (int64_t s = 0; s < kBlock; ++s) m |= uint64_t(!(b[s] <= thr)) << s;
  return m;
}

template <typename T, typename A>
inline const A* load_block(const T* x, A* buf) {
  for (int64_t s = 0; s < kBlock; ++s) buf[s] = static_cast<A>(x[s]);
  return buf;
}
inline const float* load_block(const float* x, float*) { return x; }

// Top-k of one row. Returns false when the row holds a NaN.
template <typename T, typename A = acc_t<T>>
bool row_topk(const T* x, int64_t V, int64_t k, A* tv, int64_t* ti) {
  int64_t n = 0;
  bool nan = false;
  int64_t j = 0;
  for (; j < k; ++j) {
    A v = static_cast<A>(x[j]);
    nan |= v != v;
    topk_insert(tv, ti, n, k, v, j);
  }
  A buf[kBlock];
  for (; j + kBlock <= V; j += kBlock) {
    const A* b = load_block(x + j, buf);
    for (uint64_t m = block_candidates(b, tv[k - 1]); m != 0; m &= m - 1) {
      const int64_t s = __builtin_ctzll(m);
      const A v = b[s];
      if (v > tv[k - 1]) topk_insert(tv, ti, n, k, v, j + s);  // the k-th value may have risen
      nan |= v != v;
    }
  }
  for (; j < V; ++j) {
    A v = static_cast<A>(x[j]);
    if (v > tv[k - 1]) topk_insert(tv, ti, n, k, v, j);
    nan |= v != v;
  }
  return !nan;
}

// log sum exp of the kept values (tv[0] is the maximum), optionally with one extra term.
template <typename A>
inline A topk_lse(const A* tv, int64_t k, bool extra, A xe) {
  A m = tv[0];
  if (extra && xe > m) m = xe;
  if (m == neg_inf<A>()) return m;
  A s = 0;
  for (int64_t i = 0; i < k; ++i) s += std::exp(tv[i] - m);
  if (extra) s += std::exp(xe - m);
  return m + std::log(s);
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
    using A = acc_t<scalar_t>;
    const scalar_t* xp = logits.data_ptr<scalar_t>();
    scalar_t* pp = probs.data_ptr<scalar_t>();
    at::parallel_for(0, N, grain_rows(V), [&](int64_t r0, int64_t r1) {
      std::vector<A> tv(k);
      for (int64_t r = r0; r < r1; ++r) {
        int64_t* ti = ip + r * k;
        bool finite = row_topk<scalar_t>(xp + r * ld, V, k, tv.data(), ti);
        scalar_t* out = pp + r * V;
        A lse = finite ? topk_lse(tv.data(), k, false, A(0)) : std::numeric_limits<A>::quiet_NaN();
        if (lse == neg_inf<A>()) continue;  // fully masked row: zeros
        for (int64_t i = 0; i < k; ++i) out[ti[i]] = static_cast<scalar_t>(std::exp(tv[i] - lse));
      }
    });
  });
  return {probs, index};
}

at::Tensor sparse_softmax_bwd_cpu(const at::Tensor& grad, const at::Tensor& probs,
                                  const at::Tensor& index) {
  check_dim(probs, 2, "probs");
  check_dim(index, 2, "topk_index");
  KX_CHECK(grad.sizes() == probs.sizes(), "grad_probs must match probs ", probs.sizes(), ", got ", grad.sizes());
  KX_CHECK(index.size(0) == probs.size(0), "topk_index rows must match probs");
  const int64_t N = probs.size(0), V = probs.size(1), k = index.size(1);
  const at::Tensor idx = index.contiguous();
  const at::Tensor g = grad.to(probs.scalar_type());
  at::Tensor out = new_zeroed_output({N, V}, probs.options());
  const int64_t* ip = idx.data_ptr<int64_t>();
  KX_DISPATCH_FLOATING(probs.scalar_type(), "sparse_softmax_bwd", [&] {
    using A = acc_t<scalar_t>;
    const scalar_t* gp = g.data_ptr<scalar_t>();
    const scalar_t* pp = probs.data_ptr<scalar_t>();
    const int64_t gs0 = g.stride(0), gs1 = g.stride(1), ps0 = probs.stride(0), ps1 = probs.stride(1);
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, N, grain_rows(V), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t* ti = ip + r * k;
        scalar_t* o = op + r * V;
        A dot = 0;
        for (int64_t i = 0; i < k; ++i)
          dot += A(pp[r * ps0 + ti[i] * ps1]) * A(gp[r * gs0 + ti[i] * gs1]);
        for (int64_t i = 0; i < k; ++i) {
          A p = A(pp[r * ps0 + ti[i] * ps1]);
          o[ti[i]] = static_cast<scalar_t>(p * (A(gp[r * gs0 + ti[i] * gs1]) - dot));
        }
      }
    });
  });
  return out;
}

void check_target(const at::Tensor& target, int64_t N, int64_t V, int64_t ignore_index) {
  TORCH_CHECK_TYPE(target.scalar_type() == at::kLong || target.scalar_type() == at::kInt,
                   "kxkernels: target must be int64 or int32, got ", target.scalar_type());
  check_dim(target, 1, "target");
  KX_CHECK(target.size(0) == N, "target must have ", N, " rows (one per logits row), got ", target.size(0));
  if (N == 0) return;
  const at::Tensor t = target.to(at::kLong);
  const at::Tensor bad = (t != ignore_index).logical_and((t < 0).logical_or(t >= V));
  KX_CHECK(!bad.any().item<bool>(), "target values must be in [0, ", V, ") or ignore_index=",
           ignore_index, "; found ", t.masked_select(bad).slice(0, 0, 1).item<int64_t>());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sparse_softmax_cross_entropy_fwd_cpu(
    const at::Tensor& logits_in, const at::Tensor& target_in, int64_t k, int64_t ignore_index,
    bool include_target) {
  check_logits(logits_in, k);
  const int64_t N = logits_in.size(0), V = logits_in.size(1);
  check_target(target_in, N, V, ignore_index);
  const at::Tensor logits = rows_of(logits_in);
  const at::Tensor target = target_in.to(at::kLong).contiguous();
  const int64_t ld = logits.stride(0);
  auto f32 = logits.options().dtype(logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat);
  at::Tensor loss = new_output({N}, f32), lse = new_output({N}, f32);
  at::Tensor index = new_output({N, k}, logits.options().dtype(at::kLong));
  const int64_t* tp = target.data_ptr<int64_t>();
  int64_t* ip = index.data_ptr<int64_t>();
  KX_DISPATCH_FLOATING(logits.scalar_type(), "sparse_softmax_cross_entropy_fwd", [&] {
    using A = acc_t<scalar_t>;
    const scalar_t* xp = logits.data_ptr<scalar_t>();
    A* lp = loss.data_ptr<A>();
    A* sp = lse.data_ptr<A>();
    at::parallel_for(0, N, grain_rows(V), [&](int64_t r0, int64_t r1) {
      std::vector<A> tv(k);
      for (int64_t r = r0; r < r1; ++r) {
        int64_t* ti = ip + r * k;
        const int64_t t = tp[r];
        if (t == ignore_index) {
          std::fill(ti, ti + k, int64_t(-1));
          lp[r] = 0;
          sp[r] = neg_inf<A>();
          continue;
        }
        const scalar_t* x = xp + r * ld;
        bool finite = row_topk<scalar_t>(x, V, k, tv.data(), ti);
        const A xt = A(x[t]);
        bool in_set = false;
        for (int64_t i = 0; i < k; ++i) in_set |= ti[i] == t;
        A s = finite ? topk_lse(tv.data(), k, include_target && !in_set, xt)
                     : std::numeric_limits<A>::quiet_NaN();
        sp[r] = s;
        // A row whose kept logits are all -inf is fully masked: loss 0, zero gradient.
        lp[r] = s == neg_inf<A>() ? A(0) : s - xt;
      }
    });
  });
  return {loss, lse, index};
}

at::Tensor sparse_softmax_cross_entropy_bwd_cpu(const at::Tensor& grad_loss, const at::Tensor& logits_in,
                                                const at::Tensor& target_in, const at::Tensor& lse,
                                                const at::Tensor& index_in, int64_t ignore_index,
                                                bool include_target) {
  check_dim(logits_in, 2, "logits");
  const int64_t N = logits_in.size(0), V = logits_in.size(1), k = index_in.size(1);
  KX_CHECK(grad_loss.dim() == 1 && grad_loss.size(0) == N, "grad_loss must have shape (", N, ",)");
  KX_CHECK(index_in.size(0) == N && lse.size(0) == N && target_in.size(0) == N,
           "target, lse and topk_index must have ", N, " rows");
  const at::Tensor logits = rows_of(logits_in);
  const at::Tensor target = target_in.to(at::kLong).contiguous();
  const at::Tensor index = index_in.contiguous();
  const int64_t ld = logits.stride(0);
  at::Tensor grad = new_zeroed_output({N, V}, logits.options());
  const int64_t* tp = target.data_ptr<int64_t>();
  const int64_t* ip = index.data_ptr<int64_t>();
  KX_DISPATCH_FLOATING(logits.scalar_type(), "sparse_softmax_cross_entropy_bwd", [&] {
    using A = acc_t<scalar_t>;
    const at::Tensor gl = grad_loss.to(lse.scalar_type());
    const at::Tensor sl = lse.contiguous();
    const A* gp = gl.data_ptr<A>();
    const int64_t gs = gl.stride(0);
    const A* sp = sl.data_ptr<A>();
    const scalar_t* xp = logits.data_ptr<scalar_t>();
    scalar_t* op = grad.data_ptr<scalar_t>();
    at::parallel_for(0, N, grain_rows(V), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        scalar_t* o = op + r * V;
        const int64_t t = tp[r];
        const A s = sp[r];
        if (t == ignore_index || s == neg_inf<A>()) continue;
        const A g = gp[r * gs];
        const scalar_t* x = xp + r * ld;
        const int64_t* ti = ip + r * k;
        bool in_set = false;
        for (int64_t i = 0; i < k; ++i) {
          in_set |= ti[i] == t;
          if (ti[i] != t) o[ti[i]] = static_cast<scalar_t>(g * std::exp(A(x[ti[i]]) - s));
        }
        const A pt = (in_set || include_target) ? std::exp(A(x[t]) - s) : A(0);
        o[t] = static_cast<scalar_t>(g * (pt - A(1)));
      }
    });
  });
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
