"""Custom ops for the offloaded experts: each has a plain-torch reference, chosen automatically.

``expert_ffn`` computes one routed expert over the tokens sent to it, reading the
weights straight out of its slot. The torch reference below is the default
kernel on every device; a compiled kernel registered for CUDA overrides it when
the extension is built (``cuda_ext/build.py``), and a failed native build is
reported at first use, not at import.
"""

from cuda_ext.ops import expert_ffn, expert_ffn_reference, native_status

__all__ = ["expert_ffn", "expert_ffn_reference", "native_status"]
