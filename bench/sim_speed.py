"""Simulator throughput: (token, layer) steps per second per policy on a synthetic trace.

    python -m bench.sim_speed [--tokens 20000] [--layers 16] [--experts 64] [--top-k 8] [--out speed.json]

Prints a table and, with --out, writes the numbers as JSON. The trace is synthetic
(skewed, sticky routing); only the speed is measured here, not the hit rates.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from cache.base import policy_names
from traces.format import Trace
from traces.simulate import SimConfig, build_schedule, simulate


def synthetic_trace(tokens: int, layers: int, experts: int, top_k: int, seed: int = 0) -> Trace:
    rng = np.random.default_rng(seed)
    popularity = rng.zipf(1.5, size=(layers, experts)).astype(np.float64)
    popularity /= popularity.sum(axis=1, keepdims=True)
    out = np.zeros((tokens, layers, top_k), dtype=np.int16)
    for layer in range(layers):
        prev = rng.choice(experts, top_k, replace=False, p=popularity[layer])
        for t in range(tokens):
            fresh = rng.choice(experts, top_k, replace=False, p=popularity[layer])
            keep = rng.random(top_k) < 0.4
            row = list(dict.fromkeys([int(e) for e, k in zip(prev, keep) if k] + fresh.tolist()))[:top_k]
            out[t, layer] = prev = np.array(row)
    return Trace(experts=out, weights=np.full(out.shape, 1.0 / top_k, np.float16),
                 request=(np.arange(tokens) // 256).astype(np.int32),
                 position=(np.arange(tokens) % 256).astype(np.int32), phase=np.ones(tokens, np.int8),
                 meta={"experts": experts, "top_k": top_k, "model": "synthetic"})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=20000)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--slots-per-layer", type=int, default=16)
    p.add_argument("--policies", default=",".join(policy_names()))
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    trace = synthetic_trace(args.tokens, args.layers, args.experts, args.top_k)
    t0 = time.perf_counter()
    schedule = build_schedule(trace)
    prep = time.perf_counter() - t0
    steps = args.tokens * args.layers
    rows = []
    print(f"{args.tokens} tokens x {args.layers} layers, {args.experts} experts, top-{args.top_k}, "
          f"{args.slots_per_layer} slots/layer; schedule built in {prep:.3f}s")
    print(f"{'policy':>10} {'seconds':>9} {'steps/s':>12} {'hit rate':>9}")
    for name in args.policies.split(","):
        cfg = SimConfig(policy=name, capacities=(args.slots_per_layer,) * args.layers)
        t0 = time.perf_counter()
        res = simulate(trace, cfg, schedule)
        dt = time.perf_counter() - t0
        rows.append({"policy": name, "seconds": dt, "steps_per_second": steps / dt, "hit_rate": res.hit_rate})
        print(f"{name:>10} {dt:9.3f} {steps / dt:12.0f} {res.hit_rate:9.4f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"tokens": args.tokens, "layers": args.layers, "experts": args.experts, "top_k": args.top_k,
                       "slots_per_layer": args.slots_per_layer, "schedule_seconds": prep, "results": rows}, f,
                      indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
