// Tile GEMMs of the CPU kernels: the BLAS that ATen itself calls for CPU matmuls.
// The torch wheel's BLAS (MKL on x86-64, OpenBLAS elsewhere) exports the Fortran sgemm_ / dgemm_
// that at::native::cpublas::gemm's float / double overloads call; those overloads are not
// exported by the wheel (only cpublas::brgemm is, and it ran at about half the sgemm rate on
// attention tiles here), so the kernels call the BLAS entry points directly. Weak references: a
// torch built without them leaves them null and a plain loop runs.
#pragma once
#include <cstdint>

extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc) __attribute__((weak));
int MKL_Set_Num_Threads_Local(int nt) __attribute__((weak));  // the C entry (the lowercase symbols are Fortran)
}

namespace kx {

// Inside a parallel region each task's tile GEMMs must run on the calling thread alone. MKL's
// threaded driver, called from an OpenMP worker, still takes a per-call synchronization path (futex
// wake-ups measured at 2 threads); MKL_Set_Num_Threads_Local(1) selects its sequential path for the
// calling thread for the scope of this guard (a no-op where MKL is not the BLAS).
struct BlasSequential {
  int saved = 0;
  BlasSequential() {
    if (MKL_Set_Num_Threads_Local != nullptr) saved = MKL_Set_Num_Threads_Local(1);
  }
  ~BlasSequential() {
    if (MKL_Set_Num_Threads_Local != nullptr) MKL_Set_Num_Threads_Local(saved);
  }
  BlasSequential(const BlasSequential&) = delete;
  BlasSequential& operator=(const BlasSequential&) = delete;
};

// Column-major C (m x n) = alpha op(A) op(B) + beta C (BLAS conventions; ta / tb transpose).
template <typename A>
inline void gemm_loops(bool ta, bool tb, int64_t m, int64_t n, int64_t k, A alpha, const A* a, int64_t lda,
                       const A* b, int64_t ldb, A beta, A* c, int64_t ldc) {
  for (int64_t j = 0; j < n; ++j)
    for (int64_t i = 0; i < m; ++i) {
      A s = 0;
      for (int64_t l = 0; l < k; ++l) s += (ta ? a[l + i * lda] : a[i + l * lda]) * (tb ? b[j + l * ldb] : b[l + j * ldb]);
      c[i + j * ldc] = alpha * s + (beta == A(0) ? A(0) : beta * c[i + j * ldc]);
    }
}

inline void blas_gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
                      const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  if (sgemm_ == nullptr) return gemm_loops(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
  const char cta = ta ? 'T' : 'N', ctb = tb ? 'T' : 'N';
  const int im = int(m), in = int(n), ik = int(k), ia = int(lda), ib = int(ldb), ic = int(ldc);
  sgemm_(&cta, &ctb, &im, &in, &ik, &alpha, a, &ia, b, &ib, &beta, c, &ic);
}

inline void blas_gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, double alpha, const double* a, int64_t lda,
                      const double* b, int64_t ldb, double beta, double* c, int64_t ldc) {
  if (dgemm_ == nullptr) return gemm_loops(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
  const char cta = ta ? 'T' : 'N', ctb = tb ? 'T' : 'N';
  const int im = int(m), in = int(n), ik = int(k), ia = int(lda), ib = int(ldb), ic = int(ldc);
  dgemm_(&cta, &ctb, &im, &in, &ik, &alpha, a, &ia, b, &ib, &beta, c, &ic);
}

}  // namespace kx
