"""Custom ops for the offloaded experts: each has a plain-torch reference, chosen automatically.

``expert_ffn`` computes one routed expert over the tokens sent to it, reading the
weights straight out of its slot. SiLU-gated experts go through the op
``moepager::expert_ffn_silu`` (``ops.py``): its torch reference is the default
kernel on every device, and a compiled kernel (``csrc/``, built on first CUDA use
or with ``python -m cuda_ext.build``) overrides it for CUDA. A failed native build
is reported at first use and in ``native_status()``, never at import.

On the host, ``moe_ffn`` runs one MoE layer's routed experts straight from their
pages (``PageFormat``: float, int8 or int4), ``linear`` / ``NativeLinear`` the
dense layers at small T (``linear_int8`` / ``Int8Linear`` with int8 dense weights), ``rms_norm`` / ``NativeRMSNorm`` the norms
and ``attention`` (``attention.py``) decode attention over a KV cache, ``qkv_rope`` a decode step's q/k norms,
rotary embedding and head layout; native C++ kernels (``cpu.py``, ``native_cpu.py``)
override their torch references for CPU tensors once built.
"""

from cuda_ext.attention import (
    attention,
    attention_reference,
    qkv_rope,
    qkv_rope_into,
    qkv_rope_into_reference,
    qkv_rope_reference,
)
from cuda_ext.cpu import (
    Int8Linear,
    NativeLinear,
    NativeRMSNorm,
    cpu_kernel_status,
    linear,
    linear_int8,
    linear_int8_reference,
    linear_reference,
    moe_ffn,
    moe_ffn_reference,
    rms_norm,
    rms_norm_reference,
)
from cuda_ext.ops import (
    MAX_NATIVE_TOKENS,
    expert_ffn,
    expert_ffn_reference,
    expert_ffn_silu_reference,
    native_status,
    select_expert_ffn,
    silu_layout,
)
from cuda_ext.pages import PageFormat

__all__ = [
    "MAX_NATIVE_TOKENS",
    "Int8Linear",
    "NativeLinear",
    "NativeRMSNorm",
    "PageFormat",
    "attention",
    "attention_reference",
    "cpu_kernel_status",
    "expert_ffn",
    "expert_ffn_reference",
    "expert_ffn_silu_reference",
    "linear",
    "linear_int8",
    "linear_int8_reference",
    "linear_reference",
    "moe_ffn",
    "moe_ffn_reference",
    "native_status",
    "qkv_rope",
    "qkv_rope_into",
    "qkv_rope_into_reference",
    "qkv_rope_reference",
    "rms_norm",
    "rms_norm_reference",
    "select_expert_ffn",
    "silu_layout",
]
