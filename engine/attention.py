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

The whole attention block at decode (``use_decode_blocks``): around the attention function,
a transformers attention module spends about as long again on a dozen small torch ops
(the q/k norms, the rotary embedding, the head layout) and its Python layers as the native
kernels spend reading its weights. For modules of the usual shape (q/k/v/o projections
grouped by ``cuda_ext.linear_group``, optional q/k RMSNorms, rotary cos/sin of the full
head width) the module's class is swapped for a subclass whose forward, at a few query
tokens on the CPU, runs the fused projection, ``cuda_ext.qkv_rope`` (norms, rotary and
layout in one op), the cache update, the attention function and the output projection,
and otherwise calls the module's own forward. A class is swapped only after a probe:
its own forward and the fast one, on random inputs over a cache with a history, must give
bit-identical outputs and caches, so a module that computes anything else keeps its code.
"""

from __future__ import annotations

import copy
import inspect
import sys

import torch
from transformers import AttentionInterface, DynamicCache
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

from cuda_ext import NativeRMSNorm, attention, qkv_rope, qkv_rope_into
from engine.kv_rows import GrowingLayer

NAME = "moepager_sdpa"
EAGER_NAME = "moepager_eager"  # models without SDPA support (GPT-OSS): eager masks, eager rounding, own fallback
MAX_QUERY_TOKENS = 16  # more query tokens (prefill) is a GEMM-shaped problem: sdpa's flash kernel
_KV_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_MASK_DTYPES = (torch.bool, torch.float32, torch.bfloat16, torch.float16)
# Keyword arguments under which sdpa computes something else than plain softmax attention
# (``s_aux``, GPT-OSS's attention sinks, is computed natively when it is one logit per query head).
_UNSUPPORTED = ("sinks", "softcap", "output_attentions")


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
    sinks = kwargs.get("s_aux")
    if sinks is not None and (not isinstance(sinks, torch.Tensor) or sinks.dim() != 1
                              or sinks.shape[0] != query.shape[1] or not sinks.is_floating_point()):
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
        return attention(query, key, value, attention_mask, scaling, kwargs.get("s_aux")), None
    if kwargs.get("s_aux") is not None:
        raise ValueError("attention sinks (s_aux) of this shape need the model's own eager attention")
    if position_bias is not None:
        kwargs["position_bias"] = position_bias
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  is_causal=is_causal, **kwargs)


def _own_eager(module: torch.nn.Module):
    """The eager attention function of ``module``'s modeling file (GPT-OSS's computes its sinks)."""
    for cls in type(module).__mro__:
        fn = getattr(sys.modules.get(cls.__module__), "eager_attention_forward", None)
        if fn is not None:
            return fn
    raise ValueError(f"{type(module).__name__}: no eager attention function to fall back to")


def eager_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                            **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``EAGER_NAME``: calls the native kernel computes the same way (``_native``; eager's additive
    float masks, attention sinks as ``s_aux``) go to it, rounding between steps as eager attention
    does in a 16-bit dtype; every other call goes to the model's own eager function."""
    if scaling is not None and _native(query, key, value, attention_mask, dropout, None, kwargs):
        return attention(query, key, value, attention_mask, scaling, kwargs.get("s_aux"), eager=True), None
    return _own_eager(module)(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)


def register() -> None:
    """Make ``NAME`` and ``EAGER_NAME`` known to transformers (idempotent)."""
    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    AttentionInterface.register(EAGER_NAME, eager_attention_forward)
    AttentionMaskInterface.register(EAGER_NAME, ALL_MASK_ATTENTION_FUNCTIONS["eager"])


def use_native_attention(model: torch.nn.Module) -> bool:
    """Switch ``model`` from ``sdpa`` to ``NAME`` when it runs on the CPU, or from ``eager`` to
    ``EAGER_NAME`` when eager is all its class supports (GPT-OSS; a model that could run SDPA but was
    asked for eager keeps it); returns whether it did."""
    config = getattr(model, "config", None)
    impl = getattr(config, "_attn_implementation", None) if config is not None else None
    if impl == "sdpa":
        name = NAME
    elif impl == "eager" and getattr(model, "_supports_sdpa", True) is False:
        name = EAGER_NAME
    else:
        return False
    if any(p.device.type != "cpu" for p in model.parameters()):
        return False
    register()
    model.set_attn_implementation(name)
    return model.config._attn_implementation == name


# -- the whole attention block at decode -------------------------------------------------------
_CACHE_LAYERS = (DynamicLayer, DynamicSlidingWindowLayer, GrowingLayer)  # update(k, v) needs nothing more


class _BlockPlan:
    """What the fast forward needs of one attention module, read once when its class is swapped."""

    def __init__(self, own: type, group, hq: int, hkv: int, d: int, q_w, k_w, eps: float, mode: int,
                 cache_arg: str) -> None:
        self.own = own  # the module's own class
        self.group, self.hq, self.hkv, self.d = group, hq, hkv, d
        self.q_w, self.k_w, self.eps, self.mode = q_w, k_w, eps, mode
        self.cache_arg = cache_arg  # the forward's name for the cache: "cache" or "past_key_values"


def _block_plan(module: torch.nn.Module) -> _BlockPlan | None:
    """The fast forward's plan for ``module``, or None when it does not have the usual shape."""
    names = ("q_proj", "k_proj", "v_proj", "o_proj")
    if not all(isinstance(getattr(module, n, None), torch.nn.Module) for n in names):
        return None
    q, k, v = module.q_proj, module.k_proj, module.v_proj
    group = getattr(q, "group", None)
    if group is None or not group.active or group.members != [q, k, v]:
        return None
    d, layer_idx = getattr(module, "head_dim", None), getattr(module, "layer_idx", None)
    if not isinstance(d, int) or not isinstance(layer_idx, int) or not isinstance(getattr(module, "scaling", None),
                                                                                 float):
        return None
    rows = [m.out_features for m in (q, k, v)]
    if d <= 0 or d % 2 or rows[0] % d or rows[1] % d or rows[1] != rows[2]:
        return None
    if getattr(getattr(module, "config", None), "clip_qkv", None) is not None:
        return None
    hq, hkv = rows[0] // d, rows[1] // d
    q_norm, k_norm = getattr(module, "q_norm", None), getattr(module, "k_norm", None)
    q_w = k_w = None
    eps, mode = 1e-6, 0
    if q_norm is not None or k_norm is not None:
        if type(q_norm) is not NativeRMSNorm or type(k_norm) is not NativeRMSNorm:
            return None
        if (q_norm.eps, q_norm.mode) != (k_norm.eps, k_norm.mode):
            return None
        if q_norm.weight.numel() not in (hq * d, d) or k_norm.weight.numel() not in (hkv * d, d):
            return None
        q_w, k_w, eps, mode = q_norm.weight, k_norm.weight, q_norm.eps, q_norm.mode
    params = inspect.signature(type(module).forward).parameters
    if list(params)[:4] != ["self", "hidden_states", "position_embeddings", "attention_mask"]:
        return None  # the fast forward's fallback passes these three by position
    cache_arg = "cache" if "cache" in params else "past_key_values" if "past_key_values" in params else None
    if cache_arg is None:
        return None
    return _BlockPlan(type(module), group, hq, hkv, d, q_w, k_w, eps, mode, cache_arg)


_OWN_ARGS = ("cache", "past_key_values", "dropout", "scaling", "sliding_window")  # set by the fast forward itself


class _DecodeBlock:
    """Mixed in before an attention class (see the module docstring): the fast forward, or the
    class's own."""

    _moepager_block: _BlockPlan

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, *args, **kwargs):
        out = self._moepager_fast(hidden_states, position_embeddings, attention_mask, args, kwargs)
        if out is None:
            return super().forward(hidden_states, position_embeddings, attention_mask, *args, **kwargs)
        return out

    def _moepager_fast(self, hidden, position_embeddings, mask, args, kwargs):
        plan = self._moepager_block
        cache = kwargs.get(plan.cache_arg)
        if args or cache is None or position_embeddings is None or self.training or kwargs.get("output_attentions"):
            return None
        if hidden.dim() != 3 or hidden.shape[1] > MAX_QUERY_TOKENS or self.config._attn_implementation != NAME:
            return None
        if type(cache) is not DynamicCache or len(cache.layers) <= self.layer_idx:
            return None
        layer = cache.layers[self.layer_idx]
        if type(layer) not in _CACHE_LAYERS:
            return None
        cos, sin = position_embeddings
        if cos.dim() != 3 or cos.shape[-1] != plan.d or cos.shape[1] != hidden.shape[1]:
            return None
        y = plan.group.whole(hidden)  # [B, T, (hq + 2 hkv) d]; None on another device, at autograd, ...
        if y is None:
            return None
        room = layer.room((hidden.shape[0], plan.hkv, hidden.shape[1], plan.d), y.dtype, y.device) \
            if type(layer) is GrowingLayer else None
        if room is not None:  # k and v go straight into the cache's buffers, in the same call
            kbuf, vbuf, n = room
            q = qkv_rope_into(y, cos, sin, plan.hq, plan.hkv, plan.q_w, plan.k_w, plan.eps, plan.mode, kbuf, vbuf, n)
            k, v = layer.grow(hidden.shape[1])
        else:
            q, k, v = qkv_rope(y, cos, sin, plan.hq, plan.hkv, plan.q_w, plan.k_w, plan.eps, plan.mode)
            k, v = cache.update(k, v, self.layer_idx)
        rest = {n: a for n, a in kwargs.items() if n not in _OWN_ARGS}
        out, _ = attention_forward(self, q, k, v, mask, dropout=0.0, scaling=self.scaling,
                                   sliding_window=getattr(self.config, "sliding_window", None), **rest)
        return self.o_proj(out.reshape(*hidden.shape[:-1], -1)), None


_DECODE_CLASSES: dict[type, type] = {}


def _decode_class(cls: type) -> type:
    if cls not in _DECODE_CLASSES:
        _DECODE_CLASSES[cls] = type(f"Decode{cls.__name__}", (_DecodeBlock, cls), {"__module__": __name__})
    return _DECODE_CLASSES[cls]


def _probe(module: torch.nn.Module, plan: _BlockPlan, dtype: torch.dtype) -> bool:
    """Whether the fast forward reproduces ``module``'s own bit for bit, on random inputs and cos/sin
    in the model's ``dtype``, over transformers' cache layers and over the in-place ones
    (``_probe_steps``)."""
    H = module.q_proj.group.members[0].in_features
    g = torch.Generator().manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    fast_cls = _decode_class(type(module))
    own_cls = type(module)
    try:
        with torch.no_grad():
            for growing in (False, True):  # transformers' own cache layers, and the in-place ones
                if not _probe_steps(module, plan, growing, rnd, H, fast_cls, own_cls):
                    return False
    except Exception:  # noqa: BLE001 - a module the probe cannot drive is simply not swapped
        return False
    return True


def _probe_steps(module, plan: _BlockPlan, growing: bool, rnd, H: int, fast_cls: type, own_cls: type) -> bool:
    """One cache kind of ``_probe``: a 3-token history through the module's own forward, then steps of
    1 and 2 tokens through both forwards, each over its own copy of the cache."""
    cache = DynamicCache()
    if growing:
        cache.layer_class_to_replicate = GrowingLayer
    module(rnd(1, 3, H), (rnd(1, 3, plan.d), rnd(1, 3, plan.d)), None, **{plan.cache_arg: cache})
    if type(cache.layers[module.layer_idx]) is not (GrowingLayer if growing else DynamicLayer):
        return False
    for t in (1, 2):
        x, pe = rnd(1, t, H), (rnd(1, t, plan.d), rnd(1, t, plan.d))
        n = cache.layers[module.layer_idx].keys.shape[-2]
        mask = torch.ones(t, n + t, dtype=torch.bool).tril(n)[None, None]  # [1, 1, t, n + t]
        mine = copy.deepcopy(cache)
        want = module(x, pe, mask, **{plan.cache_arg: cache})[0]
        module.__class__ = fast_cls
        module._moepager_block = plan
        try:
            got = module._moepager_fast(x, pe, mask, (), {plan.cache_arg: mine})
        finally:
            module.__class__ = own_cls
        a, b = cache.layers[module.layer_idx], mine.layers[module.layer_idx]
        if got is None or not torch.equal(got[0], want) or not torch.equal(a.keys, b.keys) \
                or not torch.equal(a.values, b.values):
            return False
    return True


def use_decode_blocks(model: torch.nn.Module) -> int:
    """Swap the class of every attention module of ``model`` that ``_block_plan`` reads and a probe
    (one per class) confirms, on a model that runs ``NAME``; returns how many were swapped."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) != NAME:
        return 0
    dtype = getattr(model, "dtype", None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        return 0
    verdict: dict[type, bool] = {}
    swapped = 0
    for module in list(model.modules()):
        if isinstance(module, _DecodeBlock):
            continue
        plan = _block_plan(module)
        if plan is None:
            continue
        cls = type(module)
        if cls not in verdict:
            verdict[cls] = _probe(module, plan, dtype)
        if verdict[cls]:
            module._moepager_block = plan
            module.__class__ = _decode_class(cls)
            swapped += 1
    return swapped


def set_decode_blocks(model: torch.nn.Module, on: bool) -> int:
    """Run the modules ``use_decode_blocks`` swapped with the fast forward (``on``) or with their own
    class again (benchmarks compare the two on one engine); returns how many modules were switched."""
    switched = 0
    for module in model.modules():
        plan = getattr(module, "_moepager_block", None)
        if isinstance(plan, _BlockPlan):
            module.__class__ = _decode_class(plan.own) if on else plan.own
            switched += 1
    return switched


__all__ = ["EAGER_NAME", "MAX_QUERY_TOKENS", "NAME", "attention_forward", "eager_attention_forward", "register",
           "set_decode_blocks", "use_decode_blocks", "use_native_attention"]
