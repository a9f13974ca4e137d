"""The compiled expert kernel against its torch reference on CUDA random inputs.

Tolerances (outputs are O(1)): float32 atol=rtol=1e-4 (fp32 accumulation in another
order); float16 1e-2 and bfloat16 3e-2 (the reference rounds the gate/up products to
the weight dtype before the down projection, the kernel keeps them in fp32).
"""

from __future__ import annotations

import time

import pytest
import torch
from gpu_helpers import require_native

from cuda_ext import ops

pytestmark = pytest.mark.gpu

TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 3e-2}
LAYOUTS = [(False, False), (False, True), (True, False), (True, True)]  # (transposed, interleaved)
SHAPES = [(64, 32), (200, 72), (2048, 768)]  # (H, I): tiny, not multiples of 32, Qwen3-30B-A3B


def _inputs(n, H, I, transposed, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(n, H, device="cuda", generator=g)
    gate_up = torch.randn(2 * I, H, device="cuda", generator=g) / H**0.5  # [2I, H]
    down = torch.randn(H, I, device="cuda", generator=g) / I**0.5  # [H, I]
    if transposed:
        gate_up, down = gate_up.t().contiguous(), down.t().contiguous()  # [H, 2I], [I, H]
    return x.to(dtype), gate_up.to(dtype), down.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("transposed,interleaved", LAYOUTS)
@pytest.mark.parametrize("n", [1, 4, 16, 33])
@pytest.mark.parametrize("H,I", SHAPES)
def test_native_matches_reference(dtype, transposed, interleaved, n, H, I):
    require_native()
    x, gate_up, down = _inputs(n, H, I, transposed, dtype)
    got = torch.ops.moepager.expert_ffn_silu(x, gate_up, down, transposed, interleaved)
    want = ops.expert_ffn_silu_reference(x, gate_up, down, transposed, interleaved)
    assert got.shape == (n, H) and got.dtype == dtype and got.is_cuda
    tol = TOL[dtype]
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)
    truth = ops.expert_ffn_silu_reference(x.double(), gate_up.double(), down.double(), transposed, interleaved)
    torch.testing.assert_close(got.double(), truth, atol=tol, rtol=tol)


def test_native_accepts_float32_tokens_for_bf16_weights_and_slot_views():
    require_native()
    x, gate_up, down = _inputs(3, 256, 128, False, torch.bfloat16)
    pages = torch.zeros(2, gate_up.numel() + down.numel() + 64, dtype=torch.bfloat16, device="cuda")
    pages[1, : gate_up.numel()] = gate_up.flatten()
    pages[1, gate_up.numel() : gate_up.numel() + down.numel()] = down.flatten()
    gu_view = pages[1, : gate_up.numel()].view(gate_up.shape)  # a slot's part, as the engine passes it
    d_view = pages[1, gate_up.numel() : gate_up.numel() + down.numel()].view(down.shape)
    got = torch.ops.moepager.expert_ffn_silu(x.float(), gu_view, d_view, False, False)
    want = ops.expert_ffn_silu_reference(x, gate_up, down, False, False)
    torch.testing.assert_close(got.float(), want.float(), atol=3e-2, rtol=3e-2)


def test_dispatch_uses_native_for_silu_modules_at_decode_sizes(tiny_model_dir):
    require_native()
    from engine import Engine

    with Engine.from_pretrained(tiny_model_dir("olmoe"), device="cuda", progress=False) as eng:
        module = eng.blocks[0].experts
        assert ops.select_expert_ffn(module, "cuda") is not ops.expert_ffn_reference
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            eng.logits(torch.randint(3, 128, (1, 6)))
        names = {e.name for e in prof.events()}
        assert "moepager::expert_ffn_silu" in names


def test_gpt_oss_stays_on_reference_on_cuda(tiny_model_dir):
    from engine import Engine

    with Engine.from_pretrained(tiny_model_dir("gpt_oss"), device="cuda", progress=False) as eng:
        module = eng.blocks[0].experts
        assert ops.select_expert_ffn(module, "cuda") is ops.expert_ffn_reference


def test_native_speed_report():
    """Per-call time at decode size, printed (no assertion: a smoke for the suite log)."""
    require_native()
    x, gate_up, down = _inputs(1, 2048, 768, False, torch.bfloat16)
    for name, fn in (("native", torch.ops.moepager.expert_ffn_silu), ("reference", ops.expert_ffn_silu_reference)):
        for _ in range(10):
            fn(x, gate_up, down, False, False)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(200):
            fn(x, gate_up, down, False, False)
        torch.cuda.synchronize()
        print(f"expert_ffn_silu {name}: {(time.perf_counter() - t0) / 200 * 1e6:.1f} us/call (H 2048, I 768, bf16, n=1)")
