"""Eviction policies on recorded routing traces: hit rate, and its ratio to Belady, at 10/25/50 % capacity.

    python -m bench.policy_table TRACE [TRACE ...] [--fractions 0.1,0.25,0.5] [--out policy.json]

For every trace, capacity fraction, replay order and cache split, every registered
policy is replayed through the simulator (the engine's own cache and policy objects):

- replay ``step``: rows grouped as the engine batched them when recording (a prefill
  chunk is one step); ``token``: one row per step;
- split ``layer``: the same slots in every layer; ``global``: one pool shared by all
  layers; ``profile``: per-layer slots sized from the working-set profile of *another*
  trace (the next one given, cyclically), so the split never sees the routing it is
  scored on. With a single trace the profile split is skipped.

Belady (clairvoyant, evicts the expert used furthest in the future) is the ceiling of
every demand-paging policy for one cache; the table gives each policy's hit rate over
Belady's. The best online policy is the one with the highest mean ratio over traces
and splits at 25 %. Also reports simulator speed (steps/s) for lru on each trace.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from cache.base import policy_names
from traces.format import load_trace
from traces.simulate import SimConfig, build_schedule, capacities_for, simulate


def write_report(path: str | os.PathLike, report: dict) -> None:
    """A benchmark's JSON report at ``path`` (parent folders made), and a line saying where."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(report, indent=1))
    print(f"wrote {path}")


def run_info(argv: list[str] | None = None) -> dict:
    """Machine, date and command of a benchmark run, for its JSON."""
    import torch

    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                check=False).stdout.strip() or None
    except OSError:
        commit = None
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": " ".join(["python", "-m", _module_name()] + list(sys.argv[1:] if argv is None else argv)),
        "machine": {"platform": platform.platform(), "cpu": cpu, "cpus_available": len(os.sched_getaffinity(0)),
                    "python": platform.python_version(), "torch": torch.__version__,
                    "cuda": torch.cuda.is_available()},
        "git_commit": commit,
    }


def _module_name() -> str:
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    return spec.name if spec is not None else os.path.basename(sys.argv[0])


SPLITS = ("layer", "global", "profile")
REPLAYS = ("step", "token")


def policy_rows(paths: list[str], fractions: list[float], policies: list[str]) -> list[dict]:
    traces = {p: load_trace(p, hidden=False) for p in paths}
    rows = []
    for i, path in enumerate(paths):
        trace = traces[path]
        other = paths[(i + 1) % len(paths)] if len(paths) > 1 else None
        for replay in REPLAYS:
            schedule = build_schedule(trace, per_token=replay == "token")
            for frac in fractions:
                for split in SPLITS:
                    if split == "profile" and other is None:
                        continue
                    caps, scope = capacities_for(
                        trace, capacity_fraction=frac, scope="global" if split == "global" else "layer",
                        split={"layer": "uniform", "global": "global", "profile": f"profile:{other}"}[split])
                    hits = {}
                    for name in policies:
                        res = simulate(trace, SimConfig(policy=name, capacities=tuple(caps), scope=scope,
                                                        per_token=replay == "token"), schedule)
                        hits[name] = res.hit_rate
                    best = hits.get("belady")
                    for name in policies:
                        rows.append({"trace": os.path.basename(path), "replay": replay, "fraction": frac,
                                     "split": split, "capacities": caps, "profile_from": other if split == "profile"
                                     else None, "steps": len(schedule.experts), "policy": name,
                                     "hit_rate": hits[name],
                                     "ratio_to_belady": hits[name] / best if best else None})
    return rows


def summarize(rows: list[dict], fraction: float) -> dict:
    """Best online policy at ``fraction`` (mean ratio to Belady over traces, replays and splits)."""
    online = sorted({r["policy"] for r in rows} - {"belady"})
    sel = [r for r in rows if abs(r["fraction"] - fraction) < 1e-9]
    if not sel:
        return {}
    mean = {p: sum(r["ratio_to_belady"] for r in sel if r["policy"] == p) /
            max(1, sum(1 for r in sel if r["policy"] == p)) for p in online}
    best = max(mean, key=mean.get)
    mean_hit = {p: sum(r["hit_rate"] for r in sel if r["policy"] == p) /
                max(1, sum(1 for r in sel if r["policy"] == p)) for p in online + ["belady"]}
    return {"fraction": fraction, "best_online": best, "mean_ratio_to_belady": mean, "mean_hit_rate": mean_hit,
            "gap_points": (mean_hit["belady"] - mean_hit[best]) * 100}


def sim_speed(paths: list[str], policy: str = "lru", fraction: float = 0.25, repeats: int = 3) -> list[dict]:
    """Steps (token x layer) per second, per-token replay, on each trace and on bench.sim_speed's synthetic one."""
    from bench.sim_speed import synthetic_trace

    out = []
    cases = [(os.path.basename(p), load_trace(p, hidden=False)) for p in paths]
    cases.append(("synthetic 5000x16 layers, 64 experts, top-8", synthetic_trace(5000, 16, 64, 8)))
    for name, trace in cases:
        schedule = build_schedule(trace, per_token=True)
        caps, scope = capacities_for(trace, capacity_fraction=fraction)
        steps = trace.num_rows * trace.num_layers
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            simulate(trace, SimConfig(policy=policy, capacities=tuple(caps), scope=scope, per_token=True), schedule)
            best = min(best, time.perf_counter() - t0)
        out.append({"trace": name, "policy": policy, "steps": steps, "seconds": best,
                    "steps_per_second": steps / best})
    return out


def print_table(rows: list[dict], policies: list[str]) -> None:
    cols = [p for p in policies]
    print(f"{'trace':<24} {'replay':>6} {'cap':>5} {'split':>8} " + " ".join(f"{p:>13}" for p in cols))
    key = lambda r: (r["trace"], r["replay"], r["fraction"], r["split"])
    groups: dict = {}
    for r in rows:
        groups.setdefault(key(r), {})[r["policy"]] = r
    for (trace, replay, frac, split), by in groups.items():
        cells = []
        for p in cols:
            r = by[p]
            cells.append(f"{r['hit_rate']:.3f} ({r['ratio_to_belady']:.2f})" if p != "belady" else
                         f"{r['hit_rate']:.3f}")
        print(f"{trace:<24} {replay:>6} {frac * 100:4.0f}% {split:>8} " + " ".join(f"{c:>13}" for c in cells))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("traces", nargs="+", metavar="TRACE")
    p.add_argument("--fractions", default="0.1,0.25,0.5")
    p.add_argument("--policies", default=",".join(policy_names()))
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    fractions = [float(f) for f in args.fractions.split(",")]
    policies = args.policies.split(",")
    if "belady" not in policies:
        policies = ["belady"] + policies
    policies = ["belady"] + [q for q in policies if q != "belady"]
    t0 = time.perf_counter()
    rows = policy_rows(args.traces, fractions, policies)
    print("hit rate (ratio to Belady)")
    print_table(rows, policies)
    summaries = [summarize(rows, f) for f in fractions]
    print()
    for s in summaries:
        print(f"{s['fraction'] * 100:.0f}%: best online {s['best_online']} "
              f"(mean hit {s['mean_hit_rate'][s['best_online']]:.4f}, belady {s['mean_hit_rate']['belady']:.4f}, "
              f"ratio {s['mean_ratio_to_belady'][s['best_online']]:.3f}, gap {s['gap_points']:.2f} points)")
    speed = sim_speed(args.traces)
    for s in speed:
        print(f"simulator speed, {s['policy']} per-token on {s['trace']}: {s['steps_per_second']:.0f} steps/s "
              f"({s['steps']} steps in {s['seconds']:.3f} s)")
    print(f"({time.perf_counter() - t0:.1f} s)")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"run": run_info(argv), "traces": args.traces, "fractions": fractions, "policies": policies,
                       "rows": rows, "summary": summaries, "sim_speed": speed}, f, indent=1)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
