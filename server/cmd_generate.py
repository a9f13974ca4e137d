"""`moepager generate`: one prompt through the offloaded engine, streamed to stdout or as JSON."""

from __future__ import annotations

import argparse
import json
import sys

from engine.errors import MoepagerError
from server.flags import add_engine_flags, engine_config_from_args


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("generate", help="generate text from one prompt",
                              description="Generate from one prompt with experts offloaded to host memory.")
    add_engine_flags(p)
    prompt = p.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="prompt text (tokenized with the model's tokenizer)")
    prompt.add_argument("--prompt-ids", help="comma-separated prompt token ids, e.g. 1,2,3")
    p.add_argument("--chat", action="store_true", help="wrap --prompt in the tokenizer's chat template")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line of stdout")
    p.set_defaults(run=run)


def _prompt_ids(args, tokenizer) -> list[int]:
    if args.prompt_ids is not None:
        try:
            ids = [int(t) for t in args.prompt_ids.replace(" ", "").split(",") if t != ""]
        except ValueError:
            raise MoepagerError(f"--prompt-ids: expected comma-separated integers, got {args.prompt_ids!r}") from None
        if not ids:
            raise MoepagerError("--prompt-ids: no token ids given")
        return ids
    if tokenizer is None:
        raise MoepagerError("--prompt: this model folder has no tokenizer; pass --prompt-ids")
    if args.chat:
        return list(tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}],
                                                  add_generation_prompt=True, tokenize=True, return_dict=False))
    ids = tokenizer(args.prompt, add_special_tokens=True)["input_ids"]
    if not ids:
        raise MoepagerError("--prompt: the prompt tokenizes to nothing")
    return list(ids)


def run(args: argparse.Namespace) -> int:
    from engine.engine import Engine
    from engine.generation import SamplingParams

    try:
        params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                                top_k=args.top_k, seed=args.seed, stop=tuple(args.stop), ignore_eos=args.ignore_eos)
    except ValueError as exc:
        raise MoepagerError(str(exc)) from None
    config = engine_config_from_args(args, max_model_len=args.max_model_len, progress=not args.json or True)
    with Engine.from_config(config) as engine:
        ids = _prompt_ids(args, engine.tokenizer)
        vocab = engine.model.config.get_text_config().vocab_size
        bad = [t for t in ids if t < 0 or t >= vocab]
        if bad:
            raise MoepagerError(f"--prompt-ids: token id {bad[0]} is outside the vocabulary (0..{vocab - 1})")
        token_ids: list[int] = []
        text_parts: list[str] = []
        finish_reason = None
        for event in engine.generate([ids], params):
            if event.token_id is not None:
                token_ids.append(event.token_id)
            if event.text:
                text_parts.append(event.text)
                if not args.json:
                    print(event.text, end="", flush=True)
            if event.finished:
                finish_reason = event.finish_reason
        stats = engine.stats()
    text = "".join(text_parts)
    if args.json:
        out = {"token_ids": token_ids, "text": text, "finish_reason": finish_reason, "prompt_tokens": len(ids),
                   "stats": {k: stats[k] for k in ("hits", "misses", "hit_rate", "bytes_transferred", "stall_seconds",
                                                "tokens_per_second", "queries", "demand_bytes", "prefetch_bytes",
                                                "prefetch", "expert_slots", "cache_policy")}}
        print(json.dumps(out))
    else:
        print()
        print(f"[{len(token_ids)} tokens, hit rate {stats['hit_rate']:.1%}, "
              f"{stats['bytes_transferred'] / 1e6:.1f} MB moved, stall {stats['stall_seconds']:.3f} s, "
              f"{stats['tokens_per_second']:.1f} tok/s]", file=sys.stderr)
    return 0
