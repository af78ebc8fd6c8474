// Hot loops of sparse softmax top-k (SPACES), csrc/cpu/sparse_softmax.cpp: compiled once per ISA
// level by common/isa_kernels.h (no include guard, no #include: see common/isa.h).
//
// Forward: one streaming pass per row keeps the running top-k (sorted by value desc, index asc,
// so ties go to the lower index), then a k-term logsumexp. The scan tests blocks of 64 logits
// against the current k-th value with vector compares (SSE2 4 lanes, AVX2 8, AVX-512 16 with mask
// registers) and only touches the scalar insert path when a block holds a candidate; fp16/bf16
// logits are compared on their raw 16-bit lanes (see block_candidates16), so the scan reads each
// input byte once at no more cost per byte than float32. Backward: k (+1) entries a row written into a
// zeroed output; every index a row uses is checked (IndexGuard) before the row writes anything.

constexpr int64_t kBlock = 64;  // logits tested per step of the scan (bits of a uint64_t mask)
static_assert(kBlock % kLanes == 0, "a block is whole vectors");

// ---- kLanes logits as float32 lanes -----------------------------------------------------------
inline vfloat vload_logits(const float* p) { return vload(p); }

inline vfloat vload_logits(const c10::Half* p) {
#if KX_ISA_LEVEL == 2
  return (vfloat)_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
#elif KX_ISA_LEVEL == 1
  return (vfloat)_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
#else
  float b[kLanes];  // SSE2 has no fp16 instruction
  convert(p, b, kLanes);
  return vload(b);
#endif
}

// bf16 is the top half of a float32: widen the 16-bit lanes to 32 and shift them up.
inline vfloat vload_logits(const c10::BFloat16* p) {
#if KX_ISA_LEVEL == 2
  const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return (vfloat)_mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
#elif KX_ISA_LEVEL == 1
  const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return (vfloat)_mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
#else
  const __m128i h = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  return (vfloat)_mm_castsi128_ps(_mm_unpacklo_epi16(_mm_setzero_si128(), h));
#endif
}

// Bit i set when lane i of v is not <= t (a candidate, or a NaN).
inline uint64_t lanes_not_le(vfloat v, vfloat t) {
#if KX_ISA_LEVEL == 2
  return _mm512_cmp_ps_mask((__m512)v, (__m512)t, _CMP_NLE_UQ);
#elif KX_ISA_LEVEL == 1
  return uint32_t(_mm256_movemask_ps(_mm256_cmp_ps((__m256)v, (__m256)t, _CMP_NLE_UQ)));
#else
  return uint32_t(_mm_movemask_ps(_mm_cmpnle_ps((__m128)v, (__m128)t)));
#endif
}

#if KX_ISA_LEVEL < 2
// Bit i set when lane i of a compare result (0 or all ones) is set.
inline uint32_t lanes_set(vint c) {
#if KX_ISA_LEVEL == 1
  return uint32_t(_mm256_movemask_ps((__m256)c));
#else
  return uint32_t(_mm_movemask_ps((__m128)c));
#endif
}
#endif

// Candidate mask of one block of kBlock logits against the k-th value thr. Most blocks hold no
// candidate once the k-th value has risen, so below AVX-512 one OR of the compares decides first.
template <typename T>
inline uint64_t block_candidates(const T* b, float thr) {
  const vfloat t = vbroadcast(thr);
#if KX_ISA_LEVEL == 2
  uint64_t m = 0;
  for (int64_t s = 0; s < kBlock; s += kLanes) m |= lanes_not_le(vload_logits(b + s), t) << s;
  return m;
#else
  vint any = vint{};
  for (int64_t s = 0; s < kBlock; s += kLanes) any |= ~(vload_logits(b + s) <= t);
  if (lanes_set(any) == 0) return 0;
  uint64_t m = 0;
  for (int64_t s = 0; s < kBlock; s += kLanes) m |= lanes_not_le(vload_logits(b + s), t) << s;
  return m;
#endif
}

// ---- 16-bit logits: the block test on the raw lanes ---------------------------------------------
// fp16 and bf16 are IEEE sign-magnitude, so once the k-th value is >= +0 (after the first blocks of
// any real row) "x > thr" is a signed int16 compare of the raw bits: 16 / 32 lanes a compare and
// no conversion, so the scan costs no more per byte than float32's. A positive NaN sorts above
// every number and shows up as a candidate; a negative NaN (bits above -inf's as unsigned) would
// sort low, so each row keeps a running unsigned max of its lanes (one op a vector) and checks it
// once at the end. Below a k-th value of +0 the block goes through the float32 compares.
template <typename T> struct Bits16;
template <> struct Bits16<c10::BFloat16> {
  static constexpr uint16_t kNegInf = 0xff80;
  static uint16_t of(float v) {  // v is a bf16 value (a kept logit): exact
    uint32_t b;
    std::memcpy(&b, &v, sizeof(b));
    return uint16_t(b >> 16);
  }
};
template <> struct Bits16<c10::Half> {
  static constexpr uint16_t kNegInf = 0xfc00;
  static uint16_t of(float v) { return c10::Half(v).x; }  // v is an fp16 value: exact
};

#if KX_ISA_LEVEL == 2
using vbits16 = __m512i;
#elif KX_ISA_LEVEL == 1
using vbits16 = __m256i;
#else
using vbits16 = __m128i;
#endif

// Running "some lane is a negative NaN" state of one row.
struct NegNan16 {
  vbits16 acc;
  NegNan16() { std::memset(&acc, 0, sizeof(acc)); }
  template <typename T>
  bool seen() const {
    alignas(64) uint16_t lanes[sizeof(vbits16) / 2];
    std::memcpy(lanes, &acc, sizeof(acc));
    uint16_t m = 0;
    for (uint16_t l : lanes) m = l > m ? l : m;
#if KX_ISA_LEVEL >= 1
    return m > Bits16<T>::kNegInf;   // acc is the unsigned max of the lanes
#else
    return m != 0;                   // acc is the OR of (lane -sat kNegInf)
#endif
  }
};

// Candidate mask of one block for a k-th value with bits thr_bits >= +0 (sign clear).
template <typename T>
inline uint64_t block_candidates16(const T* b, uint16_t thr_bits, float thr, NegNan16& nn) {
  const uint16_t* u = reinterpret_cast<const uint16_t*>(b);
#if KX_ISA_LEVEL == 2
  const __m512i kv = _mm512_set1_epi16(int16_t(thr_bits));
  uint64_t m = 0;
  for (int64_t s = 0; s < kBlock; s += 32) {
    const __m512i t = _mm512_loadu_si512(u + s);
    nn.acc = _mm512_max_epu16(nn.acc, t);
    m |= uint64_t(_mm512_cmpgt_epi16_mask(t, kv)) << s;
  }
  return m;
#elif KX_ISA_LEVEL == 1
  const __m256i kv = _mm256_set1_epi16(int16_t(thr_bits));
  __m256i c[kBlock / 16];
  __m256i any = _mm256_setzero_si256();
  for (int64_t s = 0; s < kBlock / 16; ++s) {
    const __m256i t = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(u + 16 * s));
    nn.acc = _mm256_max_epu16(nn.acc, t);
    c[s] = _mm256_cmpgt_epi16(t, kv);
    any = _mm256_or_si256(any, c[s]);
  }
  if (_mm256_testz_si256(any, any)) return 0;
  // a hit: 16-bit lane masks to bits. packs keeps 0 / -1 as bytes but interleaves the 128-bit
  // halves of its two inputs; the 64-bit permute puts them back in order.
  uint64_t m = 0;
  for (int64_t s = 0; s < kBlock / 16; s += 2) {
    const __m256i p = _mm256_permute4x64_epi64(_mm256_packs_epi16(c[s], c[s + 1]), 0xd8);
    m |= uint64_t(uint32_t(_mm256_movemask_epi8(p))) << (16 * s);
  }
  return m;
#else
  const __m128i kv = _mm_set1_epi16(int16_t(thr_bits)), ninf = _mm_set1_epi16(int16_t(Bits16<T>::kNegInf));
  __m128i c[kBlock / 8];
  __m128i any = _mm_setzero_si128();
  for (int64_t s = 0; s < kBlock / 8; ++s) {
    const __m128i t = _mm_loadu_si128(reinterpret_cast<const __m128i*>(u + 8 * s));
    nn.acc = _mm_or_si128(nn.acc, _mm_subs_epu16(t, ninf));  // SSE2 has no unsigned 16-bit max
    c[s] = _mm_cmpgt_epi16(t, kv);
    any = _mm_or_si128(any, c[s]);
  }
  if (_mm_movemask_epi8(any) == 0) return 0;
  uint64_t m = 0;
  for (int64_t s = 0; s < kBlock / 8; s += 2)
    m |= uint64_t(uint32_t(_mm_movemask_epi8(_mm_packs_epi16(c[s], c[s + 1])))) << (8 * s);
  return m;
#endif
}

// float64 (gradcheck only): scalar.
inline uint64_t block_candidates(const double* b, double thr) {
  uint64_t m = 0;
  for (int64_t s = 0; s < kBlock; ++s) m |= uint64_t(!(b[s] <= thr)) << s;
  return m;
}

// Insert (x, j) into the sorted keeper; j exceeds every kept index, so equal values stay ahead.
template <typename A>
inline void topk_insert(A* tv, int64_t* ti, int64_t& n, int64_t k, A x, int64_t j) {
  int64_t p = n < k ? n : k - 1;
  while (p > 0 && tv[p - 1] < x) {
    tv[p] = tv[p - 1];
    ti[p] = ti[p - 1];
    --p;
  }
  tv[p] = x;
  ti[p] = j;
  if (n < k) ++n;
}

// Top-k of one row into tv (values, desc) and ti (indices). Returns false when the row holds a NaN.
template <typename T, typename A>
bool row_topk(const T* x, int64_t V, int64_t k, A* tv, int64_t* ti) {
  int64_t n = 0;
  bool nan = false;
  int64_t j = 0;
  for (; j < k; ++j) {
    const A v = static_cast<A>(x[j]);
    nan |= v != v;
    topk_insert(tv, ti, n, k, v, j);
  }
  constexpr bool bits16 = std::is_same_v<T, c10::Half> || std::is_same_v<T, c10::BFloat16>;
  NegNan16 neg_nan;
  float thr_cached = std::numeric_limits<float>::quiet_NaN();
  uint16_t tb = 0;
  for (; j + kBlock <= V; j += kBlock) {
    uint64_t m;
    if constexpr (bits16) {
      const float thr = tv[k - 1];
      if (!(thr == thr_cached)) {  // the k-th value rose (or is a NaN): its bits again
        thr_cached = thr;
        tb = Bits16<T>::of(thr);
      }
      m = (tb & 0x8000u) == 0 ? block_candidates16(x + j, tb, thr, neg_nan) : block_candidates<T>(x + j, thr);
    } else {
      m = block_candidates(x + j, tv[k - 1]);
    }
    for (; m != 0; m &= m - 1) {
      const int64_t s = __builtin_ctzll(m);
      const A v = static_cast<A>(x[j + s]);
      if (v > tv[k - 1]) topk_insert(tv, ti, n, k, v, j + s);  // the k-th value may have risen
      nan |= v != v;
    }
  }
  for (; j < V; ++j) {
    const A v = static_cast<A>(x[j]);
    if (v > tv[k - 1]) topk_insert(tv, ti, n, k, v, j);
    nan |= v != v;
  }
  if constexpr (bits16) nan |= neg_nan.seen<T>();
  return !nan;
}

// log sum exp of the kept values (tv[0] is the maximum), optionally with one extra term.
template <typename A>
inline A topk_lse(const A* tv, int64_t k, bool extra, A xe) {
  A m = tv[0];
  if (extra && xe > m) m = xe;
  if (m == neg_inf<A>()) return m;
  A s = 0;
  for (int64_t i = 0; i < k; ++i) s += std::exp(tv[i] - m);
  if (extra) s += std::exp(xe - m);
  return m + std::log(s);
}

// Every index of one row in [0, V), checked before the row writes anything.
inline bool row_indices_ok(IndexGuard& guard, const int64_t* ti, int64_t k, int64_t V) {
  bool ok = true;
  for (int64_t i = 0; i < k; ++i) ok &= guard.ok(ti[i], V);
  return ok;
}

// ---- the four ops' parallel loops -------------------------------------------------------------
// logits x (N, V) rows ld apart; probs p (N, V) contiguous and zeroed; index (N, k).
template <typename T>
void sparse_softmax_fwd_rows(const T* x, int64_t ld, int64_t N, int64_t V, int64_t k, int64_t grain,
                             T* probs, int64_t* index) {
  using A = acc_t<T>;
  at::parallel_for(0, N, grain, [&](int64_t r0, int64_t r1) {
    std::vector<A> tv(k);
    for (int64_t r = r0; r < r1; ++r) {
      int64_t* ti = index + r * k;
      const bool finite = row_topk<T, A>(x + r * ld, V, k, tv.data(), ti);
      T* out = probs + r * V;
      const A lse = finite ? topk_lse(tv.data(), k, false, A(0)) : std::numeric_limits<A>::quiet_NaN();
      if (lse == neg_inf<A>()) continue;  // fully masked row: zeros
      for (int64_t i = 0; i < k; ++i) out[ti[i]] = static_cast<T>(std::exp(tv[i] - lse));
    }
  });
}

// grad (N, V) and probs (N, V) strided; index (N, k) contiguous; out (N, V) contiguous, zeroed.
template <typename T>
void sparse_softmax_bwd_rows(const T* g, int64_t gs0, int64_t gs1, const T* p, int64_t ps0, int64_t ps1,
                             const int64_t* index, int64_t N, int64_t V, int64_t k, int64_t grain, T* out,
                             IndexGuard& guard) {
  using A = acc_t<T>;
  at::parallel_for(0, N, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t* ti = index + r * k;
      if (!row_indices_ok(guard, ti, k, V)) continue;
      T* o = out + r * V;
      A dot = 0;
      for (int64_t i = 0; i < k; ++i) dot += A(p[r * ps0 + ti[i] * ps1]) * A(g[r * gs0 + ti[i] * gs1]);
      for (int64_t i = 0; i < k; ++i) {
        const A pi = A(p[r * ps0 + ti[i] * ps1]);
        o[ti[i]] = static_cast<T>(pi * (A(g[r * gs0 + ti[i] * gs1]) - dot));
      }
    }
  });
}

// Per-row loss and lse (acc_t<T>), index (N, k) (-1 in ignored rows); bad targets go to guard.
template <typename T>
void cross_entropy_fwd_rows(const T* xp, int64_t ld, const int64_t* target, int64_t N, int64_t V, int64_t k,
                            int64_t ignore_index, bool include_target, int64_t grain, acc_t<T>* loss,
                            acc_t<T>* lse, int64_t* index, IndexGuard& guard) {
  using A = acc_t<T>;
  at::parallel_for(0, N, grain, [&](int64_t r0, int64_t r1) {
    std::vector<A> tv(k);
    for (int64_t r = r0; r < r1; ++r) {
      int64_t* ti = index + r * k;
      const int64_t t = target[r];
      if (t == ignore_index || !guard.ok(t, V)) {
        std::fill(ti, ti + k, int64_t(-1));
        loss[r] = 0;
        lse[r] = neg_inf<A>();
        continue;
      }
      const T* x = xp + r * ld;
      const bool finite = row_topk<T, A>(x, V, k, tv.data(), ti);
      const A xt = A(x[t]);
      bool in_set = false;
      for (int64_t i = 0; i < k; ++i) in_set |= ti[i] == t;
      const A s = finite ? topk_lse(tv.data(), k, include_target && !in_set, xt)
                         : std::numeric_limits<A>::quiet_NaN();
      lse[r] = s;
      // A row whose kept logits are all -inf is fully masked: loss 0, zero gradient.
      loss[r] = s == neg_inf<A>() ? A(0) : s - xt;
    }
  });
}

// grad (N, V) contiguous, zeroed: g * (p * 1[set] - onehot(target)) a row.
template <typename T>
void cross_entropy_bwd_rows(const acc_t<T>* grad_loss, int64_t gs, const T* xp, int64_t ld, const int64_t* target,
                            const acc_t<T>* lse, const int64_t* index, int64_t N, int64_t V, int64_t k,
                            int64_t ignore_index, bool include_target, int64_t grain, T* out,
                            IndexGuard& target_guard, IndexGuard& index_guard) {
  using A = acc_t<T>;
  at::parallel_for(0, N, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t t = target[r];
      const A s = lse[r];
      if (t == ignore_index || s == neg_inf<A>()) continue;
      const int64_t* ti = index + r * k;
      if (!target_guard.ok(t, V) || !row_indices_ok(index_guard, ti, k, V)) continue;
      const A g = grad_loss[r * gs];
      const T* x = xp + r * ld;
      T* o = out + r * V;
      bool in_set = false;
      for (int64_t i = 0; i < k; ++i) {
        in_set |= ti[i] == t;
        if (ti[i] != t) o[ti[i]] = static_cast<T>(g * std::exp(A(x[ti[i]]) - s));
      }
      const A pt = (in_set || include_target) ? std::exp(A(x[t]) - s) : A(0);
      o[t] = static_cast<T>(g * (pt - A(1)));
    }
  });
}
