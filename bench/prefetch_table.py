"""Prefetch predictors in the timed simulator: stall per token, tokens/s and prefetch outcomes.

    python -m bench.prefetch_table TRAIN_TRACE [OTHER_TRACE] [--holdout 0.2] [--predictor-out PRED] [--out prefetch.json]
        [--predictors none,learned,oracle]

Setup: 25 % of each layer's experts in slots (the policy given, lru by default), one
host link of ``--link-gbps`` (25 GB/s, PCIe 4 effective) moving OLMoE-sized experts
(``--expert-bytes``, 12 MiB), at two operating points: link-bound (100 us of compute per
MoE layer: one copy costs five layers of compute) and compute-rich (2000 us per layer).

Predictors: none, prev, freq, eam, learned, oracle (``pregate`` needs the live routers:
see bench/prefetch_live.py). ``learned`` is trained here on the first ``1 - holdout`` of
TRAIN_TRACE's requests (lookahead = the largest one tried) and every predictor is scored on
data it never trained on: the held-out requests of TRAIN_TRACE and all of OTHER_TRACE (if given).

Each predictor runs at every lookahead and prefetch budget (in experts in flight; the
default, as in the engine, is top_k experts per predicted layer: top_k x lookahead).
Reported per cell: stall per token, tokens/s, hit rate, precision = useful / issued,
used = (useful + late) / issued, late, wasted, and the share of the oracle's gain
``(stall_none - stall_P) / (stall_none - stall_oracle)`` against the oracle's best
config at that operating point. Tokens are trace rows (prefill and decode), replayed one
row per step by default (``--replay token``). ``--replay step`` replays the steps the engine
recorded (a prefill chunk is one step); a config that fails there is recorded with its error.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from bench.policy_table import run_info
from prefetch.training import holdout_split, train_learned
from traces.format import Trace, load_trace
from traces.simulate import SimConfig, build_schedule, capacities_for, simulate

PREDICTORS = ("none", "prev", "freq", "eam", "learned", "oracle")
POINTS = {"link-bound": 100.0, "compute-rich": 2000.0}


def take_rows(trace: Trace, mask: np.ndarray) -> Trace:
    """The rows of ``trace`` where ``mask`` holds, as a trace of its own."""
    opt = {k: (None if getattr(trace, k) is None else getattr(trace, k)[mask]) for k in ("tokens", "hidden", "step")}
    return Trace(experts=trace.experts[mask], weights=trace.weights[mask], request=trace.request[mask],
                 position=trace.position[mask], phase=trace.phase[mask], meta=dict(trace.meta), **opt)


def train_predictor(trace: Trace, holdout: float, lookahead: int, out: str, epochs: int = 5) -> tuple[np.ndarray, dict]:
    """Train ``learned`` on the first requests of ``trace``; returns the held-out mask and training info."""
    held = holdout_split(trace.request, holdout)
    train = ~held
    t0 = time.perf_counter()
    model = train_learned(trace.experts[train].astype(np.int64), trace.request[train].astype(np.int64),
                          trace.num_experts, lookahead, epochs=epochs, phase=trace.phase[train],
                          tokens=None if trace.tokens is None else trace.tokens[train])
    info = {"rows": int(train.sum()), "requests": len(np.unique(trace.request[train])),
            "heldout_rows": int(held.sum()), "heldout_requests": len(np.unique(trace.request[held])),
            "lookahead": lookahead, "epochs": epochs, "seconds": round(time.perf_counter() - t0, 2), "path": out}
    model.meta = {"train": {**info, "holdout": holdout}}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    model.save(out)
    return held, info


def sweep(evals: dict[str, Trace], *, predictor_path: str, lookaheads: list[int], budgets: list[int | None],
          policy: str, fraction: float, link_gbps: float, expert_bytes: int, latency_us: float,
          per_token: bool = True, predictors: tuple[str, ...] = PREDICTORS) -> list[dict]:
    if "none" not in predictors:
        raise ValueError("the predictors must include none (the oracle share is measured against it)")
    rows = []
    for eval_name, trace in evals.items():
        schedule = build_schedule(trace, per_token=per_token)
        caps, scope = capacities_for(trace, capacity_fraction=fraction)
        for point, compute_us in POINTS.items():
            for pred in predictors:
                configs = [(1, None)] if pred == "none" else [(d, b) for d in lookaheads for b in budgets]
                for d, budget in configs:
                    cfg = SimConfig(policy=policy, capacities=tuple(caps), scope=scope, prefetch=pred,
                                    prefetch_lookahead=d, predictor_path=predictor_path if pred == "learned" else None,
                                    prefetch_budget_bytes=None if budget is None else budget * expert_bytes,
                                    expert_bytes=expert_bytes, link_gbps=link_gbps, link_latency_us=latency_us,
                                    layer_compute_us=compute_us, per_token=per_token)
                    try:
                        r = simulate(trace, cfg, schedule).as_dict()
                    except RuntimeError as exc:
                        rows.append({"eval": eval_name, "point": point, "predictor": pred, "lookahead": d,
                                     "budget_experts": budget, "error": str(exc)})
                        continue
                    pf = r["prefetch"] or {}
                    issued = pf.get("issued", 0)
                    rows.append({
                        "eval": eval_name, "point": point, "layer_compute_us": compute_us, "predictor": pred,
                        "lookahead": d, "budget_experts": budget if budget is not None else trace.top_k * d,
                        "default_budget": budget is None, "hit_rate": r["hit_rate"],
                        "stall_ms_per_token": r["stall_seconds_per_token"] * 1e3,
                        "tokens_per_second": r["tokens_per_second"], "issued": issued,
                        "useful": pf.get("useful", 0), "late": pf.get("late", 0), "wasted": pf.get("wasted", 0),
                        "cancelled": pf.get("cancelled", 0),
                        "precision": pf.get("useful", 0) / issued if issued else None,
                        "used_share": (pf.get("useful", 0) + pf.get("late", 0)) / issued if issued else None,
                        "bytes_moved": r["bytes_moved"], "tokens": r["tokens"],
                    })
    # share of the oracle's gain, against the oracle's best config per (eval, point)
    for eval_name in evals:
        for point in POINTS:
            sel = [r for r in rows if r["eval"] == eval_name and r["point"] == point and "error" not in r]
            none = next(r["stall_ms_per_token"] for r in sel if r["predictor"] == "none")
            oracle = min((r["stall_ms_per_token"] for r in sel if r["predictor"] == "oracle"), default=none)
            for r in sel:
                gain = none - oracle
                r["oracle_share"] = (none - r["stall_ms_per_token"]) / gain if gain > 0 else None
    return rows


def best_rows(rows: list[dict]) -> list[dict]:
    """Per (eval, point, predictor): the default config (lookahead 1, default budget) and the best one."""
    out = []
    keys = []
    rows = [r for r in rows if "error" not in r]
    for r in rows:
        k = (r["eval"], r["point"], r["predictor"])
        if k not in keys:
            keys.append(k)
    for k in keys:
        sel = [r for r in rows if (r["eval"], r["point"], r["predictor"]) == k]
        default = next((r for r in sel if r["default_budget"] and r["lookahead"] == 1), sel[0])
        best = min(sel, key=lambda r: r["stall_ms_per_token"])
        out.append({**default, "which": "default"})
        if best is not default:
            out.append({**best, "which": "best"})
    return out


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def print_table(rows: list[dict]) -> None:
    print(f"{'eval':<22} {'point':<12} {'predictor':<8} {'cfg':<7} {'d':>1} {'bud':>3} {'stall ms/tok':>12} "
          f"{'tok/s':>7} {'hit':>6} {'prec':>5} {'used':>5} {'issued':>6} {'useful':>6} {'late':>5} {'wasted':>6} "
          f"{'oracle share':>12}")
    for r in rows:
        print(f"{r['eval']:<22} {r['point']:<12} {r['predictor']:<8} {r['which']:<7} {r['lookahead']:>1} "
              f"{r['budget_experts']:>3} {r['stall_ms_per_token']:12.3f} {r['tokens_per_second']:7.1f} "
              f"{r['hit_rate']:6.3f} {_fmt(r['precision'], '5.2f'):>5} {_fmt(r['used_share'], '5.2f'):>5} {r['issued']:>6} {r['useful']:>6} "
              f"{r['late']:>5} {r['wasted']:>6} {_fmt(r['oracle_share'], '12.2f'):>12}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("train_trace", metavar="TRAIN_TRACE", help="learned trains on its first requests")
    p.add_argument("other_trace", metavar="OTHER_TRACE", nargs="?", default=None,
                   help="a trace the predictor never saw (optional: a synthetic trace of another seed is another model)")
    p.add_argument("--holdout", type=float, default=0.2, help="last fraction of TRAIN_TRACE's requests held out")
    p.add_argument("--predictor-out", default="bench/results/learned_predictor.safetensors")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--lookaheads", default="1,2")
    p.add_argument("--budgets", default="default,2,16", help="experts in flight; 'default' = top_k x lookahead, the engine's default")
    p.add_argument("--policy", default="lru")
    p.add_argument("--capacity-fraction", type=float, default=0.25)
    p.add_argument("--link-gbps", type=float, default=25.0)
    p.add_argument("--link-latency-us", type=float, default=0.0)
    p.add_argument("--expert-bytes", type=int, default=12582912)
    p.add_argument("--replay", default="token", choices=("token", "step"))
    p.add_argument("--predictors", default=",".join(PREDICTORS), help="comma-separated; must include none")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    lookaheads = [int(x) for x in args.lookaheads.split(",")]
    budgets = [None if b == "default" else int(b) for b in args.budgets.split(",")]
    t0 = time.perf_counter()
    train_trace = load_trace(args.train_trace, hidden=False)
    held, info = train_predictor(train_trace, args.holdout, max(lookaheads), args.predictor_out, args.epochs)
    print(f"learned: trained on {info['rows']} rows ({info['requests']} requests) of {args.train_trace} "
          f"in {info['seconds']} s; scored on its {info['heldout_rows']} held-out rows "
          f"({info['heldout_requests']} requests)" + (f" and on {args.other_trace}" if args.other_trace else ""))
    evals = {f"{Path(args.train_trace).stem}[heldout]": take_rows(train_trace, held)}
    if args.other_trace:
        evals[Path(args.other_trace).stem] = load_trace(args.other_trace, hidden=False)
    copy_us = args.link_latency_us + args.expert_bytes / (args.link_gbps * 1e9) * 1e6
    print(f"policy {args.policy}, {args.capacity_fraction * 100:.0f}% capacity, link {args.link_gbps} GB/s, "
          f"expert {args.expert_bytes} B: {copy_us:.0f} us per copy; compute per layer "
          + ", ".join(f"{k} {v:.0f} us" for k, v in POINTS.items()))
    rows = sweep(evals, predictor_path=args.predictor_out, lookaheads=lookaheads, budgets=budgets,
                 policy=args.policy, fraction=args.capacity_fraction, link_gbps=args.link_gbps,
                 expert_bytes=args.expert_bytes, latency_us=args.link_latency_us,
                 per_token=args.replay == "token", predictors=tuple(args.predictors.split(",")))
    errors = [r for r in rows if "error" in r]
    if errors:
        print(f"{len(errors)} configs failed, e.g. {errors[0]['predictor']} d={errors[0]['lookahead']}: "
              f"{errors[0]['error']}")
    summary = best_rows(rows)
    print_table(summary)
    print(f"({time.perf_counter() - t0:.1f} s; all {len(rows)} configs in the JSON)")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"run": run_info(argv), "train_trace": args.train_trace, "other_trace": args.other_trace,
                       "training": info, "policy": args.policy, "capacity_fraction": args.capacity_fraction,
                       "link_gbps": args.link_gbps, "link_latency_us": args.link_latency_us,
                       "expert_bytes": args.expert_bytes, "replay": args.replay, "copy_us": copy_us, "points_layer_compute_us": POINTS,
                       "summary": summary, "rows": rows}, f, indent=1)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
