"""Tiny random-weight checkpoints of every supported architecture, saved as real HF folders."""

from __future__ import annotations

from pathlib import Path

import torch

VOCAB = 128


def tiny_config(arch: str, *, layers: int = 3, experts: int = 8, top_k: int = 2, tie_word_embeddings: bool = False,
                hidden: int = 32, expert_intermediate: int = 16):
    from transformers import (
        DeepseekV2Config,
        DeepseekV3Config,
        GptOssConfig,
        MixtralConfig,
        OlmoeConfig,
        PhimoeConfig,
        Qwen2MoeConfig,
        Qwen3MoeConfig,
    )

    common = {"vocab_size": VOCAB, "hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": 4,
                  "num_key_value_heads": 2, "max_position_embeddings": 256, "bos_token_id": 1, "eos_token_id": 2,
                  "pad_token_id": 0, "tie_word_embeddings": tie_word_embeddings}
    mla = {"num_key_value_heads": 4, "kv_lora_rank": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 8,
               "intermediate_size": 48, "moe_intermediate_size": expert_intermediate, "n_routed_experts": experts, "n_shared_experts": 1,
               "num_experts_per_tok": top_k, "first_k_dense_replace": 1, "n_group": 2, "topk_group": 1}
    builders = {
        "mixtral": lambda: MixtralConfig(**common, intermediate_size=expert_intermediate, num_local_experts=experts,
                                         num_experts_per_tok=top_k),
        "qwen2_moe": lambda: Qwen2MoeConfig(**common, intermediate_size=48, moe_intermediate_size=expert_intermediate,
                                            shared_expert_intermediate_size=24, num_experts=experts,
                                            num_experts_per_tok=top_k, decoder_sparse_step=1, mlp_only_layers=[]),
        "qwen3_moe": lambda: Qwen3MoeConfig(**common, intermediate_size=48, moe_intermediate_size=expert_intermediate,
                                            num_experts=experts, num_experts_per_tok=top_k, head_dim=8),
        "olmoe": lambda: OlmoeConfig(**common, intermediate_size=expert_intermediate, num_experts=experts, num_experts_per_tok=top_k),
        "deepseek_v2": lambda: DeepseekV2Config(**{**common, **mla}, q_lora_rank=None,
                                                topk_method="group_limited_greedy"),
        "deepseek_v3": lambda: DeepseekV3Config(**{**common, **mla}, q_lora_rank=24),
        "gpt_oss": lambda: GptOssConfig(**common, intermediate_size=expert_intermediate, num_local_experts=experts,
                                        num_experts_per_tok=top_k, head_dim=8, sliding_window=8,
                                        layer_types=["sliding_attention", "full_attention"] * (layers // 2)
                                        + ["sliding_attention"] * (layers % 2)),
        "phimoe": lambda: PhimoeConfig(**common, intermediate_size=expert_intermediate, num_local_experts=experts,
                                       num_experts_per_tok=top_k),
    }
    return builders[arch]()


ARCHITECTURES = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3", "gpt_oss", "phimoe"]


def build_tiny_model(arch: str, out: Path, *, seed: int = 0, **kw) -> Path:
    """Random weights, saved with save_pretrained (per-expert or fused on-disk layout as transformers writes it)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = tiny_config(arch, **kw)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "e_score_correction_bias" in name:
                continue
            if p.dim() >= 2:
                p.normal_(0, 0.2)  # larger than the default init so routing and logits are far from ties
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.uniform_(-0.05, 0.05)
    model.save_pretrained(out)
    return out
