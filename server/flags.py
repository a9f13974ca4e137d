"""Flags shared by every command that takes them: one name, one meaning everywhere."""

from __future__ import annotations

import argparse
import math

from cache.base import policy_names
from engine.config import DEVICES, DTYPES, EXPERT_DTYPES, SCOPES, EngineConfig
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


def add_model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="local Hugging Face folder (default: the embedded model)")


def add_device_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", choices=DEVICES, help="cpu, cuda, or auto (cuda when present)")
    p.add_argument("--dtype", default="float32", choices=DTYPES)


def add_cache_flags(p: argparse.ArgumentParser, *, live: bool = True) -> None:
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--expert-slots", type=_positive_int, default=None,
                        help="expert slots across all MoE layers (split evenly with --cache-scope layer)")
    budget.add_argument("--expert-cache-gb", type=_positive_float, default=None,
                        help="device memory for expert slots, in GB")
    p.add_argument("--cache-scope", default="layer", choices=SCOPES)
    p.add_argument("--cache-policy", default="adaptive", choices=policy_names(online_only=live))


def add_prefetch_flags(p: argparse.ArgumentParser, *, live: bool = True) -> None:
    p.add_argument("--prefetch", default="none", choices=predictor_names(online_only=live))
    p.add_argument("--prefetch-lookahead", type=_positive_int, default=1, help="how many layers ahead to predict")
    p.add_argument("--predictor-path", default=None, help="trained predictor (.safetensors) for --prefetch learned")
    p.add_argument("--prefetch-budget-mb", type=_non_negative_float, default=None,
                   help="bytes of prefetch copies in flight, in MB (default: top_k experts per predicted layer)")


def add_engine_flags(p: argparse.ArgumentParser) -> None:
    """Everything an Engine needs: model, device, cache, prefetch, routing, trace, link emulation."""
    add_model_flags(p)
    add_device_flags(p)
    add_cache_flags(p)
    add_prefetch_flags(p)
    p.add_argument("--expert-dtype", default="auto", choices=EXPERT_DTYPES,
                   help="host page format of routed experts: auto (the compute dtype), bf16, fp16, fp32, or int8 / "
                        "int4 quantized once at load and cached on disk")
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


def engine_config_from_args(args: argparse.Namespace, **overrides) -> EngineConfig:
    fields = {
        "model": args.model,
        "device": args.device,
        "dtype": args.dtype,
        "expert_slots": args.expert_slots,
        "expert_cache_gb": args.expert_cache_gb,
        "cache_scope": args.cache_scope,
        "cache_policy": args.cache_policy,
        "prefetch": args.prefetch,
        "prefetch_lookahead": args.prefetch_lookahead,
        "predictor_path": args.predictor_path,
        "prefetch_budget_mb": args.prefetch_budget_mb,
        "cache_aware_routing": args.cache_aware_routing,
        "record_trace": args.record_trace,
        "emulate_link_gbps": args.emulate_link_gbps,
        "emulate_link_latency_us": args.emulate_link_latency_us,
        "cpu_compute": getattr(args, "cpu_compute", "never"),
        "expert_dtype": args.expert_dtype,
        "int4_group_size": args.int4_group_size,
        "quant_cache_dir": args.quant_cache_dir,
    }
    fields.update(overrides)
    return EngineConfig(**fields)
