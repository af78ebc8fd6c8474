// Kernels of GlobalPointer and the ZLPR loss (csrc/cpu/global_pointer.cpp), compiled once per ISA
// level by common/isa_kernels.h (no include guard, no #include: simd.h is in scope).
//
// One (batch, head) is one task. Its q and k rows are rotated (RoPE, angles from the host's
// float32 tables) into float buffers of L x D, then row blocks of kGpRowBlock starts i times the
// columns j >= the block start (tril) are scored by one small GEMM each (ATen's cpublas) into a
// block buffer that stays in cache. Everything around the GEMM (masks, biases, exp, the two
// streaming log-sum-exps, the gradient cells) runs on that buffer; nothing of size L x L is
// ever allocated beyond one block.

constexpr int64_t kGpRowBlock = 64;  // start positions a tile: 64 x L floats = 64 KiB at L = 256

// ---- row helpers: float rows in vectors of this level, double rows (gradcheck) scalar ---------
inline float gp_row_max(const float* x, int64_t n, float init) {
  vfloat m = vbroadcast(init);
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) m = vmax(vload(x + j), m);
  float r = hmax(m);
  for (; j < n; ++j) r = x[j] > r ? x[j] : r;
  return r;
}
inline double gp_row_max(const double* x, int64_t n, double init) {
  double r = init;
  for (int64_t j = 0; j < n; ++j) r = x[j] > r ? x[j] : r;
  return r;
}
// sum_j exp(x_j - m) (m finite, >= every x_j; -inf entries add 0).
inline float gp_row_sum_exp(const float* x, int64_t n, float m) {
  const vfloat vm = vbroadcast(m);
  vfloat s = vbroadcast(0.f);
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) s += vexp(vload(x + j) - vm);
  if (j < n) s += vexp(vload_partial(x + j, n - j, -std::numeric_limits<float>::infinity()) - vm);
  return hsum(s);
}
inline double gp_row_sum_exp(const double* x, int64_t n, double m) {
  double s = 0;
  for (int64_t j = 0; j < n; ++j) s += std::exp(x[j] - m);
  return s;
}
// x_j = mul * exp(x_j - m), in place.
inline void gp_row_exp_scale(float* x, int64_t n, float m, float mul) {
  const vfloat vm = vbroadcast(m);
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) vstore(x + j, vexp(vload(x + j) - vm) * mul);
  if (j < n) vstore_partial(x + j, vexp(vload_partial(x + j, n - j, 0.f) - vm) * mul, n - j);
}
inline void gp_row_exp_scale(double* x, int64_t n, double m, double mul) {
  for (int64_t j = 0; j < n; ++j) x[j] = mul * std::exp(x[j] - m);
}
// x_j += cb_j + rb.
template <typename A>
inline void gp_row_add(A* x, const A* cb, A rb, int64_t n) {
  int64_t j = 0;
  if constexpr (sizeof(A) == sizeof(float)) {
    const vfloat vr = vbroadcast(rb);
    for (; j + kLanes <= n; j += kLanes) vstore(x + j, vload(x + j) + vload(cb + j) + vr);
  }
  for (; j < n; ++j) x[j] += cb[j] + rb;
}
// acc_j += x_j; returns sum_j x_j.
template <typename A>
inline A gp_row_accumulate(const A* x, A* acc, int64_t n) {
  A s = 0;
  int64_t j = 0;
  if constexpr (sizeof(A) == sizeof(float)) {
    vfloat vs = vbroadcast(0.f);
    for (; j + kLanes <= n; j += kLanes) {
      const vfloat v = vload(x + j);
      vstore(acc + j, vload(acc + j) + v);
      vs += v;
    }
    s = hsum(vs);
  }
  for (; j < n; ++j) {
    acc[j] += x[j];
    s += x[j];
  }
  return s;
}

// ---- RoPE on one (batch, head): rows [0, n) of x (strides sL, sD) into out (n x D, A) -----------
// cs, sn: (L, D/2) tables of cos / sin of m * theta_i.
template <typename T, typename A>
void gp_load_rotated(const T* x, int64_t sL, int64_t sD, int64_t n, int64_t D, const A* cs, const A* sn,
                     bool rope, bool interleaved, A* out, A* tmp) {
  const int64_t half = D / 2;
  for (int64_t i = 0; i < n; ++i) {
    const T* xi = x + i * sL;
    A* t = rope ? tmp : out + i * D;
    if (sD == 1) {
      convert(xi, t, D);
    } else {
      for (int64_t d = 0; d < D; ++d) t[d] = static_cast<A>(xi[d * sD]);
    }
    if (!rope) continue;
    A* o = out + i * D;
    const A* c = cs + i * half;
    const A* s = sn + i * half;
    if (interleaved) {
      for (int64_t p = 0; p < half; ++p) {
        const A a = t[2 * p], b = t[2 * p + 1];
        o[2 * p] = a * c[p] - b * s[p];
        o[2 * p + 1] = b * c[p] + a * s[p];
      }
    } else {
      for (int64_t p = 0; p < half; ++p) {
        const A a = t[p], b = t[p + half];
        o[p] = a * c[p] - b * s[p];
        o[p + half] = b * c[p] + a * s[p];
      }
    }
  }
}

// The transpose rotation R^T of the gradient rows g (n x D) into out (L x D contiguous, dtype T);
// rows [n, L) are zero.
template <typename T, typename A>
void gp_store_unrotated(A* g, int64_t n, int64_t L, int64_t D, const A* cs, const A* sn, bool rope,
                        bool interleaved, A mul, T* out) {
  const int64_t half = D / 2;
  for (int64_t i = 0; i < n; ++i) {
    A* gi = g + i * D;
    for (int64_t d = 0; d < D; ++d) gi[d] *= mul;
    if (rope) {
      const A* c = cs + i * half;
      const A* s = sn + i * half;
      if (interleaved) {
        for (int64_t p = 0; p < half; ++p) {
          const A ga = gi[2 * p], gb = gi[2 * p + 1];
          gi[2 * p] = ga * c[p] + gb * s[p];
          gi[2 * p + 1] = gb * c[p] - ga * s[p];
        }
      } else {
        for (int64_t p = 0; p < half; ++p) {
          const A ga = gi[p], gb = gi[p + half];
          gi[p] = ga * c[p] + gb * s[p];
          gi[p + half] = gb * c[p] - ga * s[p];
        }
      }
    }
    convert(static_cast<const A*>(gi), out + i * D, D);
  }
  for (int64_t i = n * D; i < L * D; ++i) out[i] = T(0);
}

// ---- GEMMs of one tile ------------------------------------------------------------------------
// Row-major C (M x N, ldc) = A (M x K, lda) B (K x N, ldb) (+ C when add): ATen's cpublas::brgemm in
// float32 (oneDNN's micro-kernel where the CPU has one, else the BLAS sgemm); plain loops in
// float64, which only gradcheck uses.
inline void gp_tile_gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb,
                         float* C, int64_t ldc, bool add) {
  at::native::cpublas::brgemm(M, N, K, lda, ldb, ldc, add, A, B, C, false);
}
inline void gp_tile_gemm(int64_t M, int64_t N, int64_t K, const double* A, int64_t lda, const double* B,
                         int64_t ldb, double* C, int64_t ldc, bool add) {
  for (int64_t i = 0; i < M; ++i) {
    double* c = C + i * ldc;
    if (!add) std::fill(c, c + N, 0.0);
    for (int64_t p = 0; p < K; ++p) {
      const double a = A[i * lda + p];
      const double* b = B + p * ldb;
      for (int64_t j = 0; j < N; ++j) c[j] += a * b[j];
    }
  }
}
inline void gp_gemm_release() { at::native::cpublas::brgemm_release(false); }

// GpProblem<T, A> (the pointers, strides and settings of one call) is defined by the host file,
// outside the ISA regions, so one type serves every level.

template <typename T, typename A>
struct GpWork {
  // qr, kr: rotated rows (L x D); kt: scale * kr transposed (D x L), the right operand of the scores;
  // qt: qr transposed (D x L, backward only); tile: one row block of scores / gradient cells
  // (kGpRowBlock x L).
  std::vector<A> qr, kr, kt, qt, tmp, tile, colbias, rowbias;
  std::vector<char> rowok;
  int64_t n = 0;  // rows / columns in play: [0, n)
  explicit GpWork(const GpProblem<T, A>& p, bool backward)
      : qr(p.L * p.D), kr(p.L * p.D), kt(p.L * p.D), qt(backward ? p.L * p.D : 0), tmp(p.D),
        tile(kGpRowBlock * p.L), colbias(p.L), rowbias(p.L), rowok(p.L) {}
  ~GpWork() { gp_gemm_release(); }

  // Rotated q, k and the row / column terms of (b, h): colbias_j = end_bias_j or -inf at padding.
  void prepare(const GpProblem<T, A>& p, int64_t b, int64_t h) {
    n = p.lens[b];
    const T* q = p.q + b * p.qs[0] + h * p.qs[1];
    const T* k = p.k + b * p.ks[0] + h * p.ks[1];
    gp_load_rotated(q, p.qs[2], p.qs[3], n, p.D, p.cs, p.sn, p.rope, p.interleaved, qr.data(), tmp.data());
    gp_load_rotated(k, p.ks[2], p.ks[3], n, p.D, p.cs, p.sn, p.rope, p.interleaved, kr.data(), tmp.data());
    for (int64_t j = 0; j < n; ++j)
      for (int64_t d = 0; d < p.D; ++d) kt[d * p.L + j] = p.scale * kr[j * p.D + d];
    if (!qt.empty())
      for (int64_t i = 0; i < n; ++i)
        for (int64_t d = 0; d < p.D; ++d) qt[d * p.L + i] = qr[i * p.D + d];
    const int64_t off = (b * p.H + h) * p.L;
    for (int64_t j = 0; j < n; ++j) {
      const bool ok = p.mask == nullptr || p.mask[b * p.L + j];
      rowok[j] = ok;
      colbias[j] = ok ? (p.end_bias ? static_cast<A>(p.end_bias[off + j]) : A(0)) : neg_inf<A>();
      rowbias[j] = p.start_bias ? static_cast<A>(p.start_bias[off + j]) : A(0);
    }
  }
  // First column of row block i0 and its width.
  int64_t j0(const GpProblem<T, A>& p, int64_t i0) const { return p.tril ? i0 : 0; }
  // Scores the tile of rows [i0, i0 + bi) x columns [j0, n); row r of the tile at tile + r * nj.
  void score(const GpProblem<T, A>& p, int64_t i0, int64_t bi, int64_t j0, int64_t nj) {
    gp_tile_gemm(bi, nj, p.D, qr.data() + i0 * p.D, p.D, kt.data() + j0, p.L, tile.data(), nj, false);
  }
  // dQr[i0:] += dS Kr[j0:] (L x D rows) and dKr^T[:, j0:] += Qr^T[:, i0:] dS (D x L, transposed
  // once at the end by gp_transpose_rows), dS the tile, unscaled (the caller scales).
  void grads(const GpProblem<T, A>& p, int64_t i0, int64_t bi, int64_t j0, int64_t nj, A* dqr, A* dkt) {
    const A* dS = tile.data();
    gp_tile_gemm(bi, p.D, nj, dS, nj, kr.data() + j0 * p.D, p.D, dqr + i0 * p.D, p.D, true);
    gp_tile_gemm(p.D, nj, bi, qt.data() + i0, p.L, dS, nj, dkt + j0, p.L, true);
  }
  // Row i of the tile: adds the biases over its valid columns; returns the offset of its first
  // valid column within the tile row (cells before it are the masked lower triangle).
  int64_t finish_row(const GpProblem<T, A>& p, A* x, int64_t i, int64_t j0, int64_t nj) {
    const int64_t js = p.tril ? i - j0 : 0;
    gp_row_add(x + js, colbias.data() + j0 + js, rowbias[i], nj - js);
    return js;
  }
};

// Positive cells i * L + j of (b, h), sorted, deduplicated, masked cells dropped.
template <typename T, typename A>
void gp_positives(const GpProblem<T, A>& p, const int64_t* spans, int64_t P, int64_t b, int64_t h,
                  std::vector<int64_t>& out) {
  out.clear();
  const int64_t* s = spans + (b * p.H + h) * P * 2;
  const int64_t n = p.lens[b];
  for (int64_t t = 0; t < P; ++t) {
    const int64_t i = s[2 * t], j = s[2 * t + 1];
    if (i < 0 || j < 0 || i >= n || j >= n) continue;
    if (p.mask != nullptr && !(p.mask[b * p.L + i] && p.mask[b * p.L + j])) continue;
    if (p.tril && j < i) continue;
    out.push_back(i * p.L + j);
  }
  std::sort(out.begin(), out.end());
  out.erase(std::unique(out.begin(), out.end()), out.end());
}

// ---- global_pointer scores, forward: out (B, H, L, L) contiguous -------------------------------
template <typename T, typename A>
void gp_scores_forward(const GpProblem<T, A>& p, T* out) {
  const int64_t L = p.L;
  const T ninf = static_cast<T>(neg_inf<A>());
  at::parallel_for(0, p.B * p.H, 1, [&](int64_t t0, int64_t t1) {
    GpWork<T, A> w(p, false);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / p.H, h = t % p.H;
      w.prepare(p, b, h);
      T* o = out + t * L * L;
      const int64_t n = w.n;
      for (int64_t i0 = 0; i0 < n; i0 += kGpRowBlock) {
        const int64_t bi = std::min(kGpRowBlock, n - i0), j0 = w.j0(p, i0), nj = n - j0;
        w.score(p, i0, bi, j0, nj);
        for (int64_t r = 0; r < bi; ++r) {
          const int64_t i = i0 + r;
          T* orow = o + i * L;
          if (!w.rowok[i]) {
            std::fill(orow, orow + L, ninf);
            continue;
          }
          A* x = w.tile.data() + r * nj;
          const int64_t js = w.finish_row(p, x, i, j0, nj);
          std::fill(orow, orow + j0 + js, ninf);
          convert(static_cast<const A*>(x + js), orow + j0 + js, nj - js);
          std::fill(orow + n, orow + L, ninf);
        }
      }
      std::fill(o + n * L, o + L * L, ninf);
    }
  });
}

// ---- global_pointer scores, backward: grad (B, H, L, L) contiguous ------------------------------
template <typename T, typename A>
void gp_scores_backward(const GpProblem<T, A>& p, const T* grad, T* dq, T* dk, A* dsb, A* deb) {
  const int64_t L = p.L, D = p.D;
  at::parallel_for(0, p.B * p.H, 1, [&](int64_t t0, int64_t t1) {
    GpWork<T, A> w(p, true);
    std::vector<A> dqr(L * D), dkr(L * D), dkt(L * D);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / p.H, h = t % p.H;
      w.prepare(p, b, h);
      const int64_t n = w.n;
      std::fill(dqr.begin(), dqr.begin() + n * D, A(0));
      std::fill(dkt.begin(), dkt.end(), A(0));
      A* sb = dsb + t * L;
      A* eb = deb + t * L;
      std::fill(sb, sb + L, A(0));
      std::fill(eb, eb + L, A(0));
      const T* g = grad + t * L * L;
      for (int64_t i0 = 0; i0 < n; i0 += kGpRowBlock) {
        const int64_t bi = std::min(kGpRowBlock, n - i0), j0 = w.j0(p, i0), nj = n - j0;
        for (int64_t r = 0; r < bi; ++r) {
          const int64_t i = i0 + r;
          A* x = w.tile.data() + r * nj;
          if (!w.rowok[i]) {
            std::fill(x, x + nj, A(0));
            continue;
          }
          const int64_t js = p.tril ? i - j0 : 0;
          std::fill(x, x + js, A(0));
          convert(g + i * L + j0 + js, x + js, nj - js);
          const A* cb = w.colbias.data() + j0;
          for (int64_t c = js; c < nj; ++c) x[c] = cb[c] == neg_inf<A>() ? A(0) : x[c];
          sb[i] = gp_row_accumulate(static_cast<const A*>(x), eb + j0, nj);
        }
        w.grads(p, i0, bi, j0, nj, dqr.data(), dkt.data());
      }
      gp_store_unrotated(dqr.data(), n, L, D, p.cs, p.sn, p.rope, p.interleaved, p.scale, dq + t * L * D);
      for (int64_t j = 0; j < n; ++j)
        for (int64_t d = 0; d < D; ++d) dkr[j * D + d] = dkt[d * L + j];
      gp_store_unrotated(dkr.data(), n, L, D, p.cs, p.sn, p.rope, p.interleaved, p.scale, dk + t * L * D);
    }
  });
}

// ---- fused GlobalPointer + ZLPR ----------------------------------------------------------------
// Per (b, h): lse_neg = log(1 + sum_{negative cells} e^s), lse_pos = log(1 + sum_{positive} e^-s),
// each a running (max, sum) that starts at (0, 1): the "1 +" is the e^0 term.
template <typename T, typename A>
void gp_loss_forward(const GpProblem<T, A>& p, const int64_t* spans, int64_t P, A* loss, A* lse_neg, A* lse_pos) {
  const int64_t L = p.L;
  at::parallel_for(0, p.B * p.H, 1, [&](int64_t t0, int64_t t1) {
    GpWork<T, A> w(p, false);
    std::vector<int64_t> pos;
    std::vector<A> pv;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / p.H, h = t % p.H;
      w.prepare(p, b, h);
      gp_positives(p, spans, P, b, h, pos);
      pv.clear();
      const int64_t n = w.n, np = int64_t(pos.size());
      A m_neg = 0, s_neg = 1;
      int64_t pi = 0;
      for (int64_t i0 = 0; i0 < n; i0 += kGpRowBlock) {
        const int64_t bi = std::min(kGpRowBlock, n - i0), j0 = w.j0(p, i0), nj = n - j0;
        w.score(p, i0, bi, j0, nj);
        for (int64_t r = 0; r < bi; ++r) {
          const int64_t i = i0 + r;
          if (!w.rowok[i]) continue;  // positives never sit on a padded row
          A* x = w.tile.data() + r * nj;
          const int64_t js = w.finish_row(p, x, i, j0, nj);
          for (; pi < np && pos[pi] / L == i; ++pi) {  // positives of row i leave the negatives
            A& cell = x[pos[pi] % L - j0];
            pv.push_back(-cell);
            cell = neg_inf<A>();
          }
          const A m = gp_row_max(x + js, nj - js, m_neg);
          s_neg = s_neg * std::exp(m_neg - m) + gp_row_sum_exp(x + js, nj - js, m);
          m_neg = m;
        }
      }
      const A m_pos = gp_row_max(pv.data(), int64_t(pv.size()), A(0));
      const A s_pos = std::exp(-m_pos) + gp_row_sum_exp(pv.data(), int64_t(pv.size()), m_pos);
      lse_neg[t] = m_neg + std::log(s_neg);
      lse_pos[t] = m_pos + std::log(s_pos);
      loss[t] = lse_neg[t] + lse_pos[t];
    }
  });
}

// d loss / d s = e^{s - lse_neg} at a negative cell, -e^{-s - lse_pos} at a positive one.
template <typename T, typename A>
void gp_loss_backward(const GpProblem<T, A>& p, const int64_t* spans, int64_t P, const A* grad_loss,
                      int64_t grad_stride, const A* lse_neg, const A* lse_pos, T* dq, T* dk, A* dsb, A* deb) {
  const int64_t L = p.L, D = p.D;
  at::parallel_for(0, p.B * p.H, 1, [&](int64_t t0, int64_t t1) {
    GpWork<T, A> w(p, true);
    std::vector<A> dqr(L * D), dkr(L * D), dkt(L * D), pv;
    std::vector<int64_t> pos;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / p.H, h = t % p.H;
      w.prepare(p, b, h);
      gp_positives(p, spans, P, b, h, pos);
      const int64_t n = w.n, np = int64_t(pos.size());
      const A g = grad_loss[t * grad_stride], ln = lse_neg[t], lp = lse_pos[t];
      std::fill(dqr.begin(), dqr.begin() + n * D, A(0));
      std::fill(dkt.begin(), dkt.end(), A(0));
      A* sb = dsb + t * L;
      A* eb = deb + t * L;
      std::fill(sb, sb + L, A(0));
      std::fill(eb, eb + L, A(0));
      int64_t pi = 0;
      for (int64_t i0 = 0; i0 < n && g != A(0); i0 += kGpRowBlock) {
        const int64_t bi = std::min(kGpRowBlock, n - i0), j0 = w.j0(p, i0), nj = n - j0;
        w.score(p, i0, bi, j0, nj);
        for (int64_t r = 0; r < bi; ++r) {
          const int64_t i = i0 + r;
          A* x = w.tile.data() + r * nj;
          if (!w.rowok[i]) {
            std::fill(x, x + nj, A(0));
            continue;
          }
          const int64_t js = w.finish_row(p, x, i, j0, nj);
          std::fill(x, x + js, A(0));
          const int64_t pb = pi;
          pv.clear();
          for (; pi < np && pos[pi] / L == i; ++pi) pv.push_back(x[pos[pi] % L - j0]);
          gp_row_exp_scale(x + js, nj - js, ln, g);
          for (int64_t u = 0; u < pi - pb; ++u) x[pos[pb + u] % L - j0] = -g * std::exp(-pv[u] - lp);
          sb[i] = gp_row_accumulate(static_cast<const A*>(x), eb + j0, nj);
        }
        w.grads(p, i0, bi, j0, nj, dqr.data(), dkt.data());
      }
      gp_store_unrotated(dqr.data(), n, L, D, p.cs, p.sn, p.rope, p.interleaved, p.scale, dq + t * L * D);
      for (int64_t j = 0; j < n; ++j)
        for (int64_t d = 0; d < D; ++d) dkr[j * D + d] = dkt[d * L + j];
      gp_store_unrotated(dkr.data(), n, L, D, p.cs, p.sn, p.rope, p.interleaved, p.scale, dk + t * L * D);
    }
  });
}

// ---- dense ZLPR rows: logits (N, C), labels (N, C) of type Y (bool or the logits dtype) ----------
// Sets *bad when a label is outside [0, 1] or NaN.
template <typename T, typename Y, typename A>
void mcce_forward(const T* x, int64_t ldx, const Y* y, int64_t ldy, int64_t N, int64_t C, A* loss, A* lse_neg,
                  A* lse_pos, std::atomic<bool>* bad) {
  at::parallel_for(0, N, std::max<int64_t>(1, (int64_t(1) << 15) / C), [&](int64_t r0, int64_t r1) {
    std::vector<A> xb(C), yb(C), nb(C), pb(C);
    for (int64_t r = r0; r < r1; ++r) {
      convert(x + r * ldx, xb.data(), C);
      const Y* yr = y + r * ldy;
      bool ok = true;
      for (int64_t c = 0; c < C; ++c) {
        const A v = static_cast<A>(yr[c]);
        ok &= v >= A(0) && v <= A(1);
        yb[c] = v;
      }
      if (!ok) bad->store(true, std::memory_order_relaxed);
      // Terms log(w) + s; a zero weight or a -inf logit gives -inf, which adds nothing.
      for (int64_t c = 0; c < C; ++c) {
        const A s = xb[c];
        const bool fin = s != neg_inf<A>();
        const A wn = A(1) - yb[c], wp = yb[c];
        nb[c] = (fin && wn > 0) ? s + std::log(wn) : neg_inf<A>();
        pb[c] = (fin && wp > 0) ? -s + std::log(wp) : neg_inf<A>();
      }
      const A mn = gp_row_max(nb.data(), C, A(0)), mp = gp_row_max(pb.data(), C, A(0));
      const A ln = mn + std::log(std::exp(-mn) + gp_row_sum_exp(nb.data(), C, mn));
      const A lp = mp + std::log(std::exp(-mp) + gp_row_sum_exp(pb.data(), C, mp));
      lse_neg[r] = ln;
      lse_pos[r] = lp;
      loss[r] = ln + lp;
    }
  });
}

template <typename T, typename Y, typename A>
void mcce_backward(const A* g, int64_t gs, const T* x, int64_t ldx, const Y* y, int64_t ldy, int64_t N, int64_t C,
                   const A* lse_neg, const A* lse_pos, T* out) {
  at::parallel_for(0, N, std::max<int64_t>(1, (int64_t(1) << 15) / C), [&](int64_t r0, int64_t r1) {
    std::vector<A> xb(C), nb(C), pb(C);
    for (int64_t r = r0; r < r1; ++r) {
      convert(x + r * ldx, xb.data(), C);
      const Y* yr = y + r * ldy;
      const A gr = g[r * gs];
      for (int64_t c = 0; c < C; ++c) {
        const A s = xb[c], wp = static_cast<A>(yr[c]), wn = A(1) - wp;
        const bool fin = s != neg_inf<A>();
        nb[c] = (fin && wn > 0) ? s + std::log(wn) : neg_inf<A>();
        pb[c] = (fin && wp > 0) ? -s + std::log(wp) : neg_inf<A>();
      }
      gp_row_exp_scale(nb.data(), C, lse_neg[r], gr);
      gp_row_exp_scale(pb.data(), C, lse_pos[r], gr);
      for (int64_t c = 0; c < C; ++c) xb[c] = nb[c] - pb[c];
      convert(static_cast<const A*>(xb.data()), out + r * C, C);
    }
  });
}

// ---- sparse ZLPR rows: positives pos (N, P) int64 (validated by the host) ------------------------
// The negative sum runs over the negatives themselves (positives set to -inf in a row copy).
inline void smcce_row_positives(const int64_t* pr, int64_t P, bool mask_zero, std::vector<int64_t>& out) {
  out.clear();
  for (int64_t t = 0; t < P; ++t) {
    const int64_t c = pr[t];
    if (c < 0 || (mask_zero && c == 0)) continue;
    out.push_back(c);
  }
  std::sort(out.begin(), out.end());
  out.erase(std::unique(out.begin(), out.end()), out.end());
}

template <typename T, typename A>
void smcce_forward(const T* x, int64_t ldx, const int64_t* pos, int64_t P, int64_t N, int64_t C, bool mask_zero,
                   A* loss, A* lse_neg, A* lse_pos) {
  at::parallel_for(0, N, std::max<int64_t>(1, (int64_t(1) << 15) / C), [&](int64_t r0, int64_t r1) {
    std::vector<A> xb(C), pv;
    std::vector<int64_t> pi;
    for (int64_t r = r0; r < r1; ++r) {
      convert(x + r * ldx, xb.data(), C);
      smcce_row_positives(pos + r * P, P, mask_zero, pi);
      pv.clear();
      for (int64_t c : pi) {
        if (xb[c] != neg_inf<A>()) pv.push_back(-xb[c]);
        xb[c] = neg_inf<A>();
      }
      if (mask_zero) xb[0] = neg_inf<A>();
      const A mn = gp_row_max(xb.data(), C, A(0));
      const A ln = mn + std::log(std::exp(-mn) + gp_row_sum_exp(xb.data(), C, mn));
      const int64_t np = int64_t(pv.size());
      const A mp = gp_row_max(pv.data(), np, A(0));
      const A lp = mp + std::log(std::exp(-mp) + gp_row_sum_exp(pv.data(), np, mp));
      lse_neg[r] = ln;
      lse_pos[r] = lp;
      loss[r] = ln + lp;
    }
  });
}

template <typename T, typename A>
void smcce_backward(const A* g, int64_t gs, const T* x, int64_t ldx, const int64_t* pos, int64_t P, int64_t N,
                    int64_t C, bool mask_zero, const A* lse_neg, const A* lse_pos, T* out) {
  at::parallel_for(0, N, std::max<int64_t>(1, (int64_t(1) << 15) / C), [&](int64_t r0, int64_t r1) {
    std::vector<A> xb(C), pv;
    std::vector<int64_t> pi;
    for (int64_t r = r0; r < r1; ++r) {
      convert(x + r * ldx, xb.data(), C);
      smcce_row_positives(pos + r * P, P, mask_zero, pi);
      pv.clear();
      for (int64_t c : pi) {
        pv.push_back(xb[c]);
        xb[c] = neg_inf<A>();
      }
      if (mask_zero) xb[0] = neg_inf<A>();
      const A gr = g[r * gs];
      gp_row_exp_scale(xb.data(), C, lse_neg[r], gr);
      for (size_t u = 0; u < pi.size(); ++u)
        xb[pi[u]] = pv[u] == neg_inf<A>() ? A(0) : -gr * std::exp(-pv[u] - lse_pos[r]);
      convert(static_cast<const A*>(xb.data()), out + r * C, C);
    }
  });
}
