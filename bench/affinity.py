"""What affinity routing is worth: expert-cache hit rates of N replicas under round-robin,
least-loaded and affinity routing, on interleaved multi-turn conversations.

Two kinds of conversations:
- recorded: the embedded default model run on conversations cut from held-out text
  (tests/data/heldout.txt, a different passage per conversation); turn t resends the whole
  history plus a new chunk of the passage and decodes greedily;
- synthetic: each conversation has a topic (a few preferred experts per layer) and a locality
  (the share of tokens that route inside the topic); swept over topic size and cache size.
The replay model (deploy/ray/affinity_sim.py) is batch-1 FIFO per replica at a set utilization.

    python -m bench.affinity --out bench/results/affinity.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from deploy.ray.affinity_sim import affinity_table, conversations_from_trace, synthetic_conversations

RECORDED = "bench/results/affinity_conversations.safetensors"


def record_conversations(path: Path, *, conversations: int, turns: int, chunk_tokens: int, decode_tokens: int,
                         heldout: Path) -> Path:
    """Record a trace of ``conversations`` x ``turns`` requests from the embedded model; the
    request ids of each conversation go to ``meta["conversations"]``."""
    from engine import Engine
    from engine.generation import SamplingParams
    from traces.format import load_trace, save_trace

    with Engine.from_pretrained(None, device="cpu", record_trace=str(path), progress=False) as eng:
        ids = eng.tokenizer(heldout.read_text(), add_special_tokens=False)["input_ids"]
        span = turns * chunk_tokens
        stride = max(span, (len(ids) - span) // conversations)
        params = SamplingParams(max_tokens=decode_tokens, temperature=0.0, ignore_eos=True)
        for c in range(conversations):
            passage = ids[c * stride: c * stride + span]
            history: list[int] = []
            for t in range(turns):
                prompt = history + passage[t * chunk_tokens:(t + 1) * chunk_tokens]
                reply = [ev.token_id for ev in eng.generate([prompt], params) if ev.token_id is not None]
                history = prompt + reply
    trace = load_trace(path, hidden=False)
    requests = list(dict.fromkeys(trace.request.tolist()))
    if len(requests) != conversations * turns:
        raise RuntimeError(f"expected {conversations * turns} requests in the trace, found {len(requests)}")
    trace.meta["conversations"] = [requests[c * turns:(c + 1) * turns] for c in range(conversations)]
    save_trace(path, trace)
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--policy", default="lru")
    ap.add_argument("--utilization", type=float, default=0.7)
    ap.add_argument("--max-imbalance", type=int, default=8)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--conversations", type=int, default=16)
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--trace", default=RECORDED, help="recorded conversation trace; recorded (minutes) if missing")
    ap.add_argument("--heldout", default="tests/data/heldout.txt")
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    args = ap.parse_args(argv)
    seeds = tuple(range(args.seeds))
    common = {"replicas": args.replicas, "policy": args.policy, "utilization": args.utilization,
              "max_imbalance": args.max_imbalance, "seeds": seeds}
    rows = []

    # 1) the embedded model on conversations from real text
    from traces.format import load_trace

    trace_path = Path(args.trace)
    if not trace_path.exists():
        print("recording conversations from the embedded model ...", file=sys.stderr, flush=True)
        record_conversations(trace_path, conversations=args.conversations, turns=args.turns, chunk_tokens=48,
                             decode_tokens=16, heldout=Path(args.heldout))
    trace = load_trace(trace_path, hidden=False)
    convos = conversations_from_trace(trace)
    layers, experts = trace.num_layers, trace.num_experts
    for slots in (experts // 8, experts // 4, experts // 2):
        for row in affinity_table(convos, slots_per_layer=slots, layers=layers, experts=experts, **common):
            rows.append({"workload": "embedded model, held-out text", **row})

    # 2) synthetic topics: (topic experts per layer, locality) x cache size
    layers, experts = 8, 64
    regimes = [(args.conversations, args.turns, 4, 0.9, 32), (args.conversations, args.turns, 8, 0.8, 32),
               (args.conversations, args.turns, 16, 0.6, 32), (4, 6, 8, 0.98, 16)]  # the last: few, focused talks
    for conversations, turns, topic_experts, locality, prompt_tokens in regimes:
        convos = synthetic_conversations(conversations=conversations, turns=turns, layers=layers, experts=experts,
                                         topic_experts=topic_experts, locality=locality,
                                         prompt_tokens=prompt_tokens)
        for slots in (8, 16, 32):
            for row in affinity_table(convos, slots_per_layer=slots, layers=layers, experts=experts, **common):
                name = f"synthetic {conversations} conv, topic {topic_experts}/{experts}, loc {locality}"
                rows.append({"workload": name, **row})

    header = f"{'workload':42s} {'slots':>8s} {'routing':>13s} {'hit':>6s} {'prefill':>8s} {'decode':>7s} {'warm':>5s}"
    print(header)
    for r in rows:
        print(f"{r['workload']:42s} {r['slots_per_layer']:>8d} {r['routing']:>13s} {r['hit_rate']:6.3f} "
              f"{r['prefill_hit_rate']:8.3f} {r['decode_hit_rate']:7.3f} {r['warm_turn_share']:5.2f}")
    if args.out:
        meta = {"date": time.strftime("%Y-%m-%d"), "command": "python -m bench.affinity " + " ".join(argv or sys.argv[1:]),
                "replicas": args.replicas, "policy": args.policy, "utilization": args.utilization,
                "max_imbalance": args.max_imbalance, "seeds": len(seeds), "conversations": args.conversations,
                "turns": args.turns}
        Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
