// Sinkhorn / WRD CPU kernels, compiled once per ISA level by common/isa_kernels.h (no include
// guard, no #include: csrc/cpu/sinkhorn.cpp includes every header first). Inside, KX_ISA_LEVEL is
// 0/1/2 and common/simd.h's vfloat / vint / kLanes (4, 8, 16 floats) / vload / vstore / vbroadcast
// / hsum are this level's; the schedule constants and the argument structs come from sinkhorn.cpp.
// The host code there calls the three entry points at the bottom through KX_ISA_CALL.

KX_INLINE int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// doubles at the level's width (the Newton system's dot products)
constexpr int64_t kDLanes = kLanes / 2;
typedef double vdouble __attribute__((vector_size(kLanes * sizeof(float))));
KX_INLINE vdouble vload_d(const double* p) {
  vdouble v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// exp over the hot rows: simd.h's vexp_flush (no subnormal results, exactly 0 below -87.3).

// log(x) for positive normal float lanes (the callers guarantee [kSumMin, kSumMax]): Cephes logf,
// relative error below 2 ulp.
KX_INLINE vfloat vlog(vfloat x) {
  vint bits = (vint)x;
  vfloat e = __builtin_convertvector(((bits >> 23) & 0xff) - 126, vfloat);
  vfloat m = (vfloat)((bits & 0x007fffff) | 0x3f000000);  // mantissa in [0.5, 1)
  const vint small = m < vbroadcast(0.707106781186547524f);
  e = e - (vfloat)((vint)vbroadcast(1.0f) & small);
  m = (vfloat)(((vint)(m + m) & small) | ((vint)m & ~small)) - vbroadcast(1.0f);
  const vfloat z = m * m;
  vfloat y = vbroadcast(7.0376836292e-2f);
  y = y * m + vbroadcast(-1.1514610310e-1f);
  y = y * m + vbroadcast(1.1676998740e-1f);
  y = y * m + vbroadcast(-1.2420140846e-1f);
  y = y * m + vbroadcast(1.4249322787e-1f);
  y = y * m + vbroadcast(-1.6668057665e-1f);
  y = y * m + vbroadcast(2.0000714765e-1f);
  y = y * m + vbroadcast(-2.4999993993e-1f);
  y = y * m + vbroadcast(3.3333331174e-1f);
  y = y * m * z;
  y = y + e * vbroadcast(-2.12194440e-4f);
  y = y - vbroadcast(0.5f) * z;
  return m + y + e * vbroadcast(0.693359375f);
}

// out_j = exp(c + v_j - K_j) over a padded row (pad lanes of K give 0).
KX_INLINE void exp_row(const float* K, const float* v, float c, int64_t n, float* out) {
  for (int64_t j = 0; j < n; j += kLanes) vstore(out + j, vexp_flush(vbroadcast(c) + vload(v + j) - vload(K + j)));
}
KX_INLINE void exp_row(const double* K, const double* v, double c, int64_t n, double* out) {
  for (int64_t j = 0; j < n; ++j) out[j] = std::exp(c + v[j] - K[j]);
}

// Dot product of two contiguous float rows (four independent accumulators).
KX_INLINE float dot_f(const float* x, const float* y, int64_t D) {
  vfloat a0 = vbroadcast(0), a1 = vbroadcast(0), a2 = vbroadcast(0), a3 = vbroadcast(0);
  int64_t k = 0;
  for (; k + 4 * kLanes <= D; k += 4 * kLanes) {
    a0 += vload(x + k) * vload(y + k);
    a1 += vload(x + k + kLanes) * vload(y + k + kLanes);
    a2 += vload(x + k + 2 * kLanes) * vload(y + k + 2 * kLanes);
    a3 += vload(x + k + 3 * kLanes) * vload(y + k + 3 * kLanes);
  }
  for (; k + kLanes <= D; k += kLanes) a0 += vload(x + k) * vload(y + k);
  float s = hsum((a0 + a1) + (a2 + a3));
  for (; k < D; ++k) s += x[k] * y[k];
  return s;
}
KX_INLINE double dot_f(const double* x, const double* y, int64_t D) {
  double s = 0;
  for (int64_t k = 0; k < D; ++k) s += x[k] * y[k];
  return s;
}

// Dot product of two contiguous double rows, for the Newton system.
KX_INLINE double dot_d(const double* x, const double* y, int64_t n) {
  vdouble a0 = {}, a1 = {};
  int64_t k = 0;
  for (; k + 2 * kDLanes <= n; k += 2 * kDLanes) {
    a0 += vload_d(x + k) * vload_d(y + k);
    a1 += vload_d(x + k + kDLanes) * vload_d(y + k + kDLanes);
  }
  for (; k + kDLanes <= n; k += kDLanes) a0 += vload_d(x + k) * vload_d(y + k);
  a0 += a1;
  double s = 0;
  for (int64_t l = 0; l < kDLanes; ++l) s += a0[l];
  for (; k < n; ++k) s += x[k] * y[k];
  return s;
}

// Owned, 64-byte aligned scratch that only grows.
template <typename T>
struct Buf {
  std::unique_ptr<T[], void (*)(T*)> p{nullptr, [](T* q) { std::free(q); }};
  int64_t cap = 0;
  T* get(int64_t n) {
    if (n > cap) {
      void* q = nullptr;
      if (posix_memalign(&q, 64, sizeof(T) * std::max<int64_t>(n, 1)) != 0) throw std::bad_alloc();
      p.reset(static_cast<T*>(q));
      cap = n;
    }
    return p.get();
  }
};

// One thread's workspace: a problem with its padding dropped, m x n, strides ldm/ldn rounded up to
// the SIMD width. A = float (float32/float16/bfloat16 inputs) or double (float64).
template <typename A>
struct Work {
  int64_t m = 0, n = 0, ldm = 0, ldn = 0;
  A *C, *K, *KT;         // cost (m x ldn), scaled kernel (m x ldn), its transpose (n x ldm)
  A *u, *v, *la, *lb;    // offsets (units of eps), log masses; padded to ldm / ldn with 0
  A *w, *ls;             // reduction weights, log-sums of one half-sweep
  A *ut, *vt;            // Newton trial offsets
  double *F, *G, *a, *b; // absorbed potentials (cost units), normalized masses
  double *Q, *S, *dF, *r, *sqb;  // Newton: scaled plan (m x ldn), system (m x m), step, row sums, sqrt(b)
  int64_t *ri, *cj;      // compact index -> original row / column
  A *xh, *yh, *gacc;     // wrd: converted token copies (m x D, n x D), a D-long accumulator
  const A **xr, **yr;    // wrd: token rows (into the input or xh / yh)
  A *ixn, *iyn;          // wrd: inverse token norms
  double eps = 0;        // eps of the current stage
  Buf<A> bA;
  Buf<double> bD;
  Buf<int64_t> bI;
  Buf<A> bX;
  Buf<const A*> bR;

  void reserve(int64_t M, int64_t N, int64_t D) {
    const int64_t lm = round_up(std::max<int64_t>(M, 1), kLanes), ln = round_up(std::max<int64_t>(N, 1), kLanes);
    A* pa = bA.get(3 * lm * ln + 6 * lm + 6 * ln);
    C = pa; K = C + lm * ln; KT = K + lm * ln;
    u = KT + lm * ln; la = u + lm; ut = la + lm;
    v = ut + lm; lb = v + ln; vt = lb + ln;
    w = vt + ln; ls = w + std::max(lm, ln);
    double* pd = bD.get(2 * lm + 3 * ln + lm * ln + lm * lm + 2 * lm);
    F = pd; a = F + lm; G = a + lm; b = G + ln; Q = b + ln; S = Q + lm * ln; dF = S + lm * lm; r = dF + lm;
    sqb = r + lm;
    int64_t* pi = bI.get(lm + ln);
    ri = pi; cj = pi + lm;
    if (D > 0) {
      A* px = bX.get((lm + ln + 1) * D + lm + ln);
      xh = px; yh = px + lm * D; gacc = yh + ln * D; ixn = gacc + D; iyn = ixn + lm;
      const A** pr = bR.get(lm + ln);
      xr = pr; yr = pr + lm;
    }
  }
  void set_shape(int64_t m_, int64_t n_) {
    m = m_; n = n_;
    ldm = round_up(std::max<int64_t>(m, 1), kLanes);
    ldn = round_up(std::max<int64_t>(n, 1), kLanes);
  }
};

// ---- the solver ----------------------------------------------------------------------------------
// K = (C - F - G) / eps and its transpose, with pad lanes that contribute exp(-kPadK) = 0.
template <typename A>
KX_INLINE void rebuild(Work<A>& W) {
  const int64_t m = W.m, n = W.n;
  const double inv = 1.0 / W.eps;
  for (int64_t i = 0; i < m; ++i) {
    A* Ki = W.K + i * W.ldn;
    const A* Ci = W.C + i * W.ldn;
    const double Fi = W.F[i];
    for (int64_t j = 0; j < n; ++j) Ki[j] = A((double(Ci[j]) - Fi - W.G[j]) * inv);
    for (int64_t j = n; j < W.ldn; ++j) Ki[j] = A(kPadK);
  }
  for (int64_t j = 0; j < n; ++j) {
    A* KTj = W.KT + j * W.ldm;
    for (int64_t i = 0; i < m; ++i) KTj[i] = W.K[i * W.ldn + j];
    for (int64_t i = m; i < W.ldm; ++i) KTj[i] = A(kPadK);
  }
}

// Fold the offsets into F, G (at the current eps) and zero them.
template <typename A>
KX_INLINE void absorb(Work<A>& W) {
  for (int64_t i = 0; i < W.m; ++i) { W.F[i] += W.eps * double(W.u[i]); W.u[i] = 0; }
  for (int64_t j = 0; j < W.n; ++j) { W.G[j] += W.eps * double(W.v[j]); W.v[j] = 0; }
  rebuild(W);
}

// Exact log sum_r exp(w_r + t - K[r * ld + o]) for one output (the rare fallback).
template <typename A>
KX_INLINE A exact_lse(const A* K, int64_t ld, const A* w, int64_t n_red, A t, int64_t o) {
  double mx = -std::numeric_limits<double>::infinity();
  for (int64_t r = 0; r < n_red; ++r) mx = std::max(mx, double(w[r]) + double(t) - double(K[r * ld + o]));
  if (!(mx > -std::numeric_limits<double>::infinity())) return A(-std::numeric_limits<double>::infinity());
  double s = 0;
  for (int64_t r = 0; r < n_red; ++r) s += std::exp(double(w[r]) + double(t) - double(K[r * ld + o]) - mx);
  return A(mx + std::log(s));
}

// Half-sweep sums: ls_o = log sum_r exp(w_r + t_o - K[r * ld + o]) for o < n_out, over the
// reduction rows r < n_red of K (so outputs are contiguous). Returns sum_o mass_o |exp(ls_o) - 1|,
// the marginal error of the side being updated. t_o is the output's current offset: the sums are
// then ratios near 1, and out-of-range ones are redone exactly.
KX_INLINE double lse_sums(const float* K, int64_t ld, const float* w, int64_t n_red, const float* t,
                          int64_t n_out, const double* mass, float* ls) {
  double err = 0;
  for (int64_t o = 0; o < n_out; o += kLanes) {
    const vfloat tv = vload(t + o);
    vfloat acc0 = vbroadcast(0), acc1 = vbroadcast(0);
    int64_t r = 0;
    for (; r + 2 <= n_red; r += 2) {  // two chains: the adds do not wait on each other
      acc0 += vexp_flush(vbroadcast(w[r]) + tv - vload(K + r * ld + o));
      acc1 += vexp_flush(vbroadcast(w[r + 1]) + tv - vload(K + (r + 1) * ld + o));
    }
    if (r < n_red) acc0 += vexp_flush(vbroadcast(w[r]) + tv - vload(K + r * ld + o));
    vfloat s = acc0 + acc1;
    const int64_t lanes = std::min<int64_t>(kLanes, n_out - o);
    bool ok = true;
    for (int64_t l = 0; l < lanes; ++l) ok &= s[l] >= kSumMin && s[l] <= kSumMax;
    if (ok) {
      for (int64_t l = lanes; l < kLanes; ++l) s[l] = 1.0f;
      vstore(ls + o, vlog(s));
      for (int64_t l = 0; l < lanes; ++l) err += mass[o + l] * std::fabs(double(s[l]) - 1.0);
    } else {
      for (int64_t l = 0; l < lanes; ++l) {
        float lv;
        if (s[l] >= kSumMin && s[l] <= kSumMax) {
          lv = std::log(s[l]);
        } else {
          lv = exact_lse(K, ld, w, n_red, t[o + l], o + l);
        }
        ls[o + l] = lv;
        err += mass[o + l] * std::fabs(std::expm1(double(lv)));
      }
    }
  }
  return std::isfinite(err) ? err : std::numeric_limits<double>::max();
}

KX_INLINE double lse_sums(const double* K, int64_t ld, const double* w, int64_t n_red, const double* t,
                          int64_t n_out, const double* mass, double* ls) {
  double err = 0;
  for (int64_t o = 0; o < n_out; ++o) {
    double s = 0;
    for (int64_t r = 0; r < n_red; ++r) s += std::exp(w[r] + t[o] - K[r * ld + o]);
    const double lv = (s >= 1e-300 && s <= 1e300) ? std::log(s) : exact_lse(K, ld, w, n_red, t[o], o);
    ls[o] = lv;
    err += mass[o] * std::fabs(std::expm1(lv));
  }
  return std::isfinite(err) ? err : std::numeric_limits<double>::max();
}

// Row sums of the plan of (u_t, v_t): log ratios in W.ls, returns the row-marginal L1 error.
template <typename A>
KX_INLINE double row_sums(Work<A>& W, const A* ut, const A* vt) {
  for (int64_t j = 0; j < W.n; ++j) W.w[j] = W.lb[j] + vt[j];
  return lse_sums(W.KT, W.ldm, W.w, W.n, ut, W.m, W.a, W.ls);
}
template <typename A>
KX_INLINE double col_sums(Work<A>& W, const A* ut, const A* vt) {
  for (int64_t i = 0; i < W.m; ++i) W.w[i] = W.la[i] + ut[i];
  return lse_sums(W.K, W.ldn, W.w, W.m, vt, W.n, W.b, W.ls);
}
template <typename A>
KX_INLINE void apply(A* x, const A* ls, int64_t n, A omega) {
  for (int64_t k = 0; k < n; ++k) x[k] -= omega * ls[k];
}
template <typename A>
KX_INLINE bool offsets_large(const Work<A>& W) {
  A mx = 0;
  for (int64_t i = 0; i < W.m; ++i) mx = std::max(mx, A(std::fabs(W.u[i])));
  for (int64_t j = 0; j < W.n; ++j) mx = std::max(mx, A(std::fabs(W.v[j])));
  return !(mx <= A(kAbsorbAbove));
}

// In-place Cholesky of the m x m lower triangle of S (row stride m); false if not positive definite.
KX_INLINE bool cholesky(double* S, int64_t m) {
  for (int64_t i = 0; i < m; ++i) {
    double* Si = S + i * m;
    for (int64_t k = 0; k < i; ++k) {
      const double* Sk = S + k * m;
      Si[k] = (Si[k] - dot_d(Si, Sk, k)) / Sk[k];
    }
    const double d = Si[i] - dot_d(Si, Si, i);
    if (!(d > 0)) return false;
    Si[i] = std::sqrt(d);
  }
  return true;
}
KX_INLINE void cholesky_solve(const double* L, int64_t m, double* x) {
  for (int64_t i = 0; i < m; ++i) x[i] = (x[i] - dot_d(L + i * m, x, i)) / L[i * m + i];
  for (int64_t i = m - 1; i >= 0; --i) {
    double s = x[i];
    for (int64_t k = i + 1; k < m; ++k) s -= L[k * m + i] * x[k];
    x[i] = s / L[i * m + i];
  }
}

enum class NewtonEnd { kConverged, kMaxIter, kStalled };

// Newton steps on the semi-dual max_f <f, a> + <g(f), b> (g the exact c-transform of f, so the
// columns stay exact): Hessian -(diag(r) - T diag(1/b) T^T) / eps, a Schur complement of the full
// dual Hessian (Brauer et al. 2017, "A Sinkhorn-Newton method for entropic optimal transport").
// The constant vector spans its null space; adding r_max/m * 1 1^T makes it definite without
// changing the step. Steps are capped at kNewtonMaxStep * eps per potential and backtracked
// until the dual increases enough (Armijo) or the marginal error drops.
template <typename A>
KX_INLINE NewtonEnd newton(Work<A>& W, int64_t& it, int64_t max_iter, double tol, double& err) {
  const int64_t m = W.m, n = W.n;
  for (int64_t j = 0; j < n; ++j) W.sqb[j] = std::sqrt(W.b[j]);
  // exact columns at offsets 0: a plain column update, folded into G
  col_sums(W, W.u, W.v);
  apply(W.v, W.ls, n, A(1));
  absorb(W);
  while (true) {
    // plan at offsets 0: T_ij = a_i b_j exp(-K_ij); Q_ij = T_ij / sqrt(b_j), r = T 1
    err = 0;
    double rmax = 0;
    for (int64_t i = 0; i < m; ++i) {
      exp_row(W.K + i * W.ldn, W.v, A(0), W.ldn, W.ls);  // offsets are 0 here
      double* Qi = W.Q + i * W.ldn;
      double ri = 0;
      for (int64_t j = 0; j < n; ++j) {
        const double e = double(W.ls[j]);
        ri += W.b[j] * e;
        Qi[j] = W.a[i] * W.sqb[j] * e;
      }
      ri *= W.a[i];
      W.r[i] = ri;
      rmax = std::max(rmax, ri);
      err += std::fabs(ri - W.a[i]);
    }
    if (err < tol) return NewtonEnd::kConverged;
    if (it >= max_iter) return NewtonEnd::kMaxIter;
    ++it;
    double delta = 1e-10;
    bool factored = false;
    for (int attempt = 0; attempt < 3 && !factored; ++attempt, delta *= 1e3) {
      for (int64_t i = 0; i < m; ++i) {
        for (int64_t k = 0; k <= i; ++k)
          W.S[i * m + k] = rmax / double(m) - dot_d(W.Q + i * W.ldn, W.Q + k * W.ldn, n);
        W.S[i * m + i] += W.r[i] * (1.0 + delta);
      }
      factored = cholesky(W.S, m);
    }
    if (!factored) return NewtonEnd::kStalled;
    double step_max = 0;
    for (int64_t i = 0; i < m; ++i) W.dF[i] = W.a[i] - W.r[i];
    cholesky_solve(W.S, m, W.dF);
    for (int64_t i = 0; i < m; ++i) {
      W.dF[i] *= W.eps;
      step_max = std::max(step_max, std::fabs(W.dF[i]));
    }
    if (!(step_max > 0) || !std::isfinite(step_max)) return NewtonEnd::kStalled;
    const double cap = kNewtonMaxStep * W.eps;
    if (step_max > cap)
      for (int64_t i = 0; i < m; ++i) W.dF[i] *= cap / step_max;
    double slope = 0, da = 0;
    for (int64_t i = 0; i < m; ++i) {
      slope += (W.a[i] - W.r[i]) * W.dF[i];
      da += W.dF[i] * W.a[i];
    }
    const double noise = W.eps * (std::is_same<A, float>::value ? kDualNoiseF32 : kDualNoiseF64);
    double t = 1;
    bool accepted = false;
    for (int h = 0; h <= kLineSearchHalvings && !accepted; ++h, t *= 0.5) {
      for (int64_t i = 0; i < W.ldm; ++i) W.ut[i] = i < m ? A(t * W.dF[i] / W.eps) : A(0);
      for (int64_t j = 0; j < W.ldn; ++j) W.vt[j] = 0;
      col_sums(W, W.ut, W.vt);  // c-transform of the trial potentials
      double gain = t * da;
      for (int64_t j = 0; j < n; ++j) {
        W.vt[j] = -W.ls[j];
        gain += W.eps * double(W.vt[j]) * W.b[j];
      }
      const double err_new = row_sums(W, W.ut, W.vt);
      // the dual must rise (Armijo); near convergence, where its rise is below float resolution,
      // a step that keeps it level and lowers the marginal error is taken too (never one that
      // lowers the dual: that can cycle)
      accepted = gain >= kArmijo * t * slope || (gain >= -noise && err_new < err);
    }
    if (!accepted) return NewtonEnd::kStalled;
    std::copy(W.ut, W.ut + W.ldm, W.u);
    std::copy(W.vt, W.vt + W.ldn, W.v);
    absorb(W);
  }
}

struct Stats {
  int64_t n_iter = 0;
  double err = 0;
};

// Solve the problem set up in W (C, a, b, la, lb, m, n) at eps (times the problem's cost spread
// max C - min C when `relative`, or 1 where that is 0); leaves F, G, u, v, W.eps.
template <typename A>
KX_INLINE Stats solve(Work<A>& W, double eps, int64_t max_iter, double tol, bool use_newton, bool relative) {
  const int64_t m = W.m, n = W.n;
  double cmin = std::numeric_limits<double>::infinity(), cmax = -cmin;
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < n; ++j) {
      cmin = std::min(cmin, double(W.C[i * W.ldn + j]));
      cmax = std::max(cmax, double(W.C[i * W.ldn + j]));
    }
  if (relative && cmax > cmin) eps *= cmax - cmin;
  W.eps = std::max(cmax - cmin, eps);
  std::fill(W.F, W.F + W.ldm, 0.0);
  std::fill(W.G, W.G + W.ldn, 0.0);
  std::fill(W.u, W.u + W.ldm, A(0));
  std::fill(W.v, W.v + W.ldn, A(0));
  rebuild(W);
  Stats st;
  int stage_sweeps = 0, final_sweeps = 0;
  bool confirm = false;
  while (true) {
    const bool final = W.eps <= eps;
    if (final && use_newton && final_sweeps >= kNewtonAfter && m > 1 && n > 1) {
      const NewtonEnd end = newton(W, st.n_iter, max_iter, tol, st.err);
      if (end != NewtonEnd::kStalled) return st;
      final_sweeps = 0;  // Newton made no progress: more sweeps, then Newton again
      confirm = false;
    }
    const double err = row_sums(W, W.u, W.v);
    st.err = err;
    if (final && confirm && err < tol) return st;
    if (st.n_iter >= max_iter) {
      // out of iterations: a plain column update makes the columns exact; err is then the
      // row-marginal error of the plan returned
      col_sums(W, W.u, W.v);
      apply(W.v, W.ls, n, A(1));
      st.err = row_sums(W, W.u, W.v);
      // stopped before the schedule reached eps: the results belong to W.eps (reported with
      // them); err is at least tol, so err < tol always means converged at the requested eps
      if (!final) st.err = std::max(st.err, tol);
      return st;
    }
    ++st.n_iter;
    const bool relax = final && !(err < tol);
    const A omega = relax ? A(kOmega) : A(1);
    apply(W.u, W.ls, m, omega);
    col_sums(W, W.u, W.v);
    apply(W.v, W.ls, n, omega);
    confirm = !relax;
    if (!final) {
      if (++stage_sweeps >= kStageSweeps || err < kStageTol) {
        for (int64_t i = 0; i < m; ++i) { W.F[i] += W.eps * double(W.u[i]); W.u[i] = 0; }
        for (int64_t j = 0; j < n; ++j) { W.G[j] += W.eps * double(W.v[j]); W.v[j] = 0; }
        W.eps = std::max(W.eps * kEpsRatio, eps);
        rebuild(W);
        stage_sweeps = 0;
        confirm = false;
      }
    } else {
      ++final_sweeps;
      if (offsets_large(W)) absorb(W);
    }
  }
}

// Potentials f = F + eps u, g = G + eps v (shifted so that <f, a> = <g, b>), the transport cost
// <T, C> and the dual <f, a> + <g, b>; the plan row by row through `plan_row` when given.
template <typename A, typename PlanRow>
KX_INLINE void finish(Work<A>& W, double& value, double& dual, PlanRow&& plan_row) {
  const int64_t m = W.m, n = W.n;
  double fa = 0, gb = 0;
  for (int64_t i = 0; i < m; ++i) fa += (W.F[i] + W.eps * double(W.u[i])) * W.a[i];
  for (int64_t j = 0; j < n; ++j) gb += (W.G[j] + W.eps * double(W.v[j])) * W.b[j];
  const double shift = 0.5 * (fa - gb);
  for (int64_t i = 0; i < m; ++i) W.F[i] += W.eps * double(W.u[i]) - shift;
  for (int64_t j = 0; j < n; ++j) W.G[j] += W.eps * double(W.v[j]) + shift;
  dual = fa + gb;
  value = 0;
  for (int64_t i = 0; i < m; ++i) {
    const A* Ci = W.C + i * W.ldn;
    A* row = W.ls;  // scratch of length >= ldn
    exp_row(W.K + i * W.ldn, W.v, W.u[i], W.ldn, row);
    double s = 0;
    for (int64_t j = 0; j < n; ++j) {
      const double t = W.a[i] * W.b[j] * double(row[j]);
      row[j] = A(t);
      s += t * double(Ci[j]);
    }
    value += s;
    plan_row(i, row);
  }
}

// Masses of a problem: compact index lists of the non-zero entries, normalized, logs.
template <typename A>
KX_INLINE void set_masses(Work<A>& W, const double* araw, const double* braw) {
  double sa = 0, sb = 0;
  for (int64_t i = 0; i < W.m; ++i) sa += araw[i];
  for (int64_t j = 0; j < W.n; ++j) sb += braw[j];
  for (int64_t i = 0; i < W.ldm; ++i) {
    W.a[i] = i < W.m ? araw[i] / sa : 0.0;
    W.la[i] = i < W.m ? A(std::log(W.a[i])) : A(0);
  }
  for (int64_t j = 0; j < W.ldn; ++j) {
    W.b[j] = j < W.n ? braw[j] / sb : 0.0;
    W.lb[j] = j < W.n ? A(std::log(W.b[j])) : A(0);
  }
}

// A problem without mass on a side: all padding gives zeros; mass on one side only has no plan
// (nothing can move): value 0, err 1. Potentials are already zero.
template <typename Args>
KX_INLINE void no_mass(const Args& P, int64_t p, bool both) {
  P.value[p] = 0; P.dual[p] = 0; P.n_iter[p] = 0;
  P.err[p] = both ? 0 : 1;
  P.eps_out[p] = P.eps;
}
// A non-finite input at a real entry: recorded (the lowest such problem), and the op raises a
// ValueError once every problem is done. The outputs of the problem are written (NaN) meanwhile.
template <typename Args>
KX_INLINE void not_finite(const Args& P, int64_t p) {
  const double nan = std::numeric_limits<double>::quiet_NaN();
  P.value[p] = nan; P.dual[p] = nan; P.n_iter[p] = 0; P.err[p] = nan; P.eps_out[p] = nan;
  int64_t cur = P.bad->load();
  while (p < cur && !P.bad->compare_exchange_weak(cur, p)) {}
}


template <typename T, typename A>
KX_INLINE void sinkhorn_problem(const SinkhornArgs<T, A>& P, Work<A>& W, int64_t p, double* araw, double* braw) {
  const T* ap = P.a + p * P.as0;
  const T* bp = P.b + p * P.bs0;
  int64_t m = 0, n = 0;
  for (int64_t i = 0; i < P.M; ++i) {
    const double x = double(ap[i * P.as1]);
    if (x > 0) { W.ri[m] = i; araw[m++] = x; }
  }
  for (int64_t j = 0; j < P.N; ++j) {
    const double x = double(bp[j * P.bs1]);
    if (x > 0) { W.cj[n] = j; braw[n++] = x; }
  }
  A* fo = P.f + p * P.M;
  A* go = P.g + p * P.N;
  std::fill(fo, fo + P.M, A(0));
  std::fill(go, go + P.N, A(0));
  T* plan = P.plan ? P.plan + p * P.M * P.N : nullptr;
  if (plan) std::fill(plan, plan + P.M * P.N, T(0));
  if (m == 0 || n == 0) return no_mass(P, p, m == 0 && n == 0);
  W.set_shape(m, n);
  set_masses(W, araw, braw);
  const T* cp = P.cost + p * P.cs0;
  bool finite = true;
  for (int64_t i = 0; i < m; ++i) {
    const T* row = cp + W.ri[i] * P.cs1;
    A* Ci = W.C + i * W.ldn;
    for (int64_t j = 0; j < n; ++j) {
      Ci[j] = A(row[W.cj[j] * P.cs2]);
      finite &= std::isfinite(Ci[j]);
    }
  }
  if (!finite) return not_finite(P, p);
  const Stats st = solve(W, P.eps, P.max_iter, P.tol, P.newton, P.relative);
  double value, dual;
  finish(W, value, dual, [&](int64_t i, const A* row) {
    if (!plan) return;
    T* out = plan + W.ri[i] * P.N;
    for (int64_t j = 0; j < n; ++j) out[W.cj[j]] = T(row[j]);
  });
  for (int64_t i = 0; i < m; ++i) fo[W.ri[i]] = A(W.F[i]);
  for (int64_t j = 0; j < n; ++j) go[W.cj[j]] = A(W.G[j]);
  P.value[p] = A(value);
  P.dual[p] = A(dual);
  P.n_iter[p] = st.n_iter;
  P.err[p] = A(st.err);
  P.eps_out[p] = W.eps;
}

// Run `body(W, p)` over problems [0, B): each thread takes the next problem when it is done.
template <typename A, typename Body>
void for_each_problem(int64_t B, int64_t M, int64_t N, int64_t D, Body&& body) {
  if (B == 0) return;
  std::atomic<int64_t> next{0};
  const int64_t nt = std::min<int64_t>(at::get_num_threads(), B);
  at::parallel_for(0, nt, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      Work<A> W;
      W.reserve(M, N, D);
      std::vector<double> ar(std::max<int64_t>(M, 1)), br(std::max<int64_t>(N, 1));
      for (int64_t p; (p = next.fetch_add(1)) < B;) body(W, p, ar.data(), br.data());
    }
  });
}


// A side's real tokens: row pointers (into the input when it is float with unit stride, else
// into a converted copy), norms, inverse norms and original positions. Returns how many, or -1
// when a real token is not finite. Zero-norm tokens carry no mass and are left out.
template <typename T, typename A>
KX_INLINE int64_t gather_tokens(const Tokens<T>& X, int64_t p, A* buf, const A** rows, double* norm,
                                A* inv_norm, int64_t* idx) {
  int64_t k = 0;
  for (int64_t i = 0; i < X.L; ++i) {
    if (X.mask && !X.mask[p * X.ms0 + i * X.ms1]) continue;
    const T* row = X.x + p * X.s0 + i * X.s1;
    const A* r;
    if constexpr (std::is_same<T, A>::value) {
      if (X.s2 == 1) {
        r = row;
      } else {
        A* o = buf + k * X.D;
        for (int64_t d = 0; d < X.D; ++d) o[d] = row[d * X.s2];
        r = o;
      }
    } else {
      A* o = buf + k * X.D;
      for (int64_t d = 0; d < X.D; ++d) o[d] = A(row[d * X.s2]);
      r = o;
    }
    const double nrm = std::sqrt(double(dot_f(r, r, X.D)));
    if (!std::isfinite(nrm)) return -1;
    if (!(nrm > 0)) continue;
    rows[k] = r;
    norm[k] = nrm;
    inv_norm[k] = A(1.0 / nrm);
    idx[k++] = i;
  }
  return k;
}

// C_ij = 1 - <x_i, y_j> / (|x_i| |y_j|), 2 x 4 blocks of dot products over D.
template <typename A>
KX_INLINE void cosine_cost(Work<A>& W, int64_t D) {
  const int64_t m = W.m, n = W.n;
  int64_t i = 0;
  if constexpr (std::is_same<A, float>::value) {
    for (; i + 2 <= m; i += 2) {
      const float *x0 = W.xr[i], *x1 = W.xr[i + 1];
      const float ix0 = W.ixn[i], ix1 = W.ixn[i + 1];
      int64_t j = 0;
      for (; j + 4 <= n; j += 4) {
        const float *y0 = W.yr[j], *y1 = W.yr[j + 1], *y2 = W.yr[j + 2], *y3 = W.yr[j + 3];
        vfloat c00 = vbroadcast(0), c01 = vbroadcast(0), c02 = vbroadcast(0), c03 = vbroadcast(0);
        vfloat c10 = vbroadcast(0), c11 = vbroadcast(0), c12 = vbroadcast(0), c13 = vbroadcast(0);
        int64_t d = 0;
        for (; d + kLanes <= D; d += kLanes) {
          const vfloat a0 = vload(x0 + d), a1 = vload(x1 + d);
          const vfloat b0 = vload(y0 + d), b1 = vload(y1 + d), b2 = vload(y2 + d), b3 = vload(y3 + d);
          c00 += a0 * b0; c01 += a0 * b1; c02 += a0 * b2; c03 += a0 * b3;
          c10 += a1 * b0; c11 += a1 * b1; c12 += a1 * b2; c13 += a1 * b3;
        }
        float s[8] = {hsum(c00), hsum(c01), hsum(c02), hsum(c03),
                      hsum(c10), hsum(c11), hsum(c12), hsum(c13)};
        for (; d < D; ++d) {
          s[0] += x0[d] * y0[d]; s[1] += x0[d] * y1[d]; s[2] += x0[d] * y2[d]; s[3] += x0[d] * y3[d];
          s[4] += x1[d] * y0[d]; s[5] += x1[d] * y1[d]; s[6] += x1[d] * y2[d]; s[7] += x1[d] * y3[d];
        }
        for (int q = 0; q < 4; ++q) {
          W.C[i * W.ldn + j + q] = 1.0f - s[q] * ix0 * W.iyn[j + q];
          W.C[(i + 1) * W.ldn + j + q] = 1.0f - s[4 + q] * ix1 * W.iyn[j + q];
        }
      }
      for (; j < n; ++j) {
        W.C[i * W.ldn + j] = 1.0f - dot_f(x0, W.yr[j], D) * ix0 * W.iyn[j];
        W.C[(i + 1) * W.ldn + j] = 1.0f - dot_f(x1, W.yr[j], D) * ix1 * W.iyn[j];
      }
    }
  }
  for (; i < m; ++i)
    for (int64_t j = 0; j < n; ++j)
      W.C[i * W.ldn + j] = A(1) - dot_f(W.xr[i], W.yr[j], D) * W.ixn[i] * W.iyn[j];
}


template <typename T, typename A>
KX_INLINE void wrd_problem(const WrdArgs<T, A>& P, Work<A>& W, int64_t p, double* nx, double* ny) {
  const int64_t D = P.X.D;
  const int64_t m = gather_tokens(P.X, p, W.xh, W.xr, nx, W.ixn, W.ri);
  const int64_t n = gather_tokens(P.Y, p, W.yh, W.yr, ny, W.iyn, W.cj);
  A* fo = P.f + p * P.X.L;
  A* go = P.g + p * P.Y.L;
  std::fill(fo, fo + P.X.L, A(0));
  std::fill(go, go + P.Y.L, A(0));
  if (m < 0 || n < 0) return not_finite(P, p);
  if (m == 0 || n == 0) return no_mass(P, p, m == 0 && n == 0);
  W.set_shape(m, n);
  set_masses(W, nx, ny);
  cosine_cost(W, D);
  const Stats st = solve(W, P.eps, P.max_iter, P.tol, P.newton, P.relative);
  double value, dual;
  finish(W, value, dual, [](int64_t, const A*) {});
  for (int64_t i = 0; i < m; ++i) fo[W.ri[i]] = A(W.F[i]);
  for (int64_t j = 0; j < n; ++j) go[W.cj[j]] = A(W.G[j]);
  P.value[p] = A(value);
  P.dual[p] = A(dual);
  P.n_iter[p] = st.n_iter;
  P.err[p] = A(st.err);
  P.eps_out[p] = W.eps;
}

// Envelope gradient of grad[p] * wrd through cost = 1 - cos and masses = norms / sum:
//   dL/dx_i = (1/|x_i|) (I - xh_i xh_i^T) (-(T yh)_i) + (f_i - <f, a>) / sum|x| * xh_i,
// xh = x / |x| the unit vectors,
// (and the same for y with T^T, g), zero for padding and zero-norm tokens.
template <typename T, typename A>
KX_INLINE void wrd_grad_problem(const Tokens<T>& X, const Tokens<T>& Y, const A* grad, const A* f, const A* g,
                                double eps, T* gx, T* gy, Work<A>& W, int64_t p, double* nx, double* ny) {
  const int64_t D = X.D;
  std::fill(gx + p * X.L * D, gx + (p + 1) * X.L * D, T(0));
  std::fill(gy + p * Y.L * D, gy + (p + 1) * Y.L * D, T(0));
  const int64_t m = gather_tokens(X, p, W.xh, W.xr, nx, W.ixn, W.ri);
  const int64_t n = gather_tokens(Y, p, W.yh, W.yr, ny, W.iyn, W.cj);
  if (m <= 0 || n <= 0) return;
  W.set_shape(m, n);
  cosine_cost(W, D);
  double sx = 0, sy = 0;
  for (int64_t i = 0; i < m; ++i) sx += nx[i];
  for (int64_t j = 0; j < n; ++j) sy += ny[j];
  double fa = 0, gb = 0;
  for (int64_t i = 0; i < m; ++i) fa += nx[i] / sx * double(f[p * X.L + W.ri[i]]);
  for (int64_t j = 0; j < n; ++j) gb += ny[j] / sy * double(g[p * Y.L + W.cj[j]]);
  const double gv = double(grad[p]);
  // T in W.K (m x ldn)
  for (int64_t i = 0; i < m; ++i) {
    const double fi = double(f[p * X.L + W.ri[i]]), ai = nx[i] / sx;
    for (int64_t j = 0; j < n; ++j)
      W.K[i * W.ldn + j] = A(ai * ny[j] / sy *
                             std::exp((fi + double(g[p * Y.L + W.cj[j]]) - double(W.C[i * W.ldn + j])) / eps));
  }
  A* acc = W.gacc;
  for (int64_t i = 0; i < m; ++i) {  // x side: acc = -(T yh)_i
    std::fill(acc, acc + D, A(0));
    for (int64_t j = 0; j < n; ++j) {
      const A t = W.K[i * W.ldn + j] * W.iyn[j];
      const A* yj = W.yr[j];
      for (int64_t d = 0; d < D; ++d) acc[d] -= t * yj[d];
    }
    const A* xi = W.xr[i];
    const A scale = A(gv / nx[i]);
    const A proj = dot_f(acc, xi, D) * W.ixn[i];
    const A radial = A(gv * (double(f[p * X.L + W.ri[i]]) - fa) / sx);
    const A along = (radial - scale * proj) * W.ixn[i];
    T* out = gx + (p * X.L + W.ri[i]) * D;
    for (int64_t d = 0; d < D; ++d) out[d] = T(scale * acc[d] + along * xi[d]);
  }
  for (int64_t j = 0; j < n; ++j) {  // y side: acc = -(T^T xh)_j
    std::fill(acc, acc + D, A(0));
    for (int64_t i = 0; i < m; ++i) {
      const A t = W.K[i * W.ldn + j] * W.ixn[i];
      const A* xi = W.xr[i];
      for (int64_t d = 0; d < D; ++d) acc[d] -= t * xi[d];
    }
    const A* yj = W.yr[j];
    const A scale = A(gv / ny[j]);
    const A proj = dot_f(acc, yj, D) * W.iyn[j];
    const A radial = A(gv * (double(g[p * Y.L + W.cj[j]]) - gb) / sy);
    const A along = (radial - scale * proj) * W.iyn[j];
    T* out = gy + (p * Y.L + W.cj[j]) * D;
    for (int64_t d = 0; d < D; ++d) out[d] = T(scale * acc[d] + along * yj[d]);
  }
}

// ---- entry points (KX_ISA_CALL from sinkhorn.cpp) --------------------------------------------------
template <typename T, typename A>
void sinkhorn_fwd_batch(const SinkhornArgs<T, A>& P, int64_t B) {
  for_each_problem<A>(B, P.M, P.N, 0, [&](Work<A>& W, int64_t p, double* ar, double* br) {
    sinkhorn_problem(P, W, p, ar, br);
  });
}

template <typename T, typename A>
void wrd_fwd_batch(const WrdArgs<T, A>& P, int64_t B) {
  for_each_problem<A>(B, P.X.L, P.Y.L, P.X.D, [&](Work<A>& W, int64_t p, double* nx, double* ny) {
    wrd_problem(P, W, p, nx, ny);
  });
}

// eps: (B,) the eps each pair's potentials belong to.
template <typename T, typename A>
void wrd_bwd_batch(const Tokens<T>& X, const Tokens<T>& Y, const A* grad, const A* f, const A* g, const double* eps,
                   T* gx, T* gy, int64_t B) {
  for_each_problem<A>(B, X.L, Y.L, X.D, [&](Work<A>& W, int64_t p, double* nx, double* ny) {
    wrd_grad_problem(X, Y, grad, f, g, eps[p], gx, gy, W, p, nx, ny);
  });
}
