"""Op declarations, their plain-torch references, and the dispatch used by the engine.

Each op is declared once with ``torch.library`` in the ``moepager`` namespace. Its
plain-torch reference is registered as the default kernel (every device), with a
fake kernel for meta/fake tensors; the compiled CUDA kernel (``cuda_ext/native.py``)
overrides the default for CUDA when it builds.

Design: the engine calls ``expert_ffn(module, ...)`` with the fused experts module,
because the gating is the module's own (GPT-OSS clamps and interleaves its SwiGLU).
Only the plain SiLU-gated experts (Mixtral, Qwen, OLMoE, DeepSeek, PhiMoE) go to
``moepager::expert_ffn_silu``, and only at decode sizes on CUDA, where one fused
GEMV launch beats several cuBLAS calls; everything else stays on the torch
reference, which is also the ground truth every native kernel is tested against.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
import torch.nn.functional as F

from cuda_ext import native

OP = "moepager::expert_ffn_silu"
MAX_NATIVE_TOKENS = 16  # the native kernel is a GEMV: beyond a few tokens cuBLAS wins

ExpertFn = Callable[..., torch.Tensor]


# -- the op ---------------------------------------------------------------------------
def expert_ffn_silu_reference(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, transposed: bool,
                              interleaved: bool) -> torch.Tensor:
    """down(silu(gate) * up) for one expert over its tokens, in plain torch.

    x [n, H]; gate_up [2I, H] (or [H, 2I] transposed), gate rows first or, when
    interleaved, alternating gate/up; down [H, I] (or [I, H] transposed). The
    result has the weights' dtype.
    """
    x = x.to(gate_up.dtype)
    gu = x @ gate_up if transposed else F.linear(x, gate_up)  # [n, 2I]
    gate, up = (gu[..., ::2], gu[..., 1::2]) if interleaved else gu.chunk(2, dim=-1)  # [n, I] each
    h = F.silu(gate) * up  # [n, I]
    return h @ down if transposed else F.linear(h, down)  # [n, H]


def _expert_ffn_silu_fake(x, gate_up, down, transposed, interleaved):
    hidden = gate_up.shape[0] if transposed else gate_up.shape[1]
    return x.new_empty((x.shape[0], hidden), dtype=gate_up.dtype)


def _declare() -> None:
    if hasattr(torch.ops.moepager, "expert_ffn_silu"):
        return  # already declared in this process (e.g. the module was reloaded)
    torch.library.define(OP, "(Tensor x, Tensor gate_up, Tensor down, bool transposed, bool interleaved) -> Tensor")
    torch.library.impl(OP, "default", expert_ffn_silu_reference)
    torch.library.register_fake(OP, _expert_ffn_silu_fake)


_declare()


# -- the module-level entry point -------------------------------------------------------
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


_silu_layouts: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # module -> interleaved flag or None


def silu_layout(module: torch.nn.Module) -> bool | None:
    """``interleaved`` when the module's gate is exactly silu(gate) * up without biases, else None.

    Checked once per module: the gate must be transformers' default one (by name,
    stable across 5.x) and a numerical probe with large values, so a clamped or
    shifted variant can never pass, must agree with the SiLU formula.
    """
    if module in _silu_layouts:
        return _silu_layouts[module]
    result = None
    gate_fn = getattr(type(module), "_apply_gate", None)
    if (getattr(gate_fn, "__name__", "") == "_default_apply_gate" and not getattr(module, "has_bias", False)
            and getattr(module, "has_gate", True)):
        interleaved = not getattr(module, "is_concatenated", True)
        probe = torch.randn(3, 16, generator=torch.Generator().manual_seed(0)) * 20  # [3, 2I], I = 8
        gate, up = (probe[:, ::2], probe[:, 1::2]) if interleaved else probe.chunk(2, dim=-1)
        try:
            got = module._apply_gate(probe)
        except Exception:  # noqa: BLE001 - an unusual gate is simply not ours to fuse
            got = None
        if got is not None and torch.allclose(got, F.silu(gate) * up, rtol=1e-5, atol=1e-5):
            result = interleaved
    _silu_layouts[module] = result
    return result


def _expert_ffn_native(module, x, gate_up, down, gate_up_bias, down_bias, transposed):
    if x.shape[0] > MAX_NATIVE_TOKENS or gate_up_bias is not None or down_bias is not None:
        return expert_ffn_reference(module, x, gate_up, down, gate_up_bias, down_bias, transposed)
    return torch.ops.moepager.expert_ffn_silu(x, gate_up, down, transposed, _silu_layouts[module])


def select_expert_ffn(module: torch.nn.Module, device: torch.device | str) -> ExpertFn:
    """The implementation for this experts module on this device, chosen once (at engine start).

    Returns a function with ``expert_ffn``'s signature. Building the native
    kernel happens here on first CUDA use; a failed build is reported once (a
    warning with the compiler's message) and the torch reference is used.
    """
    device = torch.device(device)
    if device.type == "cuda" and silu_layout(module) is not None and native.available():
        return _expert_ffn_native
    return expert_ffn_reference


def expert_ffn(module: torch.nn.Module, x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor,
               gate_up_bias: torch.Tensor | None, down_bias: torch.Tensor | None, transposed: bool) -> torch.Tensor:
    """One expert over its tokens [n, H] -> [n, H], by the best implementation for x's device.

    CPU tensors always take the reference; on CUDA, SiLU-gated modules take the
    fused native op for decode-sized n when it is built.
    """
    if x.is_cuda and x.shape[0] <= MAX_NATIVE_TOKENS and gate_up_bias is None and down_bias is None \
            and silu_layout(module) is not None and native.available():
        return torch.ops.moepager.expert_ffn_silu(x, gate_up, down, transposed, _silu_layouts[module])
    return expert_ffn_reference(module, x, gate_up, down, gate_up_bias, down_bias, transposed)


def native_status() -> str:
    """'native' when the compiled kernel serves CUDA; 'reference' without CUDA (or disabled); else the build error."""
    return native.status()
