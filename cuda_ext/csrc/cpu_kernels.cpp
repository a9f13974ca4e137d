// The CPU expert/linear kernels, compiled once per ISA in this one translation unit: each region
// has its own target attributes (never -march=native), and cpu_ops.cpp picks a table at run time.
// Only standard headers come before the target regions, so no inline library code is compiled
// for a wider ISA than the one the process checks for.
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "cpu_kernels.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace moepager_cpu {
namespace avx2 {
#define MP_AVX2 1
#include "cpu_kernels_impl.h"
#undef MP_AVX2
}  // namespace avx2
const KernelTable* table_avx2() {
  static const KernelTable t{"avx2", &avx2::rows_any, false};
  return &t;
}
}  // namespace moepager_cpu
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
namespace moepager_cpu {
namespace avx512 {
#define MP_AVX512 1
#include "cpu_kernels_impl.h"
#undef MP_AVX512
}  // namespace avx512
const KernelTable* table_avx512() {
  static const KernelTable t{"avx512", &avx512::rows_any, false};
  return &t;
}
}  // namespace moepager_cpu
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,f16c")
namespace moepager_cpu {
namespace avx512bf16 {
// bf16 weights x bf16 activations with VDPBF16PS: 32 multiply-adds per instruction, fp32 sums.
// x is rounded to bf16 first, as the reference casts x to the weights' dtype.
template <int TB>
static void tile_dp(const TileArgs& a, int64_t r, int nr, int64_t t0) {
  constexpr int RB = 4;
  const int64_t K = a.K;
  const uint16_t* wp[RB];
  for (int i = 0; i < RB; ++i)
    wp[i] = reinterpret_cast<const uint16_t*>(a.w + (r + (i < nr ? i : nr - 1)) * a.w_row_bytes);
  const uint16_t* xp[TB];
  for (int t = 0; t < TB; ++t) xp[t] = a.xb + (t0 + t) * K;
  __m512 acc[RB][TB];
  for (int i = 0; i < RB; ++i)
    for (int t = 0; t < TB; ++t) acc[i][t] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    __m512bh wv[RB];
    for (int i = 0; i < RB; ++i) wv[i] = (__m512bh)_mm512_loadu_si512(wp[i] + k);
    for (int t = 0; t < TB; ++t) {
      const __m512bh xv = (__m512bh)_mm512_loadu_si512(xp[t] + k);
      for (int i = 0; i < RB; ++i) acc[i][t] = _mm512_dpbf16_ps(acc[i][t], wv[i], xv);
    }
  }
  if (k < K) {  // zero-filled tail: both operands masked
    const __mmask32 m = static_cast<__mmask32>((1ull << (K - k)) - 1);
    __m512bh wv[RB];
    for (int i = 0; i < RB; ++i) wv[i] = (__m512bh)_mm512_maskz_loadu_epi16(m, wp[i] + k);
    for (int t = 0; t < TB; ++t) {
      const __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(m, xp[t] + k);
      for (int i = 0; i < RB; ++i) acc[i][t] = _mm512_dpbf16_ps(acc[i][t], wv[i], xv);
    }
  }
  float sums[RB][TB];
  for (int i = 0; i < RB; ++i)
    for (int t = 0; t < TB; ++t) sums[i][t] = _mm512_reduce_add_ps(acc[i][t]);
  avx512::epilogue<kBF16, TB>(a, r, nr, t0, sums);
}

static void rows_bf16(const TileArgs& a, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; r += 4) {
    const int nr = static_cast<int>(std::min<int64_t>(4, r1 - r));
    int64_t t = 0;
    for (; t + 4 <= a.n; t += 4) tile_dp<4>(a, r, nr, t);
    switch (a.n - t) {
      case 1: tile_dp<1>(a, r, nr, t); break;
      case 2: tile_dp<2>(a, r, nr, t); break;
      case 3: tile_dp<3>(a, r, nr, t); break;
      default: break;
    }
  }
}

static void rows_any(const TileArgs& a, int64_t r0, int64_t r1) {
  if (a.kind == kBF16 && a.xb != nullptr) rows_bf16(a, r0, r1);
  else avx512::rows_any(a, r0, r1);
}
}  // namespace avx512bf16
const KernelTable* table_avx512bf16() {
  static const KernelTable t{"avx512bf16", &avx512bf16::rows_any, true};
  return &t;
}
}  // namespace moepager_cpu
#pragma GCC pop_options
