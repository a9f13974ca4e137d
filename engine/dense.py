"""The dense path on the CPU: every ``nn.Linear`` of the model served by the native kernel.

Once experts are read at memory speed, attention projections, shared experts,
dense MLP layers and the LM head are a large share of each token's bytes. On
the CPU each ``nn.Linear`` is swapped for ``cuda_ext.NativeLinear``, which keeps
the very same Parameters (state_dict and tied weights unchanged) and calls the
native ``linear`` kernel at small T (torch's where torch is faster). Routers are
not ``nn.Linear`` in transformers' MoE blocks and stay untouched, so routing is
computed exactly as the reference computes it.
"""

from __future__ import annotations

from torch import nn

from cuda_ext import NativeLinear


def use_native_dense(model: nn.Module) -> int:
    """Swap every ``nn.Linear`` of ``model`` (on the CPU) for ``NativeLinear``; returns how many."""
    swaps = []
    for parent in model.modules():
        for name, child in parent.named_children():
            if type(child) is nn.Linear and child.weight.device.type == "cpu":
                swaps.append((parent, name, child))
    for parent, name, child in swaps:
        setattr(parent, name, NativeLinear.from_linear(child))
    return len(swaps)


def dense_bytes(model: nn.Module) -> int:
    """Bytes of dense weights one decode token reads: every parameter but the embedding table."""
    embeds = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    lm_head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head_ids = {id(p) for p in lm_head.parameters()} if lm_head is not None else set()
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) in seen or (id(p) in embeds and id(p) not in head_ids):
            continue
        seen.add(id(p))
        total += p.numel() * p.element_size()
    return total


__all__ = ["dense_bytes", "use_native_dense"]
