"""Eviction policies over a grid of synthetic regimes and the shipped traces: hit rates and worst-case gaps.

    python -m bench.policy_regimes [--regimes all] [--seeds 0] [--slots 8,16,32] [--traces T ...] [--out J]

Every synthetic regime of ``traces.synth`` (8 MoE layers, 64 experts, top-6 unless
overridden) is replayed one token per step at each per-layer slot count; each
shipped trace at 10/25/50 % of its experts, per-layer and shared. For every case
the table gives each policy's hit rate and its gap, in points, to the best of
lru, lfu and lfru on that case; the summary gives each policy's worst and mean gap
over all cases. A robust policy has a worst gap near zero; "wins" counts cases
where it beats all three simple policies by more than 0.5 point.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from bench.policy_table import run_info
from cache.base import policy_names
from traces.format import load_trace
from traces.simulate import SimConfig, build_schedule, capacities_for, simulate
from traces.synth import REGIMES, regime, synth_trace

SIMPLE = ("lru", "lfu", "lfru")


def _case_rows(label: str, trace, schedule, caps, scope, policies, per_token) -> dict:
    hits = {}
    for name in policies:
        hits[name] = simulate(trace, SimConfig(policy=name, capacities=tuple(caps), scope=scope,
                                               per_token=per_token), schedule).hit_rate
    best = max(hits[p] for p in SIMPLE)
    return {"case": label, "hit_rate": hits, "best_simple": best,
            "gap_points": {p: (hits[p] - best) * 100 for p in policies}}


def run(regimes: list[str], seeds: list[int], slots: list[int], traces: list[str], policies: list[str],
        overrides: dict) -> list[dict]:
    rows = []
    for name in regimes:
        for seed in seeds:
            trace = synth_trace(regime(name, seed=seed, **overrides))
            schedule = build_schedule(trace, per_token=True)
            for s in slots:
                rows.append(_case_rows(f"{name} s{seed} {s}/{trace.num_experts}", trace, schedule,
                                       [s] * trace.num_layers, "layer", policies, True))
                print(_fmt(rows[-1], policies), flush=True)
    for path in traces:
        trace = load_trace(path, hidden=False)
        schedule = build_schedule(trace, per_token=True)
        for frac in (0.1, 0.25, 0.5):
            for split in ("uniform", "global"):
                caps, scope = capacities_for(trace, capacity_fraction=frac, split=split)
                label = f"{os.path.basename(path).split('.')[0]} {frac:.0%} {'layer' if split == 'uniform' else split}"
                rows.append(_case_rows(label, trace, schedule, caps, scope, policies, True))
                print(_fmt(rows[-1], policies), flush=True)
    return rows


def _fmt(row: dict, policies: list[str]) -> str:
    return f"{row['case']:<28} " + " ".join(f"{row['hit_rate'][p]:.4f}" for p in policies)


def summarize(rows: list[dict], policies: list[str]) -> dict:
    out = {}
    for p in policies:
        gaps = [r["gap_points"][p] for r in rows]
        out[p] = {"worst_gap_points": min(gaps), "mean_gap_points": sum(gaps) / len(gaps),
                  "wins": sum(1 for g in gaps if g > 0.5)}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--regimes", default="all")
    p.add_argument("--seeds", default="0")
    p.add_argument("--slots", default="8,16,32")
    p.add_argument("--traces", nargs="*", default=[])
    p.add_argument("--policies", default=",".join(policy_names()))
    p.add_argument("--requests", type=int, default=None, help="requests per synthetic trace")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    regimes = list(REGIMES) if args.regimes == "all" else args.regimes.split(",")
    policies = args.policies.split(",")
    for q in SIMPLE:
        if q not in policies:
            policies.append(q)
    overrides = {} if args.requests is None else {"requests": args.requests}
    t0 = time.perf_counter()
    print(f"{'case':<28} " + " ".join(f"{q:>6}" for q in policies))
    rows = run(regimes, [int(s) for s in args.seeds.split(",")], [int(s) for s in args.slots.split(",")],
               args.traces, policies, overrides)
    summary = summarize(rows, policies)
    print()
    print(f"{'policy':<10} {'worst gap':>10} {'mean gap':>9} {'wins':>5}   (points vs best of lru/lfu/lfru)")
    for q in policies:
        s = summary[q]
        print(f"{q:<10} {s['worst_gap_points']:10.2f} {s['mean_gap_points']:9.2f} {s['wins']:5d}")
    print(f"({time.perf_counter() - t0:.0f} s)")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"run": run_info(argv), "rows": rows, "summary": summary}, f, indent=1)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
