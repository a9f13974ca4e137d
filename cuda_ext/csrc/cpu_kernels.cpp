// The CPU expert/linear kernels, compiled once per ISA in this one translation unit: each region
// has its own target attributes (never -march=native), and cpu_ops.cpp picks a table at run time.
// Only standard headers come before the target regions, so no inline library code is compiled
// for a wider ISA than the one the process checks for.
#include <immintrin.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

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
  static const KernelTable t{"avx2", &avx2::rows_any, false, 32, nullptr, &avx2::attn_task};
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
  static const KernelTable t{"avx512", &avx512::rows_any, false, 64, nullptr, &avx512::attn_task};
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
// x is rounded to bf16 first, as the reference casts x to the weights' dtype. Always used for one
// token; for several tokens only where dp_tokens_faster() measured it faster than the
// shift-to-fp32 + FMA kernel (on a Xeon VDPBF16PS issued at a fraction of the FMA rate and lost
// from two tokens on; on an AMD Zen 4 it won).
// RB rows x TB tokens, U accumulators per (row, token) over consecutive 32-input vectors (see tile
// in cpu_kernels_impl.h for why one row at a time).
template <int TB, int RB, int U>
static void tile_dp(const TileArgs& a, int64_t r, int nr, int64_t t0) {
  const int64_t K = a.K;
  const uint8_t* wb[RB];  // rows of bf16 weights; input k is at byte 2 * k
  for (int i = 0; i < RB; ++i) wb[i] = a.w + tile_row(r, nr, i) * a.w_row_bytes;
  const uint16_t* xp[TB];
  for (int t = 0; t < TB; ++t) xp[t] = a.xb + (t0 + t) * K;
  __m512 acc[U][RB][TB];
  for (int u = 0; u < U; ++u)
    for (int i = 0; i < RB; ++i)
      for (int t = 0; t < TB; ++t) acc[u][i][t] = _mm512_setzero_ps();
  auto step = [&](int64_t k, int u) {
    __m512bh wv[RB];
    for (int i = 0; i < RB; ++i) wv[i] = (__m512bh)_mm512_loadu_si512(wb[i] + 2 * k);
    for (int t = 0; t < TB; ++t) {
      const __m512bh xv = (__m512bh)_mm512_loadu_si512(xp[t] + k);
      for (int i = 0; i < RB; ++i) acc[u][i][t] = _mm512_dpbf16_ps(acc[u][i][t], wv[i], xv);
    }
  };
  int64_t k = 0;
  for (; k + 32 * U <= K; k += 32 * U) {
    prefetch_rows<64 * U, RB>(wb, 2 * k);
    for (int u = 0; u < U; ++u) step(k + 32 * u, u);
  }
  for (; k + 32 <= K; k += 32) step(k, 0);
  if (k < K) {  // zero-filled tail: both operands masked
    const __mmask32 m = static_cast<__mmask32>((1ull << (K - k)) - 1);
    __m512bh wv[RB];
    for (int i = 0; i < RB; ++i) wv[i] = (__m512bh)_mm512_maskz_loadu_epi16(m, wb[i] + 2 * k);
    for (int t = 0; t < TB; ++t) {
      const __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(m, xp[t] + k);
      for (int i = 0; i < RB; ++i) acc[0][i][t] = _mm512_dpbf16_ps(acc[0][i][t], wv[i], xv);
    }
  }
  float sums[RB][TB];
  for (int i = 0; i < RB; ++i)
    for (int t = 0; t < TB; ++t) {
      for (int u = 1; u < U; ++u) acc[0][i][t] = _mm512_add_ps(acc[0][i][t], acc[u][i][t]);
      sums[i][t] = _mm512_reduce_add_ps(acc[0][i][t]);
    }
  epilogue<kBF16, TB, RB>(a, r, nr, t0, sums);
}

// bf16 rows with VDPBF16PS: tiles of one row (or 4, TileArgs::row_block) x up to 4 tokens.
static void rows_bf16(const TileArgs& a, int64_t r0, int64_t r1) {
  auto tokens = [&](auto rb, int64_t r, int nr) {
    constexpr int RB = decltype(rb)::value;
    constexpr int U1 = RB == 1 ? 4 : 1, U = RB == 1 ? 2 : 1;  // accumulators per (row, token)
    int64_t t = 0;
    for (; t + 4 <= a.n; t += 4) tile_dp<4, RB, U>(a, r, nr, t);
    switch (a.n - t) {
      case 1: tile_dp<1, RB, U1>(a, r, nr, t); break;
      case 2: tile_dp<2, RB, U>(a, r, nr, t); break;
      case 3: tile_dp<3, RB, U>(a, r, nr, t); break;
      default: break;
    }
  };
  if (a.row_block == 4) {
    for (int64_t r = r0; r < r1; r += 4)
      tokens(std::integral_constant<int, 4>{}, r, static_cast<int>(std::min<int64_t>(4, r1 - r)));
  } else {
    for (int64_t r = r0; r < r1; ++r) tokens(std::integral_constant<int, 1>{}, r, 1);
  }
}

static void rows_dispatch(const TileArgs& a, int64_t r0, int64_t r1) {
  if (a.kind == kBF16 && a.xb != nullptr && (a.n == 1 || a.dp_tokens)) rows_bf16(a, r0, r1);
  else rows_any(a, r0, r1);
}

// Whether VDPBF16PS computes 4-token bf16 tiles faster than shift + FMA on this CPU. At several
// tokens per weight the tiles are compute-bound, and CPUs differ: on an AMD EPYC (Zen 4) VDPBF16PS
// was 1.3-1.6x faster, on a Xeon shift + FMA was. Both run over a 256 KB matrix that stays in L2,
// alternately, best of 5 each (about a millisecond, once per process).
static bool dp_tokens_faster() {
  constexpr int64_t R = 128, K = 1024, T = 4;
  std::vector<uint16_t> w(R * K, 0x3C00), xb(T * K, 0x3F80);  // bf16 0.0078125 and 1.0
  std::vector<float> x(T * K, 1.0f), out(T * R, 0.0f);
  TileArgs a{};
  a.w = reinterpret_cast<const uint8_t*>(w.data()); a.w_row_bytes = 2 * K; a.kind = kBF16; a.K = K;
  a.x = x.data(); a.xb = xb.data(); a.n = T; a.out = out.data(); a.ldo = R; a.row_block = 1;
  auto run = [&](bool dp) {
    const auto t0 = std::chrono::steady_clock::now();
    for (int64_t r = 0; r < R; ++r) {
      if (dp) tile_dp<4, 1, 2>(a, r, 1, 0);
      else tile<kBF16, 4, 1, 2>(a, r, 1, 0);
    }
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  };
  double best_dp = 1e9, best_fma = 1e9;
  for (int rep = 0; rep < 5; ++rep) {
    best_dp = std::min(best_dp, run(true));
    best_fma = std::min(best_fma, run(false));
  }
  return best_dp < best_fma;
}
}  // namespace avx512bf16
const KernelTable* table_avx512bf16() {
  static const KernelTable t{"avx512bf16", &avx512bf16::rows_dispatch, true, 64, &avx512bf16::dp_tokens_faster,
                             &avx512bf16::attn_task};
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
