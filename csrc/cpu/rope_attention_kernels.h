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

// 2^x for x <= 64 (the scores run in log2 units: q carries scale * log2(e)), exactly 0 below
// -126 and for -inf. Cephes exp2f: x = n + f, f in [-0.5, 0.5], 2^f by a degree-6 polynomial
// (1.6 ulp), 2^n added to the exponent. About half the work of the general vexp (no overflow or
// subnormal range to handle).
inline vfloat vexp2_neg(vfloat x) {
  const vfloat lo = vbroadcast(-126.0f);
  const vfloat xc = x < lo ? lo : x;
  const vfloat kRound = vbroadcast(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  const vfloat n = (xc + kRound) - kRound;
  const vfloat f = xc - n;
  vfloat p = vbroadcast(1.535336188319500e-4f);
  p = p * f + 1.339887440266574e-3f;
  p = p * f + 9.618437357674640e-3f;
  p = p * f + 5.550332471162809e-2f;
  p = p * f + 2.402264791363012e-1f;
  p = p * f + 6.931472028550421e-1f;
  const vfloat y = p * f + 1.0f;
  vint bits;
  std::memcpy(&bits, &y, sizeof(bits));
  bits += __builtin_convertvector(n, vint) << 23;
  vfloat out;
  std::memcpy(&out, &bits, sizeof(out));
  return x < lo ? vbroadcast(0.f) : out;
}

// row[j] = 2^(row[j] - sub) for j < n, 0 for n <= j < n_total; returns the sum.
template <typename A>
inline A row_exp2_sum(A* row, int64_t n, int64_t n_total, A sub) {
  A s = 0;
  for (int64_t j = 0; j < n; ++j) {
    row[j] = std::exp2(row[j] - sub);
    s += row[j];
  }
  for (int64_t j = n; j < n_total; ++j) row[j] = 0;
  return s;
}

inline float row_exp2_sum(float* row, int64_t n, int64_t n_total, float sub) {
  const vfloat vs = vbroadcast(sub);
  vfloat acc = vbroadcast(0.f);
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    const vfloat e = vexp2_neg(vload(row + j) - vs);
    vstore(row + j, e);
    acc += e;
  }
  if (j < n) {
    const vfloat e = vexp2_neg(vload_partial(row + j, n - j, neg_inf<float>()) - vs);
    vstore_partial(row + j, e, n - j);
    acc += e;
  }
  for (j = n; j < n_total; ++j) row[j] = 0.f;
  return hsum(acc);
}

// One pass for a block after the first (lazy rescaling, as FlashAttention-3 does): row[j] (+ bias)
// -> 2^(row[j] - m) with m the running max of the earlier blocks, capped at 2^kExpCap; *bmax gets
// the block's max (of the biased scores). Returns the sum; row[n..n_total) = 0.
constexpr float kExpCap = 64.f;
template <typename A>
inline A row_exp2_sum_max(A* row, const A* bias, int64_t n, int64_t n_total, A m, A* bmax) {
  A s = 0, bm = neg_inf<A>();
  for (int64_t j = 0; j < n; ++j) {
    const A x = bias != nullptr ? row[j] + bias[j] : row[j];
    bm = x > bm ? x : bm;
    const A d = x - m;
    row[j] = std::exp2(d < A(kExpCap) ? d : A(kExpCap));
    s += row[j];
  }
  for (int64_t j = n; j < n_total; ++j) row[j] = 0;
  *bmax = bm;
  return s;
}

inline float row_exp2_sum_max(float* row, const float* bias, int64_t n, int64_t n_total, float m, float* bmax) {
  const vfloat vm = vbroadcast(m), cap = vbroadcast(kExpCap);
  vfloat acc = vbroadcast(0.f), vb = vbroadcast(neg_inf<float>());
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    vfloat x = vload(row + j);
    if (bias != nullptr) x += vload(bias + j);
    vb = vmax(vb, x);
    const vfloat e = vexp2_neg(vmin(x - vm, cap));
    vstore(row + j, e);
    acc += e;
  }
  float bm = hmax(vb), s = hsum(acc);
  for (; j < n; ++j) {
    const float x = bias != nullptr ? row[j] + bias[j] : row[j];
    bm = x > bm ? x : bm;
    row[j] = vexp2_neg(vbroadcast(std::min(x - m, kExpCap)))[0];
    s += row[j];
  }
  for (j = n; j < n_total; ++j) row[j] = 0.f;
  *bmax = bm;
  return s;
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
// Tile products go to kx::blas_gemm (common/blas.h): the BLAS sgemm / dgemm ATen's
// cpublas::gemm calls, column-major, so a row-major (r, c) buffer is a column-major (c, r) one.

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

// What each thread keeps of the head (b, hk) it works on: the rotated keys kr (Lk, D) (read in
// place when there is nothing to rotate or convert), v (in place when it is already in the
// accumulation type with unit stride, else converted into vc (Lk, Dv)) and the padding bias.
template <typename T, typename A>
struct HeadPack {
  std::vector<A> kr, vc, bias;
  const A* k = nullptr;
  const A* v = nullptr;
  int64_t ldk = 0, ldv = 0;
  int64_t cur = -1;

  void load(const AttnArgs& a, int64_t b, int64_t hk) {
    if (cur == b * a.Hk + hk) return;
    cur = b * a.Hk + hk;
    const T* ks = static_cast<const T*>(a.k) + b * a.skb + hk * a.skh;
    const T* vs = static_cast<const T*>(a.v) + b * a.svb + hk * a.svh;
    const A* tab = static_cast<const A*>(a.ktab);
    if (std::is_same<T, A>::value && !a.rope && a.skd == 1) {
      k = reinterpret_cast<const A*>(ks);
      ldk = a.skl;
    } else {
      kr.resize(a.Lk * a.D);
      for (int64_t j = 0; j < a.Lk; ++j) {
        A* row = kr.data() + j * a.D;
        load_row(ks + j * a.skl, a.skd, row, a.D, A(1));
        if (a.rope) {
          const A* t = tab + (b * a.ktab_bs + a.ktab_row0 + j) * 2 * a.rd;
          rotate_inplace(row, t, t + a.rd, a.rd, a.interleaved, A(1));
        }
      }
      k = kr.data();
      ldk = a.D;
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

// Rotated query rows [m0, m0 + qn) of head (b, h), times mul, into qs (qn, D).
template <typename T, typename A>
inline void pack_queries(const AttnArgs& a, int64_t b, int64_t h, int64_t m0, int64_t qn, A mul, A* qs) {
  const T* q = static_cast<const T*>(a.q) + b * a.sqb + h * a.sqh;
  const A* tab = static_cast<const A*>(a.qtab);
  for (int64_t r = 0; r < qn; ++r) {
    A* row = qs + r * a.D;
    load_row(q + (m0 + r) * a.sql, a.sqd, row, a.D, A(1));
    if (a.rope) {
      const A* t = tab + (b * a.qtab_bs + a.qtab_row0 + m0 + r) * 2 * a.rd;
      rotate_inplace(row, t, t + a.rd, a.rd, a.interleaved, A(1));
    }
    row_scale(row, a.D, mul);
  }
}

constexpr double kLog2e = 1.4426950408889634074, kLn2 = 0.69314718055994530942;
constexpr double kLazyLog2 = 8.0;  // probabilities may reach 2^8 before the running max moves

template <typename T>
void attn_forward(const AttnArgs& a) {
  using A = acc_t<T>;
  const int64_t qbs = a.q_block, kbs = a.k_block;
  const int64_t nqb = (a.Lq + qbs - 1) / qbs, group = a.Hq / a.Hk;
  T* out = static_cast<T*>(a.out);
  A* lse = static_cast<A*>(a.lse);
  at::parallel_for(0, a.B * a.Hq * nqb, 1, [&](int64_t t0, int64_t t1) {
    const BlasSequential sequential;  // common/blas.h
    HeadPack<T, A> hp;
    std::vector<A> qs(qbs * a.D), s(qbs * kbs), o(qbs * a.Dv), mx(qbs), sm(qbs);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t qb = t % nqb, bh = t / nqb, h = bh % a.Hq, b = bh / a.Hq, hk = h / group;
      const int64_t m0 = qb * qbs, qn = std::min(qbs, a.Lq - m0);
      const int64_t kend = key_end(a, m0, qn);
      if (kend > 0) hp.load(a, b, hk);
      pack_queries<T, A>(a, b, h, m0, qn, static_cast<A>(a.scale * kLog2e), qs.data());  // S in log2 units
      for (int64_t r = 0; r < qn; ++r) {
        mx[r] = neg_inf<A>();
        sm[r] = 0;
      }
      const A* bias = a.mask != nullptr ? hp.bias.data() : nullptr;
      for (int64_t n0 = 0; n0 < kend; n0 += kbs) {
        const int64_t kn = std::min(kbs, kend - n0);
        const bool first = n0 == 0;
        // S (qn, kn) = Qs Kr^T
        blas_gemm(true, false, kn, qn, a.D, A(1), hp.k + n0 * hp.ldk, hp.ldk, qs.data(), a.D, A(0), s.data(), kn);
        for (int64_t r = 0; r < qn; ++r) {
          A* row = s.data() + r * kn;
          const int64_t nc = a.causal ? causal_cols(m0 + r, n0, kn, a.Lq, a.Lk) : kn;
          const A* brow = bias != nullptr ? bias + n0 : nullptr;
          if (mx[r] != neg_inf<A>()) {
            // Lazy rescaling: exponentiate against the running max in the same pass that finds the
            // block max; only a rise above it by more than kLazyLog2 costs a rescale.
            A bm;
            A ps = row_exp2_sum_max(row, brow, nc, kn, mx[r], &bm);
            if (bm > mx[r] + A(kLazyLog2)) {
              if (bm - mx[r] <= A(kExpCap)) {  // no value was capped: rescale in place
                const A f = std::exp2(mx[r] - bm);
                row_scale(row, nc, f);
                ps *= f;
              } else {  // a jump past the cap (rare): recompute this row's scores
                for (int64_t j = 0; j < nc; ++j)
                  row[j] = vdot(qs.data() + r * a.D, hp.k + (n0 + j) * hp.ldk, a.D) + (brow ? brow[j] : A(0));
                ps = row_exp2_sum(row, nc, kn, bm);
              }
              const A alpha = std::exp2(mx[r] - bm);
              sm[r] = sm[r] * alpha + ps;
              mx[r] = bm;
              row_scale(o.data() + r * a.Dv, a.Dv, alpha);
            } else {
              sm[r] += ps;
            }
            continue;
          }
          const A bm = row_bias_max(row, brow, nc);
          if (bm == neg_inf<A>()) {  // nothing seen yet: P = 0
            for (int64_t j = 0; j < kn; ++j) row[j] = 0;
            continue;
          }
          sm[r] = row_exp2_sum(row, nc, kn, bm);
          mx[r] = bm;
          // an O row with no mass so far holds zeros (or is overwritten by the first product)
        }
        // O (qn, Dv) (+)= P V
        blas_gemm(false, false, a.Dv, qn, kn, A(1), hp.v + n0 * hp.ldv, hp.ldv, s.data(), kn, first ? A(0) : A(1),
                  o.data(), a.Dv);
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
          lb[r] = (mx[r] + std::log2(sm[r])) * static_cast<A>(kLn2);
        }
      }
    }
  });
}

// Backward (FlashAttention-2 order): one task per (batch, kv head); the task loops over the query
// heads of its group and their query blocks, recomputes P = exp(S - lse) per key block and
// accumulates dV += P^T dO, dS = P * (dO V^T - rowsum(dO * O)), dQ += scale dS K, dK += dS^T (scale Q)
// in float buffers; dQ and dK are rotated back (inverse RoPE) as they are written.
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
  const A scale = static_cast<A>(a.scale);
  at::parallel_for(0, a.B * a.Hk, 1, [&](int64_t t0, int64_t t1) {
    const BlasSequential sequential;  // common/blas.h
    HeadPack<T, A> hp;
    std::vector<A> dka(a.Lk * a.D), dva(a.Lk * a.Dv);
    std::vector<A> qs(qbs * a.D), dob(qbs * a.Dv), orow(a.Dv), di(qbs), lr(qbs), dqa(qbs * a.D);
    std::vector<A> p(qbs * kbs), ds(qbs * kbs);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t hk = t % a.Hk, b = t / a.Hk;
      hp.load(a, b, hk);
      const A* bias = a.mask != nullptr ? hp.bias.data() : nullptr;
      std::fill(dka.begin(), dka.end(), A(0));
      std::fill(dva.begin(), dva.end(), A(0));
      for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
        for (int64_t m0 = 0; m0 < a.Lq; m0 += qbs) {
          const int64_t qn = std::min(qbs, a.Lq - m0);
          const int64_t kend = key_end(a, m0, qn);
          T* dqb = dq + ((b * a.Hq + h) * a.Lq + m0) * a.D;
          std::fill(dqa.begin(), dqa.begin() + qn * a.D, A(0));
          if (kend > 0) {
            pack_queries<T, A>(a, b, h, m0, qn, static_cast<A>(a.scale * kLog2e), qs.data());
            for (int64_t r = 0; r < qn; ++r) {
              const int64_t i = m0 + r;
              load_row(gout + b * a.sgb + h * a.sgh + i * a.sgl, a.sgd, dob.data() + r * a.Dv, a.Dv, A(1));
              load_row(outp + b * a.sob + h * a.soh + i * a.sol, a.sod, orow.data(), a.Dv, A(1));
              di[r] = vdot(dob.data() + r * a.Dv, orow.data(), a.Dv);
              lr[r] = lse[(b * a.Hq + h) * a.Lq + i] * static_cast<A>(kLog2e);  // +inf stays +inf
            }
          }
          for (int64_t n0 = 0; n0 < kend; n0 += kbs) {
            const int64_t kn = std::min(kbs, kend - n0);
            // S (qn, kn) = Qs Kr^T (log2 units), P = 2^(S + bias - lse log2 e) (lse = +inf: P = 0)
            blas_gemm(true, false, kn, qn, a.D, A(1), hp.k + n0 * hp.ldk, hp.ldk, qs.data(), a.D, A(0), p.data(),
                      kn);
            for (int64_t r = 0; r < qn; ++r) {
              A* row = p.data() + r * kn;
              const int64_t nc = a.causal ? causal_cols(m0 + r, n0, kn, a.Lq, a.Lk) : kn;
              if (bias != nullptr) row_bias_max(row, bias + n0, nc);
              row_exp2_sum(row, nc, kn, lr[r]);
            }
            // dV (kn, Dv) += P^T dO
            blas_gemm(false, true, a.Dv, kn, qn, A(1), dob.data(), a.Dv, p.data(), kn, A(1),
                      dva.data() + n0 * a.Dv, a.Dv);
            // dP (qn, kn) = dO V^T, then dS = P * (dP - Di)
            blas_gemm(true, false, kn, qn, a.Dv, A(1), hp.v + n0 * hp.ldv, hp.ldv, dob.data(), a.Dv, A(0),
                      ds.data(), kn);
            for (int64_t r = 0; r < qn; ++r) row_softmax_grad(p.data() + r * kn, ds.data() + r * kn, kn, di[r]);
            // dQ (qn, D) += scale dS Kr;  dK (kn, D) += scale dS^T Q = ln 2 dS^T Qs (Qs = scale log2(e) Q)
            blas_gemm(false, false, a.D, qn, kn, scale, hp.k + n0 * hp.ldk, hp.ldk, ds.data(), kn, A(1), dqa.data(),
                      a.D);
            blas_gemm(false, true, a.D, kn, qn, static_cast<A>(kLn2), qs.data(), a.D, ds.data(), kn, A(1),
                      dka.data() + n0 * a.D, a.D);
          }
          for (int64_t r = 0; r < qn; ++r) {
            A* row = dqa.data() + r * a.D;
            if (a.rope) {
              const A* tb = qtab + (b * a.qtab_bs + a.qtab_row0 + m0 + r) * 2 * a.rd;
              rotate_inplace(row, tb, tb + a.rd, a.rd, a.interleaved, A(-1));
            }
            store_row(row, dqb + r * a.D, a.D, A(1));
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
