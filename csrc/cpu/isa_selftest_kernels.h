// Kernels of the ISA self-test op (csrc/cpu/isa_selftest.cpp), compiled once per level.

inline void selftest_exp(const float* x, float* y, int64_t n) { vexp_n(x, y, n); }

template <typename S, typename D>
inline void selftest_convert(const S* s, D* d, int64_t n) { convert(s, d, n); }
