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
from cuda_ext.cpu import rms_norm_reference

ATTENTION_OP = "moepager::attention"
QKV_ROPE_OP = "moepager::qkv_rope"
QKV_ROPE_INTO_OP = "moepager::qkv_rope_into"


def _eager_reference(q, k, v, mask, scale, sinks):
    """transformers' eager attention in q's 16-bit dtype (GPT-OSS's, sinks included): each step
    rounded to the dtype as torch computes it."""
    groups = q.shape[1] // k.shape[1]
    kr, vr = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    s = torch.matmul(q, kr.transpose(-1, -2)) * scale
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask.to(s.dtype)
    if sinks is not None:
        s = torch.cat([s, sinks.to(s.dtype).reshape(1, -1, 1, 1).expand(*s.shape[:-1], 1)], dim=-1)
    s = s - s.max(dim=-1, keepdim=True).values
    p = torch.softmax(s, dim=-1, dtype=s.dtype)
    if sinks is not None:
        p = p[..., :-1]
    return torch.matmul(p.nan_to_num(0.0), vr).transpose(1, 2).contiguous()  # [B, Tq, Hq, Dv]


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                        scale: float, sinks: torch.Tensor | None = None, eager: bool = False) -> torch.Tensor:
    """softmax(q k^T * scale + mask) v for q [B, Hq, Tq, Dk], k [B, Hkv, L, Dk], v [B, Hkv, L, Dv];
    mask None or [1|B, 1|Hq, Tq, L], bool (True: attend) or float (added). ``sinks`` [Hq] (GPT-OSS):
    one more logit per head in the softmax, whose share goes to no value. fp32 throughout; a row
    with every key masked gives zeros. With ``eager`` and 16-bit inputs, every step is rounded to
    the dtype instead, as transformers' eager attention computes (``_eager_reference``). Returns
    [B, Tq, Hq, Dv] in q's dtype."""
    if eager and q.dtype in (torch.bfloat16, torch.float16):
        return _eager_reference(q, k, v, mask, scale, sinks)
    groups = q.shape[1] // k.shape[1]
    kf = k.float().repeat_interleave(groups, dim=1)  # [B, Hq, L, Dk]
    vf = v.float().repeat_interleave(groups, dim=1)  # [B, Hq, L, Dv]
    s = torch.matmul(q.float(), kf.transpose(-1, -2)) * scale  # [B, Hq, Tq, L]
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask.float()
    dead = torch.isneginf(s.amax(dim=-1, keepdim=True))  # [B, Hq, Tq, 1]: every key masked
    if sinks is not None:
        sink = sinks.float().reshape(1, -1, 1, 1).expand(*s.shape[:-1], 1)  # [B, Hq, Tq, 1]
        p = torch.softmax(torch.cat([s, sink], dim=-1), dim=-1)[..., :-1].masked_fill(dead, 0.0)
    else:
        p = torch.softmax(s.masked_fill(dead, 0.0), dim=-1).masked_fill(dead, 0.0)
    return torch.matmul(p, vf).transpose(1, 2).contiguous().to(q.dtype)  # [B, Tq, Hq, Dv]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def qkv_rope_reference(y: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, hq: int, hkv: int,
                       q_w: torch.Tensor | None, k_w: torch.Tensor | None, eps: float, mode: int
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A decode step's attention inputs from the fused q/k/v projection ``y`` [B, T, (hq + 2 hkv) D].

    q and k get an RMSNorm (``rms_norm_reference`` with ``eps`` and ``mode``) when their weight is
    given: over the whole projection for a weight of hq * D (OLMoE), per head for one of D (Qwen3);
    then the rotary embedding with cos/sin [1|B, T, D], in transformers' order and rounding
    (``x * cos + rotate_half(x) * sin``). Returns q [B, hq, T, D], k and v [B, hkv, T, D], contiguous.
    """
    B, T, width = y.shape
    d = width // (hq + 2 * hkv)

    def part(lo: int, heads: int, w: torch.Tensor | None) -> torch.Tensor:
        x = y[..., lo * d:(lo + heads) * d]
        if w is not None:
            x = rms_norm_reference(x.reshape(B, T, heads, d) if w.numel() == d else x, w, eps, mode)
        return x.reshape(B, T, heads, d).transpose(1, 2)  # [B, heads, T, D]

    c, s = cos.unsqueeze(1), sin.unsqueeze(1)  # [1|B, 1, T, D]
    q, k, v = part(0, hq, q_w), part(hq, hkv, k_w), part(hq + hkv, hkv, None)
    q = q * c + _rotate_half(q) * s
    k = k * c + _rotate_half(k) * s
    return q.contiguous(), k.contiguous(), v.contiguous()


def qkv_rope_into_reference(y: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, hq: int, hkv: int,
                            q_w: torch.Tensor | None, k_w: torch.Tensor | None, eps: float, mode: int,
                            k_buf: torch.Tensor, v_buf: torch.Tensor, pos: int) -> torch.Tensor:
    """``qkv_rope_reference`` writing k and v into a KV cache's buffers ``[B, hkv, >= pos + T, D]`` at
    positions ``[pos, pos + T)``; returns q."""
    q, k, v = qkv_rope_reference(y, cos, sin, hq, hkv, q_w, k_w, eps, mode)
    T = y.shape[1]
    k_buf.narrow(2, pos, T).copy_(k)
    v_buf.narrow(2, pos, T).copy_(v)
    return q


def _qkv_rope_into_fake(y, cos, sin, hq, hkv, q_w, k_w, eps, mode, k_buf, v_buf, pos):
    B, T, width = y.shape
    return y.new_empty((B, hq, T, width // (hq + 2 * hkv)))


def _qkv_rope_fake(y, cos, sin, hq, hkv, q_w, k_w, eps, mode):
    B, T, width = y.shape
    d = width // (hq + 2 * hkv)
    return y.new_empty((B, hq, T, d)), y.new_empty((B, hkv, T, d)), y.new_empty((B, hkv, T, d))


def _attention_fake(q, k, v, mask, scale, sinks=None, eager=False):
    return q.new_empty((q.shape[0], q.shape[2], q.shape[1], v.shape[3]))


def _declare() -> None:
    if hasattr(torch.ops.moepager, "attention"):
        return  # already declared in this process
    torch.library.define(ATTENTION_OP, "(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale, Tensor? sinks=None, "
                         "bool eager=False) -> Tensor")
    torch.library.impl(ATTENTION_OP, "default", attention_reference)
    torch.library.register_fake(ATTENTION_OP, _attention_fake)
    torch.library.define(QKV_ROPE_OP, "(Tensor y, Tensor cos, Tensor sin, int hq, int hkv, Tensor? q_w, Tensor? k_w, "
                         "float eps, int norm_mode) -> (Tensor, Tensor, Tensor)")
    torch.library.impl(QKV_ROPE_OP, "default", qkv_rope_reference)
    torch.library.register_fake(QKV_ROPE_OP, _qkv_rope_fake)
    torch.library.define(QKV_ROPE_INTO_OP, "(Tensor y, Tensor cos, Tensor sin, int hq, int hkv, Tensor? q_w, "
                         "Tensor? k_w, float eps, int norm_mode, Tensor(a!) k_buf, Tensor(b!) v_buf, int pos) -> Tensor")
    torch.library.impl(QKV_ROPE_INTO_OP, "default", qkv_rope_into_reference)
    torch.library.register_fake(QKV_ROPE_INTO_OP, _qkv_rope_into_fake)


_declare()


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
              scale: float | None = None, sinks: torch.Tensor | None = None, eager: bool = False) -> torch.Tensor:
    """``attention_reference``'s result, native on CPU (see the module docstring). ``scale``
    defaults to 1 / sqrt(Dk)."""
    if q.device.type == "cpu":
        native_cpu.available()  # the first CPU call builds the native kernels (once)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    return torch.ops.moepager.attention(q, k, v, mask, float(scale), sinks, bool(eager))


def qkv_rope(y: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, hq: int, hkv: int,
             q_w: torch.Tensor | None = None, k_w: torch.Tensor | None = None, eps: float = 1e-6, mode: int = 0
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``qkv_rope_reference``'s result, native on CPU (one call for the norms, the rotary embedding
    and the head layout, which take a dozen small torch ops in transformers' modules)."""
    if y.device.type == "cpu":
        native_cpu.available()
    return torch.ops.moepager.qkv_rope(y, cos, sin, int(hq), int(hkv), q_w, k_w, float(eps), int(mode))


def qkv_rope_into(y: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, hq: int, hkv: int,
                  q_w: torch.Tensor | None, k_w: torch.Tensor | None, eps: float, mode: int,
                  k_buf: torch.Tensor, v_buf: torch.Tensor, pos: int) -> torch.Tensor:
    """``qkv_rope_into_reference``'s result, native on CPU: q, with k and v written into the cache's
    buffers in the same call."""
    if y.device.type == "cpu":
        native_cpu.available()
    return torch.ops.moepager.qkv_rope_into(y, cos, sin, int(hq), int(hkv), q_w, k_w, float(eps), int(mode),
                                            k_buf, v_buf, int(pos))


__all__ = ["ATTENTION_OP", "QKV_ROPE_INTO_OP", "QKV_ROPE_OP", "attention", "attention_reference", "qkv_rope",
           "qkv_rope_into", "qkv_rope_into_reference", "qkv_rope_reference"]
