// Runtime ISA dispatch for the CPU kernels: one mechanism for every op.
//
// The extension is compiled for baseline x86-64 (SSE2), so it loads on any x86-64 CPU. Each op
// writes its hot kernels once, in a header `csrc/cpu/<op>_kernels.h`, and includes
// `common/isa_kernels.h`, which compiles that header three times, each time inside a
// `#pragma GCC target` region and its own namespace:
//
//   kx::isa_baseline  SSE2, 4 float lanes
//   kx::isa_avx2      AVX2 + FMA + F16C, 8 float lanes
//   kx::isa_avx512    AVX-512 F/BW/VL/DQ + FMA + F16C, 16 float lanes
//
// Inside the kernel header `KX_ISA_LEVEL` is 0 / 1 / 2 and `common/simd.h` (vector types, exp,
// fp16/bf16 conversions) is already in scope at that width. The op's host code calls
// `KX_ISA_CALL(fn, args...)`, which runs `fn` from the namespace of `kx::cpu_isa()`: the best
// level the CPU and OS support, capped by the environment variable `KX_CPU_ISA`
// (baseline|avx2|avx512) or by `kx::set_cpu_isa` (tests run every level this way).
//
// Why regions rather than target_clones or at::vec: intrinsics and GCC vector types need the
// target on the function that contains them, and everything a kernel defines in the region
// (templates, lambdas of at::parallel_for) carries it; external headers are included before the
// regions, so their inline functions stay baseline and no ODR clash mixes levels.
#pragma once
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <string>

namespace kx {

enum class Isa : int { baseline = 0, avx2 = 1, avx512 = 2 };

inline const char* isa_name(Isa i) {
  switch (i) {
    case Isa::avx512: return "avx512";
    case Isa::avx2: return "avx2";
    default: return "baseline";
  }
}

// The best level this CPU and OS can run (the OS must save the vector state: libgcc checks XCR0).
inline Isa cpu_isa_supported() {
#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__)
  static const Isa best = [] {
    __builtin_cpu_init();
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                      __builtin_cpu_supports("f16c") && __builtin_cpu_supports("bmi2");
    const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
    return avx512 ? Isa::avx512 : avx2 ? Isa::avx2 : Isa::baseline;
  }();
  return best;
#else
  return Isa::baseline;
#endif
}

// Parses "baseline" / "avx2" / "avx512" (also "default", "sse2"); false if unknown.
inline bool parse_isa(const char* s, Isa* out) {
  if (s == nullptr) return false;
  const std::string v(s);
  if (v == "baseline" || v == "default" || v == "sse2") { *out = Isa::baseline; return true; }
  if (v == "avx2") { *out = Isa::avx2; return true; }
  if (v == "avx512") { *out = Isa::avx512; return true; }
  return false;
}

namespace detail {
inline std::atomic<int>& isa_cap() {
  static std::atomic<int> cap{[] {
    Isa want = Isa::avx512;
    const char* e = std::getenv("KX_CPU_ISA");
    if (e != nullptr && e[0] != '\0' && !parse_isa(e, &want)) want = Isa::avx512;  // unknown: no cap
    return static_cast<int>(want);
  }()};
  return cap;
}
}  // namespace detail

// The level the kernels run now: min(supported, cap).
inline Isa cpu_isa() {
  const int cap = detail::isa_cap().load(std::memory_order_relaxed);
  const int best = static_cast<int>(cpu_isa_supported());
  return static_cast<Isa>(cap < best ? cap : best);
}

// Caps the level (a level above what the CPU supports runs the supported one). Returns the
// level now in force.
inline Isa set_cpu_isa(Isa cap) {
  detail::isa_cap().store(static_cast<int>(cap), std::memory_order_relaxed);
  return cpu_isa();
}

}  // namespace kx

// Calls FN(args...) from the namespace of the running level. FN is a name the kernel header
// defines (it may carry template arguments without a top-level comma: `fwd<scalar_t>`).
#define KX_ISA_CALL(FN, ...)                                                  \
  ([&]() -> decltype(auto) {                                                  \
    switch (::kx::cpu_isa()) {                                                \
      case ::kx::Isa::avx512: return ::kx::isa_avx512::FN(__VA_ARGS__);      \
      case ::kx::Isa::avx2: return ::kx::isa_avx2::FN(__VA_ARGS__);          \
      default: return ::kx::isa_baseline::FN(__VA_ARGS__);                   \
    }                                                                         \
  }())
