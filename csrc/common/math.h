// Accumulation types and small float helpers shared by the CPU kernels.
#pragma once
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cmath>
#include <limits>

namespace kx {

// Math runs in float32 for float32/float16/bfloat16 inputs and in double for float64 (gradcheck).
template <typename T> struct acc { using type = float; };
template <> struct acc<double> { using type = double; };
template <typename T> using acc_t = typename acc<T>::type;

template <typename T> inline constexpr T neg_inf() { return -std::numeric_limits<T>::infinity(); }

}  // namespace kx
