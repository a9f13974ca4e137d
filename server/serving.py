"""Serving logic shared by the chat and completions routers: checks, prompt building,
sampling parameters, and turning token events into OpenAI responses or SSE chunks.

Every limit (model name, prompt length, max_tokens vs max_model_len, n, stop count, token
ids) is checked here before the scheduler sees the request, so bad input is a 400 and an
absurd ``max_tokens`` never reaches the engine.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import Request

from engine.generation import SamplingParams
from server.errors import APIError, error_body
from server.protocol import ChatCompletionRequest, CompletionRequest, SamplingFields, UsageInfo
from server.scheduler import QueueFullError, Scheduler, SequenceStream

DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
DISCONNECT_POLL_S = 0.25


# ---- app state ----------------------------------------------------------------------------
def ready_scheduler(request: Request) -> Scheduler:
    """The scheduler, or 503 while the model loads or the server drains."""
    state = request.app.state
    if state.draining:
        raise APIError(503, "server is shutting down", headers={"Retry-After": "5"})
    if state.scheduler is None:
        message = f"model failed to load: {state.load_error}" if state.load_error else "model is loading"
        raise APIError(503, message, headers={"Retry-After": "5"})
    return state.scheduler


def check_api_key(request: Request) -> None:
    key = request.app.state.settings.api_key
    if not key:
        return
    auth = request.headers.get("authorization", "")
    given = auth[7:].strip() if auth.lower().startswith("bearer ") else request.headers.get("x-api-key")
    if given != key:
        raise APIError(401, "invalid or missing API key (send 'Authorization: Bearer KEY')")


def served_model_name(request: Request) -> str:
    state = request.app.state
    return state.settings.served_model_name or getattr(state.engine, "model_name", None) or "moepager"


def check_model(request: Request, model: str | None) -> str:
    name = served_model_name(request)
    if model is not None and model != name:
        raise APIError(404, f"the model {model!r} does not exist; this server serves {name!r}",
                       param="model", code="model_not_found")
    return name


# ---- prompts ------------------------------------------------------------------------------
def _require_tokenizer(tokenizer: Any, what: str) -> None:
    if tokenizer is None:
        raise APIError(400, f"this model has no tokenizer, so {what} cannot be used; send token ids to "
                       "/v1/completions", param="prompt")


def chat_prompt_ids(tokenizer: Any, body: ChatCompletionRequest) -> list[int]:
    _require_tokenizer(tokenizer, "chat messages")
    try:
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in body.messages]
    except ValueError as exc:
        raise APIError(400, str(exc), param="messages") from None
    if getattr(tokenizer, "chat_template", None):
        try:
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception as exc:  # noqa: BLE001 - templates raise jinja errors for bad conversations
            raise APIError(400, f"chat template rejected the messages: {exc}", param="messages") from None
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    # Models without a chat template (random test models): a plain "role: content" transcript.
    text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
    return list(tokenizer(text)["input_ids"])


def completion_prompts(tokenizer: Any, body: CompletionRequest, vocab_size: int) -> list[list[int]]:
    prompt = body.prompt
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
        bad = [t for t in prompt if not 0 <= t < vocab_size]
        if bad:
            raise APIError(400, f"token id {bad[0]} is out of range [0, {vocab_size})", param="prompt")
        return [list(prompt)]
    texts = [prompt] if isinstance(prompt, str) else list(prompt)
    if texts:
        _require_tokenizer(tokenizer, "text prompts")
    if not texts:
        raise APIError(400, "prompt must not be empty", param="prompt")
    return [list(tokenizer(t)["input_ids"]) for t in texts]


# ---- limits and sampling ------------------------------------------------------------------
def vocab_size(engine: Any) -> int:
    config = getattr(engine.model, "config", None)
    size = getattr(config, "vocab_size", None)
    return int(size) if size else len(engine.tokenizer)


def prepare(request: Request, body: SamplingFields, prompts: list[list[int]], default_max_tokens: int | None,
            requested_max_tokens: int | None) -> list[list[Any]]:
    scheduler: Scheduler = request.app.state.scheduler
    max_len = scheduler.max_model_len
    total = len(prompts) * body.n
    limit = scheduler.max_num_seqs + scheduler.max_queued
    if total > limit:
        raise APIError(400, f"request needs {total} sequences (prompts x n); at most {limit} fit in the queue",
                       param="n")
    if body.stop and request.app.state.engine.tokenizer is None:
        raise APIError(400, "stop strings need a tokenizer and this model has none", param="stop")
    out = []
    for prompt_ids in prompts:
        if not prompt_ids:
            raise APIError(400, "prompt must contain at least one token", param="prompt")
        if len(prompt_ids) >= max_len:
            raise APIError(400, f"prompt has {len(prompt_ids)} tokens; the maximum context length is {max_len} "
                           "and at least one token must be generated", param="prompt",
                           code="context_length_exceeded")
        room = max_len - len(prompt_ids)
        if requested_max_tokens is not None:
            if requested_max_tokens > room:
                raise APIError(400, f"max_tokens={requested_max_tokens} plus the prompt's {len(prompt_ids)} tokens "
                               f"exceeds the maximum context length {max_len}", param="max_tokens",
                               code="context_length_exceeded")
            max_tokens = requested_max_tokens
        else:
            max_tokens = room if default_max_tokens is None else min(default_max_tokens, room)
        per_choice = []
        for i in range(body.n):
            kwargs: dict[str, Any] = {"max_tokens": max_tokens, "stop": body.stop_list(),
                                      "ignore_eos": body.ignore_eos}
            if body.temperature is not None:
                kwargs["temperature"] = body.temperature
            if body.top_p is not None:
                kwargs["top_p"] = body.top_p
            if body.top_k is not None:
                kwargs["top_k"] = max(0, body.top_k)
            if body.seed is not None:
                kwargs["seed"] = (body.seed + i) % 2**63  # n choices: n different, reproducible streams
            try:
                per_choice.append(SamplingParams(**kwargs))
            except (ValueError, TypeError) as exc:
                raise APIError(400, str(exc)) from None
        out.append(per_choice)
    return out


def submit(request: Request, request_id: str, prompts: list[list[int]], params: list[list[Any]]
           ) -> list[SequenceStream]:
    scheduler: Scheduler = request.app.state.scheduler
    items = [(f"{request_id}-{p}-{i}", prompt_ids, sp)
             for p, (prompt_ids, choices) in enumerate(zip(prompts, params)) for i, sp in enumerate(choices)]
    try:
        return scheduler.submit_group(items)
    except QueueFullError as exc:
        raise APIError(429, f"server is busy: {exc}", headers={"Retry-After": "1"}, reason="queue_full") from None


# ---- consuming token events ---------------------------------------------------------------
async def merged_events(streams: list[SequenceStream]) -> AsyncIterator[tuple[int, Any]]:
    """Yield (choice index, event) from all sequences as tokens arrive."""
    if len(streams) == 1:
        async for event in streams[0]:
            yield 0, event
        return
    fan_in: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, stream: SequenceStream) -> None:
        try:
            async for event in stream:
                await fan_in.put((index, event))
        except Exception as exc:  # noqa: BLE001 - forwarded to the consumer
            await fan_in.put((index, exc))
        await fan_in.put((index, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(streams)
        while remaining:
            index, item = await fan_in.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()


def abort_all(streams: list[SequenceStream]) -> None:
    for stream in streams:
        stream.abort()


@dataclass
class ChoiceResult:
    text: str = ""
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


async def collect(request: Request, streams: list[SequenceStream]) -> list[ChoiceResult]:
    """Run all sequences to completion; abort them if the client disconnects first."""
    results = [ChoiceResult() for _ in streams]

    async def consume() -> None:
        async for index, event in merged_events(streams):
            r = results[index]
            r.text += event.text
            r.prompt_tokens = event.num_prompt_tokens
            r.completion_tokens = event.num_generated_tokens
            if event.finished:
                r.finish_reason = event.finish_reason

    async def watch_disconnect() -> None:
        while not await request.is_disconnected():
            await asyncio.sleep(DISCONNECT_POLL_S)

    work = asyncio.create_task(consume())
    watcher = asyncio.create_task(watch_disconnect())
    try:
        done, _ = await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if work in done:
            work.result()  # re-raise an engine failure
        else:
            work.cancel()
    finally:
        watcher.cancel()
        work.cancel()
        abort_all(streams)
    return results


def usage_of(results: list[ChoiceResult], n: int) -> UsageInfo:
    # OpenAI counts each prompt once, however many choices it has.
    prompt = sum(r.prompt_tokens for i, r in enumerate(results) if i % n == 0)
    completion = sum(r.completion_tokens for r in results)
    return UsageInfo(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def sse(payload: Any) -> str:
    """One SSE event. Like OpenAI, chunks carry ``usage`` only when it is set and deltas only
    the keys they change."""
    if hasattr(payload, "model_dump"):
        payload = payload.model_dump()
        if payload.get("usage", 0) is None:
            del payload["usage"]
        for choice in payload.get("choices", ()):
            if isinstance(choice.get("delta"), dict):
                choice["delta"] = {k: v for k, v in choice["delta"].items() if v is not None}
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


async def stream_events(streams: list[SequenceStream], n: int, include_usage: bool,
                        start: Callable[[], list[Any]], delta: Callable[[int, str], Any],
                        finish: Callable[[int, str], Any], usage_chunk: Callable[[UsageInfo], Any]
                        ) -> AsyncIterator[str]:
    """SSE body: opening chunks, content deltas, one finish chunk per choice, usage, [DONE].

    The sequences are aborted if the client goes away (the generator is closed or cancelled).
    """
    results = [ChoiceResult() for _ in streams]
    try:
        for chunk in start():
            yield sse(chunk)
        try:
            async for index, event in merged_events(streams):
                r = results[index]
                r.prompt_tokens = event.num_prompt_tokens
                r.completion_tokens = event.num_generated_tokens
                if event.text:
                    yield sse(delta(index, event.text))
                if event.finished:
                    yield sse(finish(index, event.finish_reason))
        except Exception as exc:  # noqa: BLE001 - the status line is sent; report in-band
            yield sse(error_body(500, f"generation failed: {exc}"))
        else:
            if include_usage:
                yield sse(usage_chunk(usage_of(results, n)))
        yield "data: [DONE]\n\n"
    finally:
        abort_all(streams)


def now_s() -> int:
    return int(time.time())
