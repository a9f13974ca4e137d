"""Flags shared by every command that takes them: one name, one meaning everywhere."""

from __future__ import annotations

import argparse
import math

from cache.base import policy_names
from engine.config import DENSE_DTYPES, DEVICES, DTYPES, EXPERT_DTYPES, SCOPES, EngineConfig
from prefetch.base import predictor_names


def _int_at_least(minimum: int, what: str):
    """An argparse type: an integer >= ``minimum``; errors say ``expected <what>``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    return parse


_positive_int = _int_at_least(1, "a positive integer")
_non_negative_int = _int_at_least(0, "a non-negative integer")


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if value < 0 or math.isnan(value):
        raise argparse.ArgumentTypeError(f"expected a non-negative number, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    value = _non_negative_float(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _positive_float_or_auto(text: str) -> float | str:
    return "auto" if text == "auto" else _positive_float(text)


def add_model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="local Hugging Face folder (default: the embedded model)")


def add_device_flags(p: argparse.ArgumentParser, *, dtype_default: str = "float32") -> None:
    p.add_argument("--device", default="auto", choices=DEVICES, help="cpu, cuda, or auto (cuda when present)")
    p.add_argument("--dtype", default=dtype_default, choices=("auto", *DTYPES),
                   help="weights and activations; auto: the checkpoint's dtype (config.json)")


def add_cache_flags(p: argparse.ArgumentParser, *, live: bool = True, auto_budget: bool = False) -> None:
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--expert-slots", type=_positive_int, default=None,
                        help="expert slots across all MoE layers (split evenly with --cache-scope layer)")
    budget.add_argument("--expert-cache-gb", type=_positive_float_or_auto, default="auto" if auto_budget else None,
                        help="device memory for expert slots, in GB; auto: the device's free memory after the "
                             "dense weights and the KV reserve (on the CPU every expert: a slot is its host page); "
                             "unset: every expert")
    p.add_argument("--cache-scope", default="layer", choices=SCOPES,
                   help="one slot pool per MoE layer, or one pool shared by all layers")
    p.add_argument("--cache-policy", default="adaptive", choices=policy_names(online_only=live),
                   help="which expert to evict from a full slot pool")


def add_prefetch_flags(p: argparse.ArgumentParser, *, live: bool = True) -> None:
    p.add_argument("--prefetch", default="none", choices=predictor_names(online_only=live),
                   help="predictor that copies the next layers' experts ahead of time")
    p.add_argument("--prefetch-lookahead", type=_positive_int, default=1, help="how many layers ahead to predict")
    p.add_argument("--predictor-path", default=None, help="trained predictor (.safetensors) for --prefetch learned")
    p.add_argument("--prefetch-budget-mb", type=_non_negative_float, default=None,
                   help="bytes of prefetch copies in flight, in MB (default: top_k experts per predicted layer)")
    p.add_argument("--prefetch-gate", default="on", choices=("on", "off"),
                   help="on: the planner copies a prediction only when its expected value is positive; off: every "
                        "prediction within the budget")


def add_engine_flags(p: argparse.ArgumentParser, *, serving: bool = False) -> None:
    """Everything an Engine needs: model, device, cache, prefetch, routing, trace, link emulation.
    ``serving``: the defaults that suit a server (``--dtype auto``, ``--expert-cache-gb auto``)."""
    add_model_flags(p)
    add_device_flags(p, dtype_default="auto" if serving else "float32")
    add_cache_flags(p, auto_budget=serving)
    add_prefetch_flags(p)
    p.add_argument("--expert-dtype", default="auto", choices=EXPERT_DTYPES,
                   help="host page format of routed experts: auto (the compute dtype), bf16, fp16, fp32, or int8 / "
                        "int4 quantized once at load and cached on disk")
    p.add_argument("--dense-dtype", default="auto", choices=DENSE_DTYPES,
                   help="dense linears (attention, shared experts, dense MLPs, LM head; not routers): auto keeps "
                        "them as loaded, int8 quantizes them per output row at load (CPU device only)")
    p.add_argument("--int4-group-size", type=_positive_int, default=None,
                   help="inputs per int4 scale (default: the largest of 128, 64, 32 that divides the expert shapes)")
    p.add_argument("--quant-cache-dir", default=None,
                   help="where quantized pages are cached (default: $MOEPAGER_CACHE_DIR/pages or "
                        "~/.cache/moepager/pages; never the model folder)")
    p.add_argument("--cache-aware-routing", type=_non_negative_float, default=None, metavar="DELTA",
                   help="substitute a resident expert whose router score is within DELTA (relative); changes outputs")
    p.add_argument("--cpu-compute", default="never", choices=("never", "auto", "always"),
                   help="run missed experts on the host instead of copying them; auto: a measured cost model "
                        "decides per miss (hybrid execution)")
    p.add_argument("--record-trace", default=None, metavar="PATH", help="record routing to a trace file")
    p.add_argument("--emulate-link-gbps", type=_positive_float, default=None,
                   help="CPU device only: emulate a host-to-device link of this bandwidth")
    p.add_argument("--emulate-link-latency-us", type=_non_negative_float, default=0.0,
                   help="CPU device only: per-copy latency of the emulated link")


def checkpoint_dtype(model: str | None) -> str:
    """The dtype a checkpoint declares in config.json (``dtype`` or ``torch_dtype``); float32 if none
    or one moepager does not run."""
    import json

    from engine.loader import resolve_model_path

    config = json.loads((resolve_model_path(model) / "config.json").read_text())
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    declared = config.get("dtype") or config.get("torch_dtype") or text.get("dtype") or text.get("torch_dtype")
    return declared if declared in DTYPES else "float32"


def resolve_expert_budget(args: argparse.Namespace, dtype: str, kv_reserve_bytes: int = 0) -> tuple[float | None, str]:
    """``--expert-cache-gb`` with ``auto`` resolved, and a one-line summary of the choice."""
    if args.expert_slots is not None:
        return None, f"{args.expert_slots} expert slots (--expert-slots)"
    if args.expert_cache_gb is None:
        return None, "every expert in a slot"
    if args.expert_cache_gb != "auto":
        return args.expert_cache_gb, f"{args.expert_cache_gb:g} GB of expert slots (--expert-cache-gb)"
    import torch

    from engine.loader import resolve_device
    from server import budget

    device = resolve_device(args.device)
    if device.type != "cuda":
        return None, "every expert (auto on the CPU: a slot is the expert's host page, no copy)"
    dense, experts = budget.checkpoint_split_bytes(args.model, getattr(torch, dtype))
    free = budget.free_memory_bytes(device)
    gb = budget.auto_expert_cache_gb(free, dense, kv_reserve_bytes)
    share = min(1.0, gb * 1e9 / max(1, experts))
    return gb, (f"{gb:.2f} GB of expert slots (auto: {free / 1e9:.2f} GB free - {dense / 1e9:.2f} GB dense - "
                f"{kv_reserve_bytes / 1e9:.2f} GB KV - {budget.HEADROOM_BYTES / 1e9:.2f} GB headroom; "
                f"{share:.0%} of the experts)")


def engine_config_from_args(args: argparse.Namespace, **overrides) -> EngineConfig:
    dtype = checkpoint_dtype(args.model) if args.dtype == "auto" else args.dtype
    expert_cache_gb = args.expert_cache_gb
    if expert_cache_gb == "auto" and "expert_cache_gb" not in overrides:
        expert_cache_gb, _ = resolve_expert_budget(args, dtype)
    fields = {
        "model": args.model,
        "device": args.device,
        "dtype": dtype,
        "expert_slots": args.expert_slots,
        "expert_cache_gb": expert_cache_gb,
        "cache_scope": args.cache_scope,
        "cache_policy": args.cache_policy,
        "prefetch": args.prefetch,
        "prefetch_lookahead": args.prefetch_lookahead,
        "predictor_path": args.predictor_path,
        "prefetch_budget_mb": args.prefetch_budget_mb,
        "prefetch_gate": getattr(args, "prefetch_gate", "on") == "on",
        "cache_aware_routing": args.cache_aware_routing,
        "record_trace": args.record_trace,
        "emulate_link_gbps": args.emulate_link_gbps,
        "emulate_link_latency_us": args.emulate_link_latency_us,
        "cpu_compute": getattr(args, "cpu_compute", "never"),
        "expert_dtype": args.expert_dtype,
        "dense_dtype": args.dense_dtype,
        "int4_group_size": args.int4_group_size,
        "quant_cache_dir": args.quant_cache_dir,
    }
    fields.update(overrides)
    return EngineConfig(**fields)
