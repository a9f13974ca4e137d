"""Record routing traces from the embedded default model with the engine's recorder.

Two traces, small enough for tests/data/:

- ``trace_heldout.safetensors``: held-out documentation text (tests/data/heldout.txt) cut into
  prompts, each prefilled and then continued with sampled decode tokens;
- ``trace_chat.safetensors``: a few chat prompts through the chat template, decoded greedily.

    python -m bench.record_traces --out tests/data
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

from engine import Engine
from engine.generation import SamplingParams

CHAT_PROMPTS = [
    "How do I open a file for reading in Python?",
    "What does the with statement do?",
    "Explain list comprehensions.",
    "How can I sort a dictionary by value?",
    "What is the difference between a tuple and a list?",
    "How do I handle an exception?",
    "What does the os.path module provide?",
    "How do I write a class with a constructor?",
    "What is a generator function?",
    "How do I parse command-line arguments?",
    "What is the purpose of __init__.py?",
    "How do I format a string with variables?",
]


def _chunks(text: str, tokenizer, count: int, prompt_tokens: int, seed: int) -> list[list[int]]:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    rng = random.Random(seed)
    starts = sorted(rng.sample(range(max(1, len(ids) - prompt_tokens)), count))
    return [ids[s : s + prompt_tokens] for s in starts]


def record(out_dir: Path, *, heldout: Path, requests: int, prompt_tokens: int, decode_tokens: int,
           seed: int) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    # 1) held-out text: prompts from real text, then sampled continuations
    path = out_dir / "trace_heldout.safetensors"
    with Engine.from_pretrained(None, device="cpu", record_trace=str(path), progress=False) as eng:
        prompts = _chunks(heldout.read_text(), eng.tokenizer, requests, prompt_tokens, seed)
        for i, prompt in enumerate(prompts):  # one request at a time: batch-1 serving, like a local user
            params = SamplingParams(max_tokens=decode_tokens, temperature=0.8, top_p=0.95, seed=seed + i,
                                    ignore_eos=True)
            for _ in eng.generate([prompt], params):
                pass
            print(f"  heldout request {i + 1}/{len(prompts)}", file=sys.stderr, flush=True)
    written.append(path)
    # 2) chat prompts through the template, greedy
    path = out_dir / "trace_chat.safetensors"
    with Engine.from_pretrained(None, device="cpu", record_trace=str(path), progress=False) as eng:
        for i, text in enumerate(CHAT_PROMPTS):
            ids = eng.tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                    tokenize=True, return_dict=False)
            params = SamplingParams(max_tokens=decode_tokens, temperature=0.0, ignore_eos=True)
            for _ in eng.generate([list(ids)], params):
                pass
            print(f"  chat request {i + 1}/{len(CHAT_PROMPTS)}", file=sys.stderr, flush=True)
    written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="tests/data")
    ap.add_argument("--heldout", default="tests/data/heldout.txt")
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--decode-tokens", type=int, default=96)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    for path in record(Path(args.out), heldout=Path(args.heldout), requests=args.requests,
                       prompt_tokens=args.prompt_tokens, decode_tokens=args.decode_tokens, seed=args.seed):
        print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
