"""Op declarations and their plain-torch references."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def expert_ffn_reference(module: torch.nn.Module, x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor,
                         gate_up_bias: torch.Tensor | None, down_bias: torch.Tensor | None,
                         transposed: bool) -> torch.Tensor:
    """One expert over its tokens: down(act(gate) * up), in the fused module's own layout.

    x [n, H]; gate_up [2I, H] (or [H, 2I] transposed); down [H, I] (or [I, H]).
    The gating is the module's own (``_apply_gate``), so GPT-OSS's clamped,
    interleaved SwiGLU and the plain SiLU-gated experts share this code.
    """
    x = x.to(gate_up.dtype)
    gu = x @ gate_up if transposed else F.linear(x, gate_up)  # [n, 2I]
    if gate_up_bias is not None:
        gu = gu + gate_up_bias
    h = module._apply_gate(gu)  # [n, I]
    y = h @ down if transposed else F.linear(h, down)  # [n, H]
    if down_bias is not None:
        y = y + down_bias
    return y


_native = None
_native_error: str | None = None


def native_status() -> str:
    """'reference' when no compiled kernel is in use, else a short description."""
    return "reference" if _native is None else "native"


def expert_ffn(module, x, gate_up, down, gate_up_bias, down_bias, transposed):
    return expert_ffn_reference(module, x, gate_up, down, gate_up_bias, down_bias, transposed)
