"""cuda_ext on the CPU: the declared op equals the torch reference, and dispatch picks the reference."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_config

import cuda_ext
from cuda_ext import ops

LAYOUTS = [(False, False), (False, True), (True, False), (True, True)]  # (transposed, interleaved)
TOL = {torch.float32: {"atol": 1e-5, "rtol": 1e-5}, torch.bfloat16: {"atol": 2e-2, "rtol": 2e-2}}


def _weights(n: int, H: int, I: int, transposed: bool, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, H, generator=g)
    gate_up = torch.randn(2 * I, H, generator=g) / H**0.5  # [2I, H]
    down = torch.randn(H, I, generator=g) / I**0.5  # [H, I]
    if transposed:
        gate_up, down = gate_up.t().contiguous(), down.t().contiguous()  # [H, 2I], [I, H]
    return x.to(dtype), gate_up.to(dtype), down.to(dtype)


def _truth(x, gate_up, down, transposed: bool, interleaved: bool) -> torch.Tensor:
    """Float64, written out index by index from the layout description."""
    x, gate_up, down = x.double(), gate_up.double(), down.double()
    w1 = gate_up.t() if transposed else gate_up  # [2I, H]
    w2 = down.t() if transposed else down  # [H, I]
    I = w1.shape[0] // 2
    gate_rows = torch.arange(I) * 2 if interleaved else torch.arange(I)
    up_rows = gate_rows + 1 if interleaved else torch.arange(I) + I
    gate = x @ w1[gate_rows].t()  # [n, I]
    up = x @ w1[up_rows].t()  # [n, I]
    h = gate * torch.sigmoid(gate) * up
    return h @ w2.t()  # [n, H]


def _experts_module(arch: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, layers=2))
    return next(m for name, m in model.named_modules() if name.endswith("mlp.experts"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("transposed,interleaved", LAYOUTS)
@pytest.mark.parametrize("n", [1, 5, 17])
def test_op_matches_reference_and_truth(dtype, transposed, interleaved, n):
    x, gate_up, down = _weights(n, 48, 24, transposed, dtype)
    got = torch.ops.moepager.expert_ffn_silu(x, gate_up, down, transposed, interleaved)
    assert got.shape == (n, 48) and got.dtype == dtype
    ref = ops.expert_ffn_silu_reference(x, gate_up, down, transposed, interleaved)
    torch.testing.assert_close(got, ref, atol=0, rtol=0)  # on CPU the op's kernel is the reference itself
    torch.testing.assert_close(got.double(), _truth(x, gate_up, down, transposed, interleaved), **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe", "olmoe", "deepseek_v3", "phimoe"])
def test_op_equals_module_reference_for_silu_experts(arch, dtype):
    module = _experts_module(arch)
    interleaved = ops.silu_layout(module)
    assert interleaved is False  # these checkpoints store gate rows first
    e = 1
    gate_up = module.gate_up_proj[e].detach().to(dtype)  # [2I, H]
    down = module.down_proj[e].detach().to(dtype)  # [H, I]
    x = torch.randn(3, gate_up.shape[1]).to(dtype)
    want = ops.expert_ffn_reference(module, x, gate_up, down, None, None, False)
    got = torch.ops.moepager.expert_ffn_silu(x, gate_up, down, False, interleaved)
    torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_gpt_oss_gate_is_not_fused():
    assert ops.silu_layout(_experts_module("gpt_oss")) is None  # clamped SwiGLU with biases


def test_silu_layout_rejects_a_shifted_gate():
    module = _experts_module("mixtral")
    type_gate = type(module)._apply_gate

    class Shifted(type(module)):
        def _apply_gate(self, gate_up):  # the name differs, and so does the math
            return type_gate(self, gate_up) + 1

    module.__class__ = Shifted
    assert ops.silu_layout(module) is None


def test_fake_kernel_and_schema():
    x, gate_up, down = _weights(4, 32, 16, False, torch.float32)
    torch.library.opcheck(torch.ops.moepager.expert_ffn_silu.default, (x, gate_up, down, False, False))
    xt, gut, dt = _weights(4, 32, 16, True, torch.bfloat16)
    torch.library.opcheck(torch.ops.moepager.expert_ffn_silu.default, (xt.float(), gut, dt, True, True))
    meta = torch.ops.moepager.expert_ffn_silu(xt.to("meta"), gut.to("meta"), dt.to("meta"), True, True)
    assert meta.shape == (4, 32) and meta.dtype == torch.bfloat16


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only status")
def test_native_status_is_reference_on_cpu(monkeypatch):
    assert cuda_ext.native_status() == "reference"
    monkeypatch.setenv("MOEPAGER_NATIVE", "0")
    assert cuda_ext.native_status() == "reference"


def test_dispatch_picks_reference_on_cpu(monkeypatch):
    def no_native():
        raise AssertionError("CPU tensors must never consult the native kernels")

    monkeypatch.setattr(ops.native, "available", no_native)
    module = _experts_module("mixtral")
    assert ops.select_expert_ffn(module, "cpu") is ops.expert_ffn_reference
    gate_up, down = module.gate_up_proj[0].detach(), module.down_proj[0].detach()
    x = torch.randn(2, gate_up.shape[1])
    calls = []
    real = ops.expert_ffn_reference
    monkeypatch.setattr(ops, "expert_ffn_reference", lambda *a: calls.append(1) or real(*a))
    got = cuda_ext.expert_ffn(module, x, gate_up, down, None, None, False)
    assert calls == [1]
    torch.testing.assert_close(got, real(module, x, gate_up, down, None, None, False), atol=0, rtol=0)


def test_import_never_builds():
    code = ("import sys, cuda_ext, engine.offload; from cuda_ext import native; "
            "assert not native._tried and 'torch.utils.cpp_extension' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[2])
