// Kernels of RoPE and fused RoPE attention (csrc/cpu/rope_attention.cpp), compiled once per ISA
// level by common/isa_kernels.h (no include guard, no #include: see that header).
//
// A rotation table row holds, for one position, C[j] = cos(angle of pair(j)) and S[j] = the
// signed sin (-sin on the first member of a pair, +sin on the second) for the rotary_dim rotated
// channels, so x' = x * C + partner(x) * S, where partner swaps the two members of each pair:
// neighbours (2i, 2i+1) when interleaved, halves (i, i + rotary_dim/2) otherwise. The inverse
// rotation (the backward) flips the sign of S.
//
// Attention (flash-style, Dao et al. 2022, "FlashAttention"): per query block, scores
// S = (scale * R(q)) R(k)^T one key block at a time with cpublas::gemm, an online softmax (running
// max and sum, output rescaled when the max rises), P V accumulated by a second gemm. q rows are
// rotated and scaled while packed into the block buffer; each thread rotates (and converts) the
// keys of the head it works on once into its own buffer, reused by every query block of that head.

// ---- vector helpers ---------------------------------------------------------------------------
inline vfloat vswap_pairs(vfloat v) {
#if KX_ISA_LEVEL == 2
  return __builtin_shuffle(v, vint{1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14});
#elif KX_ISA_LEVEL == 1
  return __builtin_shuffle(v, vint{1, 0, 3, 2, 5, 4, 7, 6});
#else
  return __builtin_shuffle(v, vint{1, 0, 3, 2});
#endif
}

// out[0..n) = mul * x[0..n) (x strided by xs), in the accumulation type.
template <typename T, typename A>
inline void load_row(const T* x, int64_t xs, A* out, int64_t n, A mul) {
  if (xs == 1) {
    convert(x, out, n);
  } else {
    for (int64_t i = 0; i < n; ++i) out[i] = static_cast<A>(x[i * xs]);
  }
  if (mul != A(1))
    for (int64_t i = 0; i < n; ++i) out[i] *= mul;
}

// y[0..n) = in[0..n) * mul (in is scratch: scaled in place), rounded to T (contiguous y).
template <typename T, typename A>
inline void store_row(A* in, T* y, int64_t n, A mul) {
  if (mul != A(1))
    for (int64_t i = 0; i < n; ++i) in[i] *= mul;
  convert(in, y, n);
}

// Rotates the first rd channels of x in place with one table row (C, S), sgn = +1 or -1.
template <typename A>
inline void rotate_inplace(A* x, const A* C, const A* S, int64_t rd, bool interleaved, A sgn) {
  if (interleaved) {
    for (int64_t j = 0; j < rd; j += 2) {
      const A a = x[j], b = x[j + 1];
      x[j] = a * C[j] + b * (sgn * S[j]);
      x[j + 1] = b * C[j + 1] + a * (sgn * S[j + 1]);
    }
  } else {
    const int64_t h = rd / 2;
    for (int64_t i = 0; i < h; ++i) {
      const A a = x[i], b = x[i + h];
      x[i] = a * C[i] + b * (sgn * S[i]);
      x[i + h] = b * C[i + h] + a * (sgn * S[i + h]);
    }
  }
}

inline void rotate_inplace(float* x, const float* C, const float* S, int64_t rd, bool interleaved, float sgn) {
  const vfloat g = vbroadcast(sgn);
  if (interleaved) {
    int64_t j = 0;
    for (; j + kLanes <= rd; j += kLanes) {  // kLanes is even: pairs never straddle vectors
      const vfloat v = vload(x + j);
      vstore(x + j, v * vload(C + j) + vswap_pairs(v) * (vload(S + j) * g));
    }
    for (; j < rd; j += 2) {
      const float a = x[j], b = x[j + 1];
      x[j] = a * C[j] + b * (sgn * S[j]);
      x[j + 1] = b * C[j + 1] + a * (sgn * S[j + 1]);
    }
  } else {
    const int64_t h = rd / 2;
    int64_t i = 0;
    for (; i + kLanes <= h; i += kLanes) {
      const vfloat a = vload(x + i), b = vload(x + i + h);
      vstore(x + i, a * vload(C + i) + b * (vload(S + i) * g));
      vstore(x + i + h, b * vload(C + i + h) + a * (vload(S + i + h) * g));
    }
    for (; i < h; ++i) {
      const float a = x[i], b = x[i + h];
      x[i] = a * C[i] + b * (sgn * S[i]);
      x[i + h] = b * C[i + h] + a * (sgn * S[i + h]);
    }
  }
}

// row[j] += bias[j] (0 or -inf) when bias is given; returns max over row[0..n) (-inf if n == 0).
template <typename A>
inline A row_bias_max(A* row, const A* bias, int64_t n) {
  A m = neg_inf<A>();
  for (int64_t j = 0; j < n; ++j) {
    if (bias != nullptr) row[j] += bias[j];
    m = row[j] > m ? row[j] : m;
  }
  return m;
}

inline float row_bias_max(float* row, const float* bias, int64_t n) {
  vfloat vm = vbroadcast(neg_inf<float>());
  int64_t j = 0;
  if (bias != nullptr) {
    for (; j + kLanes <= n; j += kLanes) {
      const vfloat v = vload(row + j) + vload(bias + j);
      vstore(row + j, v);
      vm = vmax(vm, v);
    }
  } else {
    for (; j + 2 * kLanes <= n; j += 2 * kLanes) vm = vmax(vmax(vm, vload(row + j)), vload(row + j + kLanes));
    for (; j + kLanes <= n; j += kLanes) vm = vmax(vm, vload(row + j));
  }
  float m = hmax(vm);
  for (; j < n; ++j) {
    if (bias != nullptr) row[j] += bias[j];
    m = row[j] > m ? row[j] : m;
  }
  return m;
}

// row[j] = exp(row[j] - sub) for j < n, 0 for n <= j < n_total; returns the sum.
template <typename A>
inline A row_exp_sum(A* row, int64_t n, int64_t n_total, A sub) {
  A s = 0;
  for (int64_t j = 0; j < n; ++j) {
    row[j] = std::exp(row[j] - sub);
    s += row[j];
  }
  for (int64_t j = n; j < n_total; ++j) row[j] = 0;
  return s;
}

inline float row_exp_sum(float* row, int64_t n, int64_t n_total, float sub) {
  const vfloat vs = vbroadcast(sub);
  vfloat acc = vbroadcast(0.f);
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    const vfloat e = vexp(vload(row + j) - vs);
    vstore(row + j, e);
    acc += e;
  }
  if (j < n) {
    const vfloat e = vexp(vload_partial(row + j, n - j, neg_inf<float>()) - vs);
    vstore_partial(row + j, e, n - j);
    acc += e;
  }
  for (j = n; j < n_total; ++j) row[j] = 0.f;
  return hsum(acc);
}

template <typename A>
inline void row_scale(A* row, int64_t n, A f) {
  for (int64_t j = 0; j < n; ++j) row[j] *= f;
}

inline void row_scale(float* row, int64_t n, float f) {
  const vfloat vf = vbroadcast(f);
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) vstore(row + j, vload(row + j) * vf);
  for (; j < n; ++j) row[j] *= f;
}

// ds[j] = p[j] * (ds[j] - d) (ds holds dP on entry).
template <typename A>
inline void row_softmax_grad(const A* p, A* ds, int64_t n, A d) {
  for (int64_t j = 0; j < n; ++j) ds[j] = p[j] * (ds[j] - d);
}

inline void row_softmax_grad(const float* p, float* ds, int64_t n, float d) {
  const vfloat vd = vbroadcast(d);
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) vstore(ds + j, vload(p + j) * (vload(ds + j) - vd));
  for (; j < n; ++j) ds[j] = p[j] * (ds[j] - d);
}

template <typename A>
inline A row_dot(const A* a, const A* b, int64_t n) {
  A s = 0;
  for (int64_t j = 0; j < n; ++j) s += a[j] * b[j];
  return s;
}

inline float row_dot(const float* a, const float* b, int64_t n) {
  vfloat acc = vbroadcast(0.f);
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) acc += vload(a + j) * vload(b + j);
  float s = hsum(acc);
  for (; j < n; ++j) s += a[j] * b[j];
  return s;
}

// ---- apply_rope -------------------------------------------------------------------------------
// x (B, H, L, D) strided -> y contiguous (B, H, L, D). Table rows (nb, L, 2 * rd): C then S.
template <typename T>
void rope_apply(const RopeArgs& a) {
  using A = acc_t<T>;
  const T* x = static_cast<const T*>(a.x);
  T* y = static_cast<T*>(a.y);
  const A* tab = static_cast<const A*>(a.table);
  const int64_t rows = a.B * a.H * a.L, D = a.D, rd = a.rd;
  const A sgn = a.inverse ? A(-1) : A(1);
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(D, 1));
  at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
    std::vector<A> buf(D);
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t l = r % a.L, bh = r / a.L, h = bh % a.H, b = bh / a.H;
      load_row(x + b * a.sxb + h * a.sxh + l * a.sxl, a.sxd, buf.data(), D, A(1));
      const A* t = tab + (b * a.tab_bs + l) * 2 * rd;
      rotate_inplace(buf.data(), t, t + rd, rd, a.interleaved, sgn);
      store_row(buf.data(), y + r * D, D, A(1));
    }
  });
}

// ---- fused attention --------------------------------------------------------------------------
// Row-major tile product C (M, N) = A (M, K) B (K, N) (+ C when add): ATen's cpublas::brgemm in
// float32 (oneDNN's JIT micro-kernel where the CPU has one, else the BLAS sgemm), plain loops in
// float64 (gradcheck only).
inline void tile_gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb,
                      float* C, int64_t ldc, bool add) {
  at::native::cpublas::brgemm(M, N, K, lda, ldb, ldc, add, A, B, C, false);
}

inline void tile_gemm(int64_t M, int64_t N, int64_t K, const double* A, int64_t lda, const double* B,
                      int64_t ldb, double* C, int64_t ldc, bool add) {
  for (int64_t i = 0; i < M; ++i) {
    double* c = C + i * ldc;
    if (!add)
      for (int64_t j = 0; j < N; ++j) c[j] = 0;
    for (int64_t p = 0; p < K; ++p) {
      const double a = A[i * lda + p];
      const double* b = B + p * ldb;
      for (int64_t j = 0; j < N; ++j) c[j] += a * b[j];
    }
  }
}

// dst (cols, rows) = src (rows, cols)^T, leading dims lds, ldd.
template <typename A>
inline void transpose(const A* src, int64_t lds, A* dst, int64_t ldd, int64_t rows, int64_t cols) {
  constexpr int64_t kTile = 8;
  for (int64_t r0 = 0; r0 < rows; r0 += kTile)
    for (int64_t c0 = 0; c0 < cols; c0 += kTile) {
      const int64_t r1 = std::min(rows, r0 + kTile), c1 = std::min(cols, c0 + kTile);
      for (int64_t c = c0; c < c1; ++c)
        for (int64_t r = r0; r < r1; ++r) dst[c * ldd + r] = src[r * lds + c];
    }
}

// Causal (bottom-right aligned): query row i sees keys j <= i + Lk - Lq. Number of keys of the
// block starting at n0 (of kn keys) that row i sees, in [0, kn].
inline int64_t causal_cols(int64_t i, int64_t n0, int64_t kn, int64_t Lq, int64_t Lk) {
  const int64_t c = i + Lk - Lq - n0 + 1;
  return c < 0 ? 0 : (c > kn ? kn : c);
}

// Keys [0, kend) hold every key some row of the query block [m0, m0 + qn) sees.
inline int64_t key_end(const AttnArgs& a, int64_t m0, int64_t qn) {
  if (!a.causal) return a.Lk;
  const int64_t e = m0 + qn - 1 + a.Lk - a.Lq + 1;
  return e < 0 ? 0 : (e > a.Lk ? a.Lk : e);
}

// What each thread keeps of the head (b, hk) it works on: the rotated keys row-major kr (Lk, D)
// and/or transposed kt (D, Lk), v (in place when it is float32 with unit stride, else converted
// into vc (Lk, Dv)) and the padding bias (0 / -inf).
template <typename T, typename A>
struct HeadPack {
  std::vector<A> kr, kt, vc, bias, tmp;
  const A* v = nullptr;
  int64_t ldv = 0;
  int64_t cur = -1;

  void load(const AttnArgs& a, int64_t b, int64_t hk, bool want_rows, bool want_cols) {
    if (cur == b * a.Hk + hk) return;
    cur = b * a.Hk + hk;
    const T* k = static_cast<const T*>(a.k) + b * a.skb + hk * a.skh;
    const T* vs = static_cast<const T*>(a.v) + b * a.svb + hk * a.svh;
    const A* tab = static_cast<const A*>(a.ktab);
    constexpr int64_t kChunk = 16;  // keys rotated into tmp, then written transposed
    if (want_rows) kr.resize(a.Lk * a.D);
    if (want_cols) kt.resize(a.Lk * a.D);
    tmp.resize(kChunk * a.D);
    for (int64_t j0 = 0; j0 < a.Lk; j0 += kChunk) {
      const int64_t jn = std::min(kChunk, a.Lk - j0);
      A* rows = want_rows ? kr.data() + j0 * a.D : tmp.data();
      for (int64_t j = 0; j < jn; ++j) {
        A* row = rows + j * a.D;
        load_row(k + (j0 + j) * a.skl, a.skd, row, a.D, A(1));
        if (a.rope) {
          const A* t = tab + (b * a.ktab_bs + a.ktab_row0 + j0 + j) * 2 * a.rd;
          rotate_inplace(row, t, t + a.rd, a.rd, a.interleaved, A(1));
        }
      }
      if (want_cols) transpose(rows, a.D, kt.data() + j0, a.Lk, jn, a.D);
    }
    if (std::is_same<T, A>::value && a.svd == 1) {
      v = reinterpret_cast<const A*>(vs);
      ldv = a.svl;
    } else {
      vc.resize(a.Lk * a.Dv);
      for (int64_t j = 0; j < a.Lk; ++j) load_row(vs + j * a.svl, a.svd, vc.data() + j * a.Dv, a.Dv, A(1));
      v = vc.data();
      ldv = a.Dv;
    }
    if (a.mask != nullptr) {
      bias.resize(a.Lk);
      const bool* mk = a.mask + b * a.smb;
      for (int64_t j = 0; j < a.Lk; ++j) bias[j] = mk[j * a.sml] ? A(0) : neg_inf<A>();
    }
  }
};

// Rotated, scaled query rows [m0, m0 + qn) of head (b, h) into qs (qn, D).
template <typename T, typename A>
inline void pack_queries(const AttnArgs& a, int64_t b, int64_t h, int64_t m0, int64_t qn, A* qs) {
  const T* q = static_cast<const T*>(a.q) + b * a.sqb + h * a.sqh;
  const A* tab = static_cast<const A*>(a.qtab);
  for (int64_t r = 0; r < qn; ++r) {
    A* row = qs + r * a.D;
    load_row(q + (m0 + r) * a.sql, a.sqd, row, a.D, A(1));
    if (a.rope) {
      const A* t = tab + (b * a.qtab_bs + a.qtab_row0 + m0 + r) * 2 * a.rd;
      rotate_inplace(row, t, t + a.rd, a.rd, a.interleaved, A(1));
    }
    row_scale(row, a.D, static_cast<A>(a.scale));
  }
}

template <typename T>
void attn_forward(const AttnArgs& a) {
  using A = acc_t<T>;
  const int64_t qbs = a.q_block, kbs = a.k_block;
  const int64_t nqb = (a.Lq + qbs - 1) / qbs, group = a.Hq / a.Hk;
  T* out = static_cast<T*>(a.out);
  A* lse = static_cast<A*>(a.lse);
  at::parallel_for(0, a.B * a.Hq * nqb, 1, [&](int64_t t0, int64_t t1) {
    HeadPack<T, A> hp;
    std::vector<A> qs(qbs * a.D), s(qbs * kbs), o(qbs * a.Dv), mx(qbs), sm(qbs);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t qb = t % nqb, bh = t / nqb, h = bh % a.Hq, b = bh / a.Hq, hk = h / group;
      const int64_t m0 = qb * qbs, qn = std::min(qbs, a.Lq - m0);
      const int64_t kend = key_end(a, m0, qn);
      if (kend > 0) hp.load(a, b, hk, false, true);
      pack_queries<T, A>(a, b, h, m0, qn, qs.data());
      for (int64_t r = 0; r < qn; ++r) {
        mx[r] = neg_inf<A>();
        sm[r] = 0;
      }
      const A* bias = a.mask != nullptr ? hp.bias.data() : nullptr;
      for (int64_t n0 = 0; n0 < kend; n0 += kbs) {
        const int64_t kn = std::min(kbs, kend - n0);
        const bool first = n0 == 0;
        tile_gemm(qn, kn, a.D, qs.data(), a.D, hp.kt.data() + n0, a.Lk, s.data(), kn, false);
        for (int64_t r = 0; r < qn; ++r) {
          A* row = s.data() + r * kn;
          const int64_t nc = a.causal ? causal_cols(m0 + r, n0, kn, a.Lq, a.Lk) : kn;
          const A bm = row_bias_max(row, bias != nullptr ? bias + n0 : nullptr, nc);
          const A mnew = bm > mx[r] ? bm : mx[r];
          if (mnew == neg_inf<A>()) {  // nothing seen yet: P = 0
            for (int64_t j = 0; j < kn; ++j) row[j] = 0;
            continue;
          }
          const A ps = row_exp_sum(row, nc, kn, mnew);
          const A alpha = mx[r] == neg_inf<A>() ? A(0) : std::exp(mx[r] - mnew);
          sm[r] = sm[r] * alpha + ps;
          mx[r] = mnew;
          if (!first && alpha != A(1)) row_scale(o.data() + r * a.Dv, a.Dv, alpha);
        }
        tile_gemm(qn, a.Dv, kn, s.data(), kn, hp.v + n0 * hp.ldv, hp.ldv, o.data(), a.Dv, !first);
      }
      T* ob = out + ((b * a.Hq + h) * a.Lq + m0) * a.Dv;
      A* lb = lse + (b * a.Hq + h) * a.Lq + m0;
      for (int64_t r = 0; r < qn; ++r) {
        A* orow = o.data() + r * a.Dv;
        if (kend == 0 || sm[r] == A(0)) {  // fully masked row: zeros, lse = +inf
          for (int64_t j = 0; j < a.Dv; ++j) orow[j] = 0;
          store_row(orow, ob + r * a.Dv, a.Dv, A(1));
          lb[r] = std::numeric_limits<A>::infinity();
        } else {
          store_row(orow, ob + r * a.Dv, a.Dv, A(1) / sm[r]);
          lb[r] = mx[r] + std::log(sm[r]);
        }
      }
    }
  });
}

// p[i] = exp(p[i] + bias - lse[i]) for i0 <= i < n, 0 below i0 (one key row of P^T).
template <typename A>
inline void col_exp(A* p, const A* lse, int64_t i0, int64_t n, A bias) {
  for (int64_t i = 0; i < i0; ++i) p[i] = 0;
  for (int64_t i = i0; i < n; ++i) p[i] = std::exp(p[i] + bias - lse[i]);
}

inline void col_exp(float* p, const float* lse, int64_t i0, int64_t n, float bias) {
  for (int64_t i = 0; i < i0; ++i) p[i] = 0.f;
  const vfloat vb = vbroadcast(bias);
  int64_t i = i0;
  for (; i + kLanes <= n; i += kLanes) vstore(p + i, vexp(vload(p + i) + vb - vload(lse + i)));
  for (; i < n; ++i) p[i] = sexp(p[i] + bias - lse[i]);
}

// ds[i] = p[i] * (ds[i] - di[i]) (one key row of dS^T; ds holds dP^T on entry).
template <typename A>
inline void col_softmax_grad(const A* p, A* ds, const A* di, int64_t n) {
  for (int64_t i = 0; i < n; ++i) ds[i] = p[i] * (ds[i] - di[i]);
}

inline void col_softmax_grad(const float* p, float* ds, const float* di, int64_t n) {
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) vstore(ds + i, vload(p + i) * (vload(ds + i) - vload(di + i)));
  for (; i < n; ++i) ds[i] = p[i] * (ds[i] - di[i]);
}

// Backward (FlashAttention-2 order, in transposed form so that every product is a row-major
// brgemm): one task per (batch, kv head); the task loops over the query heads of its group and
// their query blocks, recomputes P^T = exp(S^T - lse) per key block and accumulates
// dV += P^T dO, dS^T = P^T * (V dO^T - rowsum(dO * O)), dK += dS^T (scale Q), dQ^T += K^T dS^T
// in float buffers; dQ (times scale) and dK are rotated back (inverse RoPE) as they are written.
template <typename T>
void attn_backward(const AttnArgs& a) {
  using A = acc_t<T>;
  const int64_t qbs = a.q_block, kbs = a.k_block, group = a.Hq / a.Hk;
  const T* gout = static_cast<const T*>(a.gout);
  const T* outp = static_cast<const T*>(a.out_in);
  const A* lse = static_cast<const A*>(a.lse_in);
  T* dq = static_cast<T*>(a.dq);
  T* dk = static_cast<T*>(a.dk);
  T* dv = static_cast<T*>(a.dv);
  const A* qtab = static_cast<const A*>(a.qtab);
  const A* ktab = static_cast<const A*>(a.ktab);
  at::parallel_for(0, a.B * a.Hk, 1, [&](int64_t t0, int64_t t1) {
    HeadPack<T, A> hp;
    std::vector<A> dka(a.Lk * a.D), dva(a.Lk * a.Dv);
    std::vector<A> qs(qbs * a.D), qst(qbs * a.D), dob(qbs * a.Dv), dot(qbs * a.Dv), orow(a.Dv), di(qbs),
        lr(qbs), dqt(qbs * a.D), drow(a.D);
    std::vector<A> p(kbs * qbs), ds(kbs * qbs);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t hk = t % a.Hk, b = t / a.Hk;
      hp.load(a, b, hk, true, true);
      const A* bias = a.mask != nullptr ? hp.bias.data() : nullptr;
      std::fill(dka.begin(), dka.end(), A(0));
      std::fill(dva.begin(), dva.end(), A(0));
      for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
        for (int64_t m0 = 0; m0 < a.Lq; m0 += qbs) {
          const int64_t qn = std::min(qbs, a.Lq - m0);
          const int64_t kend = key_end(a, m0, qn);
          T* dqb = dq + ((b * a.Hq + h) * a.Lq + m0) * a.D;
          if (kend == 0) {
            std::fill(drow.begin(), drow.end(), A(0));
            for (int64_t r = 0; r < qn; ++r) store_row(drow.data(), dqb + r * a.D, a.D, A(1));
            continue;
          }
          pack_queries<T, A>(a, b, h, m0, qn, qs.data());
          transpose(qs.data(), a.D, qst.data(), qn, qn, a.D);
          for (int64_t r = 0; r < qn; ++r) {
            const int64_t i = m0 + r;
            load_row(gout + b * a.sgb + h * a.sgh + i * a.sgl, a.sgd, dob.data() + r * a.Dv, a.Dv, A(1));
            load_row(outp + b * a.sob + h * a.soh + i * a.sol, a.sod, orow.data(), a.Dv, A(1));
            di[r] = row_dot(dob.data() + r * a.Dv, orow.data(), a.Dv);
            lr[r] = lse[(b * a.Hq + h) * a.Lq + i];
          }
          transpose(dob.data(), a.Dv, dot.data(), qn, qn, a.Dv);
          std::fill(dqt.begin(), dqt.begin() + a.D * qn, A(0));
          for (int64_t n0 = 0; n0 < kend; n0 += kbs) {
            const int64_t kn = std::min(kbs, kend - n0);
            tile_gemm(kn, qn, a.D, hp.kr.data() + n0 * a.D, a.D, qst.data(), qn, p.data(), qn, false);
            for (int64_t j = 0; j < kn; ++j) {
              // first query of the block that sees key n0 + j (causal), lse = +inf gives P = 0
              int64_t i0 = a.causal ? n0 + j - (a.Lk - a.Lq) - m0 : 0;
              i0 = i0 < 0 ? 0 : (i0 > qn ? qn : i0);
              col_exp(p.data() + j * qn, lr.data(), i0, qn, bias != nullptr ? bias[n0 + j] : A(0));
            }
            tile_gemm(kn, a.Dv, qn, p.data(), qn, dob.data(), a.Dv, dva.data() + n0 * a.Dv, a.Dv, true);
            tile_gemm(kn, qn, a.Dv, hp.v + n0 * hp.ldv, hp.ldv, dot.data(), qn, ds.data(), qn, false);
            for (int64_t j = 0; j < kn; ++j) col_softmax_grad(p.data() + j * qn, ds.data() + j * qn, di.data(), qn);
            tile_gemm(kn, a.D, qn, ds.data(), qn, qs.data(), a.D, dka.data() + n0 * a.D, a.D, true);
            tile_gemm(a.D, qn, kn, hp.kt.data() + n0, a.Lk, ds.data(), qn, dqt.data(), qn, true);
          }
          for (int64_t r = 0; r < qn; ++r) {
            for (int64_t c = 0; c < a.D; ++c) drow[c] = dqt[c * qn + r] * static_cast<A>(a.scale);
            if (a.rope) {
              const A* tb = qtab + (b * a.qtab_bs + a.qtab_row0 + m0 + r) * 2 * a.rd;
              rotate_inplace(drow.data(), tb, tb + a.rd, a.rd, a.interleaved, A(-1));
            }
            store_row(drow.data(), dqb + r * a.D, a.D, A(1));
          }
        }
      }
      T* dkb = dk + (b * a.Hk + hk) * a.Lk * a.D;
      T* dvb = dv + (b * a.Hk + hk) * a.Lk * a.Dv;
      for (int64_t j = 0; j < a.Lk; ++j) {
        A* row = dka.data() + j * a.D;
        if (a.rope) {
          const A* tb = ktab + (b * a.ktab_bs + a.ktab_row0 + j) * 2 * a.rd;
          rotate_inplace(row, tb, tb + a.rd, a.rd, a.interleaved, A(-1));
        }
        store_row(row, dkb + j * a.D, a.D, A(1));
        store_row(dva.data() + j * a.Dv, dvb + j * a.Dv, a.Dv, A(1));
      }
    }
  });
}
