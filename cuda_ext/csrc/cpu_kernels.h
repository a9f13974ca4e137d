// Interface between the torch-facing ops (cpu_ops.cpp) and the per-ISA kernels (cpu_kernels.cpp).
// This header must not include torch: the kernel translation unit is compiled region by region
// with its own target attributes, and no torch inline code may be instantiated there.
#pragma once
#include <cstdint>

namespace moepager_cpu {

enum Kind : int { kF32 = 0, kBF16 = 1, kF16 = 2, kI8 = 3, kI4 = 4 };
enum ScalarCode : int { kS32 = 0, kSBF16 = 1, kSF16 = 2 };

// out[out_rows[t], r] += wt[t] * (dot(W[r, :], x[t, :]) * scale_r + bias[r]) for r in [r0, r1), t < n.
// int8: one scale per row; int4: one scale per (row, group); float kinds: no scales.
struct TileArgs {
  const uint8_t* w;         // row 0 of the weight matrix [rows, K] (int4: [rows, K/2] bytes)
  int64_t w_row_bytes;      // bytes from one row to the next
  int kind;                 // Kind
  int64_t K;                // input dim
  int64_t group;            // int4 group size (a multiple of 32)
  const void* scales;       // int8 [rows], int4 [rows, K/group]; in scalar code `sdtype`
  int sdtype;               // ScalarCode of scales and bias
  const void* bias;         // [rows] or nullptr
  const float* x;           // [n, K] fp32
  const uint16_t* xb;       // [n, K] bf16 copy of x (only read by the AVX512_BF16 bf16 kernel)
  const int16_t* xq;        // [n, K] int16 x (int8 / int4 weights): x[t] ~= xq[t] * xs[t], in x_order
  const float* xs;          // [n] per-token scale of xq
  int64_t n;                // tokens
  const int64_t* out_rows;  // [n] output row of each token, nullptr = t
  const float* wt;          // [n] weight of each token, nullptr = 1
  float* out;               // accumulated into
  int64_t ldo;              // out row stride (elements)
  int row_block;            // 1: each row read front to back (int4: 2 adjacent rows), or 4 (4 rows interleaved)
  bool dp_tokens;           // AVX512_BF16: VDPBF16PS for several tokens too (else from 2 tokens shift + FMA)
};

using RowsFn = void (*)(const TileArgs&, int64_t r0, int64_t r1);

// Attention of a few query tokens over a KV cache (decode): out[b, t, h, :] = softmax(q . K^T + mask) V
// for the query heads h of one (batch row, KV head) per task; fp32 scores and sums.
struct AttnArgs {
  const float* q;           // [B, Hq, Tq, Dk] fp32 contiguous, already multiplied by the scale
  const uint8_t* k;         // element (b, g, j, d) at k + es * (b * k_sb + g * k_sh + j * k_sj + d)
  const uint8_t* v;         // likewise with v_* strides, Dv wide
  int kind;                 // Kind of k and v (kF32, kBF16, kF16)
  int64_t k_sb, k_sh, k_sj, v_sb, v_sh, v_sj;  // element strides
  const void* mask;         // nullptr, or element (b, h, t, j) at m_sb, m_sh, m_st, m_sj (0 = broadcast)
  int mask_kind;            // 0 none, 1 bool (true: attend), 2 fp32, 3 bf16, 4 fp16 (added to the scores)
  int64_t m_sb, m_sh, m_st, m_sj;
  int64_t B, Hq, Hkv, Tq, L, Dk, Dv;
  float scale;              // multiplies q . k
  float* out;               // [B, Tq, Hq, Dv] fp32 (splits == 1)
  // splits > 1: each (b, g) task's keys are cut into this many ranges, one task each, whose
  // unnormalised sums go to part [task][nq][Dv] and their (max score, sum of exps) to part_ml
  // [task][nq][2], nq = (Hq / Hkv) * Tq; the caller combines them.
  int64_t splits;
  float* part;
  float* part_ml;
  // [Hq] fp32 attention-sink logits (GPT-OSS), or nullptr: one more softmax term per query head,
  // with no value (the caller adds it when splits > 1)
  const float* sinks;
  // 0, or the dtype whose rounding transformers' eager attention applies between its steps (1 bf16,
  // 2 fp16): scores, scaled scores, masked scores, scores minus the max and probabilities are
  // rounded to it, as eager attention in that dtype does (GPT-OSS's); splits is then 1
  int eager_round;
};

using AttnFn = void (*)(const AttnArgs&, int64_t task);  // task = (b * Hkv + g) * splits + s

struct KernelTable {
  const char* name;     // "avx512bf16", "avx512", "avx2"
  RowsFn rows;
  bool bf16_x;          // wants TileArgs::xb for kBF16 weights
  int int4_span;        // int4: inputs per step; xq is stored in this ISA's nibble order (see quantize_x)
  bool (*dp_tokens_faster)();  // AVX512_BF16 only: measures whether TileArgs::dp_tokens should be set
  AttnFn attn;
};

// The int kernels multiply int8 / int4 codes by x quantized to int16 with one scale per token
// (relative error <= 2^-16 of the token's largest |x|): integer multiply-adds, no conversions of
// weights to float. For int4, each span of 64 inputs is stored as [0..15, 32..47, 16..31, 48..63]
// when int4_span is 64 (the low and high nibbles of 32 bytes), in order when it is 32.
void quantize_x(const float* x, int64_t n, int64_t K, int int4_span, bool int4, int16_t* xq, float* xs);

const KernelTable* table_avx2();
const KernelTable* table_avx512();
const KernelTable* table_avx512bf16();

}  // namespace moepager_cpu
