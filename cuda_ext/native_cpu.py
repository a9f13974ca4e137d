"""Building and loading the native CPU kernels (``csrc/cpu_ops.cpp``, ``csrc/cpu_kernels.cpp``).

Nothing here runs at import. ``build()`` compiles the two translation units once with
``torch.utils.cpp_extension.load`` (ninja + gcc, cached under ``TORCH_EXTENSIONS_DIR``)
and loads them as a plain library whose ``TORCH_LIBRARY_IMPL(moepager, CPU, ...)``
block overrides the torch references of ``moepager::moe_ffn`` and ``moepager::linear``
for CPU tensors. The kernels are compiled per ISA inside that library (AVX512+BF16,
AVX512, AVX2+FMA) and chosen at run time from cpuid; no -march=native anywhere.

``MOEPAGER_NATIVE=0`` disables them; ``MOEPAGER_CPU_ISA=avx2`` (or ``avx512``,
``avx512bf16``) caps the ISA, and ``=scalar`` leaves the torch reference serving.
A failed build never raises: it is warned about once, recorded in ``status()``,
and the reference keeps serving.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from cuda_ext.pages import advise_huge_pages

CSRC = Path(__file__).parent / "csrc"
SOURCES = (CSRC / "cpu_ops.cpp", CSRC / "cpu_kernels.cpp")
HEADERS = (CSRC / "cpu_kernels.h", CSRC / "cpu_kernels_impl.h")
# One build directory per source version: installs of different versions never rebuild each other's.
EXTENSION_NAME = "moepager_cpu_" + hashlib.sha256(b"".join(p.read_bytes() for p in SOURCES + HEADERS)).hexdigest()[:12]
ISAS = ("avx512bf16", "avx512", "avx2")  # best first
BUILD_SECONDS = 60  # measured on 2 cores, announced before the first build

_lock = threading.Lock()
_tried = False
_loaded = False
_error: str | None = None


def _env_isa() -> str:
    return os.environ.get("MOEPAGER_CPU_ISA", "").strip().lower()


def _disabled() -> bool:
    off = os.environ.get("MOEPAGER_NATIVE", "1").strip().lower() in ("0", "false", "no", "off")
    return off or _env_isa() in ("scalar", "reference", "none")


def detect_isa() -> str:
    """The best kernel ISA this CPU supports: 'avx512bf16', 'avx512', 'avx2' or 'none'."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    flags = set(line.split(":", 1)[-1].split())
    if not {"avx2", "fma", "f16c"} <= flags:
        return "none"
    if not {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags:
        return "avx2"
    return "avx512bf16" if {"avx512_bf16", "avx512_vnni"} <= flags else "avx512"


def runnable_isas() -> list[str]:
    """Every kernel ISA this CPU can run, best first (empty without AVX2+FMA)."""
    best = detect_isa()
    return list(ISAS[ISAS.index(best):]) if best != "none" else []


def _short(exc: BaseException, limit: int = 4000) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    return text if len(text) <= limit else "..." + text[-limit:]


def _cached() -> bool:
    """Whether a compiled library is already on disk (then no progress line is printed)."""
    try:
        from torch.utils.cpp_extension import _get_build_directory

        return (Path(_get_build_directory(EXTENSION_NAME, verbose=False)) / f"{EXTENSION_NAME}.so").exists()
    except Exception:  # noqa: BLE001 - a private helper of torch; without it, announce the build
        return False


def build(progress: Callable[[str], None] | None = None, verbose: bool = False) -> bool:
    """Compile (first time only) and load the kernels; True when they serve CPU tensors.

    ``progress`` receives one line before a compile that is not cached yet.
    """
    global _tried, _loaded, _error
    with _lock:
        if _tried:
            return _loaded
        _tried = True
        if _disabled() or detect_isa() == "none":
            return False
        try:
            from torch.utils.cpp_extension import load

            # the op schemas must exist before the CPU kernels register
            import cuda_ext.attention
            import cuda_ext.cpu  # noqa: F401

            if progress is not None and not _cached():
                progress(f"building moepager CPU kernels (first start only, ~{BUILD_SECONDS} s)...")
            t0 = time.perf_counter()
            load(name=EXTENSION_NAME, sources=[str(s) for s in SOURCES], extra_cflags=["-O3", "-fopenmp"],
                 extra_ldflags=["-fopenmp"], extra_include_paths=[str(CSRC)], is_python_module=False,
                 verbose=verbose)
            _loaded = True
            if verbose:
                print(f"moepager CPU kernels loaded in {time.perf_counter() - t0:.1f} s, isa {isa()}")
        except Exception as exc:  # noqa: BLE001 - any build failure falls back to the reference
            _error = _short(exc)
            warnings.warn(f"moepager: native CPU kernels unavailable, using the torch reference ({_error})",
                          RuntimeWarning, stacklevel=3)
        return _loaded


def available() -> bool:
    """True when the native kernels serve CPU tensors (builds them on the first call)."""
    return _loaded if _tried else build()


def isa() -> str:
    """The ISA the loaded kernels run now ('none' when they are not loaded)."""
    return str(torch.ops.moepager_cpu.isa()) if _loaded else "none"


def set_isa(name: str) -> str:
    """Switch the loaded kernels to ``name`` (at most what the CPU supports); returns the ISA in use."""
    if not available():
        raise RuntimeError(f"native CPU kernels are not loaded ({status()})")
    return str(torch.ops.moepager_cpu.set_isa(name))


def set_row_block(rows: int) -> int:
    """Rows per kernel tile: 1 (the default: each weight row read front to back) or 4 (four rows
    interleaved, the earlier loop, kept so benchmarks can compare the two); returns the previous."""
    if not available():
        raise RuntimeError(f"native CPU kernels are not loaded ({status()})")
    return int(torch.ops.moepager_cpu.set_row_block(rows))


def set_dp_tokens(on: bool) -> bool:
    """AVX512_BF16: compute bf16 tiles of several tokens with VDPBF16PS (True) or shift + FMA (False)
    instead of the choice measured at the first call; returns the previous choice."""
    if not available():
        raise RuntimeError(f"native CPU kernels are not loaded ({status()})")
    return bool(torch.ops.moepager_cpu.set_dp_tokens(on))


def dp_tokens() -> bool:
    """Whether bf16 tiles of several tokens use VDPBF16PS (measured once on AVX512_BF16 CPUs)."""
    return available() and bool(torch.ops.moepager_cpu.dp_tokens())


def status() -> str:
    """'native-<isa>', 'reference', 'reference (not built yet)' or 'build failed: <error>'."""
    if _disabled() or detect_isa() == "none":
        return "reference"
    if not _tried:
        return "reference (not built yet)"
    if _loaded:
        return f"native-{isa()}"
    return f"build failed: {_error}"


def read_bandwidth(gib: float = 1.0, repeats: int = 5) -> float:
    """The machine's memory read bandwidth in GB/s, for benchmarks: the best of a few full reads of
    a buffer far larger than the caches (on 2 MiB pages, as the expert pages), by the faster of a
    torch int64 sum and the native streaming read (when the kernels are loaded), over all threads."""
    buf = torch.empty(int(gib * 2**30) // 8 * 8, dtype=torch.uint8)
    advise_huge_pages(buf)
    buf.fill_(1)
    readers = [lambda: buf.view(torch.int64).sum()]
    if available():
        readers.append(lambda: torch.ops.moepager_cpu.stream_read(buf))
    best = float("inf")
    for read in readers:
        for _ in range(repeats):
            t0 = time.perf_counter()
            read()
            best = min(best, time.perf_counter() - t0)
    return buf.numel() / best / 1e9
