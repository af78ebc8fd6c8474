// Kernels of causal / non-causal linear attention (csrc/cpu/linear_attention.cpp), compiled once
// per ISA level by common/isa_kernels.h (no include guard, no #include: see that file).
//
// One task = one (batch, head) and one pass; the sequence runs in chunks of LaArgs::chunk positions.
// Per chunk the inputs are loaded into float32 (float64 for float64 inputs) row-major tiles, the
// feature map and RoPE applied there, and the chunk products go to ATen's cpublas::gemm on those
// tiles. The running state S (Dk x Dv) and z (Dk) stay in the accumulation type across chunks.

constexpr int64_t kMaxChunk = 128;  // LaArgs::chunk is at most this (tile sizes)

// ---- small row-major GEMM on the tiles -----------------------------------------------------------
// C (M x N, ldc) = alpha * op(A) op(B) + beta * C, op(A) M x K, op(B) K x N, all row-major; BLAS is
// column-major, so the product is issued as C^T = op(B)^T op(A)^T (kx::blas_gemm, common/blas.h).
template <typename A>
inline void mm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, A alpha, const A* a, int64_t lda,
               const A* b, int64_t ldb, A beta, A* c, int64_t ldc) {
  blas_gemm(tb, ta, N, M, K, alpha, b, ldb, a, lda, beta, c, ldc);
}

// ---- loads and stores ----------------------------------------------------------------------------
template <typename T, typename A>
inline void load_rows(const T* base, int64_t sl, int64_t sd, int64_t n, int64_t D, A* dst) {
  for (int64_t i = 0; i < n; ++i) {
    const T* row = base + i * sl;
    if (sd == 1) {
      convert(row, dst + i * D, D);
    } else {
      for (int64_t d = 0; d < D; ++d) dst[i * D + d] = static_cast<A>(row[d * sd]);
    }
  }
}

template <typename A, typename T>
inline void store_rows(const A* src, int64_t n, int64_t D, T* dst) {
  convert(src, dst, n * D);
}

// ---- feature maps: 0 elu+1, 1 relu, 2 identity ---------------------------------------------------
inline void phi_n(const float* x, float* y, int64_t n, int fm) {
  if (fm == 2) {
    if (x != y) std::memcpy(y, x, size_t(n) * sizeof(float));
    return;
  }
  int64_t i = 0;
  const vfloat zero = vbroadcast(0.f);
  for (; i + kLanes <= n; i += kLanes) {
    const vfloat v = vload(x + i);
    vstore(y + i, fm == 0 ? (v > zero ? v + 1.0f : vexp_flush(vmin(v, zero))) : vmax(v, zero));
  }
  for (; i < n; ++i) y[i] = fm == 0 ? (x[i] > 0.f ? x[i] + 1.f : vexp_flush(vbroadcast(x[i]))[0]) : (x[i] > 0.f ? x[i] : 0.f);
}
inline void phi_n(const double* x, double* y, int64_t n, int fm) {
  for (int64_t i = 0; i < n; ++i)
    y[i] = fm == 0 ? (x[i] > 0 ? x[i] + 1 : std::exp(x[i])) : fm == 1 ? (x[i] > 0 ? x[i] : 0) : x[i];
}
// g[i] *= phi'(x[i]), from f = phi(x): elu+1 has phi' = min(phi, 1) (exp(x) below 0, 1 above), relu
// phi' = [phi > 0]; no second exp.
inline void dphi_mul(const float* f, float* g, int64_t n, int fm) {
  if (fm == 2) return;
  int64_t i = 0;
  const vfloat zero = vbroadcast(0.f), one = vbroadcast(1.f);
  for (; i + kLanes <= n; i += kLanes) {
    const vfloat fv = vload(f + i), gv = vload(g + i);
    vstore(g + i, fm == 0 ? gv * vmin(fv, one) : (fv > zero ? gv : zero));
  }
  for (; i < n; ++i) g[i] = fm == 0 ? g[i] * (f[i] < 1.f ? f[i] : 1.f) : (f[i] > 0.f ? g[i] : 0.f);
}
inline void dphi_mul(const double* f, double* g, int64_t n, int fm) {
  if (fm == 2) return;
  for (int64_t i = 0; i < n; ++i) g[i] = fm == 0 ? g[i] * (f[i] < 1 ? f[i] : 1) : (f[i] > 0 ? g[i] : 0);
}

// ---- RoPE ----------------------------------------------------------------------------------------
// Tables (rows x D): cosF[d] = cos(m theta_p), sinS[d] = -sin(m theta_p) on the first channel of
// pair p and +sin on the second, so rot(x)[d] = x[d] cosF[d] + x[partner(d)] sinS[d], and the
// inverse rotation (the transpose) flips the sign of the second term. Angles m * theta in float32.
inline void sincos_n(const float* ang, float* s, float* c, int64_t n) {
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    vfloat vs, vc;
    vsincos(vload(ang + i), &vs, &vc);
    vstore(s + i, vs);
    vstore(c + i, vc);
  }
  if (i < n) {
    vfloat vs, vc;
    vsincos(vload_partial(ang + i, n - i, 0.f), &vs, &vc);
    vstore_partial(s + i, vs, n - i);
    vstore_partial(c + i, vc, n - i);
  }
}
inline void sincos_n(const float* ang, double* s, double* c, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    s[i] = std::sin(double(ang[i]));
    c[i] = std::cos(double(ang[i]));
  }
}

// pos: (P, L) int64 or nullptr (position offset + l); theta: D/2 float32 frequencies.
template <typename A>
void rope_table(const int64_t* pos, int64_t offset, int64_t P, int64_t L, int64_t D, const float* theta,
                bool interleaved, A* cosF, A* sinS) {
  const int64_t half = D / 2;
  at::parallel_for(0, P * L, 256, [&](int64_t r0, int64_t r1) {
    float ang[512];
    A s[512], c[512];
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t m = pos != nullptr ? pos[r] : offset + (r % L);
      const float mf = static_cast<float>(m);
      A* cr = cosF + r * D;
      A* sr = sinS + r * D;
      for (int64_t p0 = 0; p0 < half; p0 += 512) {
        const int64_t np = std::min<int64_t>(512, half - p0);
        for (int64_t p = 0; p < np; ++p) ang[p] = mf * theta[p0 + p];
        sincos_n(ang, s, c, np);
        for (int64_t p = 0; p < np; ++p) {
          const int64_t i0 = interleaved ? 2 * (p0 + p) : p0 + p;
          const int64_t i1 = interleaved ? i0 + 1 : i0 + half;
          cr[i0] = c[p];
          cr[i1] = c[p];
          sr[i0] = -s[p];
          sr[i1] = s[p];
        }
      }
    }
  });
}

// y (n x D, rows D apart) = rot(x) (sign +1) or rot^-1(x) (sign -1), x (rows ldx apart) != y,
// table rows cosF/sinS (n x D).
template <typename A>
inline void rope_rows(const A* x, int64_t ldx, A* y, int64_t n, int64_t D, const A* cosF, const A* sinS, A sign,
                      bool interleaved) {
  const int64_t half = D / 2;
  for (int64_t i = 0; i < n; ++i) {
    const A* xr = x + i * ldx;
    A* yr = y + i * D;
    const A* c = cosF + i * D;
    const A* s = sinS + i * D;
    if (interleaved) {
      for (int64_t d = 0; d < D; d += 2) {
        const A a = xr[d], b = xr[d + 1];
        yr[d] = a * c[d] + sign * b * s[d];
        yr[d + 1] = b * c[d + 1] + sign * a * s[d + 1];
      }
    } else {
      for (int64_t d = 0; d < half; ++d) yr[d] = xr[d] * c[d] + sign * xr[d + half] * s[d];
      for (int64_t d = half; d < D; ++d) yr[d] = xr[d] * c[d] + sign * xr[d - half] * s[d];
    }
  }
}

// float32: the same with vectors; the interleaved partner is a lane swap within each pair.
inline void rope_rows(const float* x, int64_t ldx, float* y, int64_t n, int64_t D, const float* cosF,
                      const float* sinS, float sign, bool interleaved) {
  const int64_t half = D / 2;
  if (interleaved ? D % kLanes != 0 : half % kLanes != 0)
    return rope_rows<float>(x, ldx, y, n, D, cosF, sinS, sign, interleaved);
#if KX_ISA_LEVEL == 2
  const vint swap = {1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14};
#elif KX_ISA_LEVEL == 1
  const vint swap = {1, 0, 3, 2, 5, 4, 7, 6};
#else
  const vint swap = {1, 0, 3, 2};
#endif
  for (int64_t i = 0; i < n; ++i) {
    const float* xr = x + i * ldx;
    float* yr = y + i * D;
    const float* c = cosF + i * D;
    const float* s = sinS + i * D;
    if (interleaved) {
      for (int64_t d = 0; d < D; d += kLanes) {
        const vfloat xv = vload(xr + d);
        vstore(yr + d, xv * vload(c + d) + __builtin_shuffle(xv, swap) * (vload(s + d) * sign));
      }
    } else {
      for (int64_t d = 0; d < half; d += kLanes) {
        const vfloat a = vload(xr + d), b = vload(xr + d + half);
        vstore(yr + d, a * vload(c + d) + b * (vload(s + d) * sign));
        vstore(yr + d + half, b * vload(c + d + half) + a * (vload(s + d + half) * sign));
      }
    }
  }
}

template <typename A>
inline void axpy_n(A alpha, const A* x, A* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += alpha * x[i];
}

// Zero the strict upper (keep j <= i) or strict lower (keep j >= i) triangle of an n x n tile.
template <typename A>
inline void mask_tril(A* t, int64_t n) {
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = i + 1; j < n; ++j) t[i * n + j] = 0;
}
template <typename A>
inline void mask_triu(A* t, int64_t n) {
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < i; ++j) t[i * n + j] = 0;
}

// ---- one chunk's operands ------------------------------------------------------------------------
// The GEMMs read each chunk operand through a pointer and a row stride: a tile of the workspace
// (rows D apart) when the operand had to be computed (a feature map, RoPE, a mask, a conversion
// from fp16 / bf16, strided last dim), else the input rows in place (same type, unit last stride),
// so the identity map on float32 / float64 copies nothing.
template <typename A>
struct View {
  const A *fq = nullptr, *rq = nullptr, *fk = nullptr, *rk = nullptr, *v = nullptr, *gn = nullptr;
  int64_t lfq = 0, lrq = 0, lfk = 0, lrk = 0, lv = 0, lgn = 0;
};

template <typename A>
struct Tiles {
  std::vector<A> mem;
  A *fq, *rq, *fk, *rk, *v, *go, *gn, *gd, *t1, *t2, *w1, *w2, *wk, *S, *z, *R, *Zr;
  View<A> c;
  Tiles(int64_t C, int64_t Dk, int64_t Dv) {
    const int64_t nk = C * Dk, nv = C * Dv;
    mem.assign(size_t(5 * nk + 6 * nv + C + 2 * C * C + 2 * Dk * Dv + 2 * Dk), A(0));
    A* p = mem.data();
    auto take = [&](int64_t n) { A* r = p; p += n; return r; };
    fq = take(nk); rq = take(nk); fk = take(nk); rk = take(nk); wk = take(nk);
    v = take(nv); go = take(nv); gn = take(nv); w1 = take(nv); w2 = take(nv);
    gd = take(C); t1 = take(C * C); t2 = take(C * C);
    S = take(Dk * Dv); R = take(Dk * Dv); z = take(Dk); Zr = take(Dk);
  }
};

// Rows of x (strides st[2], st[3]) as an operand: in place when `direct` (same type, unit last stride),
// else converted into `tile`.
template <typename T, typename A>
inline void rows_view(const T* x, const int64_t* st, int64_t n, int64_t D, A* tile, const A** out, int64_t* ld) {
  if (std::is_same<T, A>::value && st[3] == 1) {
    *out = reinterpret_cast<const A*>(x);
    *ld = st[2];
    return;
  }
  load_rows(x, st[2], st[3], n, D, tile);
  *out = tile;
  *ld = D;
}

// phi(x) rows, masked rows (keep[i] false) zero: x itself for the identity map without a mask.
template <typename T, typename A>
inline void feature_view(const T* x, const int64_t* st, int64_t n, int64_t D, int fm, const bool* keep, A* tile,
                         const A** out, int64_t* ld) {
  const A* src;
  int64_t lds;
  rows_view(x, st, n, D, tile, &src, &lds);
  if (fm == 2 && keep == nullptr) {
    *out = src;
    *ld = lds;
    return;
  }
  if (src == tile || lds == D) {
    phi_n(src, tile, n * D, fm);  // in place when src is the tile (identity: nothing, or a copy)
  } else {
    for (int64_t i = 0; i < n; ++i) phi_n(src + i * lds, tile + i * D, D, fm);
  }
  if (keep != nullptr)
    for (int64_t i = 0; i < n; ++i)
      if (!keep[i]) std::memset(tile + i * D, 0, size_t(D) * sizeof(A));
  *out = tile;
  *ld = D;
}

// q, k (feature map, key mask, RoPE) and v rows [t0, t0 + n) of head (b, h) as operands in w.c.
template <typename T, typename A>
void load_chunk(const LaArgs& p, int64_t b, int64_t h, int64_t t0, int64_t n, Tiles<A>& w) {
  const int64_t Dk = p.Dk, Dv = p.Dv;
  const T* q = static_cast<const T*>(p.q) + b * p.qs[0] + h * p.qs[1] + t0 * p.qs[2];
  const T* k = static_cast<const T*>(p.k) + b * p.ks[0] + h * p.ks[1] + t0 * p.ks[2];
  const T* v = static_cast<const T*>(p.v) + b * p.vs[0] + h * p.vs[1] + t0 * p.vs[2];
  View<A>& c = w.c;
  rows_view(v, p.vs, n, Dv, w.v, &c.v, &c.lv);
  feature_view(q, p.qs, n, Dk, p.fm, nullptr, w.fq, &c.fq, &c.lfq);
  feature_view(k, p.ks, n, Dk, p.fm, p.mask != nullptr ? p.mask + b * p.L + t0 : nullptr, w.fk, &c.fk, &c.lfk);
  if (p.rope) {
    const A* cosF = static_cast<const A*>(p.cosF) + ((p.P == 1 ? 0 : b) * p.L + t0) * Dk;
    const A* sinS = static_cast<const A*>(p.sinS) + ((p.P == 1 ? 0 : b) * p.L + t0) * Dk;
    rope_rows(c.fq, c.lfq, w.rq, n, Dk, cosF, sinS, A(1), p.interleaved);
    rope_rows(c.fk, c.lfk, w.rk, n, Dk, cosF, sinS, A(1), p.interleaved);
    c.rq = w.rq;
    c.rk = w.rk;
    c.lrq = c.lrk = Dk;
  } else {
    c.rq = c.fq;
    c.lrq = c.lfq;
    c.rk = c.fk;
    c.lrk = c.lfk;
  }
}

// Upstream gradient of chunk rows as w.c.gn: gn = go / den (numerator), w.gd = -(go . out) / den
// (denominator); without normalize gn = go (in place when it can be). A zero denominator (eps = 0,
// nothing seen yet) counts as 1/den = 0.
template <typename T, typename A>
void load_grad_chunk(const LaArgs& p, int64_t b, int64_t h, int64_t t0, int64_t n, Tiles<A>& w) {
  const int64_t Dv = p.Dv;
  const T* go = static_cast<const T*>(p.gout) + b * p.gs[0] + h * p.gs[1] + t0 * p.gs[2];
  View<A>& c = w.c;
  if (!p.normalize) return rows_view(go, p.gs, n, Dv, w.gn, &c.gn, &c.lgn);
  const A *g, *o;
  int64_t lg, lo;
  rows_view(go, p.gs, n, Dv, w.go, &g, &lg);
  const T* out = static_cast<const T*>(p.out) + b * p.os[0] + h * p.os[1] + t0 * p.os[2];
  rows_view(out, p.os, n, Dv, w.w2, &o, &lo);
  const A* den = static_cast<const A*>(p.den) + (b * p.H + h) * p.L + t0;
  for (int64_t i = 0; i < n; ++i) {
    const A inv = den[i] != A(0) ? A(1) / den[i] : A(0);
    for (int64_t d = 0; d < Dv; ++d) w.gn[i * Dv + d] = g[i * lg + d] * inv;
    w.gd[i] = -vdot(w.gn + i * Dv, o + i * lo, Dv);
  }
  c.gn = w.gn;
  c.lgn = Dv;
}

// Where a chunk's result rows go: straight into the output (rows D apart) when it has the
// accumulation type, else into `tile` and store_rows converts them.
template <typename T, typename A>
inline A* result_rows(T* out, A* tile) {
  if constexpr (std::is_same<T, A>::value) return out; else return tile;
}
template <typename T, typename A>
inline void finish_rows(const A* res, int64_t n, int64_t D, T* out) {
  if constexpr (!std::is_same<T, A>::value) store_rows(res, n, D, out);
}

template <typename A>
inline void init_state(const void* src, int64_t idx, int64_t n, A* dst) {
  if (src != nullptr)
    std::memcpy(dst, static_cast<const A*>(src) + idx * n, size_t(n) * sizeof(A));
  else
    std::memset(dst, 0, size_t(n) * sizeof(A));
}

// One output row's normalizer: den = fq . z + eps (kept for the backward), num /= den (a zero
// denominator, eps = 0 with nothing seen yet, counts as 1/den = 0).
template <typename A>
inline void normalize_row(const A* fq, const A* z, int64_t Dk, A eps, A* den, A* num, int64_t Dv) {
  const A d = vdot(fq, z, Dk) + eps;
  *den = d;
  const A inv = d != A(0) ? A(1) / d : A(0);
  for (int64_t e = 0; e < Dv; ++e) num[e] *= inv;
}

// Tasks of small sequences are batched, so that a decode step (L = 1) is one short loop.
inline int64_t grain_heads(int64_t L) { return std::max<int64_t>(1, 256 / std::max<int64_t>(L, 1)); }

// ---- causal forward ------------------------------------------------------------------------------
// out_i = rq_i^T S_i / (fq_i . z_i + eps), S_i = S_0 + sum_{j<=i} rk_j v_j^T, z_i = z_0 + sum_{j<=i} fk_j.
// Per chunk: num = rq S_prev + tril(rq rk^T) v, then S += rk^T v; z runs row by row.
template <typename T>
void causal_forward(const LaArgs& p) {
  using A = acc_t<T>;
  const int64_t Dk = p.Dk, Dv = p.Dv, L = p.L, C = p.chunk;
  at::parallel_for(0, p.B * p.H, grain_heads(L), [&](int64_t t_begin, int64_t t_end) {
    const BlasSequential sequential;
    Tiles<A> w(p.chunk, Dk, Dv);
    const View<A>& c = w.c;
    for (int64_t bh = t_begin; bh < t_end; ++bh) {
      const int64_t b = bh / p.H, h = bh % p.H;
      init_state(p.S0, bh, Dk * Dv, w.S);
      init_state(p.z0, bh, Dk, w.z);
      T* out = static_cast<T*>(p.outw) + bh * L * Dv;
      A* den = p.normalize ? static_cast<A*>(p.denw) + bh * L : nullptr;
      for (int64_t t0 = 0; t0 < L; t0 += C) {
        const int64_t n = std::min(C, L - t0);
        load_chunk<T>(p, b, h, t0, n, w);
        A* num = result_rows(out + t0 * Dv, w.w1);
        mm<A>(false, false, n, Dv, Dk, 1, c.rq, c.lrq, w.S, Dv, 0, num, Dv);
        mm<A>(false, true, n, n, Dk, 1, c.rq, c.lrq, c.rk, c.lrk, 0, w.t1, n);
        mask_tril(w.t1, n);
        mm<A>(false, false, n, Dv, n, 1, w.t1, n, c.v, c.lv, 1, num, Dv);
        for (int64_t i = 0; i < n; ++i) {
          axpy_n(A(1), c.fk + i * c.lfk, w.z, Dk);
          if (p.normalize) normalize_row(c.fq + i * c.lfq, w.z, Dk, A(p.eps), den + t0 + i, num + i * Dv, Dv);
        }
        mm<A>(true, false, Dk, Dv, n, 1, c.rk, c.lrk, c.v, c.lv, 1, w.S, Dv);
        finish_rows(num, n, Dv, out + t0 * Dv);
      }
      std::memcpy(static_cast<A*>(p.Sw) + bh * Dk * Dv, w.S, size_t(Dk * Dv) * sizeof(A));
      std::memcpy(static_cast<A*>(p.zw) + bh * Dk, w.z, size_t(Dk) * sizeof(A));
    }
  });
}

// ---- causal backward -----------------------------------------------------------------------------
// Two independent passes per head, run as separate tasks:
//  forward pass (q side): g_rq = gn S_prev^T + tril(gn v^T) rk, g_fq += gd z_i; S, z recomputed.
//  reverse pass (k, v side), R = dL/dS_final + sum_{later} rq_i gn_i^T, Zr = dL/dz_final + sum gd_i fq_i:
//   g_rk = v R^T + triu(v gn^T) rq, g_v = rk R + triu(rk rq^T) gn, g_fk_j += Zr_j (reverse cumsum).
// Then g_fq / g_fk go back through RoPE (inverse rotation), the mask and the feature map. Results
// are written straight into the gradients when those have the accumulation type.
template <typename T>
void causal_backward(const LaArgs& p) {
  using A = acc_t<T>;
  const int64_t Dk = p.Dk, Dv = p.Dv, L = p.L, C = p.chunk;
  at::parallel_for(0, 2 * p.B * p.H, grain_heads(L), [&](int64_t t_begin, int64_t t_end) {
    const BlasSequential sequential;
    Tiles<A> w(p.chunk, Dk, Dv);
    const View<A>& c = w.c;
    for (int64_t task = t_begin; task < t_end; ++task) {
      const int64_t bh = task / 2, b = bh / p.H, h = bh % p.H;
      const A* cosF = p.rope ? static_cast<const A*>(p.cosF) + (p.P == 1 ? 0 : b) * L * Dk : nullptr;
      const A* sinS = p.rope ? static_cast<const A*>(p.sinS) + (p.P == 1 ? 0 : b) * L * Dk : nullptr;
      if (task % 2 == 0) {  // q side, forward in time
        init_state(p.S0, bh, Dk * Dv, w.S);
        init_state(p.z0, bh, Dk, w.z);
        T* gq = static_cast<T*>(p.gqw) + bh * L * Dk;
        for (int64_t t0 = 0; t0 < L; t0 += C) {
          const int64_t n = std::min(C, L - t0);
          load_chunk<T>(p, b, h, t0, n, w);
          load_grad_chunk<T>(p, b, h, t0, n, w);
          // rq is not needed once g_rq is formed: its tile takes the rotated-back gradient
          A* gfq = result_rows(gq + t0 * Dk, w.rq);
          A* grq = p.rope ? w.wk : gfq;
          mm<A>(false, true, n, Dk, Dv, 1, c.gn, c.lgn, w.S, Dv, 0, grq, Dk);
          mm<A>(false, true, n, n, Dv, 1, c.gn, c.lgn, c.v, c.lv, 0, w.t1, n);
          mask_tril(w.t1, n);
          mm<A>(false, false, n, Dk, n, 1, w.t1, n, c.rk, c.lrk, 1, grq, Dk);
          if (p.rope) rope_rows(grq, Dk, gfq, n, Dk, cosF + t0 * Dk, sinS + t0 * Dk, A(-1), p.interleaved);
          for (int64_t i = 0; i < n; ++i) {
            axpy_n(A(1), c.fk + i * c.lfk, w.z, Dk);
            if (p.normalize) axpy_n(w.gd[i], w.z, gfq + i * Dk, Dk);
          }
          mm<A>(true, false, Dk, Dv, n, 1, c.rk, c.lrk, c.v, c.lv, 1, w.S, Dv);
          dphi_mul(w.fq, gfq, n * Dk, p.fm);  // fm != identity: fq is its tile
          finish_rows(gfq, n, Dk, gq + t0 * Dk);
        }
      } else {  // k, v side, backward in time
        init_state(p.gS, bh, Dk * Dv, w.R);
        init_state(p.gz, bh, Dk, w.Zr);
        T* gk = static_cast<T*>(p.gkw) + bh * L * Dk;
        T* gv = static_cast<T*>(p.gvw) + bh * L * Dv;
        const int64_t nchunks = (L + C - 1) / C;
        for (int64_t ci = nchunks - 1; ci >= 0; --ci) {
          const int64_t t0 = ci * C, n = std::min(C, L - t0);
          load_chunk<T>(p, b, h, t0, n, w);
          load_grad_chunk<T>(p, b, h, t0, n, w);
          A* gfk = result_rows(gk + t0 * Dk, w.rk);  // rk's tile once g_rk is formed, as above
          A* grk = p.rope ? w.wk : gfk;
          A* gvv = result_rows(gv + t0 * Dv, w.w1);
          mm<A>(false, true, n, Dk, Dv, 1, c.v, c.lv, w.R, Dv, 0, grk, Dk);
          mm<A>(false, true, n, n, Dv, 1, c.v, c.lv, c.gn, c.lgn, 0, w.t1, n);
          mask_triu(w.t1, n);
          mm<A>(false, false, n, Dk, n, 1, w.t1, n, c.rq, c.lrq, 1, grk, Dk);
          mm<A>(false, false, n, Dv, Dk, 1, c.rk, c.lrk, w.R, Dv, 0, gvv, Dv);
          mm<A>(false, true, n, n, Dk, 1, c.rk, c.lrk, c.rq, c.lrq, 0, w.t2, n);
          mask_triu(w.t2, n);
          mm<A>(false, false, n, Dv, n, 1, w.t2, n, c.gn, c.lgn, 1, gvv, Dv);
          mm<A>(true, false, Dk, Dv, n, 1, c.rq, c.lrq, c.gn, c.lgn, 1, w.R, Dv);
          if (p.rope) rope_rows(grk, Dk, gfk, n, Dk, cosF + t0 * Dk, sinS + t0 * Dk, A(-1), p.interleaved);
          const bool* m = p.mask != nullptr ? p.mask + b * L + t0 : nullptr;
          for (int64_t i = n - 1; i >= 0; --i) {
            if (p.normalize) axpy_n(w.gd[i], c.fq + i * c.lfq, w.Zr, Dk);
            A* g = gfk + i * Dk;
            if (m != nullptr && !m[i]) {
              std::memset(g, 0, size_t(Dk) * sizeof(A));
            } else {
              axpy_n(A(1), w.Zr, g, Dk);
            }
          }
          dphi_mul(w.fk, gfk, n * Dk, p.fm);  // fm != identity: fk is its tile
          finish_rows(gfk, n, Dk, gk + t0 * Dk);
          finish_rows(gvv, n, Dv, gv + t0 * Dv);
        }
        std::memcpy(static_cast<A*>(p.gS0w) + bh * Dk * Dv, w.R, size_t(Dk * Dv) * sizeof(A));
        std::memcpy(static_cast<A*>(p.gz0w) + bh * Dk, w.Zr, size_t(Dk) * sizeof(A));
      }
    }
  });
}

// ---- non-causal ----------------------------------------------------------------------------------
// out_i = rq_i^T S / (fq_i . z + eps) with S = sum_j rk_j v_j^T, z = sum_j fk_j over all positions.
template <typename T>
void full_forward(const LaArgs& p) {
  using A = acc_t<T>;
  const int64_t Dk = p.Dk, Dv = p.Dv, L = p.L, C = p.chunk;
  at::parallel_for(0, p.B * p.H, grain_heads(L), [&](int64_t t_begin, int64_t t_end) {
    const BlasSequential sequential;
    Tiles<A> w(p.chunk, Dk, Dv);
    const View<A>& c = w.c;
    for (int64_t bh = t_begin; bh < t_end; ++bh) {
      const int64_t b = bh / p.H, h = bh % p.H;
      std::memset(w.S, 0, size_t(Dk * Dv) * sizeof(A));
      std::memset(w.z, 0, size_t(Dk) * sizeof(A));
      for (int64_t t0 = 0; t0 < L; t0 += C) {
        const int64_t n = std::min(C, L - t0);
        load_chunk<T>(p, b, h, t0, n, w);
        mm<A>(true, false, Dk, Dv, n, 1, c.rk, c.lrk, c.v, c.lv, 1, w.S, Dv);
        for (int64_t i = 0; i < n; ++i) axpy_n(A(1), c.fk + i * c.lfk, w.z, Dk);
      }
      T* out = static_cast<T*>(p.outw) + bh * L * Dv;
      A* den = p.normalize ? static_cast<A*>(p.denw) + bh * L : nullptr;
      for (int64_t t0 = 0; t0 < L; t0 += C) {
        const int64_t n = std::min(C, L - t0);
        load_chunk<T>(p, b, h, t0, n, w);
        A* num = result_rows(out + t0 * Dv, w.w1);
        mm<A>(false, false, n, Dv, Dk, 1, c.rq, c.lrq, w.S, Dv, 0, num, Dv);
        if (p.normalize)
          for (int64_t i = 0; i < n; ++i)
            normalize_row(c.fq + i * c.lfq, w.z, Dk, A(p.eps), den + t0 + i, num + i * Dv, Dv);
        finish_rows(num, n, Dv, out + t0 * Dv);
      }
    }
  });
}

// Backward: a first pass gathers S, z (forward sums) and R = sum rq_i gn_i^T, Zr = sum gd_i fq_i;
// a second writes g_rq = gn S^T, g_fq += gd z, g_rk = v R^T, g_v = rk R, g_fk += Zr.
template <typename T>
void full_backward(const LaArgs& p) {
  using A = acc_t<T>;
  const int64_t Dk = p.Dk, Dv = p.Dv, L = p.L, C = p.chunk;
  at::parallel_for(0, p.B * p.H, grain_heads(L), [&](int64_t t_begin, int64_t t_end) {
    const BlasSequential sequential;
    Tiles<A> w(p.chunk, Dk, Dv);
    const View<A>& c = w.c;
    for (int64_t bh = t_begin; bh < t_end; ++bh) {
      const int64_t b = bh / p.H, h = bh % p.H;
      const A* cosF = p.rope ? static_cast<const A*>(p.cosF) + (p.P == 1 ? 0 : b) * L * Dk : nullptr;
      const A* sinS = p.rope ? static_cast<const A*>(p.sinS) + (p.P == 1 ? 0 : b) * L * Dk : nullptr;
      std::memset(w.S, 0, size_t(Dk * Dv) * sizeof(A));
      std::memset(w.R, 0, size_t(Dk * Dv) * sizeof(A));
      std::memset(w.z, 0, size_t(Dk) * sizeof(A));
      std::memset(w.Zr, 0, size_t(Dk) * sizeof(A));
      for (int64_t t0 = 0; t0 < L; t0 += C) {
        const int64_t n = std::min(C, L - t0);
        load_chunk<T>(p, b, h, t0, n, w);
        load_grad_chunk<T>(p, b, h, t0, n, w);
        mm<A>(true, false, Dk, Dv, n, 1, c.rk, c.lrk, c.v, c.lv, 1, w.S, Dv);
        mm<A>(true, false, Dk, Dv, n, 1, c.rq, c.lrq, c.gn, c.lgn, 1, w.R, Dv);
        for (int64_t i = 0; i < n; ++i) {
          axpy_n(A(1), c.fk + i * c.lfk, w.z, Dk);
          if (p.normalize) axpy_n(w.gd[i], c.fq + i * c.lfq, w.Zr, Dk);
        }
      }
      T* gq = static_cast<T*>(p.gqw) + bh * L * Dk;
      T* gk = static_cast<T*>(p.gkw) + bh * L * Dk;
      T* gv = static_cast<T*>(p.gvw) + bh * L * Dv;
      const bool* mrow = p.mask != nullptr ? p.mask + b * L : nullptr;
      for (int64_t t0 = 0; t0 < L; t0 += C) {
        const int64_t n = std::min(C, L - t0);
        load_chunk<T>(p, b, h, t0, n, w);
        load_grad_chunk<T>(p, b, h, t0, n, w);
        A* gfq = result_rows(gq + t0 * Dk, w.rq);
        A* grq = p.rope ? w.wk : gfq;
        mm<A>(false, true, n, Dk, Dv, 1, c.gn, c.lgn, w.S, Dv, 0, grq, Dk);
        if (p.rope) rope_rows(grq, Dk, gfq, n, Dk, cosF + t0 * Dk, sinS + t0 * Dk, A(-1), p.interleaved);
        if (p.normalize)
          for (int64_t i = 0; i < n; ++i) axpy_n(w.gd[i], w.z, gfq + i * Dk, Dk);
        dphi_mul(w.fq, gfq, n * Dk, p.fm);
        finish_rows(gfq, n, Dk, gq + t0 * Dk);
        A* gvv = result_rows(gv + t0 * Dv, w.w1);
        mm<A>(false, false, n, Dv, Dk, 1, c.rk, c.lrk, w.R, Dv, 0, gvv, Dv);
        finish_rows(gvv, n, Dv, gv + t0 * Dv);
        A* gfk = result_rows(gk + t0 * Dk, w.rk);
        A* grk = p.rope ? w.wk : gfk;
        mm<A>(false, true, n, Dk, Dv, 1, c.v, c.lv, w.R, Dv, 0, grk, Dk);
        if (p.rope) rope_rows(grk, Dk, gfk, n, Dk, cosF + t0 * Dk, sinS + t0 * Dk, A(-1), p.interleaved);
        for (int64_t i = 0; i < n; ++i) {
          A* g = gfk + i * Dk;
          if (mrow != nullptr && !mrow[t0 + i])
            std::memset(g, 0, size_t(Dk) * sizeof(A));
          else if (p.normalize)
            axpy_n(A(1), w.Zr, g, Dk);
        }
        dphi_mul(w.fk, gfk, n * Dk, p.fm);
        finish_rows(gfk, n, Dk, gk + t0 * Dk);
      }
    }
  });
}
