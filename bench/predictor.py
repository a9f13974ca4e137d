"""The learned expert predictor against its direct part alone and the baselines, over several regimes.

    python -m bench.predictor [--regimes mixed,crosslayer,topics] [--tokens 220000] [--traces T ...]
                              [--cache DIR] [--out bench/results/predictor.json]

Cases: synthetic regimes of ``traces.synth`` at the DeepSeek-V2-Lite shape (26
MoE layers, 64 experts, top-6; about ``--tokens`` rows, cached under ``--cache``
because generating them takes minutes) and the shipped traces. Each is split by
request: the last ``--holdout`` share is never trained on and is where every
predictor is scored (decode rows). Predictors:

- ``direct``: the learned model's direct part alone (``width`` 0, ``history`` 1):
  the per-(layer, distance) logistic units over the current token's experts at
  l, l-1 and the previous token's at l+d, l+d-1, as the predictor was before the
  path part; trained by the same trainer;
- ``learned``: the full model at the ``moepager predictor train`` defaults;
- ``prev`` and ``freq``: the baselines (prefetch/training.py).

Reported per case and predictor: precision / recall / F1 at lookahead 1 and 2,
the wasted share and coverage at the planner's busy-link threshold
(probability >= 0.5), training seconds and epochs (run / best), and the live
predictor's latency: ``LearnedPredictor.predict(layer)`` at T=1 (one decode
token), mean microseconds per call, over held-out decode rows replayed layer by
layer (``observe`` is timed separately).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch

from bench.policy_table import run_info, write_report
from prefetch.learned import LearnedPredictor
from prefetch.training import (
    decode_rows,
    evaluate,
    freq_baseline,
    holdout_split,
    prev_baseline,
    routing_shares,
    train_learned,
)
from traces.format import Trace, load_trace, save_trace
from traces.synth import regime, synth_trace

SHAPE = {"layers": 26, "experts": 64, "top_k": 6}  # DeepSeek-V2-Lite's routed experts
# direct: the direct part alone; path: with the path part; learned: with the token part too (when the
# trace carries token ids; else the same model as path)
VARIANTS = {"direct": {"width": 0, "history": 1, "token_vocab": 0}, "path": {"token_vocab": 0}, "learned": {}}


def synth_case(name: str, tokens: int, seed: int, cache: Path | None) -> Trace:
    """A regime at the DeepSeek-V2-Lite shape with about ``tokens`` rows (144 per request on average)."""
    cfg = regime(name, seed=seed, requests=max(1, round(tokens / 144)), **SHAPE)
    path = None if cache is None else cache / f"synth_{name}_s{seed}_{cfg.requests}r.safetensors"
    if path is not None and path.is_file():
        return load_trace(path, hidden=False)
    trace = synth_trace(cfg)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_trace(path, trace)
    return trace


def predict_latency(model, experts: np.ndarray, request: np.ndarray, lookahead: int, rows: int = 200,
                    tokens: np.ndarray | None = None) -> dict:
    """Mean microseconds per ``observe`` and per ``predict`` call at T=1, replaying ``rows`` rows (a step's
    ``observe_tokens`` counts towards its first ``observe``)."""
    live = LearnedPredictor(lookahead=lookahead, model=model)
    t_obs = t_pred = 0.0
    calls = 0
    for i in range(min(rows, len(request))):
        if i == 0 or request[i] != request[i - 1]:
            live.begin_request()
        live.reset()
        for layer in range(experts.shape[1]):
            idx = torch.from_numpy(experts[i, layer][None])
            t0 = time.perf_counter()
            if layer == 0 and tokens is not None:
                live.observe_tokens(tokens[i:i + 1])
            live.observe(layer, None, idx)
            t1 = time.perf_counter()
            live.predict(layer)
            t_pred += time.perf_counter() - t1
            t_obs += t1 - t0
            calls += 1
    return {"observe_us": t_obs / calls * 1e6, "predict_us": t_pred / calls * 1e6, "calls": calls}


def run_case(label: str, trace: Trace, holdout: float, lookahead: int, seed: int) -> dict:
    experts = trace.experts.astype(np.int64)
    request, phase = trace.request.astype(np.int64), trace.phase
    tokens = None if trace.tokens is None else trace.tokens.astype(np.int64)
    held = holdout_split(request, holdout)
    test = (experts[held], request[held], phase[held])
    rows = decode_rows(test[2], int(held.sum()))
    case = {"case": label, "rows": len(request), "train_rows": int((~held).sum()),
            "heldout_rows": int(held.sum()), "layers": trace.num_layers, "experts": trace.num_experts,
            "top_k": trace.top_k, "predictors": {}}
    print(f"{label}: {case['train_rows']} training rows, {case['heldout_rows']} held out", flush=True)

    def progress(info: dict) -> None:
        val = "" if info["val_loss"] is None else f" val {info['val_loss']:.4f} F1@1 {info['val_f1']:.3f}"
        print(f"  epoch {info['epoch']}: loss {info['loss']:.4f}{val} ({info['seconds']:.1f} s)", flush=True)

    for name, kw in VARIANTS.items():
        t0 = time.perf_counter()
        model = train_learned(experts[~held], request[~held], trace.num_experts, lookahead, seed=seed,
                              phase=phase[~held], tokens=None if tokens is None else tokens[~held],
                              progress=progress, **kw)
        seconds = time.perf_counter() - t0
        decode = np.flatnonzero(rows)
        case["predictors"][name] = {
            "scores": evaluate(model, test[0], test[1], lookahead, phase=test[2], rows=rows,
                               tokens=None if tokens is None else tokens[held]), "train_seconds": seconds,
            **model.meta["fit"], "latency": predict_latency(model, test[0][decode], test[1][decode], lookahead,
                                       tokens=None if tokens is None else tokens[held][decode]),
            "params": sum(p.numel() for p in model.parameters())}
        print(f"  {name}: {seconds:.0f} s, F1@1 {case['predictors'][name]['scores'][1]['f1']:.3f}", flush=True)
    shares = routing_shares(experts[~held], trace.num_experts)
    for name, fn in (("prev", prev_baseline), ("freq", freq_baseline(shares))):
        case["predictors"][name] = {"scores": evaluate(fn, test[0], test[1], lookahead, phase=test[2], rows=rows)}
    return case


def _fmt_row(case: str, name: str, p: dict) -> str:
    s1, s2 = p["scores"][1], p["scores"].get(2, {"f1": float("nan")})
    train = f"{p['train_seconds']:7.1f} {p['epochs_run']:>3}/{p['best_epoch']:<3}" if "train_seconds" in p \
        else f"{'':7} {'':7}"
    lat = f"{p['latency']['predict_us']:8.1f}" if "latency" in p else f"{'':8}"
    return (f"{case:<24} {name:<8} {s1['precision']:6.3f} {s1['recall']:6.3f} {s1['f1']:6.3f} {s2['f1']:6.3f} "
            f"{s1['wasted']:7.3f} {s1['covered']:7.3f} {train} {lat}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--regimes", default="mixed,crosslayer,topics")
    ap.add_argument("--tokens", type=int, default=220_000, help="rows per synthetic trace (default 220000)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--traces", nargs="*", default=["tests/data/trace_heldout.safetensors",
                                                    "tests/data/trace_chat.safetensors"])
    ap.add_argument("--holdout", type=float, default=0.1, help="last share of requests scored (default 0.1)")
    ap.add_argument("--lookahead", type=int, default=2)
    ap.add_argument("--cache", default="/tmp/moepager_synth", help="where generated traces are kept")
    ap.add_argument("--out", default="bench/results/predictor.json")
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)
    cases = []
    for name in [r for r in args.regimes.split(",") if r]:
        t0 = time.perf_counter()
        trace = synth_case(name, args.tokens, args.seed, Path(args.cache) if args.cache else None)
        print(f"synth {name}: {trace.num_rows} rows ({time.perf_counter() - t0:.0f} s)", flush=True)
        cases.append(run_case(f"synth {name}", trace, args.holdout, args.lookahead, args.seed))
    for path in args.traces:
        trace = load_trace(path, hidden=False)
        # The shipped traces have few requests: hold out the same 20 % as bench/prefetch_table.py.
        cases.append(run_case(os.path.basename(path).split(".")[0], trace, max(args.holdout, 0.2),
                              args.lookahead, args.seed))
    header = (f"{'case':<24} {'pred':<8} {'P@1':>6} {'R@1':>6} {'F1@1':>6} {'F1@2':>6} {'wasted':>7} "
              f"{'covered':>7} {'train_s':>7} {'ep/best':<7} {'pred_us':>8}")
    print(header)
    for case in cases:
        for name, p in case["predictors"].items():
            print(_fmt_row(case["case"], name, p))
    print("wasted / covered at lookahead 1: copies at probability >= 0.5 (the planner's busy-link threshold); "
          "pred_us: LearnedPredictor.predict per layer at T=1")
    write_report(args.out, {**run_info(argv), "args": vars(args), "cases": cases})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
