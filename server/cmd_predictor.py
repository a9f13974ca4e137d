"""`moepager predictor train|eval`: fit the learned expert predictor on traces and score it.

Both commands score the same way (prefetch.training.evaluate) beside the two
baselines, on decode rows when the trace has any (prefill touches nearly every
expert anyway), so ``eval`` on the training trace with the same ``--holdout``
reproduces the held-out numbers ``train`` stored in the file. Besides
precision, recall and F1 per lookahead distance they report the wasted share
of the copies made at the planner's busy-link threshold (probability >= 0.5,
see prefetch/training.py) and the share of used experts those copies cover.

``train`` splits twice by request: ``--holdout`` (the last requests of the
traces) is never trained on and is scored at the end; ``--validation`` (the last
requests of what remains) decides early stopping, after at most ``--epochs``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass

import numpy as np

from server.flags import _non_negative_int, _positive_int

PHASES = ("decode", "all")


@dataclass
class Routing:
    """The arrays of one or more traces, concatenated (request ids made distinct per file)."""

    experts: np.ndarray  # [N, L, K]
    request: np.ndarray  # [N]
    phase: np.ndarray  # [N]
    num_experts: int
    hidden: np.ndarray | None = None  # [N, L, H]
    tokens: np.ndarray | None = None  # [N] token ids, when every trace has them

    def take(self, rows: np.ndarray) -> Routing:
        return Routing(self.experts[rows], self.request[rows], self.phase[rows], self.num_experts,
                       None if self.hidden is None else self.hidden[rows],
                       None if self.tokens is None else self.tokens[rows])


def load_routing(paths: list[str], *, hidden: bool = False) -> Routing:
    """Read traces with the traces/ reader; all must come from the same model shape."""
    from traces.format import load_trace

    parts, offset, shape = [], 0, None
    for path in paths:
        t = load_trace(path, hidden=hidden)
        this = (t.num_layers, t.top_k, t.num_experts)
        if shape is not None and this != shape:
            raise ValueError(f"{path}: (layers, top_k, experts) = {this} differs from the first trace's {shape}")
        shape = this
        req = t.request.astype(np.int64)
        if len(req):
            req = req - req.min() + offset
            offset = int(req.max()) + 1
        parts.append((t.experts, req, t.phase, t.hidden if hidden else None, t.tokens))
    if hidden and any(p[3] is None for p in parts):
        raise ValueError("--use-hidden: a trace has no hidden states (record with hidden states, or drop the flag)")
    return Routing(
        experts=np.concatenate([p[0] for p in parts]).astype(np.int64),
        request=np.concatenate([p[1] for p in parts]),
        phase=np.concatenate([p[2] for p in parts]),
        num_experts=shape[2],
        hidden=np.concatenate([p[3] for p in parts]) if hidden else None,
        tokens=None if any(p[4] is None for p in parts) else np.concatenate([p[4] for p in parts]).astype(np.int64),
    )


def scored_rows(routing: Routing, phase: str) -> np.ndarray:
    if phase == "decode" and (routing.phase == 1).any():
        return routing.phase == 1
    return np.ones(len(routing.request), dtype=bool)


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("predictor", help="train and evaluate the learned expert predictor",
                              description="Train the learned expert predictor on routing traces and "
                                          "score it beside the previous-token and frequency baselines.")
    sub = p.add_subparsers(dest="predictor_command", required=True, metavar="SUBCOMMAND")

    t = sub.add_parser("train", help="train a predictor on traces",
                       description="Train on the first requests of the traces, report precision/recall/F1 "
                                   "per lookahead distance on the held-out last requests, and save.")
    t.add_argument("traces", nargs="+", metavar="TRACE", help="trace files (.safetensors)")
    t.add_argument("--out", required=True, metavar="PRED", help="output predictor file (.safetensors)")
    t.add_argument("--lookahead", type=_positive_int, default=2, help="layers ahead to predict (default 2)")
    t.add_argument("--epochs", type=_positive_int, default=20, help="most epochs to train (default 20)")
    t.add_argument("--patience", type=_positive_int, default=2,
                   help="stop after this many epochs without a better validation loss (default 2)")
    t.add_argument("--validation", type=float, default=0.1,
                   help="fraction of the training requests (the last ones) that decides early stopping "
                        "(default 0.1; 0: run every epoch)")
    t.add_argument("--holdout", type=float, default=0.2,
                   help="fraction of requests (the last ones) held out for evaluation (default 0.2; 0: none)")
    t.add_argument("--width", type=int, default=128,
                   help="hidden units of the cross-layer path part (default 128; 0: the direct part alone)")
    t.add_argument("--history", type=_positive_int, default=4,
                   help="previous tokens of the request the path part reads (default 4)")
    t.add_argument("--token-vocab", type=_non_negative_int, default=None, metavar="N",
                   help="the token part keeps expert counts for the N most frequent token ids of the traces "
                        "(default: up to 16384, fewer for models with many layers x experts; 0: ids not "
                        "used). Traces without ids train without it")
    t.add_argument("--batch-rows", type=_positive_int, default=2048, help="rows per minibatch (default 2048)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--lr", type=float, default=0.03)
    t.add_argument("--use-hidden", action="store_true", help="also learn from the traces' hidden states")
    t.add_argument("--phase", default="decode", choices=PHASES,
                   help="rows scored: decode rows (default, when the trace has any) or all")
    t.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    t.set_defaults(run=run_train)

    e = sub.add_parser("eval", help="score a trained predictor on a trace",
                       description="Precision, recall and F1 per lookahead distance, beside the baselines.")
    e.add_argument("predictor", metavar="PRED", help="trained predictor file")
    e.add_argument("--trace", required=True, action="append", metavar="TRACE", help="trace file (repeatable)")
    e.add_argument("--holdout", type=float, default=0.0,
                   help="score only the last fraction of requests (as train --holdout does; default 0: all)")
    e.add_argument("--lookahead", type=_positive_int, default=None, help="default: the predictor's")
    e.add_argument("--phase", default="decode", choices=PHASES)
    e.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    e.set_defaults(run=run_eval)
    return p


def _table(results: dict, out) -> None:
    from prefetch.training import COPY_THRESHOLD

    names = list(results)
    print(f"{'d':>2}  " + "  ".join(f"{n + ' P/R/F1/wasted':>29}" for n in names), file=out)
    for d in results[names[0]]:
        cells = [results[n][d] for n in names]
        print(f"{d:>2}  " + "  ".join(f"{c['precision']:6.3f} {c['recall']:6.3f} {c['f1']:6.3f} {c['wasted']:6.3f}   "
                                      for c in cells), file=out)
    print(f"wasted: share of the copies at probability >= {COPY_THRESHOLD} (the planner's busy-link threshold) "
          f"that the target layer did not use", file=out)


def _jsonable(results: dict) -> dict:
    return {name: {str(d): v for d, v in per_d.items()} for name, per_d in results.items()}


def run_train(args: argparse.Namespace) -> int:
    from prefetch.training import compare, holdout_split, train_learned

    out = sys.stderr if args.json else sys.stdout
    routing = load_routing(args.traces, hidden=args.use_hidden)
    _n, layers, top_k = routing.experts.shape
    if args.lookahead >= layers:
        raise ValueError(f"--lookahead {args.lookahead} needs more than {layers} MoE layers")
    held = holdout_split(routing.request, args.holdout)
    train, test = routing.take(~held), routing.take(held)
    print(f"training on {int((~held).sum())} rows ({len(np.unique(train.request))} requests), "
          f"holding out {int(held.sum())} rows ({len(np.unique(test.request))} requests); "
          f"{layers} MoE layers, {routing.num_experts} experts, top-{top_k}, lookahead {args.lookahead}", file=out)

    def progress(info: dict) -> None:
        val = "" if info["val_loss"] is None else \
            f"  val loss {info['val_loss']:.4f}  val F1@1 {info['val_f1']:.3f}  (best epoch {info['best_epoch']})"
        print(f"epoch {info['epoch']}/{info['epochs']}  loss {info['loss']:.4f}{val}  ({info['seconds']:.1f} s)",
              file=out, flush=True)

    t0 = time.perf_counter()
    model = train_learned(train.experts, train.request, routing.num_experts, args.lookahead, width=args.width,
                          history=args.history, epochs=args.epochs, patience=args.patience,
                          validation=args.validation, lr=args.lr, batch_rows=args.batch_rows, seed=args.seed,
                          phase=train.phase, hidden=train.hidden, tokens=train.tokens,
                          token_vocab=args.token_vocab, progress=progress)
    results = None
    if len(test.request):
        results = compare(model, test.experts, test.request, args.lookahead, phase=test.phase,
                          hidden=test.hidden, rows=scored_rows(test, args.phase), tokens=test.tokens)
        print(f"held-out ({args.phase} rows):", file=out)
        _table(results, out)
    model.meta = {
        "heldout": None if results is None else {str(d): v for d, v in results["learned"].items()},
        "baselines": None if results is None else _jsonable({k: results[k] for k in ("prev", "freq")}),
        "train": {"traces": [os.path.basename(p) for p in args.traces], "rows": int((~held).sum()),
                  "heldout_rows": int(held.sum()), "holdout": args.holdout, "epochs": args.epochs,
                  "patience": args.patience, "validation": args.validation, "width": args.width,
                  "history": args.history, "token_vocab": model.token_vocab, "batch_rows": args.batch_rows,
                  "seed": args.seed, "lr": args.lr,
                  "phase": args.phase, "seconds": round(time.perf_counter() - t0, 2), **model.meta["fit"]},
    }
    model.save(args.out)
    print(f"saved {args.out}", file=out)
    if args.json:
        print(json.dumps({"predictor": args.out, "lookahead": args.lookahead,
                          "results": None if results is None else _jsonable(results)}))
    return 0


def run_eval(args: argparse.Namespace) -> int:
    from prefetch.learned import LearnedModel
    from prefetch.training import compare, holdout_split

    out = sys.stderr if args.json else sys.stdout
    model = LearnedModel.load(args.predictor)
    routing = load_routing(args.trace, hidden=bool(model.hidden_size))
    _n, layers, top_k = routing.experts.shape
    if (layers, top_k, routing.num_experts) != (model.num_layers, model.top_k, model.num_experts):
        raise ValueError(f"trace has (layers, top_k, experts) = {(layers, top_k, routing.num_experts)}, the "
                         f"predictor was trained for {(model.num_layers, model.top_k, model.num_experts)}")
    lookahead = model.lookahead if args.lookahead is None else args.lookahead
    if lookahead > model.lookahead:
        raise ValueError(f"--lookahead {lookahead}: the predictor was trained for {model.lookahead}")
    if args.holdout:
        routing = routing.take(holdout_split(routing.request, args.holdout))
    if model.token_vocab and routing.tokens is None:
        print("note: the trace has no token ids; the predictor's token part is not used", file=out)
    results = compare(model, routing.experts, routing.request, lookahead, phase=routing.phase,
                      hidden=routing.hidden, rows=scored_rows(routing, args.phase), tokens=routing.tokens)
    print(f"{args.predictor} on {len(routing.request)} rows ({args.phase} rows scored):", file=out)
    _table(results, out)
    if args.json:
        print(json.dumps({"predictor": args.predictor, "traces": args.trace, "rows": len(routing.request),
                          "lookahead": lookahead, "results": _jsonable(results)}))
    return 0
