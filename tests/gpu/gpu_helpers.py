"""Helpers shared by the CUDA tests."""

from __future__ import annotations

import pytest


def require_native() -> None:
    """Skip when the machine has no CUDA toolchain to build the kernels; fail when a build was possible but broke."""
    from torch.utils import cpp_extension

    from cuda_ext import native_status

    status = native_status()
    if status == "native":
        return
    if cpp_extension.CUDA_HOME is None or not cpp_extension.is_ninja_available():
        pytest.skip(f"no CUDA toolchain (nvcc {cpp_extension.CUDA_HOME}, ninja "
                    f"{cpp_extension.is_ninja_available()}) to build cuda_ext: {status}")
    pytest.fail(f"cuda_ext did not build although nvcc and ninja are present: {status}")
