"""Fixtures shared by the kernel tests."""

import pytest

from cuda_ext import native_cpu


@pytest.fixture(scope="session")
def native():
    """Build the native kernels once per test session; fail (not skip) when the build fails."""
    if native_cpu._disabled():
        pytest.skip("native CPU kernels disabled by MOEPAGER_NATIVE / MOEPAGER_CPU_ISA")
    if native_cpu.detect_isa() == "none":
        pytest.skip("this CPU has no AVX2+FMA")
    assert native_cpu.build(), native_cpu.status()
    best = native_cpu.isa()
    yield best
    native_cpu.set_isa(best)
