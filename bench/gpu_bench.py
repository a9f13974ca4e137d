"""Decode benchmark grid on a real-shape random model whose routing is replayed from a real trace.

Random-weight models route almost uniformly, so the model's routing is replaced by
rows of a trace recorded from the embedded default model (``route_from_trace``):
the cache sees real temporal and cross-layer structure while the bytes moved and
the compute have the real model's per-expert shape. The trace fixes the number of
experts and top-k (extra experts would never be routed to); the shape fixes hidden
and expert sizes; ``--layers`` sets the depth (trace layers are reused by modulo).

Grid: slot fraction (10/25/50/100 % of experts, never below top-k per layer) x policy
(``lru`` and ``best``: the online policy with the best simulated hit rate on the
trace at 25 %) x prefetch (``none``, ``pregate``, and ``learned`` when ``--predictor``
is given). Note: ``pregate`` applies the model's own (random) routers, which the
replay overrides, so here it measures what wasted prefetches cost, not what good
ones gain; ``learned`` predicts from routing and is meaningful under replay.

Per run: decode tokens/s, decode hit rate, stall ms/token, bytes/token. Prints one
table and writes JSON to ``--out`` (default ``${OUT:-bench/out}/gpu_bench.json``).

    python -m bench.gpu_bench                              # CUDA, Qwen3-30B-A3B-sized experts
    python -m bench.gpu_bench --device cpu --small         # a quick check without a GPU
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

import torch

from bench.decode import SHAPES, build_checkpoint

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "tests" / "data"

# Per-expert shapes of real models (experts and top-k come from the trace).
REAL_SHAPES = {
    "qwen3-30b-a3b": {"hidden_size": 2048, "intermediate_size": 768, "num_attention_heads": 32, "num_key_value_heads": 4,
                          "vocab_size": 151936, "num_hidden_layers": 48, "num_experts": 128, "num_experts_per_tok": 8},
    "olmoe-1b-7b": {"hidden_size": 2048, "intermediate_size": 1024, "num_attention_heads": 16, "num_key_value_heads": 16,
                        "vocab_size": 50304, "num_hidden_layers": 16, "num_experts": 64, "num_experts_per_tok": 8},
    "small": SHAPES["small"],
}


def find_trace() -> Path | None:
    """The default-model trace in tests/data, preferring the held-out text one."""
    from traces.format import load_trace

    candidates = [DATA / "trace_heldout.safetensors", *sorted(DATA.glob("*.safetensors"))]
    for path in candidates:
        if path.is_file():
            try:
                load_trace(path, hidden=False)
            except Exception:  # noqa: BLE001, S112 - not a trace (e.g. a predictor file): look further
                continue
            return path
    return None


def record_trace(path: Path, device: str, requests: int, decode_tokens: int) -> Path:
    """Record routing from the embedded default model on held-out text (prompts of 32 tokens)."""
    from engine import Engine
    from engine.generation import SamplingParams

    path.parent.mkdir(parents=True, exist_ok=True)
    text = (DATA / "heldout.txt").read_text()
    with Engine.from_pretrained(None, device=device, record_trace=str(path), progress=False) as eng:
        ids = eng.tokenizer(text, add_special_tokens=False)["input_ids"]
        stride = max(1, (len(ids) - 32) // requests)
        for i in range(requests):
            prompt = ids[i * stride : i * stride + 32]
            params = SamplingParams(max_tokens=decode_tokens, temperature=0.8, top_p=0.95, seed=i, ignore_eos=True)
            for _ in eng.generate([prompt], params):
                pass
    return path


def best_online_policy(trace_path: Path, fraction: float = 0.25) -> tuple[str, dict[str, float]]:
    """The online policy with the highest simulated hit rate on the trace (the simulator runs the engine's own)."""
    from cache.base import policy_names
    from traces.format import load_trace
    from traces.simulate import SimConfig, build_schedule, capacities_for, simulate

    trace = load_trace(trace_path, hidden=False)
    capacities, scope = capacities_for(trace, capacity_fraction=fraction)
    schedule = build_schedule(trace)
    rates = {}
    for name in policy_names(online_only=True):
        rates[name] = simulate(trace, SimConfig(policy=name, capacities=tuple(capacities), scope=scope),
                               schedule).hit_rate
    return max(rates, key=rates.get), rates


def run_one(model_dir: Path, trace: Path, *, device: str, dtype: str, slots: int, policy: str, prefetch: str,
            predictor: str | None, tokens: int, prompt_len: int, link_gbps: float | None) -> dict:
    from engine import Engine
    from engine.generation import SamplingParams

    kwargs = {"device": device, "dtype": dtype, "expert_slots": slots, "cache_policy": policy, "prefetch": prefetch,
                  "route_from_trace": str(trace), "progress": False}
    if prefetch == "learned":
        kwargs["predictor_path"] = predictor
    if link_gbps is not None:
        kwargs.update(emulate_link_gbps=link_gbps, emulate_link_latency_us=10.0)
    t0 = time.perf_counter()
    eng = Engine.from_pretrained(model_dir, **kwargs)
    load_s = time.perf_counter() - t0
    try:
        prompt = torch.randint(10, 1000, (prompt_len,), generator=torch.Generator().manual_seed(0)).tolist()
        for _ in eng.generate([prompt], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)):
            pass  # warm-up: kernels, allocator, and a cache that has seen some routing
        params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
        stamps, before = [], None
        for ev in eng.generate([prompt], params):
            if ev.token_id is not None:
                if device == "cuda":
                    torch.cuda.synchronize()
                stamps.append(time.perf_counter())
                if before is None:
                    before = eng.stats()  # after the prefill: everything below is decode
        after = eng.stats()
    finally:
        eng.close()
    n = len(stamps) - 1
    c_q = after["queries"] - before["queries"]
    c_h = after["hits"] - before["hits"]
    return {"load_seconds": load_s, "decode_tokens": n,
                "decode_tokens_per_second": n / max(stamps[-1] - stamps[0], 1e-9),
                "hit_rate": c_h / c_q if c_q else 0.0,
                "stall_ms_per_token": (after["stall_seconds_decode"] - before["stall_seconds_decode"]) * 1e3 / max(n, 1),
                "bytes_per_token": (after["bytes_transferred"] - before["bytes_transferred"]) / max(n, 1),
                "prefetch_stats": {k: after["prefetch"][k] - before["prefetch"][k] for k in after["prefetch"]}}


def _slots_for(fraction: float, experts: int, top_k: int, layers: int) -> int:
    return max(top_k, min(experts, round(fraction * experts))) * layers


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--small", action="store_true", help="small shape, fewer tokens: a quick check")
    ap.add_argument("--shape", default=None, choices=sorted(REAL_SHAPES), help="default qwen3-30b-a3b (small: small)")
    ap.add_argument("--layers", type=int, default=None,
                    help="model depth (default: 3x the trace's MoE layers; the trace's own with --small or a "
                         "--predictor, which is trained for that many layers)")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    ap.add_argument("--trace", default=None, help="routing trace (default: tests/data, else one is recorded)")
    ap.add_argument("--predictor", default=None, help="learned predictor file: adds prefetch=learned")
    ap.add_argument("--fractions", default=None, help="slot fractions (default 0.1,0.25,0.5,1.0; small 0.25,1.0)")
    ap.add_argument("--policies", default="lru,best", help="names, 'best' = best online policy on the trace")
    ap.add_argument("--prefetch", default="none,pregate")
    ap.add_argument("--tokens", type=int, default=None, help="decode tokens per run (default 64, small 16)")
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--emulate-link-gbps", type=float, default=None, help="CPU only: pace copies like a link")
    ap.add_argument("--time-budget", type=float, default=None, help="seconds from start: later runs are skipped")
    ap.add_argument("--prepare-only", action="store_true", help="find or record the trace, build the checkpoint, exit")
    ap.add_argument("--model-dir", default=None)
    ap.add_argument("--out", default=None, help="JSON file or folder (default ${OUT:-bench/out})")
    args = ap.parse_args(argv)
    started = time.monotonic()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available (use --device cpu --small for a quick check)")
    out_dir = Path(os.environ.get("OUT") or REPO / "bench" / "out")
    out = Path(args.out) if args.out else out_dir / "gpu_bench.json"
    if out.suffix != ".json":
        out = out / "gpu_bench.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tokens = args.tokens or (16 if args.small else 64)

    # 1) the trace: given, found in tests/data, or recorded now from the default model
    trace = Path(args.trace) if args.trace else find_trace()
    recorded = out.parent / "trace_default.safetensors"
    if trace is None and recorded.is_file():
        trace = recorded  # recorded by an earlier (e.g. --prepare-only) run
    if trace is None:
        trace = recorded
        print(f"no trace in {DATA}: recording {trace} from the default model ...", file=sys.stderr, flush=True)
        record_trace(trace, args.device, requests=4 if args.small else 16, decode_tokens=32 if args.small else 96)
    from traces.format import load_trace

    tr = load_trace(trace, hidden=False)
    experts, top_k = tr.num_experts, tr.top_k

    # 2) the model: real per-expert shape, the trace's experts and top-k
    shape_name = args.shape or ("small" if args.small else "qwen3-30b-a3b")
    layers = args.layers or (tr.num_layers if args.small or args.predictor else 3 * tr.num_layers)
    shape = {**REAL_SHAPES[shape_name], "num_experts": experts, "num_experts_per_tok": top_k,
             "num_hidden_layers": layers}
    if args.small:
        shape["vocab_size"] = min(shape["vocab_size"], 8192)
    model_dir = Path(args.model_dir or f"/tmp/moepager-gpubench-{shape_name}-{experts}x{top_k}-{layers}-{args.dtype}")
    print(f"checkpoint {model_dir} ({shape_name}: hidden {shape['hidden_size']}, expert intermediate "
          f"{shape['intermediate_size']}, {layers} layers, {experts} experts, top-{top_k}) ...", file=sys.stderr,
          flush=True)
    build_checkpoint(model_dir, shape, getattr(torch, args.dtype))
    if args.prepare_only:
        return 0

    # 3) the grid
    policies = []
    best, rates = None, {}
    for name in args.policies.split(","):
        if name == "best":
            best, rates = best_online_policy(trace)
            name = best
        if name not in policies:
            policies.append(name)
    prefetches = args.prefetch.split(",") + (["learned"] if args.predictor else [])
    fractions = [float(f) for f in (args.fractions or ("0.25,1.0" if args.small else "0.1,0.25,0.5,1.0")).split(",")]
    results = []
    for fraction in fractions:
        slots = _slots_for(fraction, experts, top_k, layers)
        for policy in policies:
            for prefetch in prefetches:
                row = {"fraction": fraction, "slots": slots, "policy": policy, "prefetch": prefetch}
                if args.time_budget is not None and time.monotonic() - started > args.time_budget:
                    results.append({**row, "error": "skipped: --time-budget exhausted"})
                    continue
                print(f"running {fraction:.0%} slots, {policy}, prefetch {prefetch} ...", file=sys.stderr, flush=True)
                try:
                    row.update(run_one(model_dir, trace, device=args.device, dtype=args.dtype, slots=slots,
                                       policy=policy, prefetch=prefetch, predictor=args.predictor, tokens=tokens,
                                       prompt_len=args.prompt_len, link_gbps=args.emulate_link_gbps))
                except Exception as exc:  # noqa: BLE001 - one bad configuration must not lose the rest of the grid
                    row["error"] = f"{type(exc).__name__}: {exc}".splitlines()[0]
                results.append(row)
                gc.collect()
                if args.device == "cuda":
                    torch.cuda.empty_cache()

    # 4) the report
    from cuda_ext import native_status

    print(f"\ntrace {trace} ({tr.num_rows} rows, {tr.num_layers} layers, {experts} experts, top-{top_k}); "
          f"best online policy at 25 %: {best or '-'}; cuda_ext: {native_status()}")
    print(f"{'slots':>6} {'policy':>8} {'prefetch':>8} {'tok/s':>8} {'hit rate':>9} {'stall ms/tok':>13} "
          f"{'MB/tok':>8}")
    for r in results:
        if "error" in r:
            print(f"{r['fraction']:>6.0%} {r['policy']:>8} {r['prefetch']:>8}  error: {r['error']}")
            continue
        print(f"{r['fraction']:>6.0%} {r['policy']:>8} {r['prefetch']:>8} {r['decode_tokens_per_second']:>8.1f} "
              f"{r['hit_rate']:>9.3f} {r['stall_ms_per_token']:>13.2f} {r['bytes_per_token'] / 1e6:>8.1f}")
    report = {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else f"cpu ({os.cpu_count()} cores)",
        "torch": torch.__version__, "cuda": torch.version.cuda, "cuda_ext": native_status(), "dtype": args.dtype,
        "shape_name": shape_name, "shape": shape, "trace": str(trace), "trace_rows": tr.num_rows, "trace_layers": tr.num_layers,
        "tokens": tokens, "prompt_len": args.prompt_len, "best_online_policy": best, "simulated_hit_rates_25pct": rates,
        "emulate_link_gbps": args.emulate_link_gbps, "results": results, "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
