"""RMSNorms on the CPU: which modules ``use_native_norms`` swaps for the native op, and which it leaves."""

from __future__ import annotations

import pytest
import torch
from tiny_models import ARCHITECTURES, tiny_config
from torch import nn

from cuda_ext import NativeRMSNorm, native_cpu
from engine.dense import rms_norm_mode, use_native_norms


class GemmaStyleNorm(nn.Module):
    """Scales by ``1 + weight``: not a rounding the op computes, so it must never be swapped."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(n))
        self.eps = 1e-6

    def forward(self, x):
        xf = x.float()
        out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (out * (1.0 + self.weight.float())).to(x.dtype)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_every_rms_norm_of_each_architecture_is_recognised(arch):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(arch)).to(torch.bfloat16).eval()
    norms = [m for m in model.modules() if "RMSNorm" in type(m).__name__]
    if not norms:  # PhiMoE normalises with LayerNorm: nothing to swap
        assert any(isinstance(m, nn.LayerNorm) for m in model.modules())
        assert use_native_norms(model) == 0
        return
    x = torch.randn(2, 5, model.config.hidden_size).bfloat16()
    final = model.model.norm
    with torch.no_grad():
        want = final(x)
    swapped = use_native_norms(model)
    assert swapped == len(norms)
    assert all(isinstance(m, NativeRMSNorm) for m in model.modules() if "RMSNorm" in type(m).__name__)
    assert model.model.norm.weight is final.weight  # the same Parameter: state_dict unchanged
    if native_cpu.build():
        with torch.no_grad():
            got = model.model.norm(x)
        assert got.dtype == want.dtype
        assert (got.float() - want.float()).abs().max() <= 2 * 2.0**-8 * want.float().abs().max()


def test_other_norms_are_left_alone():
    assert rms_norm_mode(GemmaStyleNorm(32)) is None
    assert rms_norm_mode(nn.LayerNorm(32)) is None  # a bias and a mean subtraction
    assert rms_norm_mode(nn.LayerNorm(32, bias=False)) is None  # a mean subtraction, eps attribute
    model = nn.Sequential(GemmaStyleNorm(16), nn.LayerNorm(16))
    assert use_native_norms(model) == 0
    assert isinstance(model[0], GemmaStyleNorm) and isinstance(model[1], nn.LayerNorm)


def test_both_roundings_are_told_apart():
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssRMSNorm
    from transformers.models.mixtral.modeling_mixtral import MixtralRMSNorm

    assert rms_norm_mode(MixtralRMSNorm(64).to(torch.bfloat16)) == 0
    assert rms_norm_mode(GptOssRMSNorm(64).to(torch.bfloat16)) == 1
