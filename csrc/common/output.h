// Output allocation shared by the CPU kernels. With KX_POISON_OUTPUTS=1 in the environment (set
// by the tests) every new output is filled with NaN (floats) or INT64_MIN (ints) first, so an
// element a kernel forgets to write shows up in the comparison instead of passing by luck.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <utility>
#include <vector>
#include <limits>
#if defined(__unix__)
#include <sys/mman.h>
#include <unistd.h>
#endif
#if defined(__SSE2__)
#include <emmintrin.h>
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
// 1 GB/s), so these come from a pool of mappings whose pages are already resident: a freed
// output's mapping goes back to the pool instead of to the OS, and its first `nbytes` are zeroed
// again (non-temporal stores over resident pages, at memory bandwidth) when handed out. The CUDA caching allocator does
// the same for device memory. A miss maps fresh anonymous pages, which are zero already.
//
// Bounded under varying shapes (every NLP batch has its own):
// - size classes: a request is rounded up to one of 4 classes per power of two (waste <= 25%),
//   and a cached mapping up to twice the class serves it as a view of its first bytes, so
//   neighbouring shapes share mappings;
// - a cap on the bytes kept (freed mappings only; outputs alive are the caller's): the least
//   recently freed mappings are unmapped first (LRU) to make room. Default: 1/16 of physical
//   memory, clamped to [256 MiB, 4 GiB]; KX_ZERO_POOL_MAX_BYTES overrides it (0 disables the
//   pool), kx::zeroed_pool_set_cap at run time (kxkernels.memory.set_cap_bytes).
// torch's memory accounting does not see these mappings; kxkernels.memory reports them.
constexpr size_t kZeroPageMinBytes = size_t(4) << 20;   // smaller outputs: at::zeros
constexpr int kZeroPoolClassesPerOctave = 4;
constexpr size_t kZeroPoolMaxViewFactor = 2;            // a mapping serves requests down to half its size
constexpr size_t kZeroPoolCapMinBytes = size_t(256) << 20, kZeroPoolCapMaxBytes = size_t(4) << 30;
constexpr size_t kZeroPoolCapFractionOfRam = 16;

// The size class of a request: the next of 4 steps per power of two (p, 1.25p, 1.5p, 1.75p, 2p).
inline size_t zeroed_pool_class_bytes(size_t nbytes) {
  size_t p = 1;
  while (p * 2 <= nbytes) p *= 2;
  const size_t step = std::max<size_t>(p / kZeroPoolClassesPerOctave, 4096);
  return (nbytes + step - 1) / step * step;
}

struct ZeroedPoolStats {
  size_t cached_bytes = 0, cap_bytes = 0, live_bytes = 0, cached_mappings = 0;
  uint64_t hits = 0, misses = 0, evictions = 0;
};

// Zeroes a resident buffer with non-temporal stores (SSE2, the x86-64 baseline): the lines are
// written without being read first and without evicting the caches; about 3x memset's rate here
// on a buffer past the caches (memset reads each line before writing it at these sizes).
inline void zero_streaming(char* p, size_t n) {
#if defined(__SSE2__)
  size_t i = 0;
  for (; i < n && (reinterpret_cast<uintptr_t>(p + i) & 15) != 0; ++i) p[i] = 0;
  const __m128i z = _mm_setzero_si128();
  for (; i + 64 <= n; i += 64) {
    _mm_stream_si128(reinterpret_cast<__m128i*>(p + i), z);
    _mm_stream_si128(reinterpret_cast<__m128i*>(p + i + 16), z);
    _mm_stream_si128(reinterpret_cast<__m128i*>(p + i + 32), z);
    _mm_stream_si128(reinterpret_cast<__m128i*>(p + i + 48), z);
  }
  for (; i < n; ++i) p[i] = 0;
  _mm_sfence();  // the kernel's own stores come after these
#else
  std::memset(p, 0, n);
#endif
}

#if defined(__unix__)
class ZeroedPool {
 public:
  static ZeroedPool& get() {
    static ZeroedPool* pool = new ZeroedPool();  // leaked on purpose: deleters may run at exit
    return *pool;
  }

  // A block of at least nbytes, its first nbytes zeroed when `zero` (else what the last user left
  // there, or zeros on a miss); *map_bytes gets the size of the mapping (for give_back).
  void* take(size_t nbytes, size_t* map_bytes, bool zero = true) {
    const size_t want = zeroed_pool_class_bytes(nbytes);
    void* p = nullptr;
    {
      std::lock_guard<std::mutex> lock(mu_);
      size_t best = free_.size();
      for (size_t i = 0; i < free_.size(); ++i) {  // the smallest cached mapping that fits
        const size_t sz = free_[i].bytes;
        if (sz >= want && sz <= want * kZeroPoolMaxViewFactor && (best == free_.size() || sz < free_[best].bytes))
          best = i;
      }
      if (best != free_.size()) {
        p = free_[best].ptr;
        *map_bytes = free_[best].bytes;
        held_ -= *map_bytes;
        free_.erase(free_.begin() + best);
        ++stats_.hits;
      } else {
        ++stats_.misses;
      }
    }
    if (p != nullptr && zero) {
      char* c = static_cast<char*>(p);
      at::parallel_for(0, int64_t(nbytes), int64_t(1) << 22, [&](int64_t b, int64_t e) {
        zero_streaming(c + b, size_t(e - b));
      });
    } else if (p == nullptr) {
      p = mmap(nullptr, want, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      if (p == MAP_FAILED) return nullptr;
      *map_bytes = want;
    }
    std::lock_guard<std::mutex> lock(mu_);
    live_ += *map_bytes;
    return p;
  }

  void give_back(void* p, size_t map_bytes) {
    std::vector<Mapping> drop;
    {
      std::lock_guard<std::mutex> lock(mu_);
      live_ -= map_bytes;
      if (map_bytes <= max_bytes_) {
        evict_locked(max_bytes_ - map_bytes, &drop);
        free_.push_back({p, map_bytes});  // the back is the most recently freed
        held_ += map_bytes;
        p = nullptr;
      }
    }
    if (p != nullptr) munmap(p, map_bytes);
    for (auto& m : drop) munmap(m.ptr, m.bytes);
  }

  // Unmaps least recently freed mappings until at most `keep` bytes stay cached.
  void trim(size_t keep) {
    std::vector<Mapping> drop;
    {
      std::lock_guard<std::mutex> lock(mu_);
      evict_locked(keep, &drop);
    }
    for (auto& m : drop) munmap(m.ptr, m.bytes);
  }

  size_t cap() {
    std::lock_guard<std::mutex> lock(mu_);
    return max_bytes_;
  }

  void set_cap(size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      max_bytes_ = bytes;
    }
    trim(bytes);
  }

  ZeroedPoolStats stats() {
    std::lock_guard<std::mutex> lock(mu_);
    ZeroedPoolStats s = stats_;
    s.cached_bytes = held_;
    s.cap_bytes = max_bytes_;
    s.live_bytes = live_;
    s.cached_mappings = free_.size();
    return s;
  }

  void reset_counters() {
    std::lock_guard<std::mutex> lock(mu_);
    stats_ = ZeroedPoolStats();
  }

 private:
  struct Mapping {
    void* ptr;
    size_t bytes;
  };

  ZeroedPool() {
    const char* e = std::getenv("KX_ZERO_POOL_MAX_BYTES");
    max_bytes_ = e != nullptr && e[0] != '\0' ? size_t(std::strtoull(e, nullptr, 10)) : default_cap();
  }

  static size_t default_cap() {
    const long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGE_SIZE);
    const size_t ram = pages > 0 && page > 0 ? size_t(pages) * size_t(page) : size_t(8) << 30;
    return std::min(kZeroPoolCapMaxBytes, std::max(kZeroPoolCapMinBytes, ram / kZeroPoolCapFractionOfRam));
  }

  void evict_locked(size_t keep, std::vector<Mapping>* drop) {
    size_t n = 0;
    while (n < free_.size() && held_ > keep) {  // the front is the least recently freed
      held_ -= free_[n].bytes;
      drop->push_back(free_[n]);
      ++n;
      ++stats_.evictions;
    }
    free_.erase(free_.begin(), free_.begin() + n);
  }

  std::mutex mu_;
  std::vector<Mapping> free_;
  size_t held_ = 0, live_ = 0, max_bytes_ = 0;
  ZeroedPoolStats stats_;
};
#endif

// What the pool keeps, its cap and counters, and ways to shrink it (kxkernels.memory).
inline ZeroedPoolStats zeroed_pool_stats() {
#if defined(__unix__)
  return ZeroedPool::get().stats();
#else
  return ZeroedPoolStats();
#endif
}

inline size_t zeroed_pool_held_bytes() { return zeroed_pool_stats().cached_bytes; }

inline void zeroed_pool_release() {
#if defined(__unix__)
  ZeroedPool::get().trim(0);
#endif
}

inline void zeroed_pool_set_cap(size_t bytes) {
#if defined(__unix__)
  ZeroedPool::get().set_cap(bytes);
#endif
}

inline void zeroed_pool_reset_counters() {
#if defined(__unix__)
  ZeroedPool::get().reset_counters();
#endif
}

// A CPU output of `sizes` from the pool (its first bytes zeroed when `zero`), or an undefined
// tensor where the pool does not serve it (small, not CPU, no pool on this platform).
inline at::Tensor pooled_output(at::IntArrayRef sizes, const at::TensorOptions& options, bool zero) {
  const size_t nbytes = size_t(c10::multiply_integers(sizes)) * options.dtype().itemsize();
#if defined(__unix__)
  if (nbytes >= kZeroPageMinBytes && options.device().is_cpu()) {
    size_t map_bytes = 0;
    if (void* p = ZeroedPool::get().take(nbytes, &map_bytes, zero))
      return at::from_blob(p, sizes, [map_bytes](void* q) { ZeroedPool::get().give_back(q, map_bytes); },
                           options);
  }
#endif
  return at::Tensor();
}

inline at::Tensor new_zeroed_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor t = pooled_output(sizes, options, /*zero=*/true);
  return t.defined() ? t : at::zeros(sizes, options);
}

// A big dense output every element of which the kernel writes (no zeroing): from the same pool of
// resident mappings, so a training loop's per-step outputs stop paying a page fault per 4 KiB
// (glibc maps every block past its 32 MiB mmap threshold afresh on each call: at B=2, H=8,
// L=16384, D=64 linear attention's four outputs, 268 MB, took ~100 ms of faults a step).
// Floating outputs only (the poison fill is NaN).
inline at::Tensor new_resident_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  if (!at::isFloatingType(options.dtype().toScalarType())) return new_output(sizes, options);
  at::Tensor t = pooled_output(sizes, options, /*zero=*/false);
  if (!t.defined()) return new_output(sizes, options);
  if (poison_outputs()) t.fill_(std::numeric_limits<double>::quiet_NaN());
  return t;
}

}  // namespace kx
