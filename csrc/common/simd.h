// Vector helpers at the width of one ISA level. No include guard: common/isa_kernels.h includes
// this inside each level's `#pragma GCC target` region, with KX_ISA_LEVEL set (0 SSE2, 1 AVX2,
// 2 AVX-512). GCC vector types compile to that level's instructions; intrinsics appear only
// where C has no spelling (fp16 conversion).

constexpr int kLanes = KX_ISA_LEVEL == 2 ? 16 : (KX_ISA_LEVEL == 1 ? 8 : 4);  // floats a vector
typedef float vfloat __attribute__((vector_size(kLanes * sizeof(float))));
typedef int32_t vint __attribute__((vector_size(kLanes * sizeof(int32_t))));
typedef uint32_t vuint __attribute__((vector_size(kLanes * sizeof(uint32_t))));

inline vfloat vload(const float* p) { vfloat v; std::memcpy(&v, p, sizeof(v)); return v; }
inline void vstore(float* p, vfloat v) { std::memcpy(p, &v, sizeof(v)); }
inline vfloat vbroadcast(float x) { return vfloat{} + x; }
// First n lanes from p, the rest `fill`; n in [0, kLanes].
inline vfloat vload_partial(const float* p, int64_t n, float fill) {
  vfloat v = vbroadcast(fill);
  for (int64_t i = 0; i < n; ++i) v[i] = p[i];
  return v;
}
inline void vstore_partial(float* p, vfloat v, int64_t n) {
  for (int64_t i = 0; i < n; ++i) p[i] = v[i];
}
// Lane-wise max / min; a NaN in `a` gives b (callers that must propagate NaN check it apart).
inline vfloat vmax(vfloat a, vfloat b) { return a > b ? a : b; }
inline vfloat vmin(vfloat a, vfloat b) { return a < b ? a : b; }
inline float hsum(vfloat v) {
  float s = 0.f;
  for (int i = 0; i < kLanes; ++i) s += v[i];
  return s;
}
inline float hmax(vfloat v) {
  float m = v[0];
  for (int i = 1; i < kLanes; ++i) m = v[i] > m ? v[i] : m;
  return m;
}

// a * b + c lane-wise, fused (one rounding) where the level has FMA (AVX2 and AVX-512 regions
// enable it); a multiply and an add at the SSE2 baseline. The build is ISO C++ (-std=c++17), so
// GCC contracts no `a * b + c` on its own: the hot polynomials call this.
inline vfloat vfma(vfloat a, vfloat b, vfloat c) {
#if KX_ISA_LEVEL == 2
  return _mm512_fmadd_ps(a, b, c);
#elif KX_ISA_LEVEL == 1
  return _mm256_fmadd_ps(a, b, c);
#else
  return a * b + c;
#endif
}

// sum_i a[i] * b[i] over n elements (float32 lanes; any other type a plain loop).
template <typename A>
inline A vdot(const A* a, const A* b, int64_t n) {
  A s = 0;
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}
inline float vdot(const float* a, const float* b, int64_t n) {
  vfloat acc = vbroadcast(0.f);
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) acc = vfma(vload(a + i), vload(b + i), acc);
  float s = hsum(acc);
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

// e^x = 2^n e^r for x already clamped to the float range: Cody-Waite reduction by ln 2 to
// r in [-ln2/2, ln2/2] (n integral, returned in *n) and the Cephes expf degree-6 polynomial for e^r.
inline vfloat vexp_reduced(vfloat x, vfloat* n) {
  const vfloat kRound = vbroadcast(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  *n = vfma(x, vbroadcast(1.44269504088896341f), kRound) - kRound;
  vfloat r = vfma(*n, vbroadcast(-0.693359375f), x);
  r = vfma(*n, vbroadcast(2.12194440e-4f), r);
  vfloat p = vbroadcast(1.9875691500e-4f);
  p = vfma(p, r, vbroadcast(1.3981999507e-3f));
  p = vfma(p, r, vbroadcast(8.3334519073e-3f));
  p = vfma(p, r, vbroadcast(4.1665795894e-2f));
  p = vfma(p, r, vbroadcast(1.6666665459e-1f));
  p = vfma(p, r, vbroadcast(5.0000001201e-1f));
  return vfma(p, r * r, r) + 1.0f;
}

// exp in float32, within 2 ulp (vexp_reduced, 2^n applied as two factors so that subnormal
// results and the top of the range are exact in form). Below -103.98 (including -inf) it is
// exactly 0, above 88.7228 +inf, NaN stays NaN.
inline vfloat vexp(vfloat x) {
  const float kLo = -103.972084f, kHi = 88.7228391f;  // ln 2^-150, ln FLT_MAX
  vfloat xc = x < kLo ? vbroadcast(kLo) : x;
  xc = xc > kHi ? vbroadcast(kHi) : xc;
  vfloat n;
  const vfloat y = vexp_reduced(xc, &n);
  const vint ni = __builtin_convertvector(n, vint);  // in [-150, 128]
  const vint n1 = ni >> 1, n2 = ni - n1;              // each in [-75, 64]: normal powers of 2
  const vint e1 = (n1 + 127) << 23, e2 = (n2 + 127) << 23;
  vfloat s1, s2;
  std::memcpy(&s1, &e1, sizeof(s1));
  std::memcpy(&s2, &e2, sizeof(s2));
  vfloat out = (y * s1) * s2;
  out = x < kLo ? vbroadcast(0.f) : out;
  out = x > kHi ? vbroadcast(std::numeric_limits<float>::infinity()) : out;
  return out;
}

// exp for hot loops that need no subnormal results: within 2 ulp on [-87.3, 88.7], exactly 0
// below -87.3 (a term below 1e-38 never moves a sum or a feature), clamped at 88.7 above; two
// multiplies and selects fewer than vexp. NaN is not preserved (callers never pass it).
inline vfloat vexp_flush(vfloat x) {
  const vfloat lo = vbroadcast(-87.3f), hi = vbroadcast(88.7f);
  const vint under = x < lo;
  x = x < lo ? lo : x;
  x = x > hi ? hi : x;
  vfloat n;
  const vfloat p = vexp_reduced(x, &n);
  vint bits;
  std::memcpy(&bits, &p, sizeof(bits));
  bits = (bits + (__builtin_convertvector(n, vint) << 23)) & ~under;
  vfloat out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}
// y[i] = exp(x[i]) for n elements (x and y may alias).
inline void vexp_n(const float* x, float* y, int64_t n) {
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) vstore(y + i, vexp(vload(x + i)));
  if (i < n) vstore_partial(y + i, vexp(vload_partial(x + i, n - i, 0.f)), n - i);
}

// ---- conversions of n elements: convert(src, dst, n) ------------------------------------------
// Rounding is IEEE round-to-nearest-even, as torch's .to(); NaN stays NaN.
template <typename S, typename D>
inline void convert(const S* s, D* d, int64_t n) {
  for (int64_t i = 0; i < n; ++i) d[i] = static_cast<D>(s[i]);
}
inline void convert(const float* s, float* d, int64_t n) {
  if (s != d) std::memcpy(d, s, size_t(n) * sizeof(float));
}
inline void convert(const double* s, double* d, int64_t n) {
  if (s != d) std::memcpy(d, s, size_t(n) * sizeof(double));
}
inline void convert(const c10::BFloat16* s, float* d, int64_t n) {
  const uint16_t* u = reinterpret_cast<const uint16_t*>(s);
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t b = uint32_t(u[i]) << 16;
    std::memcpy(d + i, &b, sizeof(b));
  }
}
inline void convert(const float* s, c10::BFloat16* d, int64_t n) {
  uint16_t* u = reinterpret_cast<uint16_t*>(d);
  for (int64_t i = 0; i < n; ++i) {
    uint32_t b;
    std::memcpy(&b, s + i, sizeof(b));
    const uint32_t rounded = (b + 0x7fffu + ((b >> 16) & 1u)) >> 16;
    const bool nan = (b & 0x7fffffffu) > 0x7f800000u;
    u[i] = static_cast<uint16_t>(nan ? 0x7fc0u : rounded);  // torch's canonical bf16 NaN
  }
}
inline void convert(const c10::Half* s, float* d, int64_t n) {
  int64_t i = 0;
#if KX_ISA_LEVEL >= 2
  for (; i + 16 <= n; i += 16)
    _mm512_storeu_ps(d + i, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + i))));
#endif
#if KX_ISA_LEVEL >= 1
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(d + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i))));
#endif
  for (; i < n; ++i) d[i] = static_cast<float>(s[i]);
}
inline void convert(const float* s, c10::Half* d, int64_t n) {
  int64_t i = 0;
#if KX_ISA_LEVEL >= 2
  for (; i + 16 <= n; i += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(d + i),
                        _mm512_cvtps_ph(_mm512_loadu_ps(s + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#endif
#if KX_ISA_LEVEL >= 1
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(d + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(s + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#endif
  for (; i < n; ++i) d[i] = static_cast<c10::Half>(s[i]);
}

// sin and cos in float32 (Cephes sinf/cosf: x reduced by pi/2 in three parts, Cody-Waite, then
// degree-7/8 polynomials on [-pi/4, pi/4]); within a few ulp of the exact value of x for
// |x| < 2^16 * pi/4 (about 51,000: the quadrant count times the first part of pi/2 stays exact),
// degrading slowly beyond. For RoPE angles (position * theta) computed in float32.
inline void vsincos(vfloat x, vfloat* s, vfloat* c) {
  const vfloat j = ((x * 0.636619772367581343f) + 12582912.0f) - 12582912.0f;  // round(x * 2/pi)
  vfloat r = x - j * 1.5703125f;
  r = r - j * 4.837512969970703125e-4f;
  r = r - j * 7.54978995489188216e-8f;
  const vfloat r2 = r * r;
  vfloat ps = vbroadcast(-1.9515295891e-4f);
  ps = ps * r2 + 8.3321608736e-3f;
  ps = ps * r2 - 1.6666654611e-1f;
  const vfloat sr = ps * r2 * r + r;
  vfloat pc = vbroadcast(2.443315711809948e-5f);
  pc = pc * r2 - 1.388731625493765e-3f;
  pc = pc * r2 + 4.166664568298827e-2f;
  const vfloat cr = pc * r2 * r2 - 0.5f * r2 + 1.0f;
  const vint q = __builtin_convertvector(j, vint) & 3;
  const vint swap = (q & 1) != 0;                      // quadrants 1, 3: sin <-> cos
  const vfloat sv = swap ? cr : sr, cv = swap ? sr : cr;
  *s = ((q & 2) != 0) ? -sv : sv;                      // sin < 0 in quadrants 2, 3
  *c = (((q + 1) & 2) != 0) ? -cv : cv;                // cos < 0 in quadrants 1, 2
}
