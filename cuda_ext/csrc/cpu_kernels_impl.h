// Row-dot kernels over [out, in] weight rows, written once over a small vector wrapper `V` and
// included by cpu_kernels.cpp inside one namespace per ISA (MP_AVX512 or MP_AVX2 selects V).
// No include guard on purpose: each inclusion compiles the same code for another target.
// Each tile computes RB = 4 rows x TB tokens: every weight vector loaded is used TB times, and
// the rows are re-read from L1/L2 (not memory) for further token blocks. Float weights multiply
// fp32 x (or bf16 x, see cpu_kernels.cpp); int8 / int4 codes multiply int16 x (tile_int).

// Lane i of the result: the sum of the 8 lanes of a[i].
static inline __m256 hsum8_256(const __m256* a) {
  const __m256 t0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
  const __m256 t1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(t0, t1, 0x20), _mm256_permute2f128_ps(t0, t1, 0x31));
}

#if defined(MP_AVX512)
struct V {
  using R = __m512;
  static constexpr int N = 16;
  static constexpr int TBMAX = 4;  // 16 accumulators + 4 weight registers of 32
  static inline R zero() { return _mm512_setzero_ps(); }
  static inline R set1(float v) { return _mm512_set1_ps(v); }
  static inline R fma(R a, R b, R c) { return _mm512_fmadd_ps(a, b, c); }
  static inline R add(R a, R b) { return _mm512_add_ps(a, b); }
  static inline R ldx(const float* p) { return _mm512_loadu_ps(p); }
  static inline void st(float* p, R a) { _mm512_storeu_ps(p, a); }
  static inline R sub(R a, R b) { return _mm512_sub_ps(a, b); }
  // exp_neg's pieces: max, product, rounding to the nearest integer, 2^n for integral n, and
  // r where x is not -inf, else 0
  static inline R max(R a, R b) { return _mm512_max_ps(a, b); }
  static inline R mul(R a, R b) { return _mm512_mul_ps(a, b); }
  static inline R round(R a) { return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT); }
  static inline R pow2(R n) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23));
  }
  static inline R live(R x, R r) {
    return _mm512_maskz_mov_ps(static_cast<__mmask16>(~_mm512_cmp_ps_mask(x, set1(-INFINITY), _CMP_EQ_OQ)), r);
  }
  static inline R ld_f32(const uint8_t* p) { return _mm512_loadu_ps(reinterpret_cast<const float*>(p)); }
  static inline R ld_bf16(const uint8_t* p) {
    __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  static inline R ld_f16(const uint8_t* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  static inline float sum(R a) { return _mm512_reduce_add_ps(a); }
  // the sums of 8 vectors, in the 8 lanes of one AVX2 register
  static inline __m256 sum8(const R* a) {
    __m256 h[8];
    for (int i = 0; i < 8; ++i) h[i] = _mm256_add_ps(_mm512_castps512_ps256(a[i]), _mm512_extractf32x8_ps(a[i], 1));
    return hsum8_256(h);
  }
  // int codes x int16 activations: 32 int16 lanes, int32 sums of lane pairs
  using I = __m512i;
  static constexpr int NW = 32;        // int16 lanes (int8 codes per step)
  static constexpr int I4SPAN = 64;    // int4 codes per step: the two nibbles of 32 bytes
  static constexpr int TBI = 2;        // tokens per int tile: 8 int32 + 8 fp32 accumulators
  static inline I izero() { return _mm512_setzero_si512(); }
  static inline I ld_xq(const int16_t* p) { return _mm512_loadu_si512(p); }
  static inline I ld_xq_half(const int16_t* p) { return _mm512_maskz_loadu_epi16(0xFFFFu, p); }
  static inline I ld_i8w(const uint8_t* p) {
    return _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  // 32 bytes: lo = low nibbles (inputs 0-15 of each 16-byte chunk), hi = high nibbles; codes - 8
  static inline void ld_i4w(const uint8_t* p, I& lo, I& hi) {
    const I b = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    lo = _mm512_sub_epi16(_mm512_and_si512(b, _mm512_set1_epi16(0x0F)), _mm512_set1_epi16(8));
    hi = _mm512_sub_epi16(_mm512_srli_epi16(b, 4), _mm512_set1_epi16(8));
  }
  // 16 bytes (one chunk of 32 codes) in the low lanes, zeros above
  static inline void ld_i4w_half(const uint8_t* p, I& lo, I& hi) {
    const I b = _mm512_cvtepu8_epi16(_mm256_zextsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
    lo = _mm512_maskz_sub_epi16(0xFFFFu, _mm512_and_si512(b, _mm512_set1_epi16(0x0F)), _mm512_set1_epi16(8));
    hi = _mm512_maskz_sub_epi16(0xFFFFu, _mm512_srli_epi16(b, 4), _mm512_set1_epi16(8));
  }
  static inline I dpw(I acc, I a, I b) {
#if defined(MP_VNNI)
    return _mm512_dpwssd_epi32(acc, a, b);
#else
    return _mm512_add_epi32(acc, _mm512_madd_epi16(a, b));
#endif
  }
  static inline R cvt(I a) { return _mm512_cvtepi32_ps(a); }
  static inline I iadd(I a, I b) { return _mm512_add_epi32(a, b); }
  // int32 lanes 0-7 come from the first 16-byte chunk of a step, lanes 8-15 from the second
  static inline R mix(float a, float b) { return _mm512_insertf32x8(_mm512_set1_ps(a), _mm256_set1_ps(b), 1); }
};
#elif defined(MP_AVX2)
struct V {
  using R = __m256;
  static constexpr int N = 8;
  static constexpr int TBMAX = 2;  // 8 accumulators + 4 weight registers of 16
  static inline R zero() { return _mm256_setzero_ps(); }
  static inline R set1(float v) { return _mm256_set1_ps(v); }
  static inline R fma(R a, R b, R c) { return _mm256_fmadd_ps(a, b, c); }
  static inline R add(R a, R b) { return _mm256_add_ps(a, b); }
  static inline R ldx(const float* p) { return _mm256_loadu_ps(p); }
  static inline void st(float* p, R a) { _mm256_storeu_ps(p, a); }
  static inline R sub(R a, R b) { return _mm256_sub_ps(a, b); }
  // exp_neg's pieces, as in the AVX512 V above
  static inline R max(R a, R b) { return _mm256_max_ps(a, b); }
  static inline R mul(R a, R b) { return _mm256_mul_ps(a, b); }
  static inline R round(R a) { return _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static inline R pow2(R n) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23));
  }
  static inline R live(R x, R r) { return _mm256_andnot_ps(_mm256_cmp_ps(x, set1(-INFINITY), _CMP_EQ_OQ), r); }
  static inline R ld_f32(const uint8_t* p) { return _mm256_loadu_ps(reinterpret_cast<const float*>(p)); }
  static inline R ld_bf16(const uint8_t* p) {
    __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
  static inline R ld_f16(const uint8_t* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  static inline __m256 sum8(const R* a) { return hsum8_256(a); }
  static inline float sum(R a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  using I = __m256i;
  static constexpr int NW = 16;
  static constexpr int I4SPAN = 32;  // the two nibbles of 16 bytes: inputs in order
  static constexpr int TBI = 1;      // 16 registers: 4 int32 + 4 fp32 accumulators, weights, x
  static inline I izero() { return _mm256_setzero_si256(); }
  static inline I ld_xq(const int16_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
  static inline I ld_xq_half(const int16_t* p) { return ld_xq(p); }  // never used: I4SPAN divides every group
  static inline I ld_i8w(const uint8_t* p) {
    return _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  static inline void ld_i4w(const uint8_t* p, I& lo, I& hi) {
    const I b = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    lo = _mm256_sub_epi16(_mm256_and_si256(b, _mm256_set1_epi16(0x0F)), _mm256_set1_epi16(8));
    hi = _mm256_sub_epi16(_mm256_srli_epi16(b, 4), _mm256_set1_epi16(8));
  }
  static inline void ld_i4w_half(const uint8_t* p, I& lo, I& hi) { ld_i4w(p, lo, hi); }
  static inline I dpw(I acc, I a, I b) { return _mm256_add_epi32(acc, _mm256_madd_epi16(a, b)); }
  static inline R cvt(I a) { return _mm256_cvtepi32_ps(a); }
  static inline I iadd(I a, I b) { return _mm256_add_epi32(a, b); }
  static inline R mix(float a, float) { return set1(a); }  // never used: I4SPAN divides every group
};
#else
#error "define MP_AVX512 or MP_AVX2 before including cpu_kernels_impl.h"
#endif

// e^x for x <= 0, exactly 0 at -inf, as Cephes' expf computes it, vectorised: x = n ln2 + r with ln2
// split in two (Cody-Waite), a degree-6 polynomial for e^r on |r| <= ln2 / 2, 2^n from the
// exponent bits. Relative error about 2 ulp; inputs below -87 (e^x under the smallest normal) give
// about 1e-38.
static inline V::R exp_neg(V::R x) {
  const V::R c = V::max(x, V::set1(-87.0f));
  const V::R n = V::round(V::mul(c, V::set1(1.44269504088896341f)));
  V::R r = V::fma(n, V::set1(-0.693359375f), c);
  r = V::fma(n, V::set1(2.12194440e-4f), r);
  V::R p = V::set1(1.9875691500e-4f);
  p = V::fma(p, r, V::set1(1.3981999507e-3f));
  p = V::fma(p, r, V::set1(8.3334519073e-3f));
  p = V::fma(p, r, V::set1(4.1665795894e-2f));
  p = V::fma(p, r, V::set1(1.6666665459e-1f));
  p = V::fma(p, r, V::set1(5.0000001201e-1f));
  p = V::fma(p, V::mul(r, r), V::add(r, V::set1(1.0f)));
  return V::live(x, V::mul(p, V::pow2(n)));
}

// x rounded to bf16 (code 1, to nearest even) or fp16 (code 2), returned as fp32: the rounding of
// transformers' eager attention between its steps (AttnArgs::eager_round).
static inline float round_to_16(float x, int code) {
  if (code == 2) return _cvtsh_ss(_cvtss_sh(x, _MM_FROUND_TO_NEAREST_INT));
  uint32_t u;
  std::memcpy(&u, &x, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return x;  // NaN stays NaN
  u = (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u;
  float r;
  std::memcpy(&r, &u, 4);
  return r;
}

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
static constexpr int64_t row_offset_bytes(int64_t k) {
  return KIND == kF32 ? 4 * k : (KIND == kBF16 || KIND == kF16) ? 2 * k : k;
}

template <int KIND>
static inline typename V::R ldw(const uint8_t* row, int64_t k) {
  const uint8_t* p = row + row_offset_bytes<KIND>(k);
  if constexpr (KIND == kF32) return V::ld_f32(p);
  else if constexpr (KIND == kBF16) return V::ld_bf16(p);
  else return V::ld_f16(p);
}

template <int KIND>
static inline float wscalar(const uint8_t* row, int64_t k) {
  const uint8_t* p = row + row_offset_bytes<KIND>(k);
  if constexpr (KIND == kF32) return ld_scalar(p, kS32, 0);
  else if constexpr (KIND == kBF16) return ld_scalar(p, kSBF16, 0);
  else return ld_scalar(p, kSF16, 0);
}

// sums[i][t]: the finished dot products of row r + i and token t0 + t (unscaled for int8).
template <int KIND, int TB, int RB>
static inline void epilogue(const TileArgs& a, int64_t r, int nr, int64_t t0, const float (&sums)[RB][TB]) {
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

// Row i of a tile of nr rows starting at r; a short last tile repeats its last row (never stored).
static inline int64_t tile_row(int64_t r, int nr, int i) { return r + (i < nr ? i : nr - 1); }

// Software prefetch of the weight stream: each row's bytes kPrefetchBytes ahead of the ones being
// read. STEP: bytes of each row one loop step reads; one prefetch per 64-byte line.
constexpr int64_t kPrefetchBytes = 16384;
template <int64_t STEP, int RB>
static inline void prefetch_rows(const uint8_t* const (&wp)[RB], int64_t byte_off) {
  // one sequential stream (1 row, or int4's 2 adjacent rows): the hardware prefetchers keep up alone
  if constexpr (RB <= 2) return;
  if (STEP < 64 && (byte_off & 63) != 0) return;
  for (int i = 0; i < RB; ++i)
    for (int64_t off = 0; off < (STEP < 64 ? 1 : STEP / 64); ++off)
      _mm_prefetch(reinterpret_cast<const char*>(wp[i] + byte_off) + kPrefetchBytes + 64 * off, _MM_HINT_T0);
}

// Tiles of RB rows x TB tokens. With RB = 1 (the default, TileArgs::row_block) a tile reads one row
// front to back: the weight stream is one sequential read per thread, which the hardware
// prefetchers follow at memory speed. Interleaving 4 rows (RB = 4, the earlier layout of the loop,
// kept for comparison) read 30 % slower on an AMD EPYC (Zen 4) at one token, although the 4 rows
// are adjacent in memory. U independent accumulators per (row, token) over consecutive vectors of
// the row keep the multiply-adds from waiting on each other.
template <int KIND, int TB, int RB, int U>
static void tile(const TileArgs& a, int64_t r, int nr, int64_t t0) {
  const int64_t K = a.K;
  const uint8_t* wp[RB];
  for (int i = 0; i < RB; ++i) wp[i] = a.w + tile_row(r, nr, i) * a.w_row_bytes;
  const float* xp[TB];
  for (int t = 0; t < TB; ++t) xp[t] = a.x + (t0 + t) * K;
  typename V::R acc[U][RB][TB];
  for (int u = 0; u < U; ++u)
    for (int i = 0; i < RB; ++i)
      for (int t = 0; t < TB; ++t) acc[u][i][t] = V::zero();
  // inputs [k, k + N) into accumulator set u
  auto step = [&](int64_t k, int u) {
    typename V::R wv[RB];
    for (int i = 0; i < RB; ++i) wv[i] = ldw<KIND>(wp[i], k);
    for (int t = 0; t < TB; ++t) {
      const typename V::R xv = V::ldx(xp[t] + k);
      for (int i = 0; i < RB; ++i) acc[u][i][t] = V::fma(wv[i], xv, acc[u][i][t]);
    }
  };
  float sums[RB][TB];
  int64_t k = 0;
  for (; k + U * V::N <= K; k += U * V::N) {
    prefetch_rows<row_offset_bytes<KIND>(U * V::N), RB>(wp, row_offset_bytes<KIND>(k));
    for (int u = 0; u < U; ++u) step(k + u * V::N, u);
  }
  for (; k + V::N <= K; k += V::N) step(k, 0);
  for (int u = 1; u < U; ++u)
    for (int i = 0; i < RB; ++i)
      for (int t = 0; t < TB; ++t) acc[0][i][t] = V::add(acc[0][i][t], acc[u][i][t]);
  for (int i = 0; i < RB; ++i)
    for (int t = 0; t < TB; ++t) sums[i][t] = V::sum(acc[0][i][t]);
  for (; k < K; ++k)  // tail of a row whose length is not a multiple of the vector width
    for (int i = 0; i < RB; ++i)
      for (int t = 0; t < TB; ++t) sums[i][t] += wscalar<KIND>(wp[i], k) * xp[t][k];
  epilogue<KIND, TB, RB>(a, r, nr, t0, sums);
}

// int8 / int4 codes x int16 activations (TileArgs::xq, one scale per token in xs): integer
// multiply-adds into int32 lanes, moved into fp32 accumulators before they could overflow (int8:
// every 2048 inputs, |sum| < 2^30) or when the int4 group scale changes. Two sets of int32 sums
// (int8: consecutive steps; int4: the low and the high nibbles) so the multiply-adds of one step do
// not wait on the previous one.
template <int KIND, int TB, int RB>
static void tile_int(const TileArgs& a, int64_t r, int nr, int64_t t0) {
  const int64_t K = a.K;
  const uint8_t* wp[RB];
  for (int i = 0; i < RB; ++i) wp[i] = a.w + tile_row(r, nr, i) * a.w_row_bytes;
  const int16_t* xp[TB];
  for (int t = 0; t < TB; ++t) xp[t] = a.xq + (t0 + t) * K;
  typename V::R facc[RB][TB];
  typename V::I iacc[RB][TB], iacc2[RB][TB];
  for (int i = 0; i < RB; ++i)
    for (int t = 0; t < TB; ++t) {
      facc[i][t] = V::zero();
      iacc[i][t] = V::izero();
      iacc2[i][t] = V::izero();
    }
  // fp32 accumulators += int32 lanes * scale (per row: the int4 group scale, or 1)
  auto flush = [&](const typename V::R (&scale)[RB]) {
    for (int i = 0; i < RB; ++i)
      for (int t = 0; t < TB; ++t) {
        facc[i][t] = V::fma(V::cvt(V::iadd(iacc[i][t], iacc2[i][t])), scale[i], facc[i][t]);
        iacc[i][t] = V::izero();
        iacc2[i][t] = V::izero();
      }
  };
  float sums[RB][TB];
  if constexpr (KIND == kI8) {
    constexpr int64_t kFlush = 2048;
    typename V::R one[RB];
    for (int i = 0; i < RB; ++i) one[i] = V::set1(1.0f);
    const int64_t KV = K / V::NW * V::NW;
    // int8 codes of inputs [k0, k0 + NW) of every row times x, into the int32 sums `acc`
    auto step8 = [&](int64_t k0, typename V::I (&acc)[RB][TB]) {
      typename V::I wv[RB];
      for (int i = 0; i < RB; ++i) wv[i] = V::ld_i8w(wp[i] + k0);
      for (int t = 0; t < TB; ++t) {
        const typename V::I xv = V::ld_xq(xp[t] + k0);
        for (int i = 0; i < RB; ++i) acc[i][t] = V::dpw(acc[i][t], wv[i], xv);
      }
    };
    int64_t k = 0;
    while (k < KV) {
      const int64_t end = std::min(KV, k + kFlush);
      for (; k + 2 * V::NW <= end; k += 2 * V::NW) {
        prefetch_rows<2 * V::NW, RB>(wp, k);
        step8(k, iacc);
        step8(k + V::NW, iacc2);
      }
      for (; k < end; k += V::NW) {
        prefetch_rows<V::NW, RB>(wp, k);
        step8(k, iacc);
      }
      flush(one);
    }
    for (int i = 0; i < RB; ++i)
      for (int t = 0; t < TB; ++t) sums[i][t] = V::sum(facc[i][t]);
    for (; k < K; ++k)  // tail of a row whose length is not a multiple of the vector width
      for (int i = 0; i < RB; ++i)
        for (int t = 0; t < TB; ++t)
          sums[i][t] += static_cast<float>(static_cast<int8_t>(wp[i][k])) * static_cast<float>(xp[t][k]);
  } else {
    const int64_t G = a.group, ngroups = K / G;
    constexpr int64_t S = V::I4SPAN;
    const bool per_step = G % S != 0;  // a step spans two groups (AVX512, group an odd multiple of 32)
    auto gscale = [&](int i, int64_t g) {
      return ld_scalar(a.scales, a.sdtype, tile_row(r, nr, i) * ngroups + g);
    };
    auto step = [&](int64_t k, bool half) {
      typename V::I lo[RB], hi[RB];
      for (int i = 0; i < RB; ++i) {
        if (half) V::ld_i4w_half(wp[i] + k / 2, lo[i], hi[i]);
        else V::ld_i4w(wp[i] + k / 2, lo[i], hi[i]);
      }
      prefetch_rows<S / 2, RB>(wp, k / 2);
      for (int t = 0; t < TB; ++t) {
        const typename V::I x0 = half ? V::ld_xq_half(xp[t] + k) : V::ld_xq(xp[t] + k);
        const typename V::I x1 = half ? V::ld_xq_half(xp[t] + k + 16) : V::ld_xq(xp[t] + k + S / 2);
        for (int i = 0; i < RB; ++i) {
          iacc[i][t] = V::dpw(iacc[i][t], lo[i], x0);
          iacc2[i][t] = V::dpw(iacc2[i][t], hi[i], x1);
        }
      }
    };
    typename V::R sc[RB];
    int64_t k = 0;
    if (!per_step) {  // whole steps per group: no division in the loop
      for (int64_t g = 0; g < ngroups; ++g, k += G) {
        // a fresh counter: k itself lives across the flush and the scale loads, and GCC kept it on
        // the stack, a store and a load in every step's dependency chain
        for (int64_t kk = k, kend = k + G; kk < kend; kk += S) step(kk, false);
        for (int i = 0; i < RB; ++i) sc[i] = V::set1(gscale(i, g));
        flush(sc);
      }
    } else {  // each step's two halves may fall in two groups: follow the group boundaries
      int64_t g = 0, gend = G;
      auto group_of = [&](int64_t at) {
        while (at >= gend) { ++g; gend += G; }
        return g;
      };
      const bool halves = 2 * G == S;  // each half step is one group (32 on AVX512)
      for (; k + S <= K; k += S) {
        step(k, false);
        const int64_t g0 = halves ? 2 * (k / S) : group_of(k), g1 = halves ? g0 + 1 : group_of(k + S / 2);
        for (int i = 0; i < RB; ++i) sc[i] = V::mix(gscale(i, g0), gscale(i, g1));
        flush(sc);
      }
    }
    if (k < K) {  // AVX512: a last 32 inputs (K an odd multiple of 32)
      step(k, true);
      for (int i = 0; i < RB; ++i) sc[i] = V::set1(gscale(i, k / G));
      flush(sc);
    }
    for (int i = 0; i < RB; ++i)
      for (int t = 0; t < TB; ++t) sums[i][t] = V::sum(facc[i][t]);
  }
  for (int i = 0; i < RB; ++i)
    for (int t = 0; t < TB; ++t) sums[i][t] *= a.xs[t0 + t];
  epilogue<KIND, TB, RB>(a, r, nr, t0, sums);
}

// Rows [r0, r1) for every token, in tiles of RB rows x up to TBM tokens.
template <int KIND, int RB>
static void rows_rb(const TileArgs& a, int64_t r0, int64_t r1) {
  constexpr bool kInt = KIND == kI8 || KIND == kI4;
  constexpr int TBM = kInt ? V::TBI : V::TBMAX;
  auto run = [&](auto tb, int64_t r, int nr, int64_t t) {
    constexpr int TB = decltype(tb)::value;
    if constexpr (kInt) tile_int<KIND, TB, RB>(a, r, nr, t);
    else tile<KIND, TB, RB, (RB == 1 ? (TB == 1 ? 4 : 2) : 1)>(a, r, nr, t);
  };
  for (int64_t r = r0; r < r1; r += RB) {
    const int nr = static_cast<int>(std::min<int64_t>(RB, r1 - r));
    int64_t t = 0;
    for (; t + TBM <= a.n; t += TBM) run(std::integral_constant<int, TBM>{}, r, nr, t);
    switch (a.n - t) {
      case 1: if constexpr (TBM > 1) run(std::integral_constant<int, 1>{}, r, nr, t); break;
      case 2: if constexpr (TBM > 2) run(std::integral_constant<int, 2>{}, r, nr, t); break;
      case 3: if constexpr (TBM > 3) run(std::integral_constant<int, 3>{}, r, nr, t); break;
      default: break;
    }
  }
}

// int4 reads 2 rows per tile: its rows are short (K / 2 bytes) and its per-row work (a flush per
// group, the row's sum) long, so 2 rows' independent chains fill the core better; the 2 rows are
// adjacent, so the weights are still one sequential stream. Cache-resident (bench.kernels_hot,
// AVX2) 2 rows took 0.85-0.95x the time of 1 row per tile, 4 rows 1.05-1.4x (too few registers).
template <int KIND>
static void rows_kind(const TileArgs& a, int64_t r0, int64_t r1) {
  if (a.row_block == 4) rows_rb<KIND, 4>(a, r0, r1);
  else if constexpr (KIND == kI4) rows_rb<KIND, 2>(a, r0, r1);
  else rows_rb<KIND, 1>(a, r0, r1);
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

// -- attention of a few query tokens over a KV cache (AttnArgs) ---------------------------------
// One task is one (batch row, KV head), or one range of its keys (AttnArgs::splits): its keys and
// values are read from memory once, for every query head of its group and every query token. Pass 1 writes each query's scores over all L
// keys, then a softmax in place (fp32, std::exp), then pass 2 sums the weighted values. A row with every key
// masked gives zeros (its output is padding's, and NaN must not reach the residual stream).
template <int KIND>
static void attn_kind(const AttnArgs& a, int64_t task) {
  const int64_t bg = task / a.splits, split = task % a.splits;
  const int64_t b = bg / a.Hkv, g = bg % a.Hkv;
  const int64_t chunk = (a.L + a.splits - 1) / a.splits;
  const int64_t j0 = std::min(a.L, split * chunk);  // this task's keys: [j0, j0 + L)
  const int64_t G = a.Hq / a.Hkv, nq = G * a.Tq, L = std::min(a.L, j0 + chunk) - j0, Dk = a.Dk, Dv = a.Dv;
  constexpr int64_t es = KIND == kF32 ? 4 : 2;
  const uint8_t* kb = a.k + es * (b * a.k_sb + g * a.k_sh + j0 * a.k_sj);
  const uint8_t* vb = a.v + es * (b * a.v_sb + g * a.v_sh + j0 * a.v_sj);
  std::vector<float> mx(static_cast<size_t>(nq), -INFINITY), sums(static_cast<size_t>(nq), 0.0f);
  const float* q0 = a.q + (b * a.Hq + g * G) * a.Tq * Dk;  // the group's nq query rows, head-major
  std::vector<float> s(static_cast<size_t>(nq * L)), inv(static_cast<size_t>(nq));
  const int64_t DkV = Dk / V::N * V::N;
  const int er = a.eager_round;
  const float sc = er ? 1.0f : a.scale;  // eager rounding scales after rounding the dot product
  // Scores: 8 keys at a time, one vector accumulator per key, summed across lanes together; every
  // query of the group takes the block while its keys are in L1, so K is read from memory once.
  auto dots8 = [&](const float* qp, int64_t j) {
    typename V::R c[8];
    for (int u = 0; u < 8; ++u) c[u] = V::zero();
    for (int64_t d = 0; d < DkV; d += V::N) {
      const typename V::R qv = V::ldx(qp + d);
      for (int u = 0; u < 8; ++u) c[u] = V::fma(ldw<KIND>(kb + es * (j + u) * a.k_sj, d), qv, c[u]);
    }
    __m256 dots = V::sum8(c);
    if (DkV < Dk) {
      alignas(32) float tail[8];
      for (int u = 0; u < 8; ++u) {
        const uint8_t* kj = kb + es * (j + u) * a.k_sj;
        float t = 0.0f;
        for (int64_t d = DkV; d < Dk; ++d) t += wscalar<KIND>(kj, d) * qp[d];
        tail[u] = t;
      }
      dots = _mm256_add_ps(dots, _mm256_load_ps(tail));
    }
    return _mm256_mul_ps(dots, _mm256_set1_ps(sc));
  };
  int64_t j8 = 0;
  for (; j8 + 8 <= L; j8 += 8)
    for (int64_t qi = 0; qi < nq; ++qi) _mm256_storeu_ps(s.data() + qi * L + j8, dots8(q0 + qi * Dk, j8));
  for (int64_t j = j8; j < L; ++j) {
    const uint8_t* kj = kb + es * j * a.k_sj;
    for (int64_t qi = 0; qi < nq; ++qi) {
      const float* qp = q0 + qi * Dk;
      typename V::R c0 = V::zero();
      int64_t d = 0;
      for (; d < DkV; d += V::N) c0 = V::fma(ldw<KIND>(kj, d), V::ldx(qp + d), c0);
      float dot = V::sum(c0);
      for (; d < Dk; ++d) dot += wscalar<KIND>(kj, d) * qp[d];
      s[qi * L + j] = dot * sc;
    }
  }
  for (int64_t qi = 0; qi < nq; ++qi) {
    const int64_t h = g * G + qi / a.Tq, t = qi % a.Tq;
    float* sp = s.data() + qi * L;
    if (er)
      for (int64_t j = 0; j < L; ++j) sp[j] = round_to_16(round_to_16(sp[j], er) * a.scale, er);
    if (a.mask_kind != 0) {
      const int64_t mo = b * a.m_sb + h * a.m_sh + t * a.m_st + j0 * a.m_sj;
      for (int64_t j = 0; j < L; ++j) {
        const int64_t at = mo + j * a.m_sj;
        switch (a.mask_kind) {
          case 1: if (!static_cast<const bool*>(a.mask)[at]) sp[j] = -INFINITY; break;
          case 2: sp[j] += static_cast<const float*>(a.mask)[at]; break;
          case 3: sp[j] += ld_scalar(a.mask, kSBF16, at); break;
          default: sp[j] += ld_scalar(a.mask, kSF16, at); break;
        }
        if (er) sp[j] = round_to_16(sp[j], er);
      }
    }
    // Eager attention in a 16-bit dtype (er): the max takes the sink in, the differences from it are
    // rounded before the exp, and the probabilities are rounded and final (no scaling of the output).
    float m = er && a.sinks != nullptr ? a.sinks[h] : -INFINITY;
    for (int64_t j = 0; j < L; ++j) m = std::max(m, sp[j]);
    if (m == -INFINITY) {  // every key masked (or no keys in this range)
      std::fill(sp, sp + L, 0.0f);
      inv[qi] = 0.0f;
      continue;
    }
    mx[qi] = m;
    float base = m;  // what the exp subtracts
    if (er) {
      for (int64_t j = 0; j < L; ++j) sp[j] = round_to_16(sp[j] - m, er);
      base = 0.0f;
    }
    const typename V::R mv = V::set1(base);
    typename V::R sv = V::zero();
    int64_t j = 0;
    for (; j + V::N <= L; j += V::N) {
      const typename V::R e = exp_neg(V::sub(V::ldx(sp + j), mv));
      V::st(sp + j, e);
      sv = V::add(sv, e);
    }
    float sum = V::sum(sv);
    for (; j < L; ++j) {
      const float e = sp[j] == -INFINITY ? 0.0f : std::exp(sp[j] - base);
      sp[j] = e;
      sum += e;
    }
    if (er) {
      if (a.sinks != nullptr) sum += std::exp(round_to_16(a.sinks[h] - m, er));
      const float rs = 1.0f / sum;
      for (j = 0; j < L; ++j) sp[j] = round_to_16(sp[j] * rs, er);
      sum = 1.0f;
    }
    sums[qi] = sum;
    inv[qi] = 1.0f / sum;
  }
  // Weighted values, in chunks of keys whose values stay in L1 while every query of the group takes
  // them (V is read from memory once); per query, up to 8 vectors of the sum in registers.
  constexpr int64_t kBlock = 8 * V::N, kChunk = 64;
  const int64_t DvV = Dv / V::N * V::N;
  std::vector<float> acc(static_cast<size_t>(nq * Dv), 0.0f);
  for (int64_t j0 = 0; j0 < L; j0 += kChunk) {
    const int64_t j1 = std::min(L, j0 + kChunk);
    for (int64_t qi = 0; qi < nq; ++qi) {
      const float* sp = s.data() + qi * L;
      float* ap = acc.data() + qi * Dv;
      for (int64_t d0 = 0; d0 < DvV; d0 += kBlock) {
        const int64_t nv = std::min(kBlock, DvV - d0) / V::N;  // whole vectors in this block
        typename V::R r[8];
        for (int u = 0; u < 8; ++u)
          if (u < nv) r[u] = V::ldx(ap + d0 + u * V::N);
        for (int64_t j = j0; j < j1; ++j) {
          const float p = sp[j];
          if (p == 0.0f) continue;
          const typename V::R pv = V::set1(p);
          const uint8_t* vj = vb + es * j * a.v_sj;
          for (int u = 0; u < 8; ++u)
            if (u < nv) r[u] = V::fma(ldw<KIND>(vj, d0 + u * V::N), pv, r[u]);
        }
        for (int u = 0; u < 8; ++u)
          if (u < nv) V::st(ap + d0 + u * V::N, r[u]);
      }
      for (int64_t d = DvV; d < Dv; ++d) {  // tail lanes of a width that is not a multiple of N
        float sum = ap[d];
        for (int64_t j = j0; j < j1; ++j) sum += sp[j] * wscalar<KIND>(vb + es * j * a.v_sj, d);
        ap[d] = sum;
      }
    }
  }
  if (a.splits > 1) {  // unnormalised, with this range's max and sum: the caller combines the ranges
    std::memcpy(a.part + task * nq * Dv, acc.data(), sizeof(float) * nq * Dv);
    for (int64_t qi = 0; qi < nq; ++qi) {
      a.part_ml[(task * nq + qi) * 2] = mx[qi];
      a.part_ml[(task * nq + qi) * 2 + 1] = sums[qi];
    }
    return;
  }
  for (int64_t qi = 0; qi < nq; ++qi) {
    const int64_t h = g * G + qi / a.Tq, t = qi % a.Tq;
    float* op = a.out + ((b * a.Tq + t) * a.Hq + h) * Dv;
    const float iv = !er && a.sinks != nullptr && mx[qi] != -INFINITY
                         ? 1.0f / (sums[qi] + std::exp(a.sinks[h] - mx[qi])) : inv[qi];
    for (int64_t d = 0; d < Dv; ++d) op[d] = acc[qi * Dv + d] * iv;
  }
}

static void attn_task(const AttnArgs& a, int64_t task) {
  switch (a.kind) {
    case kF32: attn_kind<kF32>(a, task); break;
    case kBF16: attn_kind<kBF16>(a, task); break;
    case kF16: attn_kind<kF16>(a, task); break;
    default: break;
  }
}
