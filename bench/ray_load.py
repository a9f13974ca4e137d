"""Load test of the Ray Serve app on this machine: throughput and TTFT for 1 and 2 replicas.

Starts a local Ray instance, deploys ``deploy.ray.app`` with each replica layout in turn
(``replicas x cpus``, the same CPUs in total), and runs N concurrent streaming chat clients per
level, each client its own conversation (``X-Conversation-Id``) with its own prompt, several
turns each; ``--same-prompt`` sends every client the same prompt with no conversation id (all
requests share one prefix key: the worst case for affinity routing).

    python -m bench.ray_load --layouts 1x2,2x1 --concurrency 16,32 --out bench/results/ray_load.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import sys
import time
from pathlib import Path

import httpx

from bench.serve_load import RequestResult, one_request, percentile

ROOT = Path(__file__).resolve().parents[1]


async def _one(client: httpx.AsyncClient, url: str, body: dict, headers: dict) -> tuple[RequestResult, str]:
    result = await one_request(client, url, body, headers)
    return result, result.headers.get("x-moepager-replica", "")


async def run_level(base: str, clients: int, turns: int, max_tokens: int, same_prompt: bool) -> dict:
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=clients + 4)) as client:
        async def conversation(c: int) -> list[tuple[RequestResult, str]]:
            out = []
            messages = []
            for t in range(turns):
                text = "Tell me a story." if same_prompt else f"Client {c}, turn {t}: tell me about animal {c}."
                messages = [*messages, {"role": "user", "content": text}]
                body = {"model": "moepager-default", "messages": messages, "max_tokens": max_tokens,
                        "temperature": 0, "ignore_eos": True, "stream": True,
                        "stream_options": {"include_usage": True}}
                headers = {} if same_prompt else {"X-Conversation-Id": f"client-{c}"}
                out.append(await _one(client, base + "/v1/chat/completions", body, headers))
                messages = [*messages, {"role": "assistant", "content": "Once upon a time."}]
            return out

        start = time.perf_counter()
        per_client = await asyncio.gather(*(conversation(c) for c in range(clients)))
        wall = time.perf_counter() - start
    results = [r for rs in per_client for r, _ in rs]
    ok = [r for r in results if r.error is None]
    ttft = [r.ttft_s for r in ok if r.ttft_s is not None]
    itl = [x for r in ok for x in r.itl_s]
    tokens = sum(r.output_tokens for r in ok)
    moved = sum(len({rep for _, rep in rs}) > 1 for rs in per_client)
    return {"clients": clients, "requests": len(results), "errors": len(results) - len(ok),
            "ttft_p50_s": percentile(ttft, 50), "ttft_p99_s": percentile(ttft, 99),
            "itl_mean_s": statistics.fmean(itl) if itl else None, "output_tokens": tokens, "wall_s": wall,
            "output_tokens_per_s": tokens / wall if wall else 0.0,
            "replicas_used": len({rep for rs in per_client for _, rep in rs}),
            "conversations_that_moved": moved}


def run_layout(replicas: int, cpus: float, levels: list[int], turns: int, max_tokens: int,
               same_prompt: bool) -> list[dict]:
    import ray
    from ray import serve

    from deploy.ray.app import build_app

    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    ray.init(num_cpus=int(replicas * cpus), include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": path, "TOKENIZERS_PARALLELISM": "false"}})
    try:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app({"num_replicas": replicas, "replica_cpus": cpus,
                             "serve_args": ["--device", "cpu", "--max-num-seqs", "16", "--max-queued", "48"]}),
                  name="moepager", route_prefix="/")
        base = f"http://127.0.0.1:{port}"
        rows = []
        for clients in levels:
            row = asyncio.run(run_level(base, clients, turns, max_tokens, same_prompt))
            rows.append({"layout": f"{replicas}x{cpus:g}cpu", **row})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
        return rows
    finally:
        serve.shutdown()
        ray.shutdown()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layouts", default="1x2,2x1", help="REPLICASxCPUS, comma-separated")
    ap.add_argument("--concurrency", default="16,32")
    ap.add_argument("--turns", type=int, default=2, help="turns per client conversation")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--same-prompt", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    levels = [int(x) for x in args.concurrency.split(",")]
    rows = []
    for layout in args.layouts.split(","):
        replicas, cpus = layout.split("x")
        rows += run_layout(int(replicas), float(cpus), levels, args.turns, args.max_tokens, args.same_prompt)
    print(f"{'layout':>10} {'clients':>7} {'reqs':>5} {'err':>4} {'TTFT p50':>9} {'TTFT p99':>9} {'tok/s':>7} "
          f"{'replicas':>8} {'moved':>5}")
    for r in rows:
        print(f"{r['layout']:>10} {r['clients']:>7} {r['requests']:>5} {r['errors']:>4} "
              f"{(r['ttft_p50_s'] or 0) * 1000:>8.0f}ms {(r['ttft_p99_s'] or 0) * 1000:>7.0f}ms "
              f"{r['output_tokens_per_s']:>7.1f} {r['replicas_used']:>8} {r['conversations_that_moved']:>5}")
    if args.out:
        meta = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "turns": args.turns,
                "max_tokens": args.max_tokens, "same_prompt": args.same_prompt, "cpus": os.cpu_count(),
                "command": "python -m bench.ray_load " + " ".join(argv if argv is not None else sys.argv[1:])}
        Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    return 0 if all(r["errors"] == 0 for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
