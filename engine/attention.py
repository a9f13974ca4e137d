"""Decode attention on the CPU: transformers' SDPA calls served by ``cuda_ext.attention``.

transformers picks a model's attention function by name from a registry
(``AttentionInterface``) and its mask builder from another (``AttentionMaskInterface``).
This module registers one more name, ``moepager_sdpa``: the masks are built exactly as
for ``sdpa``, and each call that the native kernel computes the same way (CPU, a few
query tokens, no dropout, bias, sinks or soft-capping) goes to ``cuda_ext.attention``;
every other call goes to transformers' own ``sdpa`` function, unchanged. A model is
switched only when it runs ``sdpa`` on the CPU, so eager-only architectures keep theirs.

Why: torch's CPU flash-attention kernel is built for long query blocks. At one query it
costs several times what reading the cache does, and its cost grows with the context
(bench/long_context.py). Prefill keeps it: there it is compute-bound and fast.

Semantics follow ``sdpa_attention_forward``: one query token attends every key it is
given (``is_causal`` is never set at one token); several query tokens only with a mask
(without one, sdpa would apply a causal mask of its own alignment, which stays sdpa's).
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

from cuda_ext import attention

NAME = "moepager_sdpa"
MAX_QUERY_TOKENS = 16  # more query tokens (prefill) is a GEMM-shaped problem: sdpa's flash kernel
_KV_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_MASK_DTYPES = (torch.bool, torch.float32, torch.bfloat16, torch.float16)
# Keyword arguments under which sdpa computes something else than plain softmax attention.
_UNSUPPORTED = ("s_aux", "sinks", "softcap", "output_attentions")


def _native(query, key, value, mask, dropout, position_bias, kwargs) -> bool:
    tq = query.shape[2]
    if query.device.type != "cpu" or tq > MAX_QUERY_TOKENS or (tq > 1 and mask is None):
        return False
    if dropout or position_bias is not None:
        return False
    for name in _UNSUPPORTED:
        arg = kwargs.get(name)
        if arg is not None and arg is not False:
            return False
    if torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad):
        return False  # the op has no backward
    if key.dtype != value.dtype or key.dtype not in _KV_DTYPES or key.stride(-1) != 1 or value.stride(-1) != 1:
        return False
    if key.shape[0] != query.shape[0] or query.shape[1] % key.shape[1] != 0:
        return False
    if mask is not None:
        if mask.dim() != 4 or mask.dtype not in _MASK_DTYPES or mask.shape[2:] != (tq, key.shape[2]):
            return False
        if mask.shape[0] not in (1, query.shape[0]) or mask.shape[1] not in (1, query.shape[1]):
            return False
    return True


def attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                      is_causal: bool | None = None, position_bias: torch.Tensor | None = None,
                      **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: query [B, Hq, Tq, D], key/value [B, Hkv, L, D];
    returns ([B, Tq, Hq, Dv], None) as ``sdpa_attention_forward`` does."""
    if _native(query, key, value, attention_mask, dropout, position_bias, kwargs):
        return attention(query, key, value, attention_mask, scaling), None
    if position_bias is not None:
        kwargs["position_bias"] = position_bias
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  is_causal=is_causal, **kwargs)


def register() -> None:
    """Make ``NAME`` known to transformers (idempotent)."""
    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


def use_native_attention(model: torch.nn.Module) -> bool:
    """Switch ``model`` from ``sdpa`` to ``NAME`` when it runs on the CPU; returns whether it did."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    if any(p.device.type != "cpu" for p in model.parameters()):
        return False
    register()
    model.set_attn_implementation(NAME)
    return model.config._attn_implementation == NAME


__all__ = ["MAX_QUERY_TOKENS", "NAME", "attention_forward", "register", "use_native_attention"]
