"""Live stall per token on the CPU with the emulated link: no prefetch, learned, pre-gating, planner gate on/off.

    python -m bench.live_stall [--prompts 4] [--decode-tokens 32] [--seeds 0,1] [--out bench/results/live_stall.json]

The benchmark builds a small random OLMoE checkpoint (``bench.decode``'s "small" shape: 4 MoE
layers, 16 experts, top-4) and, first, records a routing trace from that model on training
prompts (random token ids) and trains the learned predictor on it with ``moepager predictor
train`` (lookahead 1). Then, per seed, other random prompts decode greedily on a fresh engine
per configuration, with a quarter of the experts in slots (``--slots-per-layer``, 4 of 16).

The link is sized from this machine: the decode time per MoE layer is measured with every
expert resident, and the emulated bandwidth makes one page take ``--copy-layers`` layer
computes: 4 (link-bound) and 0.5 (compute-rich) by default. Only decode steps are counted:
stall ms/token is the engine's own counter (time the compute waited on copies), tok/s is
wall time, hit rate and prefetch outcomes are the engine's counters. Random weights route
almost uniformly, so this shows the mechanism's overheads and the gate's effect, not what
prediction gains on real routing.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.decode import SHAPES, build_checkpoint
from bench.policy_table import run_info, write_report
from bench.prefetch_live import run_config
from engine import Engine
from engine.generation import SamplingParams

CONFIGS = {
    "none": {"prefetch": "none"},
    "learned": {"prefetch": "learned"},
    "learned gate off": {"prefetch": "learned", "prefetch_gate": False},
    "pregate": {"prefetch": "pregate"},
    "pregate gate off": {"prefetch": "pregate", "prefetch_gate": False},
}


def random_prompts(seed: int, count: int, length: int, vocab: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (length,), generator=gen).tolist() for _ in range(count)]


def record_and_train(model: Path, prompts: list[list[int]], decode_tokens: int, workdir: Path) -> str:
    """A trace of ``model`` on ``prompts``, and the learned predictor trained on it (command line)."""
    trace = workdir / "train.safetensors"
    with Engine.from_pretrained(model, device="cpu", progress=False, record_trace=str(trace)) as eng:
        for prompt in prompts:
            for _ in eng.generate([prompt], SamplingParams(max_tokens=decode_tokens, temperature=0,
                                                           ignore_eos=True)):
                pass
    out = workdir / "learned.safetensors"
    subprocess.run([sys.executable, "-m", "server", "predictor", "train", str(trace), "--out", str(out),
                    "--lookahead", "1"], check=True, stdout=subprocess.DEVNULL)
    return str(out)


def decode(model: Path, prompts: list[list[int]], decode_tokens: int, **engine_kwargs) -> dict:
    """Decode after each prompt on one fresh engine; sums over prompts, decode steps only."""
    r = run_config(prompts, decode_tokens, model=model, **engine_kwargs)
    keep = ("decode_tokens", "tokens_per_second", "stall_ms_per_token", "hit_rate", "issued", "useful", "late",
            "wasted")
    return {**{k: r[k] for k in keep}, "mb_per_token": (r["demand_mb"] + r["prefetch_mb"]) / r["decode_tokens"]}


def layer_seconds(model: Path, prompts: list[list[int]], decode_tokens: int) -> tuple[float, int, int]:
    """Decode seconds per MoE layer with every expert resident; also the page size and layer count."""
    with Engine.from_pretrained(model, device="cpu", progress=False) as eng:
        page, layers = eng.store.page_bytes, eng.num_moe_layers
    r = decode(model, prompts, decode_tokens)
    return 1.0 / r["tokens_per_second"] / layers, page, layers


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompts", type=int, default=3, help="prompts per seed")
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--train-prompts", type=int, default=12)
    p.add_argument("--slots-per-layer", type=int, default=4)
    p.add_argument("--copy-layers", default="4,0.5", help="operating points: one copy = this many layer computes")
    p.add_argument("--link-latency-us", type=float, default=20.0)
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--checkpoint", default=None, help="where the random checkpoint goes (default: a temp dir)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    shape = SHAPES["small"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        model = build_checkpoint(Path(args.checkpoint) if args.checkpoint else workdir / "model", shape,
                                 torch.float32)
        vocab = shape["vocab_size"]
        train = random_prompts(1000, args.train_prompts, args.prompt_tokens, vocab)
        predictor = record_and_train(model, train, args.decode_tokens, workdir)
        layer_s, page, layers = layer_seconds(model, train[:2], 16)
        slots = args.slots_per_layer * layers
        print(f"small random OLMoE: {layers} MoE layers, {shape['num_experts']} experts, top-"
              f"{shape['num_experts_per_tok']}, page {page / 1e6:.2f} MB, {slots} slots; decode compute "
              f"{layer_s * 1e3:.2f} ms per MoE layer (all resident); learned trained on {len(train)} prompts")
        print(f"{'op':>13} {'seed':>4} {'config':>18} {'stall ms/tok':>12} {'tok/s':>7} {'hit':>6} "
              f"{'issued':>6} {'useful':>6} {'late':>5} {'wasted':>6}")
        for copy_layers in map(float, args.copy_layers.split(",")):
            copy_s = copy_layers * layer_s
            gbps = page / max(copy_s - args.link_latency_us * 1e-6, 1e-6) / 1e9
            op = f"copy={copy_layers:g} layers"
            for seed in map(int, args.seeds.split(",")):
                prompts = random_prompts(seed, args.prompts, args.prompt_tokens, vocab)
                for name in args.configs.split(","):
                    kwargs = dict(CONFIGS[name], expert_slots=slots, emulate_link_gbps=gbps,
                                  emulate_link_latency_us=args.link_latency_us)
                    if kwargs["prefetch"] == "learned":
                        kwargs["predictor_path"] = predictor
                    r = decode(model, prompts, args.decode_tokens, **kwargs)
                    rows.append({"op": op, "copy_layers": copy_layers, "link_gbps": gbps, "seed": seed,
                                 "config": name} | r)
                    print(f"{op:>13} {seed:4d} {name:>18} {r['stall_ms_per_token']:12.3f} "
                          f"{r['tokens_per_second']:7.1f} {r['hit_rate']:6.3f} {r['issued']:6d} {r['useful']:6d} "
                          f"{r['late']:5d} {r['wasted']:6d}", flush=True)
    print(f"\n{'op':>13} {'config':>18} {'stall ms/tok':>12} {'vs none':>8} {'tok/s':>7} {'hit':>6}  (mean over seeds)")
    summary = []
    for op in dict.fromkeys(r["op"] for r in rows):
        base = [r for r in rows if r["op"] == op and r["config"] == "none"]
        none_stall = sum(r["stall_ms_per_token"] for r in base) / len(base) if base else None
        for name in args.configs.split(","):
            got = [r for r in rows if r["op"] == op and r["config"] == name]
            s = {k: sum(r[k] for r in got) / len(got) for k in ("stall_ms_per_token", "tokens_per_second", "hit_rate")}
            s |= {"op": op, "config": name,
                  "stall_vs_none": s["stall_ms_per_token"] / none_stall if none_stall else None}
            summary.append(s)
            ratio = "-" if s["stall_vs_none"] is None else f"{s['stall_vs_none']:.3f}"
            print(f"{op:>13} {name:>18} {s['stall_ms_per_token']:12.3f} {ratio:>8} {s['tokens_per_second']:7.1f} "
                  f"{s['hit_rate']:6.3f}")
    print(f"({time.perf_counter() - t0:.0f} s)")
    if args.out:
        write_report(args.out, {"run": run_info(argv), "layer_seconds": layer_s, "page_bytes": page,
                                              "rows": rows, "summary": summary})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
