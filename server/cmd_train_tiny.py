"""`moepager train-tiny`: train the small embedded MoE model from scratch on plain text."""

from __future__ import annotations

import argparse
import sys

from server.flags import _positive_float, _positive_int


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "train-tiny",
        help="train a small OLMoE-style model + BPE tokenizer from text (the embedded default model)",
        description="Train a small Mixture-of-Experts language model and its byte-level BPE tokenizer "
                    "from scratch, save it (bfloat16 safetensors + tokenizer + chat template) and "
                    "evaluate it. Deterministic for a given --seed and --threads.",
    )
    p.add_argument("--out", required=True, help="output folder for the model")
    p.add_argument("--data", default=None,
                   help="folder of .txt/.rst/.md files or one text file (default: the Python 3.11 "
                        "documentation sources from Debian's python3.11-doc, if installed)")
    p.add_argument("--steps", type=_positive_int, default=450, help="optimizer steps (default 450)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=_positive_int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    arch = p.add_argument_group("architecture (defaults: the shipped model)")
    arch.add_argument("--layers", type=_positive_int, default=4)
    arch.add_argument("--hidden", type=_positive_int, default=256)
    arch.add_argument("--heads", type=_positive_int, default=4)
    arch.add_argument("--experts", type=_positive_int, default=32)
    arch.add_argument("--top-k", type=_positive_int, default=4)
    arch.add_argument("--expert-intermediate", type=_positive_int, default=96)
    arch.add_argument("--vocab-size", type=_positive_int, default=8192)
    arch.add_argument("--context", type=_positive_int, default=256)
    opt = p.add_argument_group("optimisation")
    opt.add_argument("--batch-size", type=_positive_int, default=8)
    opt.add_argument("--lr", type=_positive_float, default=2e-3)
    opt.add_argument("--warmup-steps", type=_positive_int, default=100)
    opt.add_argument("--aux-loss-coef", type=float, default=0.01)
    opt.add_argument("--experts-implementation", default="eager",
                     help="transformers experts implementation used for training (eager, batched_mm, ...)")
    p.add_argument("--max-minutes", type=_positive_float, default=None,
                   help="stop early (and save) after this many minutes of training")
    p.add_argument("--checkpoint-every", type=int, default=0, help="save the model every N steps (0: only at the end)")
    p.add_argument("--eval-windows", type=_positive_int, default=64, help="held-out windows for evaluation")
    p.add_argument("--heldout-out", default=None, help="also write a held-out text sample (<190 KB) here")
    p.add_argument("--model-card", action="store_true", help="write MODEL_CARD.md into --out from the metrics")
    p.set_defaults(run=run)
    return p


def run(args: argparse.Namespace) -> int:
    from engine.default_model import train as train_tiny

    if args.top_k > args.experts:
        raise ValueError(f"--top-k {args.top_k} is larger than --experts {args.experts}")
    if args.hidden % args.heads:
        raise ValueError(f"--hidden {args.hidden} is not divisible by --heads {args.heads}")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ValueError("--device cuda but CUDA is not available")
    cfg = train_tiny.TinyConfig(
        layers=args.layers, hidden=args.hidden, heads=args.heads, kv_heads=args.heads,
        experts=args.experts, top_k=args.top_k, expert_intermediate=args.expert_intermediate,
        vocab_size=args.vocab_size, context=args.context, max_positions=max(512, args.context),
        batch_size=args.batch_size, steps=args.steps, lr=args.lr,
        warmup_steps=min(args.warmup_steps, max(1, args.steps // 10)),
        aux_loss_coef=args.aux_loss_coef, seed=args.seed, threads=args.threads, device=args.device,
        experts_implementation=args.experts_implementation, eval_windows=args.eval_windows,
    )

    def log(msg: str) -> None:
        print(msg, flush=True)

    metrics = train_tiny.train(cfg, args.data, args.out, log=log, heldout_out=args.heldout_out,
                               max_minutes=args.max_minutes, checkpoint_every=args.checkpoint_every)
    if args.model_card:
        from pathlib import Path

        path = Path(args.out) / "MODEL_CARD.md"
        path.write_text(train_tiny.model_card(metrics), encoding="utf-8")
        log(f"wrote {path}")
    sys.stdout.flush()
    return 0
