"""The host expert and dense kernels: ``moe_ffn`` (one call per MoE layer), ``linear``,
``linear_int8`` (int8 dense weights, one scale per output row) and ``rms_norm``.

All four are ``torch.library`` ops in the ``moepager`` namespace. The plain-torch
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
from cuda_ext.pages import PageFormat, apply_act, quantize_int8

MOE_OP = "moepager::moe_ffn"
LINEAR_OP = "moepager::linear"
LINEAR_INT8_OP = "moepager::linear_int8"
RMS_NORM_OP = "moepager::rms_norm"
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


# -- linear_int8 ---------------------------------------------------------------------------
def linear_int8_reference(x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor,
                          bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [T, in] @ (w [out, in] int8 * scales [out]).T (+ bias) in fp32, returned in x's dtype."""
    wf = w.float() * scales.float()[:, None]
    return F.linear(x.float(), wf, None if bias is None else bias.float()).to(x.dtype)


def _linear_int8_fake(x, w, scales, bias=None):
    return x.new_empty((x.shape[0], w.shape[0]))


# -- rms_norm ------------------------------------------------------------------------------
def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float, mode: int) -> torch.Tensor:
    """RMSNorm over the last dim in fp32, rounded as the modules round it.

    mode 0 (Llama, Mixtral, Qwen, OLMoE, DeepSeek): ``weight * normed.to(x.dtype)``, in the promoted dtype;
    mode 1 (GPT-OSS): ``(weight * normed).to(x.dtype)``.
    """
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if mode == 0:
        return weight * normed.to(x.dtype)
    if mode == 1:
        return (weight * normed).to(x.dtype)
    raise ValueError(f"rms_norm: mode must be 0 or 1, got {mode}")


def _rms_norm_fake(x, weight, eps, mode):
    return x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype) if mode == 0 else x.dtype)


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
    torch.library.define(LINEAR_INT8_OP, "(Tensor x, Tensor w, Tensor scales, Tensor? bias=None) -> Tensor")
    torch.library.impl(LINEAR_INT8_OP, "default", linear_int8_reference)
    torch.library.register_fake(LINEAR_INT8_OP, _linear_int8_fake)
    torch.library.define(RMS_NORM_OP, "(Tensor x, Tensor weight, float eps, int mode) -> Tensor")
    torch.library.impl(RMS_NORM_OP, "default", rms_norm_reference)
    torch.library.register_fake(RMS_NORM_OP, _rms_norm_fake)


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


def _over_rows(op, x: torch.Tensor, w: torch.Tensor, *args) -> torch.Tensor:
    """``op(x [N, in], w, *args)`` over x's leading dims flattened to rows; the first CPU call builds the kernels."""
    if x.device.type == "cpu":
        native_cpu.available()
    lead = x.shape[:-1]
    return op(x.reshape(-1, x.shape[-1]), w, *args).reshape(*lead, w.shape[0])


def linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ w.T (+ bias) for x [..., in], w [out, in]; native on CPU at small T, else torch."""
    if torch.is_grad_enabled() and (x.requires_grad or w.requires_grad or (bias is not None and bias.requires_grad)):
        return linear_reference(x, w, bias)  # the ops have no backward; keep training-time calls differentiable
    return _over_rows(torch.ops.moepager.linear, x, w, bias)


def linear_int8(x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None
                ) -> torch.Tensor:
    """y = x @ (w * scales[:, None]).T (+ bias) for int8 w [out, in]; native on CPU at small T."""
    return _over_rows(torch.ops.moepager.linear_int8, x, w, scales, bias)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, mode: int) -> torch.Tensor:
    """RMSNorm of x over its last dim (see ``rms_norm_reference``); native on CPU."""
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return rms_norm_reference(x, weight, eps, mode)  # the op has no backward
    if x.device.type == "cpu":
        native_cpu.available()
    return torch.ops.moepager.rms_norm(x, weight, float(eps), int(mode))


class NativeRMSNorm(nn.Module):
    """An RMSNorm stand-in that calls ``rms_norm``; shares the original weight Parameter (no copy).

    Built by ``engine.dense.use_native_norms`` only for modules whose output a probe with random
    weights matched exactly in one of the two modes.
    """

    def __init__(self, weight: nn.Parameter, eps: float, mode: int) -> None:
        super().__init__()
        self.weight = weight
        self.eps = float(eps)
        self.mode = int(mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps, self.mode)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}, mode={self.mode}"


class NativeLinear(nn.Module):
    """An ``nn.Linear`` stand-in that calls ``linear``; shares the original Parameters (no copy)."""

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = weight
        self.bias = bias
        self.group = None  # a cuda_ext.linear_group.LinearGroup this layer belongs to
        self.group_index = -1

    @classmethod
    def from_linear(cls, lin: nn.Linear) -> NativeLinear:
        return cls(lin.weight, lin.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.group
        if g is not None and g.active:
            y = g.output(self.group_index, x)
            if y is not None:
                return y
        return linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Int8Linear(nn.Module):
    """An ``nn.Linear`` stand-in with int8 weights, symmetric per output row (``pages.quantize_int8``,
    scales kept in fp32): half the bytes of bf16 per token. Each weight is within ``scale / 2`` of
    the original (``error_bound``). Calls ``linear_int8``; the bias stays in its own dtype."""

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, bias: nn.Parameter | None) -> None:
        super().__init__()
        self.out_features, self.in_features = qweight.shape
        self.register_buffer("qweight", qweight)  # int8 [out, in]
        self.register_buffer("scales", scales)  # fp32 [out]
        self.bias = bias
        self.group = None  # a cuda_ext.linear_group.LinearGroup this layer belongs to
        self.group_index = -1

    @classmethod
    def from_linear(cls, lin: nn.Module, chunk_rows: int = 4096) -> Int8Linear:
        """Quantize ``lin``'s weight a block of rows at a time (an LM head's fp32 copy would be GBs)."""
        w = lin.weight.detach()
        q = torch.empty(w.shape, dtype=torch.int8, device=w.device)
        s = torch.empty(w.shape[0], dtype=torch.float32, device=w.device)
        with torch.no_grad():
            for r in range(0, w.shape[0], chunk_rows):
                q[r : r + chunk_rows], s[r : r + chunk_rows] = quantize_int8(w[r : r + chunk_rows], torch.float32)
        return cls(q, s, lin.bias)

    def error_bound(self) -> torch.Tensor:
        """The largest |w - dequantized w| of each output row: half its scale."""
        return self.scales / 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and (x.requires_grad or (self.bias is not None and self.bias.requires_grad)):
            return linear_int8_reference(x, self.qweight, self.scales, self.bias)  # the op has no backward
        g = self.group
        if g is not None and g.active:
            y = g.output(self.group_index, x)
            if y is not None:
                return y
        return linear_int8(x, self.qweight, self.scales, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, int8"


def cpu_kernel_status() -> dict[str, str]:
    """Which implementation serves each op on CPU, and the ISA this CPU offers (never builds)."""
    impl = native_cpu.status()
    out = {"moe_ffn": impl, "linear": impl, "linear_int8": impl, "rms_norm": impl,
           "cpu_isa": native_cpu.detect_isa()}
    if native_cpu.isa() == "avx512bf16":  # loaded: which bf16 kernel serves several tokens per weight
        out["bf16_tokens"] = "vdpbf16ps" if native_cpu.dp_tokens() else "shift+fma"
    return out
