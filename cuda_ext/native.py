"""Building and loading the compiled kernels (``csrc/``), once, on first CUDA use.

Nothing here runs at import: without CUDA the status is ``reference`` and no
compiler is looked for. With CUDA the sources are compiled with
``torch.utils.cpp_extension.load`` (ninja + nvcc, cached under
``TORCH_EXTENSIONS_DIR``) and loaded as a plain library whose
``TORCH_LIBRARY_IMPL(moepager, CUDA, ...)`` block overrides the torch reference
for CUDA tensors. A failed build never raises: it is warned about once, recorded
in ``status()``, and the reference keeps serving. ``MOEPAGER_NATIVE=0`` skips the
build (to benchmark the reference on a GPU).
"""

from __future__ import annotations

import os
import threading
import warnings
from pathlib import Path

import torch

EXTENSION_NAME = "moepager_cuda_ext"
CSRC = Path(__file__).parent / "csrc"
SOURCES = (CSRC / "binding.cpp", CSRC / "expert_ffn.cu")

_lock = threading.Lock()
_tried = False
_loaded = False
_error: str | None = None  # the build/load error, when CUDA was present but the kernels are not


def _disabled() -> bool:
    return os.environ.get("MOEPAGER_NATIVE", "1").strip().lower() in ("0", "false", "no", "off")


def _short(exc: BaseException, limit: int = 4000) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    return text if len(text) <= limit else "..." + text[-limit:]


def build(verbose: bool = False) -> bool:
    """Compile and load the kernels if CUDA is present; True when they serve CUDA tensors."""
    global _tried, _loaded, _error
    with _lock:
        if _tried:
            return _loaded
        _tried = True
        if _disabled() or not torch.cuda.is_available():
            return False
        try:
            from torch.utils.cpp_extension import load

            import cuda_ext.ops  # noqa: F401 - the op schema must exist before the CUDA kernel registers

            load(name=EXTENSION_NAME, sources=[str(s) for s in SOURCES], extra_cflags=["-O3"],
                 extra_cuda_cflags=["-O3"], is_python_module=False, verbose=verbose)
            _loaded = True
        except Exception as exc:  # noqa: BLE001 - any build failure falls back to the reference
            _error = _short(exc)
            warnings.warn(f"moepager: native CUDA kernels unavailable, using the torch reference ({_error})",
                          RuntimeWarning, stacklevel=3)
        return _loaded


def available() -> bool:
    """True when the compiled kernels serve CUDA tensors (builds them on the first call)."""
    return _loaded if _tried else build()


def status() -> str:
    """'native', 'reference' (no CUDA or MOEPAGER_NATIVE=0), or 'build failed: <error>'."""
    if _disabled() or not torch.cuda.is_available():
        return "reference"
    if available():
        return "native"
    return f"build failed: {_error}"
