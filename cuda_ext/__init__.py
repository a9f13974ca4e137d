"""Custom ops for the offloaded experts: each has a plain-torch reference, chosen automatically.

``expert_ffn`` computes one routed expert over the tokens sent to it, reading the
weights straight out of its slot. SiLU-gated experts go through the op
``moepager::expert_ffn_silu`` (``ops.py``): its torch reference is the default
kernel on every device, and a compiled kernel (``csrc/``, built on first CUDA use
or with ``python -m cuda_ext.build``) overrides it for CUDA. A failed native build
is reported at first use and in ``native_status()``, never at import.
"""

from cuda_ext.ops import (
    MAX_NATIVE_TOKENS,
    expert_ffn,
    expert_ffn_reference,
    expert_ffn_silu_reference,
    native_status,
    select_expert_ffn,
    silu_layout,
)

__all__ = ["MAX_NATIVE_TOKENS", "expert_ffn", "expert_ffn_reference", "expert_ffn_silu_reference",
           "native_status", "select_expert_ffn", "silu_layout"]
