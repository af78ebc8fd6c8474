// Argument checks shared by the C++ kernels. The Python wrappers validate user input first and
// raise ValueError/TypeError naming the argument; these checks guard direct calls of the
// torch.ops.kxkernels.* ops so a bad call is an exception, never an out-of-bounds access.
#pragma once
#include <torch/library.h>
#include <ATen/ATen.h>
#include <atomic>
#include <cstdint>

#define KX_CHECK(cond, ...) TORCH_CHECK_VALUE(cond, "kxkernels: ", __VA_ARGS__)

namespace kx {

inline void check_floating(const at::Tensor& t, const char* name) {
  auto s = t.scalar_type();
  TORCH_CHECK_TYPE(s == at::kFloat || s == at::kDouble || s == at::kHalf || s == at::kBFloat16,
                   "kxkernels: ", name, " must be float64/float32/float16/bfloat16, got ", s);
}

inline void check_dim(const at::Tensor& t, int64_t dim, const char* name) {
  KX_CHECK(t.dim() == dim, name, " must have ", dim, " dims, got shape ", t.sizes());
}

inline void check_same_device(const at::Tensor& a, const at::Tensor& b, const char* na, const char* nb) {
  KX_CHECK(a.device() == b.device(), na, " and ", nb, " must be on the same device, got ",
           a.device(), " and ", b.device());
}

// Index values checked inside a kernel's own parallel pass (no extra pass over the data): a
// worker that meets a bad value records it and skips the write; after the pass, raise() throws a
// ValueError naming the argument. The first bad value any worker records is the one reported.
class IndexGuard {
 public:
  // True when 0 <= v < hi; otherwise records v and returns false.
  bool ok(int64_t v, int64_t hi) {
    if (v >= 0 && v < hi) return true;
    bool expected = false;
    if (bad_.compare_exchange_strong(expected, true)) value_.store(v);
    return false;
  }
  bool bad() const { return bad_.load(); }
  // Throws "<name> values must be in [0, hi)<extra>; found v" if a worker saw a bad value.
  void raise_if_bad(const char* name, int64_t hi, const char* extra = "") const {
    KX_CHECK(!bad(), name, " values must be in [0, ", hi, ")", extra, "; found ", value_.load());
  }

 private:
  std::atomic<bool> bad_{false};
  std::atomic<int64_t> value_{0};
};

}  // namespace kx

// Float dispatch over the dtypes every op accepts: math in float (double for float64 gradcheck).
#define KX_DISPATCH_FLOATING(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)
