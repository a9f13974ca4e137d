"""``moepager trace import | stats | simulate | synth``: routing traces from the command line."""

from __future__ import annotations

import argparse
import json
import math

from cache.base import policy_names
from cache.hybrid import MODES
from engine.config import SCOPES
from prefetch.base import predictor_names
from server.flags import _non_negative_float, _positive_float, _positive_int


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("trace", help="import, inspect and simulate routing traces")
    sub = p.add_subparsers(dest="trace_command", required=True, metavar="TRACE_COMMAND")

    imp = sub.add_parser("import", help="convert .npz or .jsonl routing into a trace file")
    imp.add_argument("src", metavar="SRC")
    imp.add_argument("--out", required=True, metavar="TRACE")
    imp.set_defaults(run=run_import)

    st = sub.add_parser("stats", help="entropy, reuse distance, token overlap, cross-layer co-activation")
    st.add_argument("trace", metavar="TRACE")
    st.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    st.set_defaults(run=run_stats)

    sim = sub.add_parser("simulate", help="replay a trace through a cache policy (and prefetcher, link model)")
    sim.add_argument("trace", metavar="TRACE")
    sim.add_argument("--policy", default="lru", choices=policy_names() + ["all"])
    budget = sim.add_mutually_exclusive_group(required=True)
    budget.add_argument("--slots-per-layer", type=_positive_int, default=None)
    budget.add_argument("--capacity-fraction", type=_positive_float, default=None,
                        help="slots per layer as a fraction of the layer's experts")
    sim.add_argument("--cache-scope", default="layer", choices=SCOPES)
    sim.add_argument("--cache-split", default="uniform", metavar="uniform|global|profile:TRACE")
    sim.add_argument("--prefetch", default="none", choices=predictor_names())
    sim.add_argument("--prefetch-lookahead", type=_positive_int, default=1)
    sim.add_argument("--predictor-path", default=None)
    sim.add_argument("--prefetch-budget-mb", type=_non_negative_float, default=None)
    sim.add_argument("--link-gbps", type=_positive_float, default=None, help="host link bandwidth, GB/s")
    sim.add_argument("--link-latency-us", type=_non_negative_float, default=0.0)
    sim.add_argument("--expert-bytes", type=_positive_int, default=None,
                     help="bytes per expert page (default: the trace's expert_bytes metadata, if any)")
    sim.add_argument("--layer-compute-us", type=_non_negative_float, default=0.0)
    sim.add_argument("--prefetch-gate", default="on", choices=("on", "off"),
                     help="on: the planner copies a prediction only when its expected value is positive")
    sim.add_argument("--cpu-compute", default="never", choices=MODES,
                     help="hybrid execution, as the engine's flag: auto computes a miss on the host when the "
                          "host time (--host-read-gbps, --host-token-us) is below one copy (--link-gbps)")
    sim.add_argument("--host-read-gbps", type=_positive_float, default=None,
                     help="host memory read bandwidth, GB/s: each host-computed expert reads its page once")
    sim.add_argument("--host-token-us", type=_non_negative_float, default=0.0,
                     help="host compute per token of a host-computed expert, us")
    sim.add_argument("--cache-aware-routing", type=_non_negative_float, default=None, metavar="DELTA",
                     help="substitute a resident expert whose router score is within DELTA (needs a trace with "
                          "router scores)")
    sim.add_argument("--per-token", action="store_true", help="one row per step even if the trace has steps")
    sim.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    sim.add_argument("--plot", default=None, metavar="PNG", help="hit rate vs capacity for all policies")
    sim.set_defaults(run=run_simulate)

    from traces.synth import REGIMES, config_fields

    syn = sub.add_parser("synth", help="generate a synthetic trace from a named regime (deterministic by seed)")
    syn.add_argument("--regime", default="mixed", choices=list(REGIMES))
    syn.add_argument("--out", required=True, metavar="TRACE")
    for name, kind in config_fields():  # every knob overrides the regime's value
        syn.add_argument("--" + name.replace("_", "-"), dest=name, type=kind, default=None)
    syn.add_argument("--scores", action="store_true",
                     help="also write router scores (what simulating --cache-aware-routing needs)")
    syn.set_defaults(run=run_synth)
    return p


# -- synth --------------------------------------------------------------------------------
def run_synth(args: argparse.Namespace) -> int:
    from traces.format import save_trace
    from traces.synth import config_fields, regime, synth_trace

    overrides = {name: getattr(args, name) for name, _ in config_fields() if getattr(args, name) is not None}
    trace = synth_trace(regime(args.regime, **overrides), scores=args.scores)
    save_trace(args.out, trace)
    print(f"wrote {args.out}: regime {args.regime}, {trace.num_rows} rows, {int(trace.request.max()) + 1} requests, "
          f"{trace.num_layers} MoE layers, {trace.num_experts} experts, top-{trace.top_k}")
    return 0


# -- import -------------------------------------------------------------------------------
def run_import(args: argparse.Namespace) -> int:
    from traces.format import save_trace
    from traces.importers import import_trace

    trace = import_trace(args.src)
    save_trace(args.out, trace)
    print(f"wrote {args.out}: {trace.num_rows} rows, {trace.num_layers} MoE layers, "
          f"{trace.num_experts} experts, top-{trace.top_k}")
    return 0


# -- stats --------------------------------------------------------------------------------
def run_stats(args: argparse.Namespace) -> int:
    from traces.format import load_trace
    from traces.stats import trace_stats

    trace = load_trace(args.trace, hidden=False)
    stats = trace_stats(trace)
    print(f"{args.trace}: {stats['rows']} rows, {stats['requests']} requests, {stats['layers']} MoE layers, "
          f"{stats['experts']} experts, top-{stats['top_k']}")
    print(f"{'layer':>5} {'entropy':>8} {'norm':>6} {'overlap':>8} {'uniform':>8} {'same-freq':>9} {'next-prec':>9}")
    precision = stats["co_activation"]["next_layer_precision"]
    for layer in range(stats["layers"]):
        ent, ov = stats["entropy"][layer], stats["consecutive_overlap"][layer]
        prec = f"{precision[layer]:9.3f}" if layer < len(precision) else f"{'-':>9}"
        print(f"{layer:5d} {ent['entropy_bits']:8.3f} {ent['normalized']:6.3f} {ov['observed']:8.3f} "
              f"{ov['random_uniform']:8.3f} {ov['independent_same_frequency']:9.3f} {prec}")
    reuse = stats["reuse_distance"]
    print(f"reuse distance (tokens, same request): median {reuse['median']}, histogram {reuse['histogram']}")
    co = stats["co_activation"]
    if co["mean_precision"] is not None:
        print(f"cross-layer co-activation: next-layer top-k precision {co['mean_precision']:.3f} "
              f"(chance {co['chance']:.3f})")
    if args.json:
        print(json.dumps(stats, default=_json_default))
    return 0


def _json_default(value):
    if isinstance(value, float) and math.isnan(value):
        return None
    return str(value)


# -- simulate -----------------------------------------------------------------------------
def _sim_config(args, trace, policy: str, capacities: list[int], scope: str):
    from traces.simulate import SimConfig

    expert_bytes = args.expert_bytes or trace.meta.get("expert_bytes")
    budget = None if args.prefetch_budget_mb is None else int(args.prefetch_budget_mb * 1e6)
    return SimConfig(policy=policy, capacities=tuple(capacities), scope=scope, prefetch=args.prefetch,
                     prefetch_lookahead=args.prefetch_lookahead, predictor_path=args.predictor_path,
                     prefetch_budget_bytes=budget, expert_bytes=int(expert_bytes) if expert_bytes else None,
                     link_gbps=args.link_gbps, link_latency_us=args.link_latency_us,
                     layer_compute_us=args.layer_compute_us, per_token=args.per_token,
                     prefetch_gate=args.prefetch_gate == "on", cpu_compute=args.cpu_compute,
                     host_read_gbps=args.host_read_gbps, host_token_us=args.host_token_us,
                     cache_aware_routing=args.cache_aware_routing)


def _summary(d: dict) -> dict:
    keys = ("hit_rate", "hits", "accesses", "bytes_moved", "experts_moved", "stall_seconds_per_token",
            "seconds_per_token", "tokens_per_second", "prefetch", "host_computed", "host_share",
            "routing_substitutions")
    return {k: d[k] for k in keys if k in d}


def run_simulate(args: argparse.Namespace) -> int:
    from traces.format import load_trace
    from traces.simulate import build_schedule, capacities_for, simulate

    trace = load_trace(args.trace, hidden=args.prefetch not in ("none", "oracle"))
    capacities, scope = capacities_for(trace, slots_per_layer=args.slots_per_layer,
                                       capacity_fraction=args.capacity_fraction, split=args.cache_split,
                                       scope=args.cache_scope)
    schedule = build_schedule(trace, args.per_token)
    names = policy_names() if args.policy == "all" else [args.policy]
    results = {}
    for name in names:
        res = simulate(trace, _sim_config(args, trace, name, capacities, scope), schedule)
        results[name] = _summary(res.as_dict())
    print(f"{args.trace}: {trace.num_rows} tokens, {len(schedule.experts)} steps, {trace.num_layers} MoE layers, "
          f"capacities {capacities if len(set(capacities)) > 1 else f'{capacities[0]} x {len(capacities)}'} "
          f"({scope} scope)")
    header = f"{'policy':>10} {'hit rate':>9} {'hits':>10} {'accesses':>10} {'bytes moved':>14}"
    timed = args.link_gbps is not None
    if timed:
        header += f" {'stall ms/tok':>12} {'tok/s':>9}"
    print(header)
    for name, r in results.items():
        moved = r["bytes_moved"] if r["bytes_moved"] is not None else f"{r['experts_moved']} exp"
        line = f"{name:>10} {r['hit_rate']:9.4f} {r['hits']:10d} {r['accesses']:10d} {moved!s:>14}"
        if timed:
            line += f" {r['stall_seconds_per_token'] * 1e3:12.3f} {r['tokens_per_second']:9.1f}"
        print(line)
        if r.get("prefetch"):
            print(f"{'':>10} prefetch {r['prefetch']}")
        if args.cpu_compute != "never" or args.cache_aware_routing is not None:
            print(f"{'':>10} host-computed {r['host_computed']} ({r['host_share']:.1%} of misses), "
                  f"routing substitutions {r['routing_substitutions']}")
    if args.plot:
        _plot(args, trace, schedule, scope)
    if args.json:
        print(json.dumps(results if args.policy == "all" else results[args.policy]))
    return 0


def _plot(args, trace, schedule, scope: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ValueError("--plot needs matplotlib: pip install 'moepager[plot]'") from None
    from traces.simulate import capacities_for, simulate

    e = trace.num_experts
    sizes = sorted({max(1, round(f * e)) for f in (1 / 16, 1 / 8, 1 / 4, 3 / 8, 1 / 2, 3 / 4, 1.0)})
    fig, ax = plt.subplots(figsize=(6, 4))
    for name in policy_names():
        rates = []
        for slots in sizes:
            caps, sc = capacities_for(trace, slots_per_layer=slots, split=args.cache_split, scope=scope)
            rates.append(simulate(trace, _sim_config(args, trace, name, caps, sc), schedule).hit_rate)
        ax.plot(sizes, rates, marker="o", label=name)
    ax.set_xlabel("slots per layer")
    ax.set_ylabel("hit rate")
    ax.set_title(f"{args.trace}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.plot)
    print(f"wrote {args.plot}")
