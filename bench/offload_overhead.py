"""Time the offload runtime spends per MoE layer outside the expert compute, during decode.

    python -m bench.offload_overhead [--small] [--tokens 33] [--repeat 3] [--profile] [--out bench/results/offload_overhead.json]

Wraps ``OffloadRuntime._forward_rows`` (routing to the host, unique experts, the cache step,
output assembly) and its ``compute`` call (the expert kernel) with timers, on
``bench.decode``'s checkpoint with every expert resident, and prints per run the decode
ms/token and the microseconds per layer call spent outside the compute. Greedy decode of
``--tokens`` tokens after a 16-token prompt; the prefill's layer calls are left out.
``--profile`` decodes once more under the torch profiler and prints the ops that took the most
time, per decode token.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from bench.decode import SHAPES, build_checkpoint
from bench.policy_table import run_info, write_report
from engine import Engine
from engine.generation import SamplingParams


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--small", action="store_true", help="a small model for a quick check")
    ap.add_argument("--model-dir", default=None, help="where to build/keep the checkpoint (as bench.decode)")
    ap.add_argument("--tokens", type=int, default=33)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--profile", action="store_true", help="one more decode under the torch profiler")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.tokens < 2 or args.repeat < 1:
        ap.error("--tokens must be at least 2 and --repeat at least 1")
    shape = "small" if args.small else "olmoe"
    model_dir = Path(args.model_dir or f"/tmp/moepager-bench-{shape}-bfloat16")
    build_checkpoint(model_dir, SHAPES[shape], torch.bfloat16)
    eng = Engine.from_pretrained(model_dir, device="cpu", dtype="bfloat16", progress=False)
    rt = eng.runtime
    forward, compute = rt._forward_rows, rt.compute
    calls: list[tuple[int, float, float]] = []  # (rows, seconds in _forward_rows, seconds in compute)
    inner = [0.0]

    def timed_compute(*a, **k):
        t0 = time.perf_counter()
        compute(*a, **k)
        inner[0] += time.perf_counter() - t0

    def timed_forward(module, hidden, *a, **k):
        inner[0] = 0.0
        t0 = time.perf_counter()
        out = forward(module, hidden, *a, **k)
        calls.append((hidden.shape[0], time.perf_counter() - t0, inner[0]))
        return out

    rt._forward_rows, rt.compute = timed_forward, timed_compute
    torch.manual_seed(0)
    prompt = torch.randint(10, 1000, (16,)).tolist()
    params = SamplingParams(max_tokens=args.tokens, temperature=0.0, ignore_eos=True)
    for _ in eng.generate([prompt], SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)):
        pass
    runs = []
    for _ in range(args.repeat):
        calls.clear()
        stamps = [time.perf_counter() for ev in eng.generate([prompt], params) if ev.token_id is not None]
        decode = [fwd - comp for rows, fwd, comp in calls if rows == 1]
        run = {"ms_per_token": (stamps[-1] - stamps[0]) / (len(stamps) - 1) * 1e3,
               "overhead_us_per_layer_mean": statistics.mean(decode) * 1e6,
               "overhead_us_per_layer_median": statistics.median(decode) * 1e6, "layer_calls": len(decode)}
        runs.append(run)
        print(f"decode {run['ms_per_token']:.1f} ms/token; outside the expert compute: "
              f"{run['overhead_us_per_layer_mean']:.0f} us per layer (median "
              f"{run['overhead_us_per_layer_median']:.0f}, {len(decode)} layer calls)", flush=True)
    profile = None
    if args.profile:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            tokens = sum(ev.token_id is not None for ev in eng.generate([prompt], params))
        ops = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:12]
        profile = [{"op": e.key, "calls": e.count, "ms_per_token": e.self_cpu_time_total / 1e3 / tokens}
                   for e in ops]
        print(f"torch profiler, {tokens} tokens (prefill included), self CPU time per token:")
        for row in profile:
            print(f"  {row['op']:<52} {row['ms_per_token']:7.2f} ms  ({row['calls']} calls)")
    eng.close()
    if args.out:
        write_report(args.out, {"run": run_info(argv), "shape": shape, "runs": runs, "profile": profile})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
