"""Prefetch predictors in the live engine on CPU, with the emulated host link.

    python -m bench.prefetch_live TRACE --predictor PRED [--prompts 4] [--decode-tokens 64] [--out live.json]

The default model decodes ``--decode-tokens`` greedy tokens after each of ``--prompts``
prompts taken from the held-out requests of TRACE (the last ``--holdout`` of its
requests: the ones bench/prefetch_table.py keeps away from the learned predictor), with
25 % of the experts in slots (``--expert-slots``, 8 per layer) and a link emulated on the
copy worker thread.

The link is sized from this machine: first the decode time per MoE layer is measured
with every expert resident, then the bandwidth is chosen so that one expert page takes
``--copy-layers`` layer computes to cross (``--link-gbps`` overrides). Each config then
runs on a fresh engine; only decode steps are counted (the snapshot is taken at the
first token): stall per token, decode tokens/s, hit rate and prefetch outcomes.
``learned`` uses PRED (trained by bench/prefetch_table.py); its lookahead must not
exceed the one PRED was trained for.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from bench.policy_table import run_info
from engine import Engine
from engine.generation import SamplingParams
from prefetch.training import holdout_split
from traces.format import load_trace

CONFIGS = (("none", 1), ("prev", 1), ("eam", 1), ("learned", 1), ("learned", 2), ("pregate", 1), ("pregate", 2))


def heldout_prompts(path: str, holdout: float, count: int, max_len: int) -> list[list[int]]:
    trace = load_trace(path, hidden=False)
    if trace.tokens is None:
        raise ValueError(f"{path} has no token ids; record it with the engine's recorder")
    held = holdout_split(trace.request, holdout)
    prompts = []
    for req in dict.fromkeys(trace.request[held].tolist()):
        rows = (trace.request == req) & (trace.phase == 0)
        order = np.argsort(trace.position[rows], kind="stable")
        ids = trace.tokens[rows][order].tolist()[:max_len]
        if ids:
            prompts.append(ids)
        if len(prompts) == count:
            break
    return prompts


def _decode_counters(eng: Engine) -> dict:
    c = eng.runtime.step.sync_counters(block=True)
    return {"hits": sum(c.hits[1]), "queries": sum(c.queries[1]), "stall": c.stall_seconds[1],
            "issued": c.prefetch_issued, "useful": c.prefetch_useful, "wasted": c.prefetch_wasted,
            "late": c.prefetch_late, "demand_bytes": c.demand_bytes, "prefetch_bytes": c.prefetch_bytes}


def run_config(prompts: list[list[int]], decode_tokens: int, model=None, **engine_kwargs) -> dict:
    """Decode after each prompt on one fresh engine (``model``: a checkpoint folder, None for the
    embedded model); sums over prompts, decode steps only."""
    totals: dict[str, float] = {}
    decode_seconds = 0.0
    tokens = 0
    with Engine.from_pretrained(model, device="cpu", progress=False, **engine_kwargs) as eng:
        for prompt in prompts:
            params = SamplingParams(max_tokens=decode_tokens + 1, temperature=0, ignore_eos=True)
            first = before = None
            count = 0
            for ev in eng.generate([prompt], params):
                if ev.token_id is None:
                    continue
                count += 1
                if first is None:  # the prefill's token: decode starts here
                    first, before = time.perf_counter(), _decode_counters(eng)
            end, after = time.perf_counter(), _decode_counters(eng)
            decode_seconds += end - first
            tokens += count - 1
            for k in after:
                totals[k] = totals.get(k, 0) + after[k] - before[k]
    issued = totals["issued"]
    return {
        "decode_tokens": tokens, "decode_seconds": decode_seconds,
        "tokens_per_second": tokens / decode_seconds if decode_seconds else None,
        "stall_ms_per_token": totals["stall"] / tokens * 1e3 if tokens else None,
        "hit_rate": totals["hits"] / totals["queries"] if totals["queries"] else None,
        "issued": int(issued), "useful": int(totals["useful"]), "late": int(totals["late"]),
        "wasted": int(totals["wasted"]), "precision": totals["useful"] / issued if issued else None,
        "used_share": (totals["useful"] + totals["late"]) / issued if issued else None,
        "demand_mb": totals["demand_bytes"] / 1e6, "prefetch_mb": totals["prefetch_bytes"] / 1e6,
    }


def layer_compute_seconds(prompts: list[list[int]], decode_tokens: int) -> tuple[float, int, int]:
    """Decode seconds per MoE layer with every expert resident; also the page size and layer count."""
    with Engine.from_pretrained(None, device="cpu", progress=False) as eng:
        page = eng.stats()["expert_cache_capacity_bytes"] // eng.cache.num_slots
        layers = eng.num_moe_layers
    r = run_config(prompts[:2], decode_tokens)
    return r["decode_seconds"] / r["decode_tokens"] / layers, int(page), layers


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("trace", metavar="TRACE", help="prompts come from its held-out requests")
    p.add_argument("--predictor", required=True, metavar="PRED", help="learned predictor file")
    p.add_argument("--holdout", type=float, default=0.2)
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--decode-tokens", type=int, default=64)
    p.add_argument("--expert-slots", type=int, default=32)
    p.add_argument("--copy-layers", type=float, default=2.0, help="one expert copy = this many layer computes")
    p.add_argument("--link-gbps", type=float, default=None, help="overrides --copy-layers")
    p.add_argument("--link-latency-us", type=float, default=20.0)
    p.add_argument("--prefetch-budget-mb", type=float, default=None, help="default: the engine's")
    p.add_argument("--configs", default=",".join(f"{n}:{d}" for n, d in CONFIGS), help="name:lookahead,...")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    prompts = heldout_prompts(args.trace, args.holdout, args.prompts, args.prompt_tokens)
    layer_s, page, layers = layer_compute_seconds(prompts, min(args.decode_tokens, 32))
    if args.link_gbps is None:
        copy_s = args.copy_layers * layer_s - args.link_latency_us * 1e-6
        gbps = page / copy_s / 1e9
    else:
        gbps = args.link_gbps
    copy_s = args.link_latency_us * 1e-6 + page / (gbps * 1e9)
    print(f"{len(prompts)} held-out prompts of {[len(q) for q in prompts]} tokens from {args.trace}; "
          f"{args.decode_tokens} decode tokens each; {args.expert_slots} slots ({layers} MoE layers)")
    print(f"decode compute {layer_s * 1e6:.0f} us per MoE layer (all experts resident); page {page} B; "
          f"link {gbps:.4f} GB/s + {args.link_latency_us:.0f} us: {copy_s * 1e6:.0f} us per copy "
          f"= {copy_s / layer_s:.2f} layer computes")
    results = []
    for item in args.configs.split(","):
        name, d = item.split(":")
        kwargs = {"expert_slots": args.expert_slots, "emulate_link_gbps": gbps,
                  "emulate_link_latency_us": args.link_latency_us, "prefetch": name, "prefetch_lookahead": int(d),
                  "prefetch_budget_mb": args.prefetch_budget_mb}
        if name == "learned":
            kwargs["predictor_path"] = args.predictor
        try:
            r = run_config(prompts, args.decode_tokens, **kwargs)
        except RuntimeError as exc:  # a failing config is a result too: record it and go on
            r = {"error": f"{type(exc).__name__}: {exc}"}
        results.append({"predictor": name, "lookahead": int(d), **r})
        if "error" in r:
            print(f"{name:>8} d={d}: FAILED {r['error']}", flush=True)
    base = next((r for r in results if r["predictor"] == "none" and "error" not in r), None)
    for r in results:
        if "error" not in r and base is not None:
            r["stall_vs_none"] = r["stall_ms_per_token"] / base["stall_ms_per_token"] if base["stall_ms_per_token"] \
                else None
    print(f"{'predictor':>9} {'d':>1} {'stall ms/tok':>12} {'vs none':>7} {'tok/s':>6} {'hit':>6} {'issued':>6} "
          f"{'useful':>6} {'late':>5} {'wasted':>6} {'prec':>5} {'used':>5} {'demand MB':>9} {'pref MB':>7}")
    for r in results:
        if "error" in r:
            continue
        print(f"{r['predictor']:>9} {r['lookahead']:>1} {r['stall_ms_per_token']:12.2f} "
              f"{_fmt(r.get('stall_vs_none'), '7.2f'):>7} {r['tokens_per_second']:6.1f} {r['hit_rate']:6.3f} "
              f"{r['issued']:>6} {r['useful']:>6} {r['late']:>5} {r['wasted']:>6} {_fmt(r['precision'], '5.2f'):>5} "
              f"{_fmt(r['used_share'], '5.2f'):>5} {r['demand_mb']:9.1f} {r['prefetch_mb']:7.1f}")
    ok = [r for r in results if "error" not in r and r["predictor"] != "none"]
    best = min(ok, key=lambda r: r["stall_ms_per_token"]) if ok else None
    if best is not None and base is not None:
        print(f"best: {best['predictor']} d={best['lookahead']}: {best['stall_ms_per_token']:.2f} ms/token vs none "
              f"{base['stall_ms_per_token']:.2f} ({best['stall_vs_none']:.2f}x): halved "
              f"{'yes' if best['stall_vs_none'] <= 0.5 else 'no'}")
    print(f"({time.perf_counter() - t0:.0f} s)")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"run": run_info(argv), "trace": args.trace, "predictor_path": args.predictor,
                       "prompt_lengths": [len(q) for q in prompts], "decode_tokens": args.decode_tokens,
                       "expert_slots": args.expert_slots, "layer_compute_us": layer_s * 1e6, "page_bytes": page,
                       "link_gbps": gbps, "link_latency_us": args.link_latency_us, "copy_us": copy_s * 1e6,
                       "threads": args.threads, "results": results}, f, indent=1)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
