"""Decode speed against context length: the in-place KV layers against transformers' DynamicCache.

transformers' ``DynamicLayer`` concatenates each layer's keys and values at every decode step,
so a token copies (into fresh memory) the whole cache of every layer; moepager's
``GrowingLayer`` writes the new position in place. Both run on one engine in one process
(the concatenating cache by swapping ``engine.generation.growing_cache`` for
``DynamicCache``), alternating, so the machine's drift hits both alike; each context length
reports the best of ``--repeat`` decodes per cache.

    python -m bench.long_context --out bench/results/long_context.json   # the decode.py checkpoint
    python -m bench.long_context --small --contexts 16,512                # quick check
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from bench.decode import SHAPES, build_checkpoint, cpu_description


def decode_ms_per_token(eng, prompt: list[int], tokens: int) -> float:
    """Decode milliseconds per token after the prefill (greedy, ``tokens`` new tokens)."""
    from engine.generation import SamplingParams

    stamps = []
    for ev in eng.generate([prompt], SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)):
        if ev.token_id is not None:
            stamps.append(time.perf_counter())
    return (stamps[-1] - stamps[0]) / (len(stamps) - 1) * 1e3


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--small", action="store_true", help="a small model for a quick check")
    ap.add_argument("--model-dir", default=None, help="where to build/keep the checkpoint")
    ap.add_argument("--contexts", default="16,1024,2048,3968", help="prompt lengths (tokens)")
    ap.add_argument("--tokens", type=int, default=16, help="decode tokens per run")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    from transformers import DynamicCache

    from engine import Engine, generation

    shape_name = "small" if args.small else "olmoe"
    dtype = torch.float32 if args.small else torch.bfloat16
    path = Path(args.model_dir or f"/tmp/moepager-bench-{shape_name}-{str(dtype).split('.')[-1]}")
    try:
        contexts = [int(c) for c in args.contexts.split(",")]
    except ValueError:
        ap.error(f"--contexts: comma-separated token counts, got {args.contexts!r}")
    if min(contexts) < 1 or args.tokens < 2 or args.repeat < 1:
        ap.error("--contexts must be >= 1, --tokens >= 2 (decode time is measured between tokens), --repeat >= 1")
    config = path / "config.json"
    # an existing checkpoint's own limit, else that of the one build_checkpoint writes
    limit = json.loads(config.read_text()).get("max_position_embeddings", 4096) if config.is_file() else 4096
    if max(contexts) + args.tokens > limit:
        ap.error(f"--contexts: {max(contexts)} + --tokens {args.tokens} exceeds the model's {limit} positions")
    build_checkpoint(path, SHAPES[shape_name], dtype)
    growing = generation.growing_cache
    caches = {"in place": growing, "concatenate": lambda config: DynamicCache(config=config)}
    rows = []
    print(f"{'context':>8} {'in place ms/tok':>16} {'concatenate ms/tok':>19} {'speedup':>8}", flush=True)
    with Engine.from_pretrained(str(path), device="cpu", progress=False) as eng:
        gen = torch.Generator().manual_seed(0)
        try:
            for n in contexts:
                prompt = torch.randint(10, 1000, (n,), generator=gen).tolist()
                best = {name: float("inf") for name in caches}
                for _ in range(args.repeat):
                    for name, factory in caches.items():
                        generation.growing_cache = factory
                        best[name] = min(best[name], decode_ms_per_token(eng, prompt, args.tokens))
                row = {"context": n, "in_place_ms_per_token": best["in place"],
                       "concatenate_ms_per_token": best["concatenate"],
                       "speedup": best["concatenate"] / best["in place"]}
                rows.append(row)
                print(f"{n:8d} {row['in_place_ms_per_token']:16.1f} {row['concatenate_ms_per_token']:19.1f} "
                      f"{row['speedup']:7.2f}x", flush=True)
        finally:
            generation.growing_cache = growing
    if args.out:
        report = {"cpu": cpu_description(), "threads": torch.get_num_threads(), "shape": SHAPES[shape_name],
                  "dtype": str(dtype), "tokens": args.tokens, "repeat": args.repeat, "rows": rows,
                  "date": time.strftime("%Y-%m-%d")}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
