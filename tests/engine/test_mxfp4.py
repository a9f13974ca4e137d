"""GPT-OSS checkpoints with MXFP4 experts load (dequantized into host pages) with exact parity."""

import json

import torch
from safetensors.torch import load_file, save_file

from engine import Engine
from engine.arch import FP4_VALUES, dequantize_mxfp4


def quantize_mxfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[R, C] float -> blocks [R, C/32, 16] uint8, scales [R, C/32] uint8 (nearest FP4 code)."""
    rows, cols = w.shape
    g = w.float().reshape(rows, cols // 32, 32)
    amax = g.abs().amax(dim=-1).clamp_min(1e-12)
    exp = torch.ceil(torch.log2(amax / 6.0)).to(torch.int32)  # [R, G]
    scaled = g / torch.pow(2.0, exp.float()).unsqueeze(-1)
    lut = torch.tensor(FP4_VALUES)
    codes = (scaled.unsqueeze(-1) - lut).abs().argmin(dim=-1).to(torch.uint8)  # [R, G, 32]
    blocks = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return blocks, (exp + 127).to(torch.uint8)


def test_dequantize_roundtrip_of_representable_values():
    lut = torch.tensor(FP4_VALUES)
    codes = torch.randint(0, 16, (3, 64))
    w = lut[codes] * 4.0  # exponent 2
    blocks, scales = quantize_mxfp4(w)
    back = dequantize_mxfp4(blocks, scales, torch.float32)  # [64, 3]
    assert torch.equal(back.t(), w)


def test_mxfp4_gpt_oss_matches_dequantized_reference(tmp_path):
    from transformers import AutoModelForCausalLM, GptOssConfig

    torch.manual_seed(0)
    cfg = GptOssConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=16, intermediate_size=32, num_local_experts=4,
                       num_experts_per_tok=2, layer_types=["sliding_attention", "full_attention"], sliding_window=8,
                       max_position_embeddings=128, tie_word_embeddings=False)
    model = AutoModelForCausalLM.from_config(cfg)
    quantized = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0, 0.2)
        for i, layer in enumerate(model.model.layers):
            experts = layer.mlp.experts
            for pname in ("gate_up_proj", "down_proj"):
                param = getattr(experts, pname)  # [E, in, out] (transposed layout)
                blocks, scales = [], []
                for e in range(param.shape[0]):
                    b, s = quantize_mxfp4(param[e].t())  # on disk: [out, in]
                    blocks.append(b)
                    scales.append(s)
                    param[e].copy_(dequantize_mxfp4(b, s, torch.float32))
                prefix = f"model.layers.{i}.mlp.experts.{pname}"
                quantized[prefix + "_blocks"] = torch.stack(blocks)
                quantized[prefix + "_scales"] = torch.stack(scales)
    ref_dir, q_dir = tmp_path / "ref", tmp_path / "mxfp4"
    model.save_pretrained(ref_dir)
    tensors = load_file(ref_dir / "model.safetensors")
    tensors = {k: v for k, v in tensors.items() if not k.endswith(("experts.gate_up_proj", "experts.down_proj"))}
    tensors.update(quantized)
    q_dir.mkdir()
    save_file(tensors, q_dir / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((ref_dir / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4"}
    (q_dir / "config.json").write_text(json.dumps(config))

    ref = AutoModelForCausalLM.from_pretrained(ref_dir, dtype=torch.float32).eval()
    ids = torch.randint(0, 128, (1, 10))
    with torch.no_grad():
        want = ref(ids).logits
    with Engine.from_pretrained(q_dir, device="cpu", expert_slots=4, progress=False) as eng:
        torch.testing.assert_close(eng.logits(ids), want, atol=1e-4, rtol=0)
