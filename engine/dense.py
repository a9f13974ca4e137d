"""The dense path on the CPU: every ``nn.Linear`` of the model served by the native kernel.

Once experts are read at memory speed, attention projections, shared experts,
dense MLP layers and the LM head are a large share of each token's bytes. On
the CPU each ``nn.Linear`` is swapped for ``cuda_ext.NativeLinear``, which keeps
the very same Parameters (state_dict and tied weights unchanged) and calls the
native ``linear`` kernel at small T (torch's where torch is faster). Routers are
not ``nn.Linear`` in transformers' MoE blocks and stay untouched, so routing is
computed exactly as the reference computes it.

With ``--dense-dtype int8`` the larger ``nn.Linear`` layers are swapped for ``cuda_ext.Int8Linear``
instead (int8 weights, one fp32 scale per output row, quantized once at load): half the dense bytes
per token, at a per-weight error of at most half a row's scale.

RMSNorms (four or more per layer) are swapped for ``cuda_ext.NativeRMSNorm``, one op call
instead of seven small torch ops, when a probe shows the module computes one of the two
roundings the op knows (``cuda_ext.rms_norm_reference``); any other norm stays as it is.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from cuda_ext import Int8Linear, NativeLinear, NativeRMSNorm, rms_norm_reference

# Linears with fewer output rows stay in their dtype under int8: a few KB each, and they are gates
# (Qwen2-MoE's shared-expert gate has one row), whose outputs are not worth a rounding.
INT8_MIN_ROWS = 8


def _swap_children(model: nn.Module, replace) -> int:
    """Replace every submodule for which ``replace(child)`` returns a module; returns how many.
    Replacements are collected first, so the walk never sees a half-swapped model."""
    swaps = [(parent, name, new) for parent in model.modules() for name, child in parent.named_children()
             if (new := replace(child)) is not None]
    for parent, name, new in swaps:
        setattr(parent, name, new)
    return len(swaps)


def use_native_dense(model: nn.Module) -> int:
    """Swap every ``nn.Linear`` of ``model`` (on the CPU) for ``NativeLinear``; returns how many."""
    return _swap_children(model, lambda child: NativeLinear.from_linear(child)
                          if type(child) is nn.Linear and child.weight.device.type == "cpu" else None)


def use_int8_dense(model: nn.Module) -> int:
    """Swap every ``nn.Linear`` of ``model`` (on the CPU) with at least ``INT8_MIN_ROWS`` output rows
    for ``Int8Linear``; returns how many. Tied weights are not touched: the LM head gets its own
    int8 copy and the embedding keeps the original."""
    return _swap_children(model, lambda child: Int8Linear.from_linear(child)
                          if type(child) is nn.Linear and child.weight.device.type == "cpu"
                          and child.out_features >= INT8_MIN_ROWS else None)


def _norm_eps(module: nn.Module) -> float | None:
    """The epsilon of a module shaped like an RMSNorm: a leaf whose only parameter is a 1-D ``weight``
    and that carries ``variance_epsilon`` or ``eps``; None for anything else."""
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
    names = [n for n, _ in module.named_parameters()]
    if names != ["weight"] or module.weight.dim() != 1 or not isinstance(eps, float):
        return None
    return None if any(True for _ in module.children()) else eps


def rms_norm_mode(module: nn.Module) -> int | None:
    """The ``rms_norm`` mode that reproduces ``module`` exactly, or None.

    A copy of the module with random weights is run on random rows; a mode counts only if its
    reference output is bit-identical, so a variant the op does not compute (a ``1 + weight``
    scale, a mean subtraction, another rounding) is never swapped.
    """
    eps = _norm_eps(module)
    if eps is None:
        return None
    g = torch.Generator().manual_seed(0)
    probe = copy.deepcopy(module)
    with torch.no_grad():
        probe.weight.copy_(torch.rand(probe.weight.shape, generator=g) * 2 + 0.25)
        x = (torch.randn(3, probe.weight.shape[0], generator=g) * 3).to(probe.weight.dtype)
        try:
            got = probe(x)
        except Exception:  # noqa: BLE001 - a module that rejects the probe is simply not swapped
            return None
        for mode in (0, 1):
            want = rms_norm_reference(x, probe.weight, eps, mode)
            if isinstance(got, torch.Tensor) and got.dtype == want.dtype and torch.equal(got, want):
                return mode
    return None


def use_native_norms(model: nn.Module) -> int:
    """Swap every RMSNorm of ``model`` (on the CPU) that ``rms_norm_mode`` recognises (one probe per
    class); returns how many."""
    modes: dict[type, int | None] = {}

    def replace(child: nn.Module) -> NativeRMSNorm | None:
        eps = _norm_eps(child)
        if eps is None or child.weight.device.type != "cpu":
            return None
        if type(child) not in modes:
            modes[type(child)] = rms_norm_mode(child)
        mode = modes[type(child)]
        return None if mode is None else NativeRMSNorm(child.weight, eps, mode)

    return _swap_children(model, replace)


def dense_bytes(model: nn.Module) -> int:
    """Bytes of dense weights one decode token reads: every parameter and int8 weight buffer but the
    embedding table (which one token reads a row of)."""
    embeds = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    lm_head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head_ids = {id(p) for p in lm_head.parameters()} if lm_head is not None else set()
    int8 = [t for m in model.modules() if isinstance(m, Int8Linear) for t in (m.qweight, m.scales)]
    seen, total = set(), 0
    for p in [*model.parameters(), *int8]:
        if id(p) in seen or (id(p) in embeds and id(p) not in head_ids):
            continue
        seen.add(id(p))
        total += p.numel() * p.element_size()
    return total


__all__ = ["INT8_MIN_ROWS", "dense_bytes", "rms_norm_mode", "use_int8_dense", "use_native_dense", "use_native_norms"]
