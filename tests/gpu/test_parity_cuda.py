"""Golden parity on CUDA: the offloaded engine's logits equal plain transformers' on the GPU.

float32: atol 1e-4 (as on the CPU), at min / 25 % / all slots, for a prefill of
18 rows (torch reference per expert) and one of 12 rows (the native kernel when
built: at most 16 tokens reach an expert). bfloat16: the engine's largest
deviation from the float32 model may be at most twice transformers' own bf16
deviation plus 0.02 (rounding differs with the order of per-expert matmuls).
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_config

from engine import Engine

pytestmark = pytest.mark.gpu

ATOL = 1e-4
LAYERS = 3
EXPERTS = 8
ARCHS = ["mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3", "gpt_oss"]


def _reference(path, dtype):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval().to("cuda")


def _slots(arch: str, budget: str) -> int:
    cfg = tiny_config(arch, layers=LAYERS)
    layers = LAYERS - getattr(cfg, "first_k_dense_replace", 0)
    top_k = cfg.num_experts_per_tok
    per_layer = {"min": top_k, "25pct": max(top_k, EXPERTS // 4), "all": EXPERTS}[budget]
    return per_layer * layers


@torch.no_grad()
def _logits(model, ids):
    return model(ids.to("cuda")).logits.float().cpu()


@pytest.mark.parametrize("budget", ["min", "25pct", "all"])
@pytest.mark.parametrize("arch", ARCHS)
def test_float32_logits_and_greedy_match(tiny_model_dir, arch, budget):
    path = tiny_model_dir(arch)
    ref = _reference(path, torch.float32)
    torch.manual_seed(1)
    batches = [torch.randint(3, 128, (2, 9)), torch.randint(3, 128, (1, 12))]
    with Engine.from_pretrained(path, device="cuda", expert_slots=_slots(arch, budget), progress=False) as eng:
        for ids in batches:
            torch.testing.assert_close(eng.logits(ids), _logits(ref, ids), atol=ATOL, rtol=0)
        prompt = batches[0][:1, :5].to("cuda")
        with torch.no_grad():
            want = ref.generate(prompt, max_new_tokens=24, min_new_tokens=24, do_sample=False)
            got = eng.model.generate(prompt, max_new_tokens=24, min_new_tokens=24, do_sample=False)
        assert got.tolist() == want.tolist()
        assert eng.stats()["queries"] > 0


@pytest.mark.parametrize("budget", ["min", "all"])
@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
def test_bfloat16_logits_close(tiny_model_dir, arch, budget):
    path = tiny_model_dir(arch)
    torch.manual_seed(2)
    ids = torch.randint(3, 128, (1, 12))
    exact = _logits(_reference(path, torch.float32), ids)
    hf_err = (_logits(_reference(path, torch.bfloat16), ids) - exact).abs().max().item()
    with Engine.from_pretrained(path, device="cuda", dtype="bfloat16", expert_slots=_slots(arch, budget),
                                progress=False) as eng:
        eng_err = (eng.logits(ids) - exact).abs().max().item()
    print(f"{arch} bf16 max |logit error|: transformers {hf_err:.4f}, moepager {eng_err:.4f}")
    assert eng_err <= 2 * hf_err + 0.02
