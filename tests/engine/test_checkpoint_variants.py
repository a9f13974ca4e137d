"""Checkpoint variants seen in the wild: shards with an index, dense layers between MoE layers,
bf16 files loaded at another dtype."""

import torch
from tiny_models import tiny_config

from engine import Engine


def _save(cfg, out, **save_kw):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.2)
    model.save_pretrained(out, **save_kw)
    return out


def _check(path, slots, atol=1e-4, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    ids = torch.randint(3, 128, (2, 7))
    with torch.no_grad():
        want = ref(ids).logits.float()
    name = {torch.float32: "float32", torch.bfloat16: "bfloat16"}[dtype]
    with Engine.from_pretrained(path, device="cpu", dtype=name, expert_slots=slots, progress=False) as eng:
        torch.testing.assert_close(eng.logits(ids), want, atol=atol, rtol=0)
        return eng.num_moe_layers


def test_sharded_checkpoint_with_index(tmp_path):
    path = _save(tiny_config("mixtral"), tmp_path / "sharded", max_shard_size="20KB")
    assert (path / "model.safetensors.index.json").is_file()
    assert len(list(path.glob("*.safetensors"))) > 2
    assert _check(path, slots=6) == 3


def test_dense_layers_between_moe_layers(tmp_path):
    cfg = tiny_config("qwen2_moe", layers=4)
    cfg.decoder_sparse_step = 2  # MoE on every second layer, dense MLPs elsewhere
    path = _save(cfg, tmp_path / "sparse-step")
    assert _check(path, slots=4) == 2


def test_bf16_checkpoint_at_float32_and_bfloat16(tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = tiny_config("qwen3_moe")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "bf16")
    _check(tmp_path / "bf16", slots=6)  # upcast on load: same numbers as transformers at float32
    _check(tmp_path / "bf16", slots=6, dtype=torch.bfloat16, atol=0.1)  # bf16: rounding differs slightly
