"""The host expert and dense kernels: ``moe_ffn`` (one call per MoE layer) and ``linear``.

Both are ``torch.library`` ops in the ``moepager`` namespace. The plain-torch
reference below is the default kernel on every device (and the ground truth the
tests compare against); the native C++ kernels (``native_cpu.py``) override it for
CPU tensors once built. The wrappers build the native kernels on their first CPU
call; ``native_cpu.build(progress=print)`` does it earlier (at engine start-up).

Design: one ``moe_ffn`` call per layer, over the store's whole page tensor, so the
native kernel can read each expert's weights once for all its tokens and split
(expert, output rows) work across threads; nothing is copied out of the pages.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cuda_ext import native_cpu
from cuda_ext.pages import PageFormat, apply_act

MOE_OP = "moepager::moe_ffn"
LINEAR_OP = "moepager::linear"
ACTS = ("silu", "swiglu_oai")


# -- moe_ffn ------------------------------------------------------------------------------
def moe_ffn_reference(x: torch.Tensor, pages: torch.Tensor, rows: torch.Tensor, idx: torch.Tensor,
                      weights: torch.Tensor, kind: str, dtype: torch.dtype, hidden: int, intermediate: int,
                      transposed: bool, interleaved: bool, has_bias: bool, group_size: int, act: str,
                      alpha: float, limit: float) -> torch.Tensor:
    """sum_k weights[t, k] * FFN_{rows[idx[t, k]]}(x[t]) in fp32 from the dequantized pages; -1 skips."""
    fmt = PageFormat(kind, dtype, hidden, intermediate, transposed, interleaved, has_bias, group_size)
    out = torch.zeros(x.shape[0], hidden, dtype=torch.float32, device=x.device)  # [T, H]
    xf = x.float()
    flat = idx.reshape(-1)
    for u in torch.unique(flat[flat >= 0]).tolist():
        tok, kk = (idx == u).nonzero(as_tuple=True)  # the (token, k) entries routed to u
        gate_up, down, b1, b2 = fmt.unpack(pages[int(rows[u])], torch.float32)
        xe = xf[tok]  # [n, H]
        gu = xe @ gate_up if transposed else F.linear(xe, gate_up)  # [n, 2I]
        if b1 is not None:
            gu = gu + b1
        h = apply_act(gu, interleaved, act, alpha, limit)  # [n, I]
        y = h @ down if transposed else F.linear(h, down)  # [n, H]
        if b2 is not None:
            y = y + b2
        out.index_add_(0, tok, y * weights[tok, kk].float()[:, None])
    return out.to(x.dtype)


def _moe_ffn_fake(x, pages, rows, idx, weights, kind, dtype, hidden, intermediate, transposed, interleaved,
                  has_bias, group_size, act, alpha, limit):
    return x.new_empty((x.shape[0], hidden))


# -- linear --------------------------------------------------------------------------------
def linear_reference(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [T, in] @ w[out, in].T (+ bias), computed in w's dtype, returned in x's dtype."""
    b = None if bias is None else bias.to(w.dtype)
    return F.linear(x.to(w.dtype), w, b).to(x.dtype)


def _linear_fake(x, w, bias=None):
    return x.new_empty((x.shape[0], w.shape[0]))


def _declare() -> None:
    if hasattr(torch.ops.moepager, "moe_ffn"):
        return  # already declared in this process
    torch.library.define(MOE_OP, "(Tensor x, Tensor pages, Tensor rows, Tensor idx, Tensor weights, str kind, "
                                 "ScalarType dtype, int hidden, int intermediate, bool transposed, "
                                 "bool interleaved, bool has_bias, int group_size, str act, float alpha, "
                                 "float limit) -> Tensor")
    torch.library.impl(MOE_OP, "default", moe_ffn_reference)
    torch.library.register_fake(MOE_OP, _moe_ffn_fake)
    torch.library.define(LINEAR_OP, "(Tensor x, Tensor w, Tensor? bias=None) -> Tensor")
    torch.library.impl(LINEAR_OP, "default", linear_reference)
    torch.library.register_fake(LINEAR_OP, _linear_fake)


_declare()


# -- entry points --------------------------------------------------------------------------
def moe_ffn(x: torch.Tensor, pages: torch.Tensor, rows: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor,
            fmt: PageFormat, act: str, alpha: float = 1.702, limit: float = 7.0) -> torch.Tensor:
    """One MoE layer's routed experts: [T, H] in x's dtype.

    x [T, H]; pages uint8 [N, page_bytes] (never copied); rows [U] int64 page rows
    of the layer's experts; idx [T, K] int64 indices into rows, -1 to skip;
    weights [T, K] routing weights. act: "silu" or "swiglu_oai" (GPT-OSS, with
    ``alpha`` and ``limit``).
    """
    if act not in ACTS:
        raise ValueError(f"act must be one of {ACTS}, got {act!r}")
    if x.device.type == "cpu":
        native_cpu.available()  # the first CPU call builds the native kernels (once)
    return torch.ops.moepager.moe_ffn(x, pages, rows, idx, weights, fmt.kind, fmt.dtype, fmt.hidden,
                                      fmt.intermediate, fmt.transposed, fmt.interleaved, fmt.has_bias,
                                      fmt.group_size, act, float(alpha), float(limit))


def linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ w.T (+ bias) for x [..., in], w [out, in]; native on CPU at small T, else torch."""
    if torch.is_grad_enabled() and (x.requires_grad or w.requires_grad or (bias is not None and bias.requires_grad)):
        return linear_reference(x, w, bias)  # the ops have no backward; keep training-time calls differentiable
    if x.device.type == "cpu":
        native_cpu.available()
    lead = x.shape[:-1]
    y = torch.ops.moepager.linear(x.reshape(-1, x.shape[-1]), w, bias)
    return y.reshape(*lead, w.shape[0])


class NativeLinear(nn.Module):
    """An ``nn.Linear`` stand-in that calls ``linear``; shares the original Parameters (no copy)."""

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = weight
        self.bias = bias

    @classmethod
    def from_linear(cls, lin: nn.Linear) -> NativeLinear:
        return cls(lin.weight, lin.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def cpu_kernel_status() -> dict[str, str]:
    """Which implementation serves each op on CPU, and the ISA this CPU offers (never builds)."""
    impl = native_cpu.status()
    return {"moe_ffn": impl, "linear": impl, "cpu_isa": native_cpu.detect_isa()}
