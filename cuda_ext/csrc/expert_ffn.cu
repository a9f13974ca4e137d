// Fused gated-SiLU expert for decode-sized token counts: y = down(silu(gate(x)) * up(x)).
//
// Two launches per call, both GEMVs with fp32 accumulation:
//   1) h[t, i] = silu(<x_t, W_gate[i]>) * <x_t, W_up[i]>      (h kept in fp32, [n, I])
//   2) y[t, o] = <h_t, W_down[o]>                            (y in the weights' dtype, [n, H])
// Each weight element is read once for all tokens of a chunk (up to kMaxTokens
// tokens), so at n <= 16 the cost is one pass over the expert's bytes.
//
// Layouts (as the fused transformers module stores them, one expert):
//   not transposed: gate_up [2I, H] (rows), down [H, I]
//   transposed:     gate_up [H, 2I] (columns), down [I, H]
//   concatenated: gate = rows/cols [0, I), up = [I, 2I); interleaved: gate = 2i, up = 2i + 1
//
// Row layouts use one warp per output row (lanes stride the contiguous K axis,
// then a shuffle reduction); column layouts use one thread per output column
// (consecutive threads read consecutive columns, so loads coalesce).

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>

namespace moepager {
namespace {

constexpr int kMaxTokens = 16;   // tokens per launch; larger n is processed in chunks
constexpr int kWarps = 8;        // warps per block for the row kernels
constexpr int kColThreads = 128; // threads per block for the column kernels

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

__device__ __forceinline__ float silu(float g) { return g / (1.0f + expf(-g)); }

// gate_up [2I, H] row-major. One warp per intermediate index i.
template <typename scalar_t>
__global__ void gate_up_silu_rows(const scalar_t* __restrict__ x, const scalar_t* __restrict__ w,
                                  float* __restrict__ h, int n, int H, int I, bool interleaved) {
  const int lane = threadIdx.x & 31;
  const int i = blockIdx.x * kWarps + (threadIdx.x >> 5);
  if (i >= I) return;  // i is the same for all lanes of a warp: whole warps leave together
  const int64_t gate_row = interleaved ? 2 * static_cast<int64_t>(i) : static_cast<int64_t>(i);
  const int64_t up_row = interleaved ? 2 * static_cast<int64_t>(i) + 1 : static_cast<int64_t>(I) + i;
  const scalar_t* wg = w + gate_row * H;
  const scalar_t* wu = w + up_row * H;
  float g[kMaxTokens];
  float u[kMaxTokens];
#pragma unroll
  for (int t = 0; t < kMaxTokens; ++t) {
    g[t] = 0.0f;
    u[t] = 0.0f;
  }
  for (int k = lane; k < H; k += 32) {
    const float a = static_cast<float>(wg[k]);
    const float b = static_cast<float>(wu[k]);
#pragma unroll
    for (int t = 0; t < kMaxTokens; ++t) {
      if (t < n) {
        const float xv = static_cast<float>(x[static_cast<int64_t>(t) * H + k]);
        g[t] += a * xv;
        u[t] += b * xv;
      }
    }
  }
#pragma unroll
  for (int t = 0; t < kMaxTokens; ++t) {
    if (t < n) {  // n is uniform: every lane takes the same branch, so the shuffles are complete
      const float gs = warp_sum(g[t]);
      const float us = warp_sum(u[t]);
      if (lane == 0) h[static_cast<int64_t>(t) * I + i] = silu(gs) * us;
    }
  }
}

// gate_up [H, 2I] row-major (transposed). One thread per intermediate index i.
template <typename scalar_t>
__global__ void gate_up_silu_cols(const scalar_t* __restrict__ x, const scalar_t* __restrict__ w,
                                  float* __restrict__ h, int n, int H, int I, bool interleaved) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= I) return;
  const int64_t width = 2 * static_cast<int64_t>(I);
  const int64_t gate_col = interleaved ? 2 * static_cast<int64_t>(i) : static_cast<int64_t>(i);
  const int64_t up_col = interleaved ? 2 * static_cast<int64_t>(i) + 1 : static_cast<int64_t>(I) + i;
  float g[kMaxTokens];
  float u[kMaxTokens];
#pragma unroll
  for (int t = 0; t < kMaxTokens; ++t) {
    g[t] = 0.0f;
    u[t] = 0.0f;
  }
  for (int k = 0; k < H; ++k) {
    const float a = static_cast<float>(w[k * width + gate_col]);
    const float b = static_cast<float>(w[k * width + up_col]);
#pragma unroll
    for (int t = 0; t < kMaxTokens; ++t) {
      if (t < n) {
        const float xv = static_cast<float>(x[static_cast<int64_t>(t) * H + k]);
        g[t] += a * xv;
        u[t] += b * xv;
      }
    }
  }
#pragma unroll
  for (int t = 0; t < kMaxTokens; ++t) {
    if (t < n) h[static_cast<int64_t>(t) * I + i] = silu(g[t]) * u[t];
  }
}

// down [H, I] row-major. One warp per output feature o.
template <typename scalar_t>
__global__ void down_rows(const float* __restrict__ h, const scalar_t* __restrict__ w, scalar_t* __restrict__ y,
                          int n, int H, int I) {
  const int lane = threadIdx.x & 31;
  const int o = blockIdx.x * kWarps + (threadIdx.x >> 5);
  if (o >= H) return;  // warp-uniform, as above
  const scalar_t* wr = w + static_cast<int64_t>(o) * I;
  float acc[kMaxTokens];
#pragma unroll
  for (int t = 0; t < kMaxTokens; ++t) acc[t] = 0.0f;
  for (int k = lane; k < I; k += 32) {
    const float a = static_cast<float>(wr[k]);
#pragma unroll
    for (int t = 0; t < kMaxTokens; ++t) {
      if (t < n) acc[t] += a * h[static_cast<int64_t>(t) * I + k];
    }
  }
#pragma unroll
  for (int t = 0; t < kMaxTokens; ++t) {
    if (t < n) {
      const float s = warp_sum(acc[t]);
      if (lane == 0) y[static_cast<int64_t>(t) * H + o] = static_cast<scalar_t>(s);
    }
  }
}

// down [I, H] row-major (transposed). One thread per output feature o.
template <typename scalar_t>
__global__ void down_cols(const float* __restrict__ h, const scalar_t* __restrict__ w, scalar_t* __restrict__ y,
                          int n, int H, int I) {
  const int o = blockIdx.x * blockDim.x + threadIdx.x;
  if (o >= H) return;
  float acc[kMaxTokens];
#pragma unroll
  for (int t = 0; t < kMaxTokens; ++t) acc[t] = 0.0f;
  for (int k = 0; k < I; ++k) {
    const float a = static_cast<float>(w[static_cast<int64_t>(k) * H + o]);
#pragma unroll
    for (int t = 0; t < kMaxTokens; ++t) {
      if (t < n) acc[t] += a * h[static_cast<int64_t>(t) * I + k];
    }
  }
#pragma unroll
  for (int t = 0; t < kMaxTokens; ++t) {
    if (t < n) y[static_cast<int64_t>(t) * H + o] = static_cast<scalar_t>(acc[t]);
  }
}

int blocks_for(int64_t units, int per_block) { return static_cast<int>((units + per_block - 1) / per_block); }

}  // namespace

at::Tensor expert_ffn_silu_cuda(const at::Tensor& x, const at::Tensor& gate_up, const at::Tensor& down,
                                bool transposed, bool interleaved) {
  TORCH_CHECK(x.is_cuda() && gate_up.is_cuda() && down.is_cuda(), "expert_ffn_silu: all tensors must be on CUDA");
  TORCH_CHECK(x.get_device() == gate_up.get_device() && x.get_device() == down.get_device(),
              "expert_ffn_silu: all tensors must be on the same device");
  TORCH_CHECK(x.dim() == 2 && gate_up.dim() == 2 && down.dim() == 2,
              "expert_ffn_silu: expected x [n, H], gate_up and down 2-D");
  TORCH_CHECK(gate_up.scalar_type() == down.scalar_type(), "expert_ffn_silu: gate_up and down dtypes differ");
  const auto dtype = gate_up.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
              "expert_ffn_silu: weights must be float32, float16 or bfloat16, got ", dtype);
  const int64_t n = x.size(0);
  const int64_t H = x.size(1);
  const int64_t two_i = transposed ? gate_up.size(1) : gate_up.size(0);
  TORCH_CHECK(two_i % 2 == 0, "expert_ffn_silu: gate_up must have an even number of gate/up features");
  const int64_t I = two_i / 2;
  if (transposed) {
    TORCH_CHECK(gate_up.size(0) == H && down.size(0) == I && down.size(1) == H,
                "expert_ffn_silu: transposed layout expects gate_up [H, 2I], down [I, H]");
  } else {
    TORCH_CHECK(gate_up.size(1) == H && down.size(0) == H && down.size(1) == I,
                "expert_ffn_silu: layout expects gate_up [2I, H], down [H, I]");
  }
  TORCH_CHECK(H < (int64_t{1} << 31) && I < (int64_t{1} << 31), "expert_ffn_silu: dimensions too large");

  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.to(dtype).contiguous();
  const at::Tensor w1 = gate_up.contiguous();
  const at::Tensor w2 = down.contiguous();
  at::Tensor y = at::empty({n, H}, w1.options());
  if (n == 0 || H == 0) return y;
  if (I == 0) return y.zero_();
  at::Tensor h = at::empty({std::min<int64_t>(n, kMaxTokens), I}, w1.options().dtype(at::kFloat));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int Hi = static_cast<int>(H);
  const int Ii = static_cast<int>(I);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "expert_ffn_silu_cuda", [&] {
    const scalar_t* xp = xc.data_ptr<scalar_t>();
    const scalar_t* w1p = w1.data_ptr<scalar_t>();
    const scalar_t* w2p = w2.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    float* hp = h.data_ptr<float>();
    for (int64_t start = 0; start < n; start += kMaxTokens) {
      const int nt = static_cast<int>(std::min<int64_t>(kMaxTokens, n - start));
      const scalar_t* xs = xp + start * H;
      scalar_t* ys = yp + start * H;
      if (transposed) {
        gate_up_silu_cols<scalar_t><<<blocks_for(I, kColThreads), kColThreads, 0, stream>>>(
            xs, w1p, hp, nt, Hi, Ii, interleaved);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        down_cols<scalar_t><<<blocks_for(H, kColThreads), kColThreads, 0, stream>>>(hp, w2p, ys, nt, Hi, Ii);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      } else {
        gate_up_silu_rows<scalar_t><<<blocks_for(I, kWarps), kWarps * 32, 0, stream>>>(
            xs, w1p, hp, nt, Hi, Ii, interleaved);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        down_rows<scalar_t><<<blocks_for(H, kWarps), kWarps * 32, 0, stream>>>(hp, w2p, ys, nt, Hi, Ii);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    }
  });
  return y;
}

}  // namespace moepager
