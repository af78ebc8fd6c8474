// Output allocation shared by the CPU kernels. With KX_POISON_OUTPUTS=1 in the environment (set
// by the tests) every new output is filled with NaN (floats) or INT64_MIN (ints) first, so an
// element a kernel forgets to write shows up in the comparison instead of passing by luck.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <utility>
#include <vector>
#include <limits>
#if defined(__unix__)
#include <sys/mman.h>
#endif

namespace kx {

inline bool poison_outputs() {
  static const bool on = [] {
    const char* e = std::getenv("KX_POISON_OUTPUTS");
    return e != nullptr && e[0] == '1';
  }();
  return on;
}

inline at::Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor t = at::empty(sizes, options);
  if (poison_outputs()) {
    if (at::isFloatingType(t.scalar_type()))
      t.fill_(std::numeric_limits<double>::quiet_NaN());
    else
      t.fill_(t.scalar_type() == at::kLong ? std::numeric_limits<int64_t>::min()
                                           : std::numeric_limits<int32_t>::min());
  }
  return t;
}

// Big outputs that are zero but for a few entries a row (sparse softmax probabilities and
// gradients). Fresh pages cost a fault each (about 5 us here; a 512 MiB at::zeros runs at under
// 1 GB/s), so these come from a small pool of mappings whose pages are already resident: a freed
// output's mapping goes back to the pool instead of to the OS, and is zeroed again (memset over
// resident pages, ~30 GB/s) when handed out. The CUDA caching allocator does the same for device
// memory. A miss maps fresh anonymous pages, which are zero already (calloc semantics), so the
// kernel writes only its non-zeros. KX_ZERO_POOL_MAX_BYTES bounds what the pool keeps
// (default 2 GiB; 0 disables it).
constexpr size_t kZeroPageMinBytes = size_t(4) << 20;

#if defined(__unix__)
class ZeroedPool {
 public:
  static ZeroedPool& get() {
    static ZeroedPool* pool = new ZeroedPool();  // leaked on purpose: deleters may run at exit
    return *pool;
  }

  void* take(size_t nbytes) {
    void* p = nullptr;
    {
      std::lock_guard<std::mutex> lock(mu_);
      for (size_t i = 0; i < free_.size(); ++i) {
        if (free_[i].second == nbytes) {
          p = free_[i].first;
          held_ -= nbytes;
          free_.erase(free_.begin() + i);
          break;
        }
      }
    }
    if (p != nullptr) {
      char* c = static_cast<char*>(p);
      at::parallel_for(0, int64_t(nbytes), int64_t(1) << 22, [&](int64_t b, int64_t e) {
        std::memset(c + b, 0, size_t(e - b));
      });
      return p;
    }
    p = mmap(nullptr, nbytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    return p == MAP_FAILED ? nullptr : p;
  }

  size_t held_bytes() {
    std::lock_guard<std::mutex> lock(mu_);
    return held_;
  }

  void release_all() {
    std::vector<std::pair<void*, size_t>> drop;
    {
      std::lock_guard<std::mutex> lock(mu_);
      drop.swap(free_);
      held_ = 0;
    }
    for (auto& m : drop) munmap(m.first, m.second);
  }

  void give_back(void* p, size_t nbytes) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (held_ + nbytes <= max_bytes_) {
        free_.emplace_back(p, nbytes);
        held_ += nbytes;
        return;
      }
    }
    munmap(p, nbytes);
  }

 private:
  ZeroedPool() {
    const char* e = std::getenv("KX_ZERO_POOL_MAX_BYTES");
    max_bytes_ = e != nullptr ? size_t(std::strtoull(e, nullptr, 10)) : (size_t(2) << 30);
  }
  std::mutex mu_;
  std::vector<std::pair<void*, size_t>> free_;
  size_t held_ = 0, max_bytes_ = 0;
};
#endif

// What the pool keeps now, and a way to hand it all back to the OS (kxkernels.memory).
inline size_t zeroed_pool_held_bytes() {
#if defined(__unix__)
  return ZeroedPool::get().held_bytes();
#else
  return 0;
#endif
}

inline void zeroed_pool_release() {
#if defined(__unix__)
  ZeroedPool::get().release_all();
#endif
}

inline at::Tensor new_zeroed_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  const size_t nbytes = size_t(c10::multiply_integers(sizes)) * options.dtype().itemsize();
#if defined(__unix__)
  if (nbytes >= kZeroPageMinBytes && options.device().is_cpu()) {
    if (void* p = ZeroedPool::get().take(nbytes))
      return at::from_blob(p, sizes, [nbytes](void* q) { ZeroedPool::get().give_back(q, nbytes); },
                           options);
  }
#endif
  return at::zeros(sizes, options);
}

}  // namespace kx
