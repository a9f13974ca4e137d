"""Engine configuration: one frozen dataclass built once at the edge (CLI, HTTP, Python API)."""

from __future__ import annotations

from dataclasses import dataclass

from engine.errors import MoepagerError

DTYPES = ("float32", "bfloat16", "float16")
EXPERT_DTYPES = ("auto", "bf16", "fp16", "fp32", "int8", "int4")
DENSE_DTYPES = ("auto", "int8")
DEVICES = ("auto", "cpu", "cuda")
SCOPES = ("layer", "global")


@dataclass(frozen=True)
class EngineConfig:
    model: str | None = None  # None: the embedded default model
    device: str = "auto"
    dtype: str = "float32"
    expert_slots: int | None = None  # slots across all MoE layers; None with no GB budget: all experts
    expert_cache_gb: float | None = None
    cache_scope: str = "layer"
    cache_policy: str = "adaptive"  # follows whichever of lru, lfu, decayed lfu, lfru wins per layer
    prefetch: str = "none"
    prefetch_lookahead: int = 1
    predictor_path: str | None = None
    prefetch_budget_mb: float | None = None
    prefetch_gate: bool = True  # the planner copies only what its value estimate says pays
    cache_aware_routing: float | None = None
    record_trace: str | None = None
    emulate_link_gbps: float | None = None
    emulate_link_latency_us: float = 0.0
    max_model_len: int | None = None
    cpu_compute: str = "never"  # never | auto | always: run missed experts on the host (hybrid execution)
    route_from_trace: str | None = None  # benchmarks: replay routing from a trace (outputs meaningless)
    progress: bool = True
    expert_dtype: str = "auto"  # host page format: auto (the compute dtype) | bf16 | fp16 | fp32 | int8 | int4
    dense_dtype: str = "auto"  # dense linears (attention, shared experts, LM head): auto (as loaded) | int8 (CPU)
    int4_group_size: int | None = None  # inputs per int4 scale; None: the largest of 128/64/32 that divides
    quant_cache_dir: str | None = None  # where quantized pages are cached; None: $MOEPAGER_CACHE_DIR or ~/.cache

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise MoepagerError(f"--dtype: unknown dtype {self.dtype!r}; choose one of {', '.join(DTYPES)}")
        if self.device not in DEVICES:
            raise MoepagerError(f"--device: unknown device {self.device!r}; choose one of {', '.join(DEVICES)}")
        if self.cache_scope not in SCOPES:
            raise MoepagerError(f"--cache-scope: must be one of {', '.join(SCOPES)}, got {self.cache_scope!r}")
        if self.expert_slots is not None and self.expert_cache_gb is not None:
            raise MoepagerError("--expert-slots and --expert-cache-gb are exclusive; give one")
        if self.expert_slots is not None and self.expert_slots < 1:
            raise MoepagerError(f"--expert-slots must be a positive integer, got {self.expert_slots}")
        if self.expert_cache_gb is not None and self.expert_cache_gb <= 0:
            raise MoepagerError(f"--expert-cache-gb must be positive, got {self.expert_cache_gb}")
        if self.prefetch_lookahead < 1:
            raise MoepagerError(f"--prefetch-lookahead must be >= 1, got {self.prefetch_lookahead}")
        if self.prefetch_budget_mb is not None and self.prefetch_budget_mb < 0:
            raise MoepagerError(f"--prefetch-budget-mb must be >= 0, got {self.prefetch_budget_mb}")
        if self.cache_aware_routing is not None and self.cache_aware_routing < 0:
            raise MoepagerError(f"--cache-aware-routing must be >= 0, got {self.cache_aware_routing}")
        if self.emulate_link_gbps is not None and self.emulate_link_gbps <= 0:
            raise MoepagerError(f"--emulate-link-gbps must be positive, got {self.emulate_link_gbps}")
        if self.cpu_compute not in ("never", "auto", "always"):
            raise MoepagerError(f"--cpu-compute must be one of never, auto, always, got {self.cpu_compute!r}")
        if self.expert_dtype not in EXPERT_DTYPES:
            raise MoepagerError(f"--expert-dtype: unknown page dtype {self.expert_dtype!r}; choose one of "
                                f"{', '.join(EXPERT_DTYPES)}")
        if self.dense_dtype not in DENSE_DTYPES:
            raise MoepagerError(f"--dense-dtype: unknown dtype {self.dense_dtype!r}; choose one of "
                                f"{', '.join(DENSE_DTYPES)}")
        if self.int4_group_size is not None and self.int4_group_size < 1:
            raise MoepagerError(f"--int4-group-size must be a positive integer, got {self.int4_group_size}")
        if self.emulate_link_latency_us < 0:
            raise MoepagerError(f"--emulate-link-latency-us must be >= 0, got {self.emulate_link_latency_us}")
