// Row-dot kernels over [out, in] weight rows, written once over a small vector wrapper `V` and
// included by cpu_kernels.cpp inside one namespace per ISA (MP_AVX512 or MP_AVX2 selects V).
// No include guard on purpose: each inclusion compiles the same code for another target.
// Each tile computes RB = 4 rows x TB tokens: every weight vector loaded is used TB times, and
// the rows are re-read from L1/L2 (not memory) for further token blocks.

#if defined(MP_AVX512)
struct V {
  using R = __m512;
  static constexpr int N = 16;
  static constexpr int TBMAX = 4;  // 16 accumulators + 4 weight registers of 32
  static inline R zero() { return _mm512_setzero_ps(); }
  static inline R set1(float v) { return _mm512_set1_ps(v); }
  static inline R fma(R a, R b, R c) { return _mm512_fmadd_ps(a, b, c); }
  static inline R ldx(const float* p) { return _mm512_loadu_ps(p); }
  static inline R ld_f32(const uint8_t* p) { return _mm512_loadu_ps(reinterpret_cast<const float*>(p)); }
  static inline R ld_bf16(const uint8_t* p) {
    __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  static inline R ld_f16(const uint8_t* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  static inline R ld_i8(const uint8_t* p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  }
  // 16 packed bytes hold 32 int4 codes: part 0 = low nibbles (inputs 0..15), part 1 = high (16..31).
  static inline R ld_i4(const uint8_t* p, int part) {
    __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    if (part) b = _mm_srli_epi16(b, 4);
    b = _mm_and_si128(b, _mm_set1_epi8(0x0F));
    return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(b));
  }
  static inline float sum(R a) { return _mm512_reduce_add_ps(a); }
};
#elif defined(MP_AVX2)
struct V {
  using R = __m256;
  static constexpr int N = 8;
  static constexpr int TBMAX = 2;  // 8 accumulators + 4 weight registers of 16
  static inline R zero() { return _mm256_setzero_ps(); }
  static inline R set1(float v) { return _mm256_set1_ps(v); }
  static inline R fma(R a, R b, R c) { return _mm256_fmadd_ps(a, b, c); }
  static inline R ldx(const float* p) { return _mm256_loadu_ps(p); }
  static inline R ld_f32(const uint8_t* p) { return _mm256_loadu_ps(reinterpret_cast<const float*>(p)); }
  static inline R ld_bf16(const uint8_t* p) {
    __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
  static inline R ld_f16(const uint8_t* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  static inline R ld_i8(const uint8_t* p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
  }
  // parts 0..3 = inputs 0-7, 8-15 (low nibbles of bytes 0-7, 8-15), 16-23, 24-31 (high nibbles).
  static inline R ld_i4(const uint8_t* p, int part) {
    __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + (part & 1) * 8));
    if (part & 2) b = _mm_srli_epi16(b, 4);
    b = _mm_and_si128(b, _mm_set1_epi8(0x0F));
    return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(b));
  }
  static inline float sum(R a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
};
#else
#error "define MP_AVX512 or MP_AVX2 before including cpu_kernels_impl.h"
#endif

static inline float ld_scalar(const void* p, int code, int64_t i) {
  if (code == kS32) return static_cast<const float*>(p)[i];
  uint16_t h = static_cast<const uint16_t*>(p)[i];
  if (code == kSBF16) {
    uint32_t u = static_cast<uint32_t>(h) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
  return _cvtsh_ss(h);
}

template <int KIND>
static inline int64_t row_offset_bytes(int64_t k) {
  return KIND == kF32 ? 4 * k : (KIND == kBF16 || KIND == kF16) ? 2 * k : k;
}

template <int KIND>
static inline typename V::R ldw(const uint8_t* row, int64_t k) {
  const uint8_t* p = row + row_offset_bytes<KIND>(k);
  if constexpr (KIND == kF32) return V::ld_f32(p);
  else if constexpr (KIND == kBF16) return V::ld_bf16(p);
  else if constexpr (KIND == kF16) return V::ld_f16(p);
  else return V::ld_i8(p);
}

template <int KIND>
static inline float wscalar(const uint8_t* row, int64_t k) {
  const uint8_t* p = row + row_offset_bytes<KIND>(k);
  if constexpr (KIND == kF32) return ld_scalar(p, kS32, 0);
  else if constexpr (KIND == kBF16) return ld_scalar(p, kSBF16, 0);
  else if constexpr (KIND == kF16) return ld_scalar(p, kSF16, 0);
  else return static_cast<float>(static_cast<const int8_t*>(static_cast<const void*>(p))[0]);
}

// sums[i][t]: the finished dot products of row r + i and token t0 + t (unscaled for int8).
template <int KIND, int TB>
static inline void epilogue(const TileArgs& a, int64_t r, int nr, int64_t t0, const float (&sums)[4][TB]) {
  for (int i = 0; i < nr; ++i) {
    const float scale = KIND == kI8 ? ld_scalar(a.scales, a.sdtype, r + i) : 1.0f;
    const float bias = a.bias ? ld_scalar(a.bias, a.sdtype, r + i) : 0.0f;
    for (int t = 0; t < TB; ++t) {
      const int64_t tok = t0 + t;
      const int64_t orow = a.out_rows ? a.out_rows[tok] : tok;
      const float wt = a.wt ? a.wt[tok] : 1.0f;
      a.out[orow * a.ldo + r + i] += wt * (sums[i][t] * scale + bias);
    }
  }
}

template <int KIND, int TB>
static void tile(const TileArgs& a, int64_t r, int nr, int64_t t0) {
  constexpr int RB = 4;
  const int64_t K = a.K;
  const uint8_t* wp[RB];
  for (int i = 0; i < RB; ++i) wp[i] = a.w + (r + (i < nr ? i : nr - 1)) * a.w_row_bytes;  // pad with the last row
  const float* xp[TB];
  for (int t = 0; t < TB; ++t) xp[t] = a.x + (t0 + t) * K;
  typename V::R acc[RB][TB];
  for (int i = 0; i < RB; ++i)
    for (int t = 0; t < TB; ++t) acc[i][t] = V::zero();
  float sums[RB][TB];
  if constexpr (KIND == kI4) {
    // w = q * s - 8 s with the group's scale s, folded into one FMA per weight vector.
    const int64_t G = a.group, ngroups = K / G;
    for (int64_t g = 0; g < ngroups; ++g) {
      typename V::R vs[RB], vn[RB];
      for (int i = 0; i < RB; ++i) {
        const float s = ld_scalar(a.scales, a.sdtype, (r + (i < nr ? i : nr - 1)) * ngroups + g);
        vs[i] = V::set1(s);
        vn[i] = V::set1(-8.0f * s);
      }
      for (int64_t k = g * G; k < (g + 1) * G; k += 32) {
        for (int part = 0; part < 32 / V::N; ++part) {
          typename V::R wv[RB];
          for (int i = 0; i < RB; ++i) wv[i] = V::fma(V::ld_i4(wp[i] + k / 2, part), vs[i], vn[i]);
          for (int t = 0; t < TB; ++t) {
            const typename V::R xv = V::ldx(xp[t] + k + part * V::N);
            for (int i = 0; i < RB; ++i) acc[i][t] = V::fma(wv[i], xv, acc[i][t]);
          }
        }
      }
    }
    for (int i = 0; i < RB; ++i)
      for (int t = 0; t < TB; ++t) sums[i][t] = V::sum(acc[i][t]);
  } else {
    int64_t k = 0;
    for (; k + V::N <= K; k += V::N) {
      typename V::R wv[RB];
      for (int i = 0; i < RB; ++i) wv[i] = ldw<KIND>(wp[i], k);
      for (int t = 0; t < TB; ++t) {
        const typename V::R xv = V::ldx(xp[t] + k);
        for (int i = 0; i < RB; ++i) acc[i][t] = V::fma(wv[i], xv, acc[i][t]);
      }
    }
    for (int i = 0; i < RB; ++i)
      for (int t = 0; t < TB; ++t) sums[i][t] = V::sum(acc[i][t]);
    for (; k < K; ++k)  // tail of a row whose length is not a multiple of the vector width
      for (int i = 0; i < RB; ++i)
        for (int t = 0; t < TB; ++t) sums[i][t] += wscalar<KIND>(wp[i], k) * xp[t][k];
  }
  epilogue<KIND, TB>(a, r, nr, t0, sums);
}

template <int KIND>
static void rows_kind(const TileArgs& a, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; r += 4) {
    const int nr = static_cast<int>(std::min<int64_t>(4, r1 - r));
    int64_t t = 0;
    for (; t + V::TBMAX <= a.n; t += V::TBMAX) tile<KIND, V::TBMAX>(a, r, nr, t);
    switch (a.n - t) {
      case 1: tile<KIND, 1>(a, r, nr, t); break;
      case 2: if constexpr (V::TBMAX > 2) tile<KIND, 2>(a, r, nr, t); break;
      case 3: if constexpr (V::TBMAX > 3) tile<KIND, 3>(a, r, nr, t); break;
      default: break;
    }
  }
}

static void rows_any(const TileArgs& a, int64_t r0, int64_t r1) {
  switch (a.kind) {
    case kF32: rows_kind<kF32>(a, r0, r1); break;
    case kBF16: rows_kind<kBF16>(a, r0, r1); break;
    case kF16: rows_kind<kF16>(a, r0, r1); break;
    case kI8: rows_kind<kI8>(a, r0, r1); break;
    case kI4: rows_kind<kI4>(a, r0, r1); break;
    default: break;
  }
}
