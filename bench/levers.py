"""Every lever side by side in the timed simulator: policy, predictor, planner gate, hybrid, cache-aware routing.

    python -m bench.levers [--regimes skewed,sticky,...] [--traces T ...] [--requests 8] [--out J]

Each synthetic regime of ``traces.synth`` (with router scores) and each shipped trace is
replayed at two operating points of one model shape (a Qwen3-30B-A3B bf16 expert page,
9.4 MB, over a 25 GB/s link: 377 us a copy; the host reads a page at 50 GB/s and computes
10 us per token):

- link-bound: a layer computes in 50 us, a copy takes 7.5 layer computes;
- compute-rich: a layer computes in 1000 us, a copy takes 0.38 of one.

A quarter of each layer's experts fit in slots. Every row changes one lever from the
baseline (lru, no prefetch, every miss fetched, no routing change). ``learned`` is trained
on each trace with ``moepager predictor train`` (its default hold-out: 80 % of the
requests train it, the replay covers all of them). Cache-aware routing needs router
scores: the shipped traces have none, so those cells are empty. The summary gives, per
lever and operating point, the geometric mean and the worst ratio of time per token to the
baseline over all traces, and the mean hit rate.
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from bench.policy_table import run_info, write_report
from traces.format import load_trace, save_trace
from traces.simulate import SimConfig, build_schedule, capacities_for, simulate
from traces.synth import regime, synth_trace

EXPERT_BYTES = 3 * 2048 * 768 * 2  # Qwen3-30B-A3B, bf16
LINK_GBPS = 25.0
HOST_READ_GBPS = 50.0
HOST_TOKEN_US = 10.0
OPERATING_POINTS = {"link-bound": 50.0, "compute-rich": 1000.0}  # layer compute, us
REGIMES = ("skewed", "sticky", "drifting", "topics", "crosslayer", "mixed")
SHIPPED = ("tests/data/trace_chat.safetensors", "tests/data/trace_heldout.safetensors")
BASE = {"policy": "lru"}
LEVERS: dict[str, dict] = {
    "baseline": {},
    "policy lfu": {"policy": "lfu"},
    "policy adaptive": {"policy": "adaptive"},
    "prefetch prev": {"prefetch": "prev"},
    "prefetch eam": {"prefetch": "eam"},
    "prefetch learned": {"prefetch": "learned"},
    "prefetch oracle": {"prefetch": "oracle"},
    "eam gate off": {"prefetch": "eam", "prefetch_gate": False},
    "learned gate off": {"prefetch": "learned", "prefetch_gate": False},
    "cpu-compute auto": {"cpu_compute": "auto"},
    "cpu-compute always": {"cpu_compute": "always"},
    "routing delta 0.1": {"cache_aware_routing": 0.1},
    "routing delta 0.3": {"cache_aware_routing": 0.3},
}


def train_learned(trace_path: str, out: str) -> str:
    """The learned predictor for ``trace_path`` through the command line (lookahead 1, as replayed)."""
    cmd = [sys.executable, "-m", "server", "predictor", "train", trace_path, "--out", out, "--lookahead", "1"]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    return out


def run_trace(label: str, path: str, trace, levers: dict[str, dict], workdir: str) -> list[dict]:
    schedule = build_schedule(trace)
    caps, scope = capacities_for(trace, capacity_fraction=0.25)
    predictor = train_learned(path, os.path.join(workdir, f"{label}.learned.safetensors")) \
        if any(v.get("prefetch") == "learned" for v in levers.values()) else None
    rows = []
    for op, compute_us in OPERATING_POINTS.items():
        base = SimConfig(capacities=tuple(caps), scope=scope, expert_bytes=EXPERT_BYTES, link_gbps=LINK_GBPS,
                         layer_compute_us=compute_us, host_read_gbps=HOST_READ_GBPS, host_token_us=HOST_TOKEN_US,
                         **BASE)
        for lever, change in levers.items():
            row = {"trace": label, "op": op, "lever": lever}
            if change.get("cache_aware_routing") and trace.scores is None:
                rows.append(row | {"skipped": "no router scores in the trace"})
                print(_fmt(rows[-1]), flush=True)
                continue
            cfg = replace(base, **change)
            if cfg.prefetch == "learned":
                cfg = replace(cfg, predictor_path=predictor)
            t0 = time.perf_counter()
            r = simulate(trace, cfg, schedule).as_dict()
            rows.append(row | {
                "stall_ms_per_token": r["stall_seconds_per_token"] * 1e3,
                "ms_per_token": r["seconds_per_token"] * 1e3, "hit_rate": r["hit_rate"],
                "mb_per_token": r["bytes_moved"] / r["tokens"] / 1e6, "host_share": r["host_share"],
                "substitutions": r["routing_substitutions"], "prefetch": r["prefetch"],
                "sim_seconds": time.perf_counter() - t0})
            print(_fmt(rows[-1]), flush=True)
    return rows


def summary(rows: list[dict], levers: list[str]) -> list[dict]:
    base = {(r["trace"], r["op"]): r["ms_per_token"] for r in rows if r["lever"] == "baseline"}
    out = []
    for op in OPERATING_POINTS:
        for lever in levers:
            got = [r for r in rows if r["op"] == op and r["lever"] == lever and "skipped" not in r]
            if not got:
                continue
            ratios = [r["ms_per_token"] / base[(r["trace"], op)] for r in got]
            out.append({"op": op, "lever": lever, "traces": len(got),
                        "geomean_time_ratio": math.exp(sum(map(math.log, ratios)) / len(ratios)),
                        "worst_time_ratio": max(ratios), "best_time_ratio": min(ratios),
                        "mean_hit_rate": sum(r["hit_rate"] for r in got) / len(got),
                        "mean_host_share": sum(r["host_share"] for r in got) / len(got)})
    return out


HEADER = (f"{'trace':>12} {'op':>12} {'lever':>19} {'stall ms/tok':>12} {'ms/tok':>8} {'hit':>6} {'MB/tok':>8} "
          f"{'host':>6} {'subs':>6}")


def _fmt(r: dict) -> str:
    if "skipped" in r:
        return f"{r['trace']:>12} {r['op']:>12} {r['lever']:>19}   - ({r['skipped']})"
    return (f"{r['trace']:>12} {r['op']:>12} {r['lever']:>19} {r['stall_ms_per_token']:12.3f} "
            f"{r['ms_per_token']:8.3f} {r['hit_rate']:6.3f} {r['mb_per_token']:8.1f} {r['host_share']:6.1%} "
            f"{r['substitutions']:6d}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--regimes", default=",".join(REGIMES))
    p.add_argument("--traces", nargs="*", default=list(SHIPPED))
    p.add_argument("--requests", type=int, default=8, help="requests per synthetic trace")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--levers", default=",".join(LEVERS), help="comma-separated lever names")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    levers = {name: LEVERS[name] for name in args.levers.split(",")}
    if "baseline" not in levers:
        raise SystemExit("--levers must include baseline (every ratio is taken to it)")
    t0 = time.perf_counter()
    print(f"expert page {EXPERT_BYTES / 1e6:.1f} MB, link {LINK_GBPS:g} GB/s "
          f"({EXPERT_BYTES / LINK_GBPS / 1e3:.0f} us a copy), host {HOST_READ_GBPS:g} GB/s read + "
          f"{HOST_TOKEN_US:g} us/token; layer compute {OPERATING_POINTS}; 25 % of experts in slots")
    print(HEADER)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as workdir:
        for name in filter(None, args.regimes.split(",")):
            trace = synth_trace(regime(name, seed=args.seed, requests=args.requests), scores=True)
            path = os.path.join(workdir, f"{name}.safetensors")
            save_trace(path, trace)
            rows += run_trace(name, path, trace, levers, workdir)
        for path in args.traces:
            label = Path(path).name.split(".")[0].removeprefix("trace_")
            rows += run_trace(label, path, load_trace(path), levers, workdir)
    table = summary(rows, list(levers))
    print(f"\n{'op':>12} {'lever':>19} {'traces':>6} {'time/base':>9} {'worst':>6} {'best':>6} {'hit':>6} {'host':>6}")
    for s in table:
        print(f"{s['op']:>12} {s['lever']:>19} {s['traces']:6d} {s['geomean_time_ratio']:9.3f} "
              f"{s['worst_time_ratio']:6.3f} {s['best_time_ratio']:6.3f} {s['mean_hit_rate']:6.3f} "
              f"{s['mean_host_share']:6.1%}")
    print(f"({time.perf_counter() - t0:.0f} s)")
    if args.out:
        write_report(args.out, {"run": run_info(argv), "rows": rows, "summary": table})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
