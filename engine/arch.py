"""Which checkpoints moepager serves, and how their routed experts are laid out.

Every supported architecture uses transformers' fused experts module
(``mlp.experts`` with ``gate_up_proj`` and ``down_proj``) behind the experts
interface, so one experts function serves them all. What differs is on disk:
per-expert tensors (``experts.E.w1/w3/w2`` for Mixtral and PhiMoE,
``experts.E.gate_proj/up_proj/down_proj`` for the others) or fused ones
(GPT-OSS), and the module's own layout (GPT-OSS is transposed, interleaved and
biased). This module names those facts once.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

SUPPORTED_ARCHITECTURES = {
    "mixtral": "MixtralForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "olmoe": "OlmoeForCausalLM",
    "deepseek_v2": "DeepseekV2ForCausalLM",
    "deepseek_v3": "DeepseekV3ForCausalLM",
    "gpt_oss": "GptOssForCausalLM",
    "phimoe": "PhimoeForCausalLM",
}

# On-disk per-expert projection names -> role in the fused module.
_PROJ_ROLE = {"w1": "gate", "w3": "up", "w2": "down", "gate_proj": "gate", "up_proj": "up", "down_proj": "down"}

_PER_EXPERT = re.compile(
    r"^(?P<prefix>.*?)layers\.(?P<layer>\d+)\.(?P<block>mlp|block_sparse_moe)\.experts\."
    r"(?P<expert>\d+)\.(?P<proj>w1|w2|w3|gate_proj|up_proj|down_proj)\.weight$"
)
_FUSED = re.compile(
    r"^(?P<prefix>.*?)layers\.(?P<layer>\d+)\.(?P<block>mlp|block_sparse_moe)\.experts\."
    r"(?P<param>gate_up_proj|down_proj|gate_up_proj_bias|down_proj_bias"
    r"|gate_up_proj_blocks|gate_up_proj_scales|down_proj_blocks|down_proj_scales)$"
)


@dataclass(frozen=True)
class ExpertTensorRef:
    """Where one piece of one layer's experts lives in the checkpoint."""

    layer: int  # decoder layer index
    expert: int | None  # None for fused tensors holding every expert
    role: str  # gate | up | down (per-expert) or gate_up_proj | down_proj | *_bias (fused)
    name: str  # checkpoint key


def parse_expert_key(name: str) -> ExpertTensorRef | None:
    m = _PER_EXPERT.match(name)
    if m:
        return ExpertTensorRef(int(m["layer"]), int(m["expert"]), _PROJ_ROLE[m["proj"]], name)
    m = _FUSED.match(name)
    if m:
        return ExpertTensorRef(int(m["layer"]), None, m["param"], name)
    return None


FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """MXFP4 (GPT-OSS checkpoints) -> dense, in the fused module's transposed layout.

    blocks [R, G, 16] uint8 (two FP4 codes per byte, low nibble first), scales [R, G]
    uint8 (power-of-two exponents biased by 127) -> [G*32, R]: on disk the rows are
    the output features, the module stores the transpose.
    """
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32)
    rows, groups, width = blocks.shape
    blocks = blocks.to(torch.uint8)
    out = torch.empty(rows, groups, width * 2, dtype=torch.float32)
    out[..., 0::2] = lut[(blocks & 0x0F).long()]
    out[..., 1::2] = lut[(blocks >> 4).long()]
    out = torch.ldexp(out, (scales.to(torch.int32) - 127).unsqueeze(-1).float())
    return out.reshape(rows, groups * width * 2).t().to(dtype)


def dense_key_candidates(name: str) -> list[str]:
    """Model parameter names a dense checkpoint key may correspond to (legacy names first renamed)."""
    out = [name]
    if ".block_sparse_moe." in name:
        renamed = name.replace(".block_sparse_moe.", ".mlp.")
        out.append(renamed)
        out.append(renamed.replace(".mlp.gate.", ".mlp.router."))
    return out


@dataclass(frozen=True)
class ExpertLayout:
    """Shapes of one expert inside the fused module, in the module's own layout."""

    gate_up_shape: tuple[int, int]  # [2I, H], or [H, 2I] when transposed
    down_shape: tuple[int, int]  # [H, I], or [I, H] when transposed
    has_bias: bool
    is_transposed: bool
    is_concatenated: bool  # gate rows then up rows; False: interleaved (GPT-OSS)

    @property
    def hidden(self) -> int:
        return self.gate_up_shape[0] if self.is_transposed else self.gate_up_shape[1]

    @property
    def intermediate(self) -> int:
        return self.down_shape[0] if self.is_transposed else self.down_shape[1]

    def parts(self) -> list[tuple[str, tuple[int, ...]]]:
        """The tensors of one expert's page, in page order."""
        parts = [("gate_up_proj", self.gate_up_shape), ("down_proj", self.down_shape)]
        if self.has_bias:
            parts += [("gate_up_proj_bias", (2 * self.intermediate,)), ("down_proj_bias", (self.hidden,))]
        return parts


def layout_of(experts: torch.nn.Module) -> ExpertLayout:
    gate_up = experts.gate_up_proj
    down = experts.down_proj
    return ExpertLayout(
        gate_up_shape=tuple(gate_up.shape[1:]),
        down_shape=tuple(down.shape[1:]),
        has_bias=bool(getattr(experts, "has_bias", False)),
        is_transposed=bool(getattr(experts, "is_transposed", False)),
        is_concatenated=bool(getattr(experts, "is_concatenated", True)),
    )


def fuse_gate_up(gate: torch.Tensor, up: torch.Tensor, layout: ExpertLayout) -> torch.Tensor:
    """Per-expert gate [I, H] and up [I, H] -> the module's gate_up layout."""
    if layout.is_concatenated:
        fused = torch.cat([gate, up], dim=0)  # [2I, H]
    else:
        fused = torch.stack([gate, up], dim=1).reshape(-1, gate.shape[1])  # rows g0,u0,g1,u1,... [2I, H]
    return fused.t() if layout.is_transposed else fused


def down_to_layout(down: torch.Tensor, layout: ExpertLayout) -> torch.Tensor:
    """Per-expert down [H, I] -> the module's down layout."""
    return down.t() if layout.is_transposed else down


def moe_layers(model: torch.nn.Module) -> list[tuple[int, torch.nn.Module, torch.nn.Module]]:
    """(decoder layer index, MoE block, experts module) for every layer with routed experts."""
    decoder = model.model.layers if hasattr(model, "model") else model.layers
    out = []
    for i, layer in enumerate(decoder):
        block = getattr(layer, "mlp", None)
        experts = getattr(block, "experts", None)
        if experts is not None and hasattr(experts, "down_proj") or (
            experts is not None and hasattr(experts, "_moepager_layer")
        ):
            out.append((i, block, experts))
    return out


def router_of(block: torch.nn.Module) -> torch.nn.Module:
    """The MoE block's router: ``gate`` for most, ``router`` for GPT-OSS and PhiMoE."""
    router = getattr(block, "router", None)
    if router is None:
        router = getattr(block, "gate", None)
    if router is None:
        raise ValueError(f"{type(block).__name__} has no router (expected .gate or .router)")
    return router


def num_experts_of(experts: torch.nn.Module) -> int:
    return int(experts.num_experts)


def top_k_of(config) -> int:
    for attr in ("num_experts_per_tok", "moe_topk", "top_k"):
        value = getattr(config, attr, None)
        if value:
            return int(value)
    raise ValueError(f"cannot find top_k in {type(config).__name__}")
