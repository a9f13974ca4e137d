// CPU kernels of moepager::moe_ffn, moepager::linear and moepager::rms_norm
// (TORCH_LIBRARY_IMPL(moepager, CPU)).
// The ops and their torch references are declared in cuda_ext/cpu.py; this file only overrides
// them for CPU tensors. The arithmetic lives in cpu_kernels.cpp (one region per ISA); the ISA is
// chosen at run time from cpuid, capped by MOEPAGER_CPU_ISA, and can be changed for tests through
// moepager_cpu::set_isa.
#include <ATen/Parallel.h>
#include <ATen/TensorOperators.h>
#include <ATen/ops/bitwise_and.h>
#include <ATen/ops/bitwise_right_shift.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/linear.h>
#include <ATen/ops/sigmoid.h>
#include <ATen/ops/silu.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cmath>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <string>
#include <tuple>
#include <vector>

#include "cpu_kernels.h"

namespace moepager_cpu {
namespace {

constexpr int64_t kAlign = 64;
constexpr int64_t kRowBlock = 4;        // rows per tile; thread ranges are whole tiles
constexpr int64_t kLinearMaxTokens = 16;  // beyond this oneDNN's GEMM (at::linear) is faster
// An expert with more tokens than this (prefill) is widened to fp32 and multiplied by oneDNN's GEMM:
// the row-dot kernels are compute-bound there, a blocked GEMM is not. fp32 keeps gate_up and the
// activation unrounded, as the row kernels keep them.
constexpr int64_t kGemmTokens = 32;
// Decode attention cuts a (row, KV head)'s keys into ranges for more threads only down to this.
constexpr int64_t kAttnMinKeys = 256;

int64_t align64(int64_t n) { return (n + kAlign - 1) / kAlign * kAlign; }

// Levels: 3 avx512bf16 (with VNNI), 2 avx512 (F/BW/VL/DQ), 1 avx2 (+FMA, F16C), 0 none.
int detect_level() {
  __builtin_cpu_init();
  if (!(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))) return 0;
  if (!(__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq")))
    return 1;
  return __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512vnni") ? 3 : 2;
}

int level_of(const std::string& name) {
  if (name == "avx512bf16") return 3;
  if (name == "avx512") return 2;
  if (name == "avx2") return 1;
  if (name == "scalar" || name == "none" || name == "reference") return 0;
  return -1;
}

const KernelTable* table_of(int level) {
  switch (level) {
    case 3: return table_avx512bf16();
    case 2: return table_avx512();
    case 1: return table_avx2();
    default: return nullptr;
  }
}

std::atomic<int> g_level{-1};
// Rows per kernel tile (TileArgs::row_block): 1, or 4 to measure the interleaved-rows loop.
std::atomic<int> g_row_block{1};
// VDPBF16PS for multi-token bf16 tiles: -1 = measure on first use (KernelTable::dp_tokens_faster).
std::atomic<int> g_dp_tokens{-1};

int initial_level() {
  int level = detect_level();
  if (const char* env = std::getenv("MOEPAGER_CPU_ISA")) {
    const int want = level_of(env);
    if (want >= 0 && want < level) level = want;
  }
  return level;
}

const KernelTable* table() {
  int level = g_level.load();
  if (level < 0) {
    level = initial_level();
    g_level.store(level);
  }
  return table_of(level);
}

int kind_code(c10::string_view kind, at::ScalarType dtype) {
  if (kind == "int8") return kI8;
  if (kind == "int4") return kI4;
  TORCH_CHECK(kind == "float", "moe_ffn: kind must be float, int8 or int4, got ", std::string(kind));
  switch (dtype) {
    case at::kFloat: return kF32;
    case at::kBFloat16: return kBF16;
    case at::kHalf: return kF16;
    default: TORCH_CHECK(false, "moe_ffn: page dtype must be float32, bfloat16 or float16");
  }
  return -1;
}

int scalar_code(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat: return kS32;
    case at::kBFloat16: return kSBF16;
    case at::kHalf: return kSF16;
    default: TORCH_CHECK(false, "moe_ffn: dtype must be float32, bfloat16 or float16");
  }
  return -1;
}

// Byte offsets of the page sections; mirrors PageFormat.sections() in cuda_ext/pages.py.
struct PageLayout {
  int64_t w1 = 0, w2 = 0, s1 = -1, s2 = -1, b1 = -1, b2 = -1, bytes = 0;
  int64_t w1_row = 0, w2_row = 0;  // bytes per weight row
};

PageLayout page_layout(int kind, int64_t es, int64_t H, int64_t I, int64_t g, bool has_bias) {
  PageLayout p;
  int64_t off = 0;
  auto take = [&](int64_t n) { const int64_t at = off; off = align64(off + n); p.bytes = at + n; return at; };
  if (kind == kI4) {
    p.w1_row = H / 2; p.w2_row = I / 2;
    p.w1 = take(2 * I * H / 2); p.w2 = take(H * I / 2);
    p.s1 = take(2 * I * (H / g) * es); p.s2 = take(H * (I / g) * es);
  } else if (kind == kI8) {
    p.w1_row = H; p.w2_row = I;
    p.w1 = take(2 * I * H); p.w2 = take(H * I);
    p.s1 = take(2 * I * es); p.s2 = take(H * es);
  } else {
    p.w1_row = H * es; p.w2_row = I * es;
    p.w1 = take(2 * I * H * es); p.w2 = take(H * I * es);
  }
  if (has_bias) { p.b1 = take(2 * I * es); p.b2 = take(H * es); }
  p.bytes = align64(p.bytes);
  return p;
}

// Rows [0, rows) of one matrix for a list of experts, split across threads by row tiles: every
// thread reads its share of every expert, so top-k experts at one token keep all cores busy.
// Whether bf16 tiles of several tokens use VDPBF16PS: measured once, on the first call that could.
bool dp_tokens(const KernelTable* kt) {
  if (kt == nullptr || kt->dp_tokens_faster == nullptr) return false;
  int v = g_dp_tokens.load();
  if (v < 0) {
    v = kt->dp_tokens_faster() ? 1 : 0;
    int expected = -1;
    if (!g_dp_tokens.compare_exchange_strong(expected, v)) v = expected;
  }
  return v == 1;
}

void run_rows(const KernelTable* kt, std::vector<TileArgs>& jobs, int64_t rows) {
  const int rb = g_row_block.load();
  const bool dp = dp_tokens(kt);
  for (TileArgs& a : jobs) {
    a.row_block = rb;
    a.dp_tokens = dp;
  }
  const int64_t tiles = (rows + kRowBlock - 1) / kRowBlock;
  at::parallel_for(0, tiles, 1, [&](int64_t b0, int64_t b1) {
    const int64_t r0 = b0 * kRowBlock, r1 = std::min(rows, b1 * kRowBlock);
    for (const TileArgs& a : jobs) kt->rows(a, r0, r1);
  });
}

at::Tensor act_fn(const at::Tensor& gu, bool interleaved, c10::string_view act, double alpha, double limit) {
  const int64_t I = gu.size(1) / 2;
  at::Tensor gate = interleaved ? gu.slice(1, 0, 2 * I, 2) : gu.slice(1, 0, I);
  at::Tensor up = interleaved ? gu.slice(1, 1, 2 * I, 2) : gu.slice(1, I, 2 * I);
  if (act == "silu") return (at::silu(gate) * up).contiguous();
  TORCH_CHECK(act == "swiglu_oai", "moe_ffn: act must be silu or swiglu_oai, got ", std::string(act));
  gate = gate.clamp_max(limit);
  up = up.clamp(-limit, limit);
  return ((up + 1) * gate * at::sigmoid(gate * alpha)).contiguous();
}

// One weight matrix of a page as a dense tensor: a view for float pages, dequantized (fp32) else.
at::Tensor dense_weight(const uint8_t* page, int kind, at::ScalarType dtype, int64_t w_off, int64_t s_off,
                        int64_t rows, int64_t K, int64_t group) {
  auto opts = at::TensorOptions().device(at::kCPU);
  void* w = const_cast<uint8_t*>(page + w_off);
  if (kind != kI8 && kind != kI4) return at::from_blob(w, {rows, K}, opts.dtype(dtype));
  void* s = const_cast<uint8_t*>(page + s_off);
  if (kind == kI8)
    return at::from_blob(w, {rows, K}, opts.dtype(at::kChar)).to(at::kFloat) *
           at::from_blob(s, {rows, 1}, opts.dtype(dtype)).to(at::kFloat);
  const at::Tensor b = at::from_blob(w, {rows, K / 32, 1, 16}, opts.dtype(at::kByte));
  const at::Tensor q = at::cat({at::bitwise_and(b, 15), at::bitwise_right_shift(b, 4)}, 2).to(at::kFloat) - 8;
  const at::Tensor sc = at::from_blob(s, {rows, K / group, 1}, opts.dtype(dtype)).to(at::kFloat);
  return (q.view({rows, K / group, group}) * sc).view({rows, K});
}

// x [N, K] fp32 -> (int16 [N, K] in the kernel table's int4 order, scales [N]) for the int kernels.
std::tuple<at::Tensor, at::Tensor> quantize(const at::Tensor& x, const KernelTable* kt, bool int4) {
  const int64_t N = x.size(0), K = x.size(1);
  at::Tensor xq = at::empty({N, K}, x.options().dtype(at::kShort));
  at::Tensor xs = at::empty({N}, x.options().dtype(at::kFloat));
  quantize_x(x.data_ptr<float>(), N, K, kt->int4_span, int4, xq.data_ptr<int16_t>(), xs.data_ptr<float>());
  return {xq, xs};
}

at::Tensor bias_of(const uint8_t* page, int64_t off, int64_t n, at::ScalarType dtype) {
  return at::from_blob(const_cast<uint8_t*>(page + off), {n}, at::TensorOptions().dtype(dtype)).to(at::kFloat);
}

at::Tensor moe_ffn_cpu(const at::Tensor& x, const at::Tensor& pages, const at::Tensor& rows, const at::Tensor& idx,
                       const at::Tensor& weights, c10::string_view kind, at::ScalarType dtype, int64_t hidden,
                       int64_t inter, bool transposed, bool interleaved, bool has_bias, int64_t group_size,
                       c10::string_view act, double alpha, double limit) {
  (void)transposed;  // pages store [out, in] rows whatever the module layout
  const KernelTable* kt = table();
  TORCH_CHECK(kt != nullptr, "moe_ffn: the native CPU kernels need AVX2 and FMA");
  const int code = kind_code(kind, dtype);
  const int sc = scalar_code(dtype);
  const int64_t H = hidden, I = inter;
  TORCH_CHECK(x.dim() == 2 && x.size(1) == H, "moe_ffn: x must be [T, ", H, "], got ", x.sizes());
  TORCH_CHECK(pages.dim() == 2 && pages.scalar_type() == at::kByte && pages.stride(1) == 1,
              "moe_ffn: pages must be a uint8 [N, page_bytes] tensor with contiguous rows");
  TORCH_CHECK(idx.dim() == 2 && idx.size(0) == x.size(0) && idx.scalar_type() == at::kLong,
              "moe_ffn: idx must be int64 [T, K]");
  TORCH_CHECK(weights.sizes() == idx.sizes(), "moe_ffn: weights must have idx's shape");
  TORCH_CHECK(rows.dim() == 1 && rows.scalar_type() == at::kLong, "moe_ffn: rows must be int64 [U]");
  if (code == kI4) TORCH_CHECK(group_size > 0 && group_size % 32 == 0 && H % group_size == 0 && I % group_size == 0,
                               "moe_ffn: bad group_size ", group_size);
  const int64_t es = c10::elementSize(dtype);
  const PageLayout L = page_layout(code, es, H, I, group_size, has_bias);
  TORCH_CHECK(pages.size(1) >= L.bytes, "moe_ffn: pages rows hold ", pages.size(1), " bytes, the format needs ",
              L.bytes);

  const int64_t T = x.size(0), K = idx.size(1), U = rows.size(0);
  const at::Tensor idx_c = idx.contiguous(), rows_c = rows.contiguous();
  const at::Tensor w_c = weights.to(at::kFloat).contiguous();
  const int64_t* ip = idx_c.data_ptr<int64_t>();
  const int64_t* rp = rows_c.data_ptr<int64_t>();
  const float* wp = w_c.data_ptr<float>();

  // 1) group the (token, k) entries by expert; entries of one expert are contiguous
  std::vector<int64_t> count(U, 0);
  for (int64_t i = 0; i < T * K; ++i) {
    const int64_t u = ip[i];
    if (u < 0) continue;
    TORCH_CHECK(u < U, "moe_ffn: idx value ", u, " is out of range for ", U, " rows");
    ++count[u];
  }
  std::vector<int64_t> start(U + 1, 0);
  for (int64_t u = 0; u < U; ++u) start[u + 1] = start[u] + count[u];
  const int64_t N = start[U];
  std::vector<int64_t> ent_tok(N);
  std::vector<float> ent_w(N);
  {
    std::vector<int64_t> fill(start.begin(), start.end() - 1);
    for (int64_t i = 0; i < T * K; ++i) {
      const int64_t u = ip[i];
      if (u < 0) continue;
      ent_tok[fill[u]] = i / K;
      ent_w[fill[u]++] = wp[i];
    }
  }
  at::Tensor out = at::zeros({T, H}, x.options().dtype(at::kFloat));
  if (N == 0) return out.to(x.scalar_type());

  const at::Tensor xf = x.to(at::kFloat).contiguous();
  at::Tensor xg = at::empty({N, H}, xf.options());  // [N, H] tokens gathered per expert
  {
    const float* src = xf.data_ptr<float>();
    float* dst = xg.data_ptr<float>();
    for (int64_t e = 0; e < N; ++e) std::memcpy(dst + e * H, src + ent_tok[e] * H, H * sizeof(float));
  }
  const bool want_bf16 = kt->bf16_x && code == kBF16;
  const at::Tensor xgb = want_bf16 ? xg.to(at::kBFloat16) : at::Tensor();
  const bool int_kind = code == kI8 || code == kI4;
  at::Tensor xq, xs;  // int16 x and per-token scales for the int kernels
  if (int_kind) std::tie(xq, xs) = quantize(xg, kt, code == kI4);

  const uint8_t* base = pages.data_ptr<uint8_t>();
  const int64_t page_stride = pages.stride(0);
  std::vector<int64_t> active, gemm;  // experts for the row-dot kernels / for the GEMM
  for (int64_t u = 0; u < U; ++u)
    if (count[u] > 0) {
      TORCH_CHECK(rp[u] >= 0 && rp[u] < pages.size(0), "moe_ffn: rows[", u, "] = ", rp[u], " is not a page");
      (count[u] > kGemmTokens ? gemm : active).push_back(u);
    }

  // 2) gate_up for every active expert: gu [N, 2I] = x_e @ W1^T + b1
  at::Tensor gu = at::zeros({N, 2 * I}, xf.options());
  std::vector<TileArgs> jobs;
  for (int64_t u : active) {
    const uint8_t* page = base + rp[u] * page_stride;
    TileArgs a{};
    a.w = page + L.w1; a.w_row_bytes = L.w1_row; a.kind = code; a.K = H; a.group = group_size;
    a.scales = L.s1 >= 0 ? page + L.s1 : nullptr; a.sdtype = sc;
    a.bias = has_bias ? page + L.b1 : nullptr;
    a.x = xg.data_ptr<float>() + start[u] * H;
    a.xb = want_bf16 ? reinterpret_cast<const uint16_t*>(xgb.data_ptr<at::BFloat16>()) + start[u] * H : nullptr;
    a.xq = int_kind ? xq.data_ptr<int16_t>() + start[u] * H : nullptr;
    a.xs = int_kind ? xs.data_ptr<float>() + start[u] : nullptr;
    a.n = count[u]; a.out_rows = nullptr; a.wt = nullptr;
    a.out = gu.data_ptr<float>() + start[u] * 2 * I; a.ldo = 2 * I;
    jobs.push_back(a);
  }
  run_rows(kt, jobs, 2 * I);
  for (int64_t u : gemm) {
    const uint8_t* page = base + rp[u] * page_stride;
    const at::Tensor w1 = dense_weight(page, code, dtype, L.w1, L.s1, 2 * I, H, group_size).to(at::kFloat);
    at::Tensor y = at::linear(xg.slice(0, start[u], start[u] + count[u]), w1);
    if (has_bias) y = y + bias_of(page, L.b1, 2 * I, dtype);
    gu.slice(0, start[u], start[u] + count[u]).copy_(y);
  }

  // 3) activation, then down: out[tok] += w * (h_e @ W2^T + b2)
  const at::Tensor h = act_fn(gu, interleaved, act, alpha, limit);  // [N, I]
  const at::Tensor hb = want_bf16 ? h.to(at::kBFloat16) : at::Tensor();
  if (int_kind) std::tie(xq, xs) = quantize(h, kt, code == kI4);
  jobs.clear();
  for (int64_t u : active) {
    const uint8_t* page = base + rp[u] * page_stride;
    TileArgs a{};
    a.w = page + L.w2; a.w_row_bytes = L.w2_row; a.kind = code; a.K = I; a.group = group_size;
    a.scales = L.s2 >= 0 ? page + L.s2 : nullptr; a.sdtype = sc;
    a.bias = has_bias ? page + L.b2 : nullptr;
    a.x = h.data_ptr<float>() + start[u] * I;
    a.xb = want_bf16 ? reinterpret_cast<const uint16_t*>(hb.data_ptr<at::BFloat16>()) + start[u] * I : nullptr;
    a.xq = int_kind ? xq.data_ptr<int16_t>() + start[u] * I : nullptr;
    a.xs = int_kind ? xs.data_ptr<float>() + start[u] : nullptr;
    a.n = count[u]; a.out_rows = ent_tok.data() + start[u]; a.wt = ent_w.data() + start[u];
    a.out = out.data_ptr<float>(); a.ldo = H;
    jobs.push_back(a);
  }
  run_rows(kt, jobs, H);
  for (int64_t u : gemm) {
    const uint8_t* page = base + rp[u] * page_stride;
    const at::Tensor w2 = dense_weight(page, code, dtype, L.w2, L.s2, H, I, group_size).to(at::kFloat);
    at::Tensor y = at::linear(h.slice(0, start[u], start[u] + count[u]), w2);
    if (has_bias) y = y + bias_of(page, L.b2, H, dtype);
    const at::Tensor wt = at::from_blob(ent_w.data() + start[u], {count[u], 1}, xf.options());
    const at::Tensor tok = at::from_blob(ent_tok.data() + start[u], {count[u]}, xf.options().dtype(at::kLong));
    out.index_add_(0, tok, y * wt);
  }
  return out.to(x.scalar_type());
}

// Large T (prefill): a GEMM. bf16 / fp16 weights are multiplied in fp32 (one conversion of the weight
// per call) unless the CPU has AVX512-BF16 for bf16: without it oneDNN's bf16 GEMM ran at 17-19
// GFLOPS on an AMD EPYC (Zen 3) against 57-110 in fp32, conversion included (bench/RESULTS.md). Each
// output is an fp32 sum rounded once, as in the row kernels.
at::Tensor linear_fallback(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias) {
  const KernelTable* kt = table();
  const auto wt = w.scalar_type();
  const bool widen = (wt == at::kBFloat16 && !(kt != nullptr && kt->bf16_x)) || wt == at::kHalf;
  const auto ct = widen ? at::kFloat : wt;
  c10::optional<at::Tensor> b;
  if (bias.has_value()) b = bias->to(ct);
  return at::linear(x.to(ct), widen ? w.to(ct) : w, b).to(x.scalar_type());
}

at::Tensor linear_cpu(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias) {
  const KernelTable* kt = table();
  const auto wt = w.scalar_type();
  const bool ok_dtype = wt == at::kFloat || wt == at::kBFloat16 || wt == at::kHalf;
  // Large T is a GEMM: oneDNN/MKL blocking beats row dot products there.
  if (kt == nullptr || x.dim() != 2 || w.dim() != 2 || !ok_dtype || x.size(0) > kLinearMaxTokens ||
      x.size(1) != w.size(1) || !w.is_contiguous())
    return linear_fallback(x, w, bias);
  const int64_t T = x.size(0), IN = w.size(1), OUT = w.size(0);
  const int code = wt == at::kFloat ? kF32 : wt == at::kBFloat16 ? kBF16 : kF16;
  const bool want_bf16 = kt->bf16_x && code == kBF16;
  // One bf16 token on the AVX512_BF16 kernel reads only the bf16 x: no fp32 copy is made.
  const bool bf16_only = want_bf16 && T == 1 && x.scalar_type() == at::kBFloat16;
  const at::Tensor xf = bf16_only ? at::Tensor() : x.to(at::kFloat).contiguous();
  const at::Tensor xb = bf16_only ? x.contiguous() : want_bf16 ? xf.to(at::kBFloat16) : at::Tensor();
  const at::Tensor bf = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();
  at::Tensor out = at::zeros({T, OUT}, x.options().dtype(at::kFloat));
  TileArgs a{};
  a.w = static_cast<const uint8_t*>(w.data_ptr()); a.w_row_bytes = IN * w.element_size();
  a.kind = code; a.K = IN; a.sdtype = kS32;
  a.bias = bias.has_value() ? bf.data_ptr<float>() : nullptr;
  a.x = bf16_only ? nullptr : xf.data_ptr<float>();
  a.xb = want_bf16 ? reinterpret_cast<const uint16_t*>(xb.data_ptr<at::BFloat16>()) : nullptr;
  a.n = T; a.out = out.data_ptr<float>(); a.ldo = OUT;
  std::vector<TileArgs> jobs{a};
  run_rows(kt, jobs, OUT);
  return out.to(x.scalar_type());
}

// y = x @ (w * scales[:, None]).T (+ bias) for int8 w [out, in] with one scale per output row
// (cuda_ext/cpu.py linear_int8_reference is the ground truth). Small T runs the int8 row kernel on
// int16-quantized x (one scale per token, as moe_ffn's int8 pages); larger T dequantizes to fp32
// for oneDNN's GEMM.
at::Tensor linear_int8_cpu(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales,
                           const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kChar, "linear_int8: w must be int8 [out, in], got ",
              w.scalar_type(), " ", w.sizes());
  TORCH_CHECK(scales.dim() == 1 && scales.size(0) == w.size(0), "linear_int8: scales must be [", w.size(0),
              "], got ", scales.sizes());
  TORCH_CHECK(x.dim() == 2 && x.size(1) == w.size(1), "linear_int8: x must be [T, ", w.size(1), "], got ", x.sizes());
  TORCH_CHECK(!bias.has_value() || (bias->dim() == 1 && bias->size(0) == w.size(0)),
              "linear_int8: bias must be [", w.size(0), "]");
  const KernelTable* kt = table();
  const at::Tensor sf = scales.to(at::kFloat).contiguous();
  const at::Tensor bf = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();
  const int64_t T = x.size(0), IN = w.size(1), OUT = w.size(0);
  if (kt == nullptr || T > kLinearMaxTokens || !w.is_contiguous()) {
    c10::optional<at::Tensor> b;
    if (bias.has_value()) b = bf;
    return at::linear(x.to(at::kFloat), w.to(at::kFloat) * sf.unsqueeze(1), b).to(x.scalar_type());
  }
  at::Tensor out = at::zeros({T, OUT}, x.options().dtype(at::kFloat));
  if (T == 0) return out.to(x.scalar_type());
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  at::Tensor xq, xs;
  std::tie(xq, xs) = quantize(xf, kt, false);
  TileArgs a{};
  a.w = static_cast<const uint8_t*>(w.data_ptr()); a.w_row_bytes = IN;
  a.kind = kI8; a.K = IN; a.group = 0;
  a.scales = sf.data_ptr<float>(); a.sdtype = kS32;
  a.bias = bias.has_value() ? bf.data_ptr<float>() : nullptr;
  a.x = xf.data_ptr<float>(); a.xq = xq.data_ptr<int16_t>(); a.xs = xs.data_ptr<float>();
  a.n = T; a.out = out.data_ptr<float>(); a.ldo = OUT;
  std::vector<TileArgs> jobs{a};
  run_rows(kt, jobs, OUT);
  return out.to(x.scalar_type());
}

// Attention of Tq query tokens over a KV cache (cuda_ext/attention.py attention_reference is the
// ground truth): q [B, Hq, Tq, Dk], k [B, Hkv, L, Dk], v [B, Hkv, L, Dv] (any strides with a unit
// last one: the cache's prefix views are read in place), mask None or [1|B, 1|Hq, Tq, L] bool
// (true: attend) or float (added), sinks None or [Hq] (GPT-OSS: one more logit per head in the
// softmax, with no value); eager: round between the steps as transformers' eager attention does in
// a 16-bit dtype (AttnArgs::eager_round). Returns [B, Tq, Hq, Dv] in q's dtype: the layout
// transformers' attention functions hand back. Tasks are (batch row, KV head), split across threads.
at::Tensor attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                         const c10::optional<at::Tensor>& mask, double scale,
                         const c10::optional<at::Tensor>& sinks, bool eager) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "attention: q, k, v must be 4-D [B, H, T, D]");
  const int64_t B = q.size(0), Hq = q.size(1), Tq = q.size(2), Dk = q.size(3);
  const int64_t Hkv = k.size(1), L = k.size(2), Dv = v.size(3);
  TORCH_CHECK(k.size(0) == B && v.size(0) == B && v.size(1) == Hkv && v.size(2) == L && k.size(3) == Dk,
              "attention: k ", k.sizes(), " and v ", v.sizes(), " do not match q ", q.sizes());
  TORCH_CHECK(Hkv > 0 && Hq % Hkv == 0, "attention: query heads ", Hq, " are not a multiple of KV heads ", Hkv);
  TORCH_CHECK(k.scalar_type() == v.scalar_type(), "attention: k and v dtypes differ");
  const auto dt = k.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf, "attention: k/v dtype must be float32, "
              "bfloat16 or float16, got ", dt);
  TORCH_CHECK(k.stride(3) == 1 && v.stride(3) == 1, "attention: k and v need a unit stride in the last dim");
  const KernelTable* kt = table();
  TORCH_CHECK(kt != nullptr, "attention: the native kernels need at least avx2");
  at::Tensor out = at::empty({B, Tq, Hq, Dv}, q.options().dtype(at::kFloat));
  if (B == 0 || Tq == 0 || Hq == 0) return out.to(q.scalar_type());
  const at::Tensor qf = q.to(at::kFloat).contiguous();
  AttnArgs a{};
  a.q = qf.data_ptr<float>();
  a.k = static_cast<const uint8_t*>(k.data_ptr());
  a.v = static_cast<const uint8_t*>(v.data_ptr());
  a.kind = dt == at::kFloat ? kF32 : dt == at::kBFloat16 ? kBF16 : kF16;
  a.k_sb = k.stride(0); a.k_sh = k.stride(1); a.k_sj = k.stride(2);
  a.v_sb = v.stride(0); a.v_sh = v.stride(1); a.v_sj = v.stride(2);
  at::Tensor m;
  if (mask.has_value()) {
    m = *mask;
    TORCH_CHECK(m.dim() == 4 && (m.size(0) == 1 || m.size(0) == B) && (m.size(1) == 1 || m.size(1) == Hq) &&
                m.size(2) == Tq && m.size(3) == L, "attention: mask must be [1|B, 1|Hq, Tq, L], got ", m.sizes());
    const auto mt = m.scalar_type();
    TORCH_CHECK(mt == at::kBool || mt == at::kFloat || mt == at::kBFloat16 || mt == at::kHalf,
                "attention: mask dtype must be bool or float, got ", mt);
    a.mask = m.data_ptr();
    a.mask_kind = mt == at::kBool ? 1 : mt == at::kFloat ? 2 : mt == at::kBFloat16 ? 3 : 4;
    a.m_sb = m.size(0) == 1 ? 0 : m.stride(0);
    a.m_sh = m.size(1) == 1 ? 0 : m.stride(1);
    a.m_st = m.stride(2); a.m_sj = m.stride(3);
  }
  at::Tensor sk;
  if (sinks.has_value()) {
    TORCH_CHECK(sinks->dim() == 1 && sinks->size(0) == Hq, "attention: sinks must be [", Hq, "], got ",
                sinks->sizes());
    sk = sinks->to(at::kFloat).contiguous();
    a.sinks = sk.data_ptr<float>();
  }
  a.eager_round = !eager || dt == at::kFloat ? 0 : dt == at::kBFloat16 ? 1 : 2;
  a.B = B; a.Hq = Hq; a.Hkv = Hkv; a.Tq = Tq; a.L = L; a.Dk = Dk; a.Dv = Dv;
  a.scale = static_cast<float>(scale);
  a.out = out.data_ptr<float>();
  // Fewer (row, KV head) tasks than threads (one sequence of a model with few KV heads, on a
  // many-core CPU): cut each task's keys into ranges of at least kAttnMinKeys, and combine the
  // ranges' softmax sums after (as flash-decoding does).
  const int64_t tasks = B * Hkv, threads = at::get_num_threads();
  a.splits = tasks >= threads || a.eager_round ? 1
             : std::max<int64_t>(1, std::min((threads + tasks - 1) / tasks, L / kAttnMinKeys));
  const int64_t nq = (Hq / Hkv) * Tq, S = a.splits;
  at::Tensor part, ml;
  if (S > 1) {
    part = at::empty({tasks * S, nq, Dv}, q.options().dtype(at::kFloat));
    ml = at::empty({tasks * S, nq, 2}, q.options().dtype(at::kFloat));
    a.part = part.data_ptr<float>();
    a.part_ml = ml.data_ptr<float>();
  }
  at::parallel_for(0, tasks * S, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) kt->attn(a, t);
  });
  if (S > 1) {
    const float* pp = a.part;
    const float* pm = a.part_ml;
    for (int64_t bg = 0; bg < tasks; ++bg) {
      const int64_t b = bg / Hkv, g = bg % Hkv;
      for (int64_t qi = 0; qi < nq; ++qi) {
        float m = -INFINITY;
        for (int64_t s = 0; s < S; ++s) m = std::max(m, pm[((bg * S + s) * nq + qi) * 2]);
        const int64_t h = g * (Hq / Hkv) + qi / Tq, t = qi % Tq;
        float* op = a.out + ((b * Tq + t) * Hq + h) * Dv;
        std::fill(op, op + Dv, 0.0f);
        if (m == -INFINITY) continue;  // every key masked
        float l = 0.0f;
        for (int64_t s = 0; s < S; ++s) {
          const float ms = pm[((bg * S + s) * nq + qi) * 2];
          if (ms == -INFINITY) continue;
          const float w = std::exp(ms - m);
          l += w * pm[((bg * S + s) * nq + qi) * 2 + 1];
          const float* src = pp + ((bg * S + s) * nq + qi) * Dv;
          for (int64_t d = 0; d < Dv; ++d) op[d] += w * src[d];
        }
        if (a.sinks != nullptr) l += std::exp(a.sinks[h] - m);
        const float inv = 1.0f / l;
        for (int64_t d = 0; d < Dv; ++d) op[d] *= inv;
      }
    }
  }
  return out.to(q.scalar_type());
}

// RMSNorm over the last dim, in fp32, with the modules' roundings (cuda_ext/cpu.py
// rms_norm_reference is the ground truth): mode 0 (Llama-style) rounds the normalised row to x's
// dtype, then multiplies by the weight in the promoted dtype; mode 1 (GPT-OSS) multiplies in fp32
// and rounds once to x's dtype. One row per token; rows are split across threads beyond 64.
template <typename T>
float to_f(T v) { return static_cast<float>(v); }

template <typename T>
float round_to(float v) { return static_cast<float>(static_cast<T>(v)); }

// RMSNorm of one row of H values into out; buf holds H floats.
template <typename X, typename W, typename O>
void rms_row(const X* x, const W* w, O* out, int64_t H, float eps, int64_t mode, float* buf) {
  float ss = 0.0f;
  for (int64_t k = 0; k < H; ++k) {
    buf[k] = to_f(x[k]);
    ss += buf[k] * buf[k];
  }
  const float inv = 1.0f / std::sqrt(ss / static_cast<float>(H) + eps);
  for (int64_t k = 0; k < H; ++k) {
    const float n = buf[k] * inv;
    if (mode == 0) out[k] = static_cast<O>(to_f(w[k]) * round_to<X>(n));
    else out[k] = static_cast<O>(round_to<X>(to_f(w[k]) * n));
  }
}

template <typename X, typename W, typename O>
void rms_rows(const X* x, const W* w, O* out, int64_t rows, int64_t H, float eps, int64_t mode) {
  at::parallel_for(0, rows, 64, [&](int64_t r0, int64_t r1) {
    std::vector<float> buf(H);
    for (int64_t r = r0; r < r1; ++r) rms_row<X, W, O>(x + r * H, w, out + r * H, H, eps, mode, buf.data());
  });
}

// Calls f with a value of the C++ type of a float dtype (float, BFloat16 or Half).
template <typename F>
void with_float_type(at::ScalarType t, const char* what, F&& f) {
  if (t == at::kFloat) f(float{});
  else if (t == at::kBFloat16) f(at::BFloat16{});
  else if (t == at::kHalf) f(at::Half{});
  else TORCH_CHECK(false, "rms_norm: ", what, " must be float32, bfloat16 or float16, got ", t);
}

at::Tensor rms_norm_cpu(const at::Tensor& x, const at::Tensor& weight, double eps, int64_t mode) {
  TORCH_CHECK(mode == 0 || mode == 1, "rms_norm: mode must be 0 (cast, then scale) or 1 (scale, then cast)");
  TORCH_CHECK(x.dim() >= 1 && weight.dim() == 1 && weight.size(0) == x.size(-1),
              "rms_norm: weight must be [", x.size(-1), "], got ", weight.sizes());
  const auto xd = x.scalar_type(), wd = weight.scalar_type();
  const auto od = mode == 0 ? at::promote_types(xd, wd) : xd;
  const at::Tensor xc = x.contiguous(), wc = weight.contiguous();
  at::Tensor out = at::empty(x.sizes(), x.options().dtype(od));
  const int64_t H = x.size(-1), rows = H ? x.numel() / H : 0;
  if (rows == 0) return out;
  const float e = static_cast<float>(eps);
  with_float_type(xd, "x", [&](auto xt) {
    with_float_type(wd, "weight", [&](auto wt) {
      with_float_type(od, "the output", [&](auto ot) {
        using X = decltype(xt);
        using W = decltype(wt);
        using O = decltype(ot);
        rms_rows<X, W, O>(xc.data_ptr<X>(), wc.data_ptr<W>(), out.data_ptr<O>(), rows, H, e, mode);
      });
    });
  });
  return out;
}

// Rotary embedding of one head's vector, torch's rounding: x * cos and rotate_half(x) * sin are each
// rounded to the dtype, then their sum (cuda_ext/attention.py qkv_rope_reference). No FMA: this file
// is compiled without it, so each product is rounded as torch rounds it.
template <typename T, typename C>
void rope_head(const T* x, const C* c, const C* s, T* out, int64_t D) {
  const int64_t half = D / 2;
  for (int64_t i = 0; i < D; ++i) {
    const float xi = to_f(x[i]);
    const float rot = i < half ? -to_f(x[i + half]) : to_f(x[i - half]);
    const float a = round_to<T>(xi * to_f(c[i]));
    const float b = round_to<T>(rot * to_f(s[i]));
    out[i] = static_cast<T>(a + b);
  }
}

// One decode step's attention inputs from the fused q/k/v projection y [B, T, (Hq + 2 Hkv) D]:
// optional RMSNorms of q and k (over the whole projection, or per head when the weight is [D]),
// rotary embedding of q and k with cos/sin [1|B, T, D], and v. Returns q [B, Hq, T, D]; k and v go
// to k_out / v_out at positions [pos, pos + T) when given (a KV cache's buffers [B, Hkv, >= pos + T,
// D] with a unit last stride), else they are returned [B, Hkv, T, D] after q. All in y's dtype: the
// tensors transformers' attention modules hand to the cache and the attention function.
std::vector<at::Tensor> qkv_rope_impl(
    const at::Tensor& y, const at::Tensor& cos, const at::Tensor& sin, int64_t hq, int64_t hkv,
    const c10::optional<at::Tensor>& q_w, const c10::optional<at::Tensor>& k_w, double eps, int64_t mode,
    const at::Tensor* k_out, const at::Tensor* v_out, int64_t pos) {
  TORCH_CHECK(y.dim() == 3 && hq > 0 && hkv > 0 && y.size(2) % (hq + 2 * hkv) == 0,
              "qkv_rope: y must be [B, T, (hq + 2 hkv) * D], got ", y.sizes(), " for hq ", hq, ", hkv ", hkv);
  const int64_t B = y.size(0), T = y.size(1), D = y.size(2) / (hq + 2 * hkv);
  TORCH_CHECK(D % 2 == 0, "qkv_rope: head dim ", D, " must be even");
  TORCH_CHECK(cos.dim() == 3 && cos.sizes() == sin.sizes() && (cos.size(0) == 1 || cos.size(0) == B) &&
              cos.size(1) == T && cos.size(2) == D, "qkv_rope: cos/sin must be [1|B, ", T, ", ", D, "], got ",
              cos.sizes(), " and ", sin.sizes());
  TORCH_CHECK(cos.scalar_type() == sin.scalar_type(), "qkv_rope: cos and sin dtypes differ");
  for (const at::Tensor* t : {&y, &cos})
    TORCH_CHECK(t->scalar_type() == at::kFloat || t->scalar_type() == at::kBFloat16 || t->scalar_type() == at::kHalf,
                "qkv_rope: y, cos and sin must be float32, bfloat16 or float16, got ", t->scalar_type());
  TORCH_CHECK(mode == 0 || mode == 1, "qkv_rope: mode must be 0 (cast, then scale) or 1 (scale, then cast)");
  auto check_norm = [&](const c10::optional<at::Tensor>& w, int64_t heads, const char* what) {
    if (!w.has_value()) return;
    TORCH_CHECK(w->dim() == 1 && (w->numel() == heads * D || w->numel() == D), "qkv_rope: ", what,
                " norm weight must be [", heads * D, "] or [", D, "], got ", w->sizes());
    const auto od = mode == 0 ? at::promote_types(y.scalar_type(), w->scalar_type()) : y.scalar_type();
    TORCH_CHECK(od == y.scalar_type(), "qkv_rope: the ", what, " norm changes the dtype");
    TORCH_CHECK(w->scalar_type() == at::kFloat || w->scalar_type() == at::kBFloat16 || w->scalar_type() == at::kHalf,
                "qkv_rope: norm weights must be float32, bfloat16 or float16");
  };
  check_norm(q_w, hq, "q");
  check_norm(k_w, hkv, "k");
  const bool into = k_out != nullptr;
  if (into) {
    for (const at::Tensor* t : {k_out, v_out})
      TORCH_CHECK(t->dim() == 4 && t->size(0) == B && t->size(1) == hkv && t->size(2) >= pos + T && t->size(3) == D &&
                  t->stride(3) == 1 && t->scalar_type() == y.scalar_type() && t->device().is_cpu(),
                  "qkv_rope: k_out/v_out must be ", y.scalar_type(), " [", B, ", ", hkv, ", >= ", pos + T, ", ", D,
                  "] with a unit last stride, got ", t->sizes());
    TORCH_CHECK(pos >= 0, "qkv_rope: pos must be >= 0");
  }
  const at::Tensor yc = y.contiguous(), cc = cos.contiguous(), sc = sin.contiguous();
  at::Tensor qo = at::empty({B, hq, T, D}, y.options());
  at::Tensor ko = into ? *k_out : at::empty({B, hkv, T, D}, y.options());
  at::Tensor vo = into ? *v_out : at::empty({B, hkv, T, D}, y.options());
  const int64_t k0 = into ? pos : 0;  // first position written in ko / vo
  const int64_t cb = cos.size(0) == 1 ? 0 : T * D;
  const int64_t W = (hq + 2 * hkv) * D;
  with_float_type(y.scalar_type(), "y", [&](auto xt) {
    with_float_type(cos.scalar_type(), "cos", [&](auto ct) {
      using X = decltype(xt);
      using C = decltype(ct);
      const X* yp = yc.data_ptr<X>();
      const C* cp = cc.data_ptr<C>();
      const C* sp = sc.data_ptr<C>();
      X* qop = qo.data_ptr<X>();
      X* kop = ko.data_ptr<X>();
      X* vop = vo.data_ptr<X>();
      const int64_t ks0 = ko.stride(0), ks1 = ko.stride(1), ks2 = ko.stride(2);
      const int64_t vs0 = vo.stride(0), vs1 = vo.stride(1), vs2 = vo.stride(2);
      std::vector<float> fbuf(std::max(hq, hkv) * D);
      std::vector<X> normed(std::max(hq, hkv) * D);
      // heads [0, heads) of the part starting at column `col`, normed with w when given, then rotated
      auto part = [&](const X* row, int64_t col, int64_t heads, const c10::optional<at::Tensor>& w, const C* c,
                      const C* s, auto&& dst) {
        const X* src = row + col;
        if (w.has_value()) {
          const bool per_head = w->numel() == D;
          with_float_type(w->scalar_type(), "weight", [&](auto wt) {
            using Wt = decltype(wt);
            const Wt* wp = w->data_ptr<Wt>();
            if (per_head)
              for (int64_t h = 0; h < heads; ++h) rms_row<X, Wt, X>(src + h * D, wp, normed.data() + h * D, D,
                                                                  static_cast<float>(eps), mode, fbuf.data());
            else
              rms_row<X, Wt, X>(src, wp, normed.data(), heads * D, static_cast<float>(eps), mode, fbuf.data());
          });
          src = normed.data();
        }
        for (int64_t h = 0; h < heads; ++h) rope_head<X, C>(src + h * D, c, s, dst(h), D);
      };
      for (int64_t b = 0; b < B; ++b)
        for (int64_t t = 0; t < T; ++t) {
          const X* row = yp + (b * T + t) * W;
          const C* c = cp + b * cb + t * D;
          const C* s = sp + b * cb + t * D;
          part(row, 0, hq, q_w, c, s, [&](int64_t h) { return qop + ((b * hq + h) * T + t) * D; });
          part(row, hq * D, hkv, k_w, c, s, [&](int64_t h) { return kop + b * ks0 + h * ks1 + (k0 + t) * ks2; });
          const X* v = row + (hq + hkv) * D;
          for (int64_t h = 0; h < hkv; ++h)
            std::memcpy(vop + b * vs0 + h * vs1 + (k0 + t) * vs2, v + h * D, D * sizeof(X));
        }
    });
  });
  if (into) return {qo};
  return {qo, ko, vo};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> qkv_rope_cpu(
    const at::Tensor& y, const at::Tensor& cos, const at::Tensor& sin, int64_t hq, int64_t hkv,
    const c10::optional<at::Tensor>& q_w, const c10::optional<at::Tensor>& k_w, double eps, int64_t mode) {
  auto r = qkv_rope_impl(y, cos, sin, hq, hkv, q_w, k_w, eps, mode, nullptr, nullptr, 0);
  return {r[0], r[1], r[2]};
}

// qkv_rope writing k and v into a KV cache's buffers at positions [pos, pos + T); returns q.
at::Tensor qkv_rope_into_cpu(const at::Tensor& y, const at::Tensor& cos, const at::Tensor& sin, int64_t hq,
                             int64_t hkv, const c10::optional<at::Tensor>& q_w, const c10::optional<at::Tensor>& k_w,
                             double eps, int64_t mode, at::Tensor& k_buf, at::Tensor& v_buf, int64_t pos) {
  return qkv_rope_impl(y, cos, sin, hq, hkv, q_w, k_w, eps, mode, &k_buf, &v_buf, pos)[0];
}

// Reads every byte of t once, split across threads (the machine's read bandwidth, for benchmarks);
// returns an XOR of the words so the reads cannot be optimised away.
int64_t stream_read(const at::Tensor& t) {
  TORCH_CHECK(t.is_contiguous() && t.device().is_cpu(), "stream_read: a contiguous CPU tensor");
  const auto* p = static_cast<const uint64_t*>(t.data_ptr());
  const int64_t words = t.numel() * t.element_size() / 8;
  std::atomic<uint64_t> acc{0};
  at::parallel_for(0, words, 1 << 16, [&](int64_t b, int64_t e) {
    uint64_t x0 = 0, x1 = 0, x2 = 0, x3 = 0;
    int64_t i = b;
    for (; i + 4 <= e; i += 4) { x0 ^= p[i]; x1 ^= p[i + 1]; x2 ^= p[i + 2]; x3 ^= p[i + 3]; }
    for (; i < e; ++i) x0 ^= p[i];
    acc.fetch_xor(x0 ^ x1 ^ x2 ^ x3);
  });
  return static_cast<int64_t>(acc.load());
}

std::string set_isa(c10::string_view name) {
  const int want = level_of(std::string(name));
  TORCH_CHECK(want >= 0, "set_isa: unknown ISA ", std::string(name), " (avx512bf16, avx512, avx2)");
  const int have = detect_level();
  TORCH_CHECK(want <= have, "set_isa: this CPU does not support ", std::string(name));
  TORCH_CHECK(want >= 1, "set_isa: the native kernels need at least avx2");
  g_level.store(want);
  return table()->name;
}

int64_t set_row_block(int64_t rows) {
  TORCH_CHECK(rows == 1 || rows == 4, "set_row_block: rows per tile must be 1 or 4, got ", rows);
  return g_row_block.exchange(static_cast<int>(rows));
}

bool set_dp_tokens(bool on) {
  const bool was = dp_tokens(table());
  g_dp_tokens.store(on ? 1 : 0);
  return was;
}

bool current_dp_tokens() { return dp_tokens(table()); }

std::string current_isa() {
  const KernelTable* kt = table();
  return kt ? kt->name : "none";
}

std::string detected_isa() {
  const KernelTable* kt = table_of(detect_level());
  return kt ? kt->name : "none";
}

}  // namespace
}  // namespace moepager_cpu

TORCH_LIBRARY_IMPL(moepager, CPU, m) {
  m.impl("moe_ffn", &moepager_cpu::moe_ffn_cpu);
  m.impl("linear", &moepager_cpu::linear_cpu);
  m.impl("linear_int8", &moepager_cpu::linear_int8_cpu);
  m.impl("rms_norm", &moepager_cpu::rms_norm_cpu);
  m.impl("attention", &moepager_cpu::attention_cpu);
  m.impl("qkv_rope", &moepager_cpu::qkv_rope_cpu);
  m.impl("qkv_rope_into", &moepager_cpu::qkv_rope_into_cpu);
}

TORCH_LIBRARY(moepager_cpu, m) {
  m.def("set_isa(str name) -> str", &moepager_cpu::set_isa);
  m.def("isa() -> str", &moepager_cpu::current_isa);
  m.def("set_row_block(int rows) -> int", &moepager_cpu::set_row_block);
  m.def("set_dp_tokens(bool on) -> bool", &moepager_cpu::set_dp_tokens);
  m.def("dp_tokens() -> bool", &moepager_cpu::current_dp_tokens);
  m.def("detected_isa() -> str", &moepager_cpu::detected_isa);
  m.def("stream_read(Tensor t) -> int", &moepager_cpu::stream_read);
}
