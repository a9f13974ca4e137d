// The CPU expert/linear kernels, compiled once per ISA in this one translation unit: each region
// has its own target attributes (never -march=native), and cpu_ops.cpp picks a table at run time.
// Only standard headers come before the target regions, so no inline library code is compiled
// for a wider ISA than the one the process checks for.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

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
  static const KernelTable t{"avx2", &avx2::rows_any, false, 32};
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
  static const KernelTable t{"avx512", &avx512::rows_any, false, 64};
  return &t;
}
}  // namespace moepager_cpu
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx512vnni,avx2,fma,f16c")
namespace moepager_cpu {
namespace avx512bf16 {
// Every kernel again with VPDPWSSD (VNNI) for the int8 / int4 multiply-adds; CPUs with AVX512_BF16
// all have AVX512_VNNI, and the run-time check asks for both.
#define MP_AVX512 1
#define MP_VNNI 1
#include "cpu_kernels_impl.h"
#undef MP_VNNI
#undef MP_AVX512

// bf16 weights x bf16 activations with VDPBF16PS: 32 multiply-adds per instruction, fp32 sums.
// x is rounded to bf16 first, as the reference casts x to the weights' dtype. Used for one token
// only: measured on a Xeon with AVX512_BF16, from two tokens per tile on the shift-to-fp32 + FMA
// kernel was faster (VDPBF16PS issues at a fraction of the FMA rate there), at one token both read
// the weights faster than memory delivers them.
// RB rows x U accumulators per row over consecutive 32-input vectors, one token (see tile in
// cpu_kernels_impl.h for why one row at a time).
template <int RB, int U>
static void tile_dp(const TileArgs& a, int64_t r, int nr) {
  const int64_t K = a.K;
  const uint8_t* wb[RB];  // rows of bf16 weights; input k is at byte 2 * k
  for (int i = 0; i < RB; ++i) wb[i] = a.w + tile_row(r, nr, i) * a.w_row_bytes;
  const uint16_t* xp = a.xb;
  __m512 acc[U][RB];
  for (int u = 0; u < U; ++u)
    for (int i = 0; i < RB; ++i) acc[u][i] = _mm512_setzero_ps();
  auto step = [&](int64_t k, int u) {
    const __m512bh xv = (__m512bh)_mm512_loadu_si512(xp + k);
    for (int i = 0; i < RB; ++i)
      acc[u][i] = _mm512_dpbf16_ps(acc[u][i], (__m512bh)_mm512_loadu_si512(wb[i] + 2 * k), xv);
  };
  int64_t k = 0;
  for (; k + 32 * U <= K; k += 32 * U) {
    prefetch_rows<64 * U, RB>(wb, 2 * k);
    for (int u = 0; u < U; ++u) step(k + 32 * u, u);
  }
  for (; k + 32 <= K; k += 32) step(k, 0);
  if (k < K) {  // zero-filled tail: both operands masked
    const __mmask32 m = static_cast<__mmask32>((1ull << (K - k)) - 1);
    const __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(m, xp + k);
    for (int i = 0; i < RB; ++i)
      acc[0][i] = _mm512_dpbf16_ps(acc[0][i], (__m512bh)_mm512_maskz_loadu_epi16(m, wb[i] + 2 * k), xv);
  }
  float sums[RB][1];
  for (int i = 0; i < RB; ++i) {
    for (int u = 1; u < U; ++u) acc[0][i] = _mm512_add_ps(acc[0][i], acc[u][i]);
    sums[i][0] = _mm512_reduce_add_ps(acc[0][i]);
  }
  epilogue<kBF16, 1, RB>(a, r, nr, 0, sums);
}

static void rows_bf16(const TileArgs& a, int64_t r0, int64_t r1) {
  if (a.row_block == 4) {
    for (int64_t r = r0; r < r1; r += 4) tile_dp<4, 1>(a, r, static_cast<int>(std::min<int64_t>(4, r1 - r)));
  } else {
    for (int64_t r = r0; r < r1; ++r) tile_dp<1, 4>(a, r, 1);
  }
}

static void rows_dispatch(const TileArgs& a, int64_t r0, int64_t r1) {
  if (a.kind == kBF16 && a.xb != nullptr && a.n == 1) rows_bf16(a, r0, r1);
  else rows_any(a, r0, r1);
}
}  // namespace avx512bf16
const KernelTable* table_avx512bf16() {
  static const KernelTable t{"avx512bf16", &avx512bf16::rows_dispatch, true, 64};
  return &t;
}
}  // namespace moepager_cpu
#pragma GCC pop_options

namespace moepager_cpu {
void quantize_x(const float* x, int64_t n, int64_t K, int int4_span, bool int4, int16_t* xq, float* xs) {
  for (int64_t t = 0; t < n; ++t) {
    const float* src = x + t * K;
    int16_t* dst = xq + t * K;
    float amax = 0.0f;
    for (int64_t k = 0; k < K; ++k) amax = std::max(amax, std::fabs(src[k]));
    const float scale = amax > 0.0f ? amax / 32767.0f : 1.0f;
    const float inv = 1.0f / scale;
    xs[t] = scale;
    const bool perm = int4 && int4_span == 64;
    for (int64_t k = 0; k < K; ++k) {
      int64_t at = k;
      const int64_t base = k & ~int64_t{63}, j = k - base;
      if (perm && base + 64 <= K) at = base + (j < 16 || j >= 48 ? j : j < 32 ? j + 16 : j - 16);
      const float q = std::nearbyint(src[k] * inv);
      dst[at] = static_cast<int16_t>(std::min(32767.0f, std::max(-32767.0f, q)));
    }
  }
}
}  // namespace moepager_cpu
