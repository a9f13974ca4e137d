"""Decode attention over a KV cache: ``attention`` (op ``moepager::attention``).

A decode step's attention is a few query tokens against every cached key and value.
torch's CPU flash-attention kernel is built for long query blocks: with one query it
took 0.4 ms per layer at 200 cached tokens and 2.8 ms at 2,000 (16 heads of 64 on a
2-core AMD EPYC), several times what reading the cache costs. The native kernel reads
each (batch row, KV head)'s keys and values once, for every query head of its group
(GQA without ``repeat_kv``), straight from the cache's strided views, with fp32 scores
and sums.

The plain-torch reference below is the default kernel and the ground truth; the native
kernel (``csrc/cpu_ops.cpp``) overrides it for CPU tensors once built.
"""

from __future__ import annotations

import torch

from cuda_ext import native_cpu

ATTENTION_OP = "moepager::attention"


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                        scale: float) -> torch.Tensor:
    """softmax(q k^T * scale + mask) v for q [B, Hq, Tq, Dk], k [B, Hkv, L, Dk], v [B, Hkv, L, Dv];
    mask None or [1|B, 1|Hq, Tq, L], bool (True: attend) or float (added). fp32 throughout; a row
    with every key masked gives zeros. Returns [B, Tq, Hq, Dv] in q's dtype."""
    groups = q.shape[1] // k.shape[1]
    kf = k.float().repeat_interleave(groups, dim=1)  # [B, Hq, L, Dk]
    vf = v.float().repeat_interleave(groups, dim=1)  # [B, Hq, L, Dv]
    s = torch.matmul(q.float(), kf.transpose(-1, -2)) * scale  # [B, Hq, Tq, L]
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask.float()
    dead = torch.isneginf(s.amax(dim=-1, keepdim=True))  # [B, Hq, Tq, 1]: every key masked
    p = torch.softmax(s.masked_fill(dead, 0.0), dim=-1).masked_fill(dead, 0.0)
    return torch.matmul(p, vf).transpose(1, 2).contiguous().to(q.dtype)  # [B, Tq, Hq, Dv]


def _attention_fake(q, k, v, mask, scale):
    return q.new_empty((q.shape[0], q.shape[2], q.shape[1], v.shape[3]))


def _declare() -> None:
    if hasattr(torch.ops.moepager, "attention"):
        return  # already declared in this process
    torch.library.define(ATTENTION_OP, "(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale) -> Tensor")
    torch.library.impl(ATTENTION_OP, "default", attention_reference)
    torch.library.register_fake(ATTENTION_OP, _attention_fake)


_declare()


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
              scale: float | None = None) -> torch.Tensor:
    """``attention_reference``'s result, native on CPU (see the module docstring). ``scale``
    defaults to 1 / sqrt(Dk)."""
    if q.device.type == "cpu":
        native_cpu.available()  # the first CPU call builds the native kernels (once)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    return torch.ops.moepager.attention(q, k, v, mask, float(scale))


__all__ = ["ATTENTION_OP", "attention", "attention_reference"]
