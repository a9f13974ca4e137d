"""Load test for a running ``moepager serve``: N concurrent streaming clients per level.

For each concurrency level (default 1, 4, 16, 32) it runs ``--requests-per-client`` streaming
completions per client and reports TTFT p50/p99, inter-token latency p50/p99 and output
tokens/s; prints a table and writes JSON with ``--out``. ``--structured json_object`` (or
``json_schema``) sends chat requests with that ``response_format`` instead, so the grammar
mask is on the sampling path; those requests stop when the JSON document is complete.

    python -m bench.serve_load --url http://127.0.0.1:8000 --out serve_load.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from dataclasses import dataclass, field

import httpx


@dataclass
class RequestResult:
    ttft_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    output_tokens: int = 0
    error: str | None = None
    headers: dict[str, str] = field(default_factory=dict)  # the response's headers (e.g. which replica served)


STRUCTURED = {
    "json_object": {"type": "json_object"},
    "json_schema": {"type": "json_schema", "json_schema": {"name": "story", "strict": True, "schema": {
        "type": "object", "additionalProperties": False, "required": ["title", "tags"],
        "properties": {"title": {"type": "string", "maxLength": 80},
                       "tags": {"type": "array", "items": {"type": "string", "maxLength": 16}, "maxItems": 4}}}}},
}


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


async def one_request(client: httpx.AsyncClient, url: str, body: dict,
                      headers: dict[str, str] | None = None) -> RequestResult:
    result = RequestResult()
    start = time.perf_counter()
    last = None
    try:
        async with client.stream("POST", url, json=body, headers=headers) as response:
            result.headers = dict(response.headers)
            if response.status_code != 200:
                result.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    result.error = chunk["error"].get("message", "error")
                    return result
                if chunk.get("usage"):
                    result.output_tokens = chunk["usage"]["completion_tokens"]
                choices = chunk.get("choices")
                if not choices or not (choices[0].get("text") or (choices[0].get("delta") or {}).get("content")):
                    continue
                now = time.perf_counter()
                if last is None:
                    result.ttft_s = now - start
                else:
                    result.itl_s.append(now - last)
                last = now
    except httpx.HTTPError as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    return result


async def run_level(base: str, concurrency: int, requests_per_client: int, body: dict, api_key: str | None,
                    timeout_s: float, path: str = "/v1/completions") -> dict:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=timeout_s, headers=headers, limits=limits) as client:
        async def client_loop() -> list[RequestResult]:
            return [await one_request(client, base + path, body) for _ in range(requests_per_client)]

        start = time.perf_counter()
        per_client = await asyncio.gather(*(client_loop() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    results = [r for rs in per_client for r in rs]
    ok = [r for r in results if r.error is None]
    ttft = [r.ttft_s for r in ok if r.ttft_s is not None]
    itl = [x for r in ok for x in r.itl_s]
    tokens = sum(r.output_tokens for r in ok)
    return {
        "concurrency": concurrency,
        "requests": len(results),
        "errors": len(results) - len(ok),
        "first_error": next((r.error for r in results if r.error), None),
        "ttft_p50_s": percentile(ttft, 50), "ttft_p99_s": percentile(ttft, 99),
        "itl_p50_s": percentile(itl, 50), "itl_p99_s": percentile(itl, 99),
        "itl_mean_s": statistics.fmean(itl) if itl else None,
        "output_tokens": tokens, "wall_s": wall, "output_tokens_per_s": tokens / wall if wall > 0 else 0.0,
    }


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.1f}"


def print_table(rows: list[dict]) -> None:
    print(f"{'clients':>7} {'reqs':>5} {'err':>4} {'TTFT p50':>9} {'TTFT p99':>9} {'ITL p50':>8} {'ITL p99':>8} "
          f"{'tok/s':>8}   (latencies in ms)")
    for r in rows:
        print(f"{r['concurrency']:>7} {r['requests']:>5} {r['errors']:>4} {_ms(r['ttft_p50_s']):>9} "
              f"{_ms(r['ttft_p99_s']):>9} {_ms(r['itl_p50_s']):>8} {_ms(r['itl_p99_s']):>8} "
              f"{r['output_tokens_per_s']:>8.1f}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", default="http://127.0.0.1:8000", help="base URL of the server")
    p.add_argument("--concurrency", default="1,4,16,32", help="comma-separated client counts")
    p.add_argument("--requests-per-client", type=int, default=4)
    p.add_argument("--prompt", default="Once upon a time, in a land far away,")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--model", default=None, help="model id (default: the server's first)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--timeout", type=float, default=600.0, help="per-request timeout, seconds")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--structured", default="none", choices=("none", "json_object", "json_schema"),
                   help="chat requests with this response_format (the grammar mask on) instead of completions")
    args = p.parse_args(argv)

    levels = [int(x) for x in args.concurrency.split(",") if x.strip()]
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    try:
        models = httpx.get(args.url + "/v1/models", headers=headers, timeout=30).json()["data"]
    except (httpx.HTTPError, KeyError, ValueError) as exc:
        print(f"serve_load: cannot reach {args.url}/v1/models: {exc}", file=sys.stderr)
        return 2
    model = args.model or models[0]["id"]
    body = {"model": model, "prompt": args.prompt, "max_tokens": args.max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    path = "/v1/completions"
    if args.structured != "none":
        path = "/v1/chat/completions"
        body = {"model": model, "messages": [{"role": "user", "content": args.prompt}], "stream": True,
                "max_tokens": args.max_tokens, "temperature": 0, "stream_options": {"include_usage": True},
                "response_format": STRUCTURED[args.structured]}
    rows = [asyncio.run(run_level(args.url, n, args.requests_per_client, body, args.api_key, args.timeout, path))
            for n in levels]
    print_table(rows)
    report = {"url": args.url, "model": model, "max_tokens": args.max_tokens, "prompt": args.prompt,
              "structured": args.structured,
              "requests_per_client": args.requests_per_client, "cache_policy": models[0].get("cache_policy"),
              "levels": rows}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {args.out}")
    return 0 if all(r["errors"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
