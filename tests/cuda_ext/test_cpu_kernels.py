"""Native CPU kernels (moe_ffn, linear, rms_norm) against their torch references, and the page formats.

Tolerances: outputs are compared as max |native - reference| <= tol * max |reference|
(the output scale). fp32 pages with fp32 x: 1e-5. Everything else: 1e-2, since
the output is rounded to bf16/fp16 and the AVX512-BF16 kernel rounds x and the
activations to bf16 (as the modules cast x to the weights' dtype). The references
compute in fp32 from the same (dequantized) page weights.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import cuda_ext
from cuda_ext import (
    Int8Linear,
    NativeLinear,
    NativeRMSNorm,
    PageFormat,
    linear,
    linear_int8,
    linear_int8_reference,
    linear_reference,
    moe_ffn,
    moe_ffn_reference,
    native_cpu,
    rms_norm,
    rms_norm_reference,
)

ROOT = Path(__file__).parents[2]
KINDS = {  # name -> (kind, dtype, group_size)
    "fp32": ("float", torch.float32, 0),
    "bf16": ("float", torch.bfloat16, 0),
    "fp16": ("float", torch.float16, 0),
    "int8": ("int8", torch.bfloat16, 0),
    "int4g32": ("int4", torch.float16, 32),
    "int4g128": ("int4", torch.float32, 128),
    "int4g96": ("int4", torch.bfloat16, 96),  # an odd multiple of 32: one AVX512 step spans two groups
}
ARCHS = {  # name -> (transposed, interleaved, has_bias, act)
    "silu": (False, False, False, "silu"),  # Mixtral / Qwen / OLMoE / DeepSeek: [2I, H], gate rows first
    "gpt_oss": (True, True, True, "swiglu_oai"),  # [H, 2I] interleaved, biases, clamped SwiGLU
}
TOKENS = [1, 2, 7, 16, 33]
CASES = [(64, 32, T) for T in TOKENS] + [(1024, 1024, T) for T in (1, 7, 33)] + [(192, 96, 3)]  # (H, I, T)
PAGES, ROWS, TOP_K = 4, (3, 0, 2), 4


def _fmt(kind_name: str, arch: str, H: int, I: int) -> PageFormat:
    kind, dtype, group = KINDS[kind_name]
    transposed, interleaved, has_bias, _ = ARCHS[arch]
    if kind == "int4" and (H % group or I % group):
        group = 32
    return PageFormat(kind, dtype, H, I, transposed, interleaved, has_bias, group)


def _module_weights(fmt: PageFormat, g: torch.Generator):
    H, I = fmt.hidden, fmt.intermediate
    gate_up = torch.randn(2 * I, H, generator=g) / H**0.5  # [2I, H]
    down = torch.randn(H, I, generator=g) / I**0.5  # [H, I]
    gate_up = gate_up * torch.exp(torch.randn(2 * I, 1, generator=g) / 2)  # rows of different scales
    if fmt.transposed:
        gate_up, down = gate_up.t().contiguous(), down.t().contiguous()
    b1 = torch.randn(2 * I, generator=g) / 4 if fmt.has_bias else None
    b2 = torch.randn(H, generator=g) / 4 if fmt.has_bias else None
    return gate_up, down, b1, b2


@functools.lru_cache(maxsize=8)
def _pages(fmt: PageFormat) -> torch.Tensor:
    """PAGES pages of random experts, rows of a wider buffer (row stride > page_bytes)."""
    g = torch.Generator().manual_seed(zlib.crc32(repr((fmt.kind, fmt.hidden, fmt.transposed)).encode()))
    buf = torch.zeros(PAGES, fmt.page_bytes + 128, dtype=torch.uint8)
    pages = buf[:, : fmt.page_bytes]
    for e in range(PAGES):
        fmt.pack(*_module_weights(fmt, g), out=pages[e])
    return pages


def _routing(T: int, U: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(-1, U, (T, TOP_K), generator=g)  # -1 entries and repeated experts both occur
    idx[0, :2] = torch.tensor([U - 1, U - 1])  # a token sending two of its top-k slots to one expert
    weights = torch.rand(T, TOP_K, generator=g)
    return idx, weights


def _check(fmt: PageFormat, act: str, T: int, x_dtype: torch.dtype, seed: int = 0, crowd: bool = False) -> None:
    pages = _pages(fmt)
    rows = torch.tensor(ROWS)  # the layer's experts live in scattered page rows
    idx, weights = _routing(T, rows.numel(), seed)
    if crowd:  # every token on expert 1 (a prefill-sized batch for one expert), others as routed
        idx[:, 0] = 1
    x = torch.randn(T, fmt.hidden, generator=torch.Generator().manual_seed(seed + 1)).to(x_dtype)
    got = moe_ffn(x, pages, rows, idx, weights, fmt, act)
    want = moe_ffn_reference(x, pages, rows, idx, weights, fmt.kind, fmt.dtype, fmt.hidden, fmt.intermediate,
                             fmt.transposed, fmt.interleaved, fmt.has_bias, fmt.group_size, act, 1.702, 7.0)
    assert got.shape == (T, fmt.hidden) and got.dtype == x_dtype
    exact = fmt.kind == "float" and fmt.dtype == torch.float32 and x_dtype == torch.float32
    tol = 1e-5 if exact else 1e-2
    scale = want.float().abs().max().item()
    assert scale > 0
    err = (got.float() - want.float()).abs().max().item()
    assert err <= tol * scale, f"max error {err:.3g} > {tol} x output scale {scale:.3g}"


# -- moe_ffn ------------------------------------------------------------------------------
@pytest.mark.parametrize("H,I,T", CASES)
@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("kind_name", list(KINDS))
def test_moe_ffn_matches_reference(native, kind_name, arch, H, I, T):
    fmt = _fmt(kind_name, arch, H, I)
    x_dtype = fmt.dtype if fmt.kind == "float" else torch.bfloat16
    _check(fmt, ARCHS[arch][3], T, x_dtype, seed=T)


@pytest.mark.parametrize("isa", native_cpu.runnable_isas()[1:])  # the best ISA runs every case above
@pytest.mark.parametrize("kind_name", list(KINDS))
@pytest.mark.parametrize("arch", list(ARCHS))
def test_moe_ffn_every_isa(native, isa, kind_name, arch):
    native_cpu.set_isa(isa)
    try:
        assert native_cpu.isa() == isa
        for H, I, T in ((64, 32, 1), (64, 32, 7), (64, 32, 33), (1024, 1024, 2)):
            _check(_fmt(kind_name, arch, H, I), ARCHS[arch][3], T, torch.float32, seed=T)
    finally:
        native_cpu.set_isa(native)


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("kind_name", list(KINDS))
def test_moe_ffn_many_tokens_per_expert(native, kind_name, arch):
    """More than 32 tokens on one expert take the dequantize + GEMM path; the rest the row kernels."""
    fmt = _fmt(kind_name, arch, 64, 32)
    _check(fmt, ARCHS[arch][3], 40, fmt.dtype if fmt.kind == "float" else torch.bfloat16, crowd=True)


def test_moe_ffn_odd_sizes(native):
    """Rows and inputs that are not multiples of the vector width or the 4-row tile."""
    for isa in native_cpu.runnable_isas():
        native_cpu.set_isa(isa)
        for kind_name in ("fp32", "bf16", "fp16", "int8"):
            fmt = PageFormat(*(KINDS[kind_name][:2]), 50, 21, False, False, True)
            _check(fmt, "silu", 5, torch.float32)
    native_cpu.set_isa(native)


def test_moe_ffn_int8_long_rows(native):
    """int8 rows longer than one 2048-input int32 block, with a remainder of one and of two vector
    steps after it (the AVX512 kernel takes two steps at a time), on every ISA."""
    for isa in native_cpu.runnable_isas():
        native_cpu.set_isa(isa)
        for H, I in ((2144, 96), (2112, 64)):
            fmt = PageFormat("int8", torch.bfloat16, H, I, False, False, False)
            _check(fmt, "silu", 3, torch.float32, seed=H)
    native_cpu.set_isa(native)


@pytest.mark.parametrize("kind_name", list(KINDS))
def test_moe_ffn_four_row_tiles(native, kind_name):
    """The loop over 4 interleaved rows per tile (kept so benchmarks can compare it with the
    default one-row tiles) agrees with the reference on every ISA, and so does the native linear."""
    assert native_cpu.set_row_block(4) == 1  # one row per tile is the default
    try:
        for isa in native_cpu.runnable_isas():
            native_cpu.set_isa(isa)
            for arch in ARCHS:
                for H, I, T in ((64, 32, 1), (64, 32, 7), (192, 96, 3)):
                    _check(_fmt(kind_name, arch, H, I), ARCHS[arch][3], T, torch.float32, seed=T)
            x, w = torch.randn(3, 50), torch.randn(37, 50)
            torch.testing.assert_close(linear(x, w), linear_reference(x, w, None), rtol=1e-4, atol=1e-4)
    finally:
        native_cpu.set_isa(native)
        native_cpu.set_row_block(1)
    with pytest.raises(RuntimeError, match="rows per tile must be 1 or 4"):
        native_cpu.set_row_block(3)


def test_bf16_tokens_both_kernels(native):
    """On AVX512_BF16 CPUs bf16 tiles of several tokens run VDPBF16PS or shift + FMA, whichever was
    measured faster at the first call; both agree with the reference, for experts and linears."""
    if native != "avx512bf16":
        pytest.skip("needs AVX512_BF16")
    measured = native_cpu.dp_tokens()
    assert cuda_ext.cpu_kernel_status()["bf16_tokens"] == ("vdpbf16ps" if measured else "shift+fma")
    try:
        for on in (True, False):
            native_cpu.set_dp_tokens(on)
            assert native_cpu.dp_tokens() is on
            for arch in ARCHS:
                for H, I, T in ((64, 32, 2), (64, 32, 7), (96, 48, 3), (1024, 1024, 5)):
                    _check(_fmt("bf16", arch, H, I), ARCHS[arch][3], T, torch.bfloat16, seed=T)
            for T in (2, 3, 4, 9, 16):
                x, w = torch.randn(T, 50).bfloat16(), torch.randn(37, 50).bfloat16()
                torch.testing.assert_close(linear(x, w).float(), linear_reference(x, w, None).float(),
                                           rtol=2e-2, atol=2e-2)
    finally:
        native_cpu.set_dp_tokens(measured)


def test_moe_ffn_skips_and_repeats(native):
    fmt = _fmt("bf16", "silu", 64, 32)
    pages, rows = _pages(fmt), torch.tensor([2, 1])
    x = torch.randn(3, 64)
    none = torch.full((3, 2), -1)
    assert torch.equal(moe_ffn(x, pages, rows, none, torch.rand(3, 2), fmt, "silu"), torch.zeros(3, 64))
    twice = moe_ffn(x, pages, rows, torch.tensor([[1, 1]] * 3), torch.tensor([[0.25, 0.5]] * 3), fmt, "silu")
    once = moe_ffn(x, pages, rows, torch.tensor([[1, -1]] * 3), torch.tensor([[0.75, 0.9]] * 3), fmt, "silu")
    torch.testing.assert_close(twice, once, rtol=1e-5, atol=1e-6)


def test_moe_ffn_reference_matches_module_math():
    """The reference equals the FFN written out from the module-layout float weights (float64)."""
    fmt = PageFormat("float", torch.float32, 32, 16, True, True, True)
    g = torch.Generator().manual_seed(3)
    experts = [_module_weights(fmt, g) for _ in range(2)]
    pages = torch.stack([fmt.pack(*w) for w in experts])
    x, idx, wts = torch.randn(3, 32, generator=g), torch.tensor([[0, 1], [1, -1], [0, 0]]), torch.rand(3, 2)
    got = moe_ffn_reference(x, pages, torch.tensor([0, 1]), idx, wts, "float", torch.float32, 32, 16, True, True,
                            True, 0, "swiglu_oai", 1.702, 7.0)
    want = torch.zeros(3, 32, dtype=torch.float64)
    for t in range(3):
        for k in range(2):
            if idx[t, k] < 0:
                continue
            gate_up, down, b1, b2 = (w.double() for w in experts[idx[t, k]])
            gu = x[t].double() @ gate_up + b1  # [2I]
            gate, up = gu[::2].clamp(max=7.0), gu[1::2].clamp(-7.0, 7.0)
            h = (up + 1) * gate * torch.sigmoid(gate * 1.702)
            want[t] += wts[t, k].double() * (h @ down + b2)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_moe_ffn_rejects_bad_arguments(native):
    fmt = _fmt("int8", "silu", 64, 32)
    pages, x = _pages(fmt), torch.randn(2, 64)
    with pytest.raises(ValueError, match="act"):
        moe_ffn(x, pages, torch.tensor([0]), torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 1), fmt, "gelu")
    with pytest.raises(RuntimeError, match="out of range"):
        moe_ffn(x, pages, torch.tensor([0]), torch.ones(2, 1, dtype=torch.long), torch.ones(2, 1), fmt, "silu")
    with pytest.raises(RuntimeError, match="page_bytes|bytes"):
        moe_ffn(x, pages[:, :64], torch.tensor([0]), torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 1), fmt,
                "silu")


def test_opcheck(native):
    fmt = _fmt("int4g32", "gpt_oss", 64, 32)
    pages, rows = _pages(fmt), torch.tensor([1, 2, 0])
    idx, wts = _routing(3, 3, 0)
    args = (torch.randn(3, 64), pages, rows, idx, wts, fmt.kind, fmt.dtype, 64, 32, True, True, True, 32,
            "swiglu_oai", 1.702, 7.0)
    torch.library.opcheck(torch.ops.moepager.moe_ffn.default, args)
    torch.library.opcheck(torch.ops.moepager.linear.default, (torch.randn(3, 40), torch.randn(24, 40),
                                                              torch.randn(24)))
    torch.library.opcheck(torch.ops.moepager.linear.default, (torch.randn(2, 40).bfloat16(),
                                                              torch.randn(24, 40).bfloat16(), None))


# -- linear --------------------------------------------------------------------------------
@pytest.mark.parametrize("T", TOKENS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("out_features,in_features", [(64, 48), (37, 50), (1024, 1024)])
def test_linear_matches_reference(native, dtype, out_features, in_features, T):
    g = torch.Generator().manual_seed(T)
    w = (torch.randn(out_features, in_features, generator=g) / in_features**0.5).to(dtype)
    b = torch.randn(out_features, generator=g).to(dtype)
    x = torch.randn(T, in_features, generator=g).to(dtype)
    for bias in (b, None):
        got, want = linear(x, w, bias), linear_reference(x, w, bias)
        assert got.shape == want.shape and got.dtype == dtype
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        assert (got.float() - want.float()).abs().max() <= tol * want.float().abs().max()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_prefill_linear_multiplies_in_fp32_without_native_bf16(native, dtype):
    """Above 16 rows the op is a GEMM: bf16 (without AVX512-BF16) and fp16 weights are multiplied in
    fp32 and rounded once, which oneDNN does 3-6x faster on such CPUs than its bf16 / fp16 GEMM."""
    g = torch.Generator().manual_seed(4)
    w = (torch.randn(48, 40, generator=g) / 7).to(dtype)
    b = torch.randn(48, generator=g).to(dtype)
    x = torch.randn(33, 40, generator=g).to(dtype)
    for bias in (b, None):
        got = linear(x, w, bias)
        if dtype == torch.bfloat16 and native_cpu.isa() == "avx512bf16":
            want = linear_reference(x, w, bias)  # oneDNN's bf16 GEMM runs on the native instructions
        else:
            want = F.linear(x.float(), w.float(), None if bias is None else bias.float()).to(dtype)
        assert torch.equal(got, want)


def test_native_linear_shares_parameters(native):
    lin = nn.Linear(48, 40).to(torch.bfloat16)
    nl = NativeLinear.from_linear(lin)
    assert nl.weight is lin.weight and nl.bias is lin.bias
    assert nl.state_dict().keys() == lin.state_dict().keys()
    x = torch.randn(2, 3, 48).to(torch.bfloat16)
    with torch.inference_mode():
        got, want = nl(x), lin(x)
    assert got.shape == (2, 3, 40)
    assert (got.float() - want.float()).abs().max() <= 1e-2 * want.float().abs().max()
    y = nl(torch.randn(2, 48).to(torch.bfloat16))
    y.float().sum().backward()
    assert lin.weight.grad is not None


# -- linear_int8 ---------------------------------------------------------------------------
def _int8_linear(out_features: int, in_features: int, seed: int, bias: bool) -> Int8Linear:
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(in_features, out_features, bias=bias)
    with torch.no_grad():  # rows of different scales, as real projections have
        lin.weight.copy_(torch.randn(out_features, in_features, generator=g) / in_features**0.5
                         * torch.exp(torch.randn(out_features, 1, generator=g) / 2))
        if bias:
            lin.bias.copy_(torch.randn(out_features, generator=g))
    return Int8Linear.from_linear(lin.to(torch.bfloat16))


@pytest.mark.parametrize("T", TOKENS)
@pytest.mark.parametrize("out_features,in_features", [(64, 48), (37, 50), (1024, 1024), (96, 2144)])
def test_linear_int8_matches_reference(native, out_features, in_features, T):
    """Every ISA, bf16 and fp32 x, with and without bias: within 1 % of the output scale (the int16
    rounding of x and the output's own dtype are the only differences from the fp32 reference)."""
    for isa in native_cpu.runnable_isas():
        native_cpu.set_isa(isa)
        for bias in (True, False):
            m = _int8_linear(out_features, in_features, T + out_features, bias)
            for dtype in (torch.float32, torch.bfloat16):
                x = torch.randn(T, in_features, generator=torch.Generator().manual_seed(T)).to(dtype)
                got = linear_int8(x, m.qweight, m.scales, m.bias)
                want = linear_int8_reference(x, m.qweight, m.scales, m.bias)
                assert got.shape == (T, out_features) and got.dtype == dtype
                scale = want.float().abs().max()
                assert (got.float() - want.float()).abs().max() <= 1e-2 * scale, (isa, bias, dtype)
    native_cpu.set_isa(native)


def test_int8_linear_error_bound_and_module(native):
    """Quantization stays within half a row's scale; the module agrees with the bf16 Linear it replaced
    within that bound's effect, keeps the bias Parameter, and holds int8 weights (half the bytes)."""
    lin = nn.Linear(96, 80).to(torch.bfloat16)
    m = Int8Linear.from_linear(lin)
    assert m.qweight.dtype == torch.int8 and m.bias is lin.bias and m.scales.dtype == torch.float32
    deq = m.qweight.float() * m.scales[:, None]
    err = (deq - lin.weight.float()).abs().amax(dim=1)
    assert bool((err <= m.error_bound() * (1 + 1e-6)).all()) and bool((err > 0).any())
    x = torch.randn(2, 3, 96).to(torch.bfloat16)
    with torch.inference_mode():
        got, want = m(x), lin(x)
    assert got.shape == (2, 3, 80)
    assert (got.float() - want.float()).abs().max() <= 3e-2 * want.float().abs().max()
    y = m(torch.randn(2, 96).to(torch.bfloat16))  # grad enabled: the differentiable reference serves
    y.float().sum().backward()
    assert lin.bias.grad is not None
    chunked = Int8Linear.from_linear(lin, chunk_rows=7)  # quantized a few rows at a time: the same codes
    assert torch.equal(chunked.qweight, m.qweight) and torch.equal(chunked.scales, m.scales)


def test_linear_int8_opcheck_and_errors(native):
    m = _int8_linear(24, 40, 0, True)
    torch.library.opcheck(torch.ops.moepager.linear_int8.default, (torch.randn(3, 40), m.qweight, m.scales, m.bias.detach()))
    torch.library.opcheck(torch.ops.moepager.linear_int8.default,
                          (torch.randn(2, 40).bfloat16(), m.qweight, m.scales, None))
    with pytest.raises(RuntimeError, match="w must be int8"):
        linear_int8(torch.randn(2, 40), m.qweight.float(), m.scales)
    with pytest.raises(RuntimeError, match="scales must be"):
        linear_int8(torch.randn(2, 40), m.qweight, m.scales[:5])
    with pytest.raises(RuntimeError, match="x must be"):
        linear_int8(torch.randn(2, 41), m.qweight, m.scales)


# -- rms_norm ------------------------------------------------------------------------------
FLOATS = [torch.float32, torch.bfloat16, torch.float16]
ULP = {torch.float32: 2.0**-23, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-10}


@pytest.mark.parametrize("mode", [0, 1])
@pytest.mark.parametrize("wdtype", FLOATS)
@pytest.mark.parametrize("xdtype", FLOATS)
def test_rms_norm_matches_reference(native, xdtype, wdtype, mode):
    """Same dtype as the reference; within 2 units in the last place of the coarser of x's and the
    output's dtype (the normalised row is rounded to x's dtype, and the sum of squares is added in
    another order), and bit-identical almost everywhere."""
    g = torch.Generator().manual_seed(mode)
    for shape in [(1, 1024), (3, 5, 96), (130, 64)]:  # 130 rows: split across threads
        x = (torch.randn(*shape, generator=g) * 3).to(xdtype)
        w = (torch.rand(shape[-1], generator=g) * 2 + 0.1).to(wdtype)
        got, want = rms_norm(x, w, 1e-6, mode), rms_norm_reference(x, w, 1e-6, mode)
        assert got.dtype == want.dtype and got.shape == want.shape
        diff = (got.float() - want.float()).abs()
        ulp = max(ULP[xdtype], ULP[want.dtype])
        assert diff.max() <= 2 * ulp * want.float().abs().max()
        if xdtype != torch.float32:
            assert (got != want).float().mean() < 0.01


def test_rms_norm_opcheck_and_errors(native):
    torch.library.opcheck(torch.ops.moepager.rms_norm.default, (torch.randn(3, 40), torch.rand(40), 1e-5, 0))
    torch.library.opcheck(torch.ops.moepager.rms_norm.default,
                          (torch.randn(2, 40).bfloat16(), torch.rand(40).bfloat16(), 1e-5, 1))
    with pytest.raises(RuntimeError, match="weight must be"):
        rms_norm(torch.randn(2, 40), torch.rand(41), 1e-5, 0)
    with pytest.raises(RuntimeError, match="mode must be"):
        rms_norm(torch.randn(2, 40), torch.rand(40), 1e-5, 2)
    with pytest.raises(RuntimeError, match="x must be"):
        rms_norm(torch.randn(2, 40).double(), torch.rand(40), 1e-5, 0)


def test_native_rms_norm_shares_weight_and_trains(native):
    w = nn.Parameter(torch.rand(48))
    norm = NativeRMSNorm(w, 1e-5, 0)
    assert norm.weight is w and list(norm.state_dict()) == ["weight"]
    y = norm(torch.randn(2, 48, requires_grad=True))
    y.sum().backward()
    assert w.grad is not None


# -- status and ISA selection ----------------------------------------------------------------
def test_status_reports_native(native):
    status = cuda_ext.cpu_kernel_status()
    assert status["moe_ffn"] == status["linear"] == status["rms_norm"] == f"native-{native}"
    assert status["cpu_isa"] == native_cpu.detect_isa()


def _run(code: str, **env: str) -> str:
    full = {**os.environ, **env}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=full, check=True, capture_output=True,
                         text=True)
    return out.stdout.strip().splitlines()[-1]


def test_env_forces_avx2(native):
    code = ("import torch; from cuda_ext import native_cpu, linear, linear_reference; "
            "assert native_cpu.build(); x, w = torch.randn(3, 40), torch.randn(24, 40); "
            "assert (linear(x, w) - linear_reference(x, w)).abs().max() < 1e-4; print(native_cpu.status())")
    assert _run(code, MOEPAGER_CPU_ISA="avx2") == "native-avx2"


def test_env_disables_native(monkeypatch):
    code = ("import torch, cuda_ext; from cuda_ext import native_cpu; native_cpu.build(); "
            "assert not torch._C._dispatch_has_kernel_for_dispatch_key('moepager::moe_ffn', 'CPU'); "
            "print(native_cpu.status())")
    assert _run(code, MOEPAGER_CPU_ISA="scalar") == "reference"
    monkeypatch.setenv("MOEPAGER_NATIVE", "0")
    assert native_cpu._disabled() and native_cpu.status() == "reference"


# -- page formats ----------------------------------------------------------------------------
@pytest.mark.parametrize("kind_name", list(KINDS))
@pytest.mark.parametrize("arch", list(ARCHS))
def test_pack_unpack_within_bound(kind_name, arch):
    fmt = _fmt(kind_name, arch, 256, 128)
    g = torch.Generator().manual_seed(5)
    gate_up, down, b1, b2 = _module_weights(fmt, g)
    gate_up[0].zero_()  # an all-zero row/column must not divide by zero
    down[..., 3] *= 50  # an outlier
    page = fmt.pack(gate_up, down, b1, b2)
    assert page.dtype == torch.uint8 and page.numel() == fmt.page_bytes and fmt.page_bytes % 64 == 0
    gu2, dn2, b12, b22 = fmt.unpack(page, torch.float32)
    assert gu2.shape == gate_up.shape and dn2.shape == down.shape
    bound_gu, bound_dn = fmt.error_bound(page)
    for w, w2, bound in ((gate_up, gu2, bound_gu), (down, dn2, bound_dn)):
        if fmt.kind == "float":
            torch.testing.assert_close(w2, w.to(fmt.dtype).float(), rtol=0, atol=0)
            continue
        err = (w2 - w).abs()
        assert (err <= bound + 1e-6 * w.abs()).all()
        assert err.max() > bound.max() / 20  # the bound is not vacuous
        # the bound is the quantization step of the channel (int8) or group (int4), not more
        qmax = 127 if fmt.kind == "int8" else 7
        w_rows = w.t() if fmt.transposed else w  # [out, in]
        b_rows = bound.t() if fmt.transposed else bound
        g = fmt.group_size or w_rows.shape[1]
        amax = w_rows.abs().reshape(w_rows.shape[0], -1, g).amax(-1).repeat_interleave(g, dim=1)
        assert (b_rows <= amax / qmax / 2 * (1 + 2**-7) + torch.finfo(fmt.dtype).tiny).all()
    if fmt.has_bias:
        torch.testing.assert_close(b12, b1.to(fmt.dtype).float(), rtol=0, atol=0)
        torch.testing.assert_close(b22, b2.to(fmt.dtype).float(), rtol=0, atol=0)


def test_float_unpack_is_a_view():
    fmt = PageFormat("float", torch.bfloat16, 64, 32, True, True, False)
    gate_up, down = torch.randn(64, 64).bfloat16(), torch.randn(32, 64).bfloat16()
    page = fmt.pack(gate_up, down)
    gu, dn, b1, b2 = fmt.unpack(page, torch.bfloat16)
    assert torch.equal(gu, gate_up) and torch.equal(dn, down) and b1 is None and b2 is None
    assert gu.untyped_storage().data_ptr() == page.untyped_storage().data_ptr()


def test_int4_group_size_must_divide():
    with pytest.raises(ValueError, match="group_size"):
        PageFormat("int4", torch.bfloat16, 64, 48, False, False, False, 32)
    with pytest.raises(ValueError, match="group_size"):
        PageFormat("int4", torch.bfloat16, 64, 32, False, False, False, 0)
    with pytest.raises(ValueError, match="group_size"):
        PageFormat("int8", torch.bfloat16, 64, 32, False, False, False, 32)


def test_pack_rejects_wrong_shapes():
    fmt = PageFormat("int8", torch.bfloat16, 64, 32, False, False, False)
    with pytest.raises(ValueError, match="hidden"):
        fmt.pack(torch.randn(64, 32), torch.randn(64, 32))
    with pytest.raises(ValueError, match="has_bias"):
        fmt.pack(torch.randn(64, 64), torch.randn(64, 32), torch.randn(64), torch.randn(64))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_unpack_on_cuda_equals_cpu():
    fmt = _fmt("int4g32", "gpt_oss", 64, 32)
    page = _pages(fmt)[0].contiguous()
    for a, b in zip(fmt.unpack(page.cuda(), torch.bfloat16), fmt.unpack(page, torch.bfloat16)):
        torch.testing.assert_close(a.cpu(), b, rtol=0, atol=0)


def test_stream_read_reads_every_word(native):
    words = torch.randint(-2**62, 2**62, (3 * 2**17 + 5,), dtype=torch.int64, generator=torch.Generator().manual_seed(0))
    want = 0
    for w in words.tolist():
        want ^= w
    assert torch.ops.moepager_cpu.stream_read(words) == want
    assert native_cpu.read_bandwidth(gib=0.0625, repeats=1) > 0
