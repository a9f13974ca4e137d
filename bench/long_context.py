"""Decode speed against context length: two ways of handling the context, on one engine.

``--compare cache`` (default): the in-place KV layers against transformers' DynamicCache.
transformers' ``DynamicLayer`` concatenates each layer's keys and values at every decode step,
so a token copies (into fresh memory) the whole cache of every layer; moepager's
``GrowingLayer`` writes the new position in place (the concatenating cache runs by swapping
``engine.generation.growing_cache`` for ``DynamicCache``).

``--compare attention``: the native decode attention (``engine.attention``) against
transformers' SDPA (torch's CPU flash-attention kernel), by switching the model's attention
implementation between the two names.

``--compare blocks``: attention modules fused into four native calls at decode
(``engine.attention.use_decode_blocks``) against the same modules running their own forward.

Both variants run on one engine in one process, alternating, so the machine's drift hits both
alike; each context length reports the best of ``--repeat`` decodes per variant.

    python -m bench.long_context --out bench/results/long_context.json   # the decode.py checkpoint
    python -m bench.long_context --compare attention --out bench/results/long_context_attention.json
    python -m bench.long_context --compare blocks --contexts 16,1024 --repeat 6 --expert-dtype int8 --dense-dtype int8
    python -m bench.long_context --small --contexts 16,512                # quick check
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from bench.decode import SHAPES, build_checkpoint, cpu_description
from bench.policy_table import write_report


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
    ap.add_argument("--compare", choices=("cache", "attention", "blocks"), default="cache",
                    help="in-place KV layers vs DynamicCache, native decode attention vs SDPA, or fused "
                         "attention blocks vs the modules' own forward")
    ap.add_argument("--expert-dtype", default="auto", help="the engine's host page format (as the CLI's flag)")
    ap.add_argument("--dense-dtype", default="auto", help="the engine's dense weight format (as the CLI's flag)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    from transformers import DynamicCache

    from engine import Engine, attention, generation
    from engine.errors import MoepagerError

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
    if args.compare == "cache":
        names = ("in place", "concatenate")
        setups = {"in place": lambda eng: setattr(generation, "growing_cache", growing),
                  "concatenate": lambda eng: setattr(generation, "growing_cache",
                                                     lambda config: DynamicCache(config=config))}
    elif args.compare == "blocks":
        names = ("fused", "own")
        setups = {"fused": lambda eng: attention.set_decode_blocks(eng.model, True),
                  "own": lambda eng: attention.set_decode_blocks(eng.model, False)}
    else:
        names = ("native", "sdpa")
        setups = {"native": lambda eng: eng.model.set_attn_implementation(attention.NAME),
                  "sdpa": lambda eng: eng.model.set_attn_implementation("sdpa")}
    keys = [f"{name.replace(' ', '_')}_ms_per_token" for name in names]
    rows = []
    try:
        eng = Engine.from_pretrained(str(path), device="cpu", dtype=str(dtype).split(".")[-1], progress=False,
                                     expert_dtype=args.expert_dtype, dense_dtype=args.dense_dtype,
                                     quant_cache_dir=f"{path}-page-cache")  # beside the checkpoint, as bench.decode
    except MoepagerError as e:
        ap.error(str(e))
    print(f"{'context':>8} {names[0] + ' ms/tok':>16} {names[1] + ' ms/tok':>19} {'speedup':>8}", flush=True)
    with eng:
        if args.compare == "attention" and eng.kernels().get("decode_attention") != "native":
            ap.error("--compare attention: this engine does not run the native decode attention "
                     f"({eng.kernels().get('decode_attention')})")
        if args.compare == "blocks" and not eng.kernels().get("attention_blocks_fused"):
            ap.error("--compare blocks: this engine fused no attention blocks (they need the native CPU kernels)")
        gen = torch.Generator().manual_seed(0)
        try:
            for n in contexts:
                prompt = torch.randint(10, 1000, (n,), generator=gen).tolist()
                runs = {name: [] for name in names}
                for _ in range(args.repeat):
                    for name in names:
                        setups[name](eng)
                        runs[name].append(decode_ms_per_token(eng, prompt, args.tokens))
                best = {name: min(v) for name, v in runs.items()}
                row = {"context": n, keys[0]: best[names[0]], keys[1]: best[names[1]],
                       "speedup": best[names[1]] / best[names[0]],
                       "median_ms_per_token": {name: statistics.median(v) for name, v in runs.items()},
                       "runs_ms_per_token": runs}
                rows.append(row)
                med = row["median_ms_per_token"]
                print(f"{n:8d} {row[keys[0]]:16.1f} {row[keys[1]]:19.1f} {row['speedup']:7.2f}x   (medians "
                      f"{med[names[0]]:.1f} / {med[names[1]]:.1f})", flush=True)
        finally:
            generation.growing_cache = growing
            setups[names[0]](eng)
    if args.out:
        report = {"cpu": cpu_description(), "threads": torch.get_num_threads(), "shape": SHAPES[shape_name],
                  "dtype": str(dtype), "compare": args.compare, "tokens": args.tokens, "repeat": args.repeat, "rows": rows,
                  "expert_dtype": args.expert_dtype, "dense_dtype": args.dense_dtype,
                  "date": time.strftime("%Y-%m-%d")}
        write_report(args.out, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
