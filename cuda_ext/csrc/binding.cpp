// Registers the compiled kernels as the CUDA implementations of ops declared in
// cuda_ext/ops.py (torch.library). The torch reference stays the default kernel
// for every other device.

#include <ATen/ATen.h>
#include <torch/library.h>

namespace moepager {
at::Tensor expert_ffn_silu_cuda(const at::Tensor& x, const at::Tensor& gate_up, const at::Tensor& down,
                                bool transposed, bool interleaved);
}  // namespace moepager

TORCH_LIBRARY_IMPL(moepager, CUDA, m) {
  m.impl("expert_ffn_silu", &moepager::expert_ffn_silu_cuda);
}
