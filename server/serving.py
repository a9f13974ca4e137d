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
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request

from engine.generation import SamplingParams
from server import tools as tools_mod
from server.errors import APIError, error_body
from server.protocol import ChatCompletionRequest, CompletionRequest, SamplingFields, UsageInfo
from server.scheduler import KVBudgetError, QueueFullError, Scheduler, SequenceStream

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


def is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_admin(request: Request) -> None:
    """Admin routes: the API key when one is set; refused off loopback without one."""
    settings = request.app.state.settings
    if settings.api_key:
        check_api_key(request)
    elif not is_loopback(settings.host):
        raise APIError(403, f"admin routes are disabled: the server listens on {settings.host} without an API "
                       "key; start it with --api-key (or $MOEPAGER_API_KEY), or bind to 127.0.0.1",
                       reason="forbidden")


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


def chat_template(request: Request) -> str | None:
    """The template in effect: ``--chat-template`` if given, else the tokenizer's."""
    override = request.app.state.settings.chat_template
    tokenizer = request.app.state.engine.tokenizer
    return override or getattr(tokenizer, "chat_template", None)


def render_chat(tokenizer: Any, template: str | None, messages: list[Any], tools: list[dict] | None = None,
                add_generation_prompt: bool = True) -> list[int]:
    """Token ids of a conversation, through the chat template."""
    _require_tokenizer(tokenizer, "chat messages")
    try:
        history = [tools_mod.history_message(m) for m in messages]
    except ValueError as exc:
        raise APIError(400, str(exc), param="messages") from None
    if template:
        kwargs: dict[str, Any] = {"chat_template": template}
        if tools:
            kwargs["tools"] = tools
        try:
            text = tokenizer.apply_chat_template(history, add_generation_prompt=add_generation_prompt,
                                                 tokenize=False, **kwargs)
        except Exception as exc:  # noqa: BLE001 - templates raise jinja errors for bad conversations
            raise APIError(400, f"chat template rejected the messages: {exc}", param="messages") from None
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if tools:
        raise APIError(400, "this model has no chat template, so it cannot be given tools", param="tools")
    # Models without a chat template (random test models): a plain "role: content" transcript.
    text = "".join(f"{m['role']}: {m['content']}\n" for m in history)
    if add_generation_prompt:
        text += "assistant:"
    return list(tokenizer(text)["input_ids"])


def chat_prompt_ids(request: Request, body: ChatCompletionRequest) -> list[int]:
    tokenizer = request.app.state.engine.tokenizer
    _require_tokenizer(tokenizer, "chat messages")
    template = chat_template(request)
    return render_chat(tokenizer, template, body.messages, tools_mod.template_tools(template, body))


def completion_prompts(tokenizer: Any, body: CompletionRequest, vocab_size: int) -> list[list[int]]:
    prompt = body.prompt
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
        prompt = [prompt]
    if isinstance(prompt, list) and prompt and all(isinstance(t, list) for t in prompt):
        for ids in prompt:
            bad = [t for t in ids if not 0 <= t < vocab_size]
            if bad:
                raise APIError(400, f"token id {bad[0]} is out of range [0, {vocab_size})", param="prompt")
        return [list(ids) for ids in prompt]
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


def logit_bias(body: SamplingFields, vocab: int) -> dict[int, float]:
    bias = {}
    for key, value in (body.logit_bias or {}).items():
        token = int(key)
        if token >= vocab:
            raise APIError(400, f"logit_bias: token id {token} is out of range [0, {vocab})", param="logit_bias")
        bias[token] = value
    return bias


def prepare(request: Request, body: SamplingFields, prompts: list[list[int]], default_max_tokens: int | None,
            requested_max_tokens: int | None, *, logprobs: int | None = None, prompt_logprobs: int | None = None,
            constraint: Any = None) -> list[list[Any]]:
    scheduler: Scheduler = request.app.state.scheduler
    bias = logit_bias(body, vocab_size(request.app.state.engine))
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
        scoring_only = requested_max_tokens == 0
        if len(prompt_ids) > max_len or (len(prompt_ids) == max_len and not scoring_only):
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
                                      "ignore_eos": body.ignore_eos, "logit_bias": bias, "logprobs": logprobs,
                                      "prompt_logprobs": prompt_logprobs, "constraint": constraint}
            for name in ("min_p", "presence_penalty", "frequency_penalty", "repetition_penalty"):
                if getattr(body, name) is not None:
                    kwargs[name] = getattr(body, name)
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
    except KVBudgetError as exc:
        raise APIError(400, str(exc), param="max_tokens", reason="kv_budget") from None


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
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[tuple[int, float, list]] = field(default_factory=list)  # (token, logprob, top)
    prompt_logprobs: list | None = None

    def add(self, event: Any) -> None:
        self.text += event.text
        self.prompt_tokens = event.num_prompt_tokens
        self.completion_tokens = event.num_generated_tokens
        if event.token_id is not None:
            self.token_ids.append(event.token_id)
            if event.logprob is not None:
                self.logprobs.append((event.token_id, event.logprob, event.top_logprobs or []))
        if event.prompt_logprobs is not None:
            self.prompt_logprobs = event.prompt_logprobs
        if event.finished:
            self.finish_reason = event.finish_reason


async def collect(request: Request, streams: list[SequenceStream]) -> list[ChoiceResult]:
    """Run all sequences to completion; abort them if the client disconnects first."""
    results = [ChoiceResult() for _ in streams]

    async def consume() -> None:
        async for index, event in merged_events(streams):
            results[index].add(event)

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
                        start: Callable[[], list[Any]], delta: Callable[[int, Any], list[Any]],
                        finish: Callable[[int, str], list[Any]], usage_chunk: Callable[[UsageInfo], Any]
                        ) -> AsyncIterator[str]:
    """SSE body: opening chunks, deltas, the finish chunks of each choice, usage, [DONE].

    ``delta(index, event)`` and ``finish(index, reason)`` return the chunks to send (maybe none).
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
                for chunk in delta(index, event):
                    yield sse(chunk)
                if event.finished:
                    for chunk in finish(index, event.finish_reason):
                        yield sse(chunk)
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


# ---- structured output --------------------------------------------------------------------
def grammar_constraint(request: Request, grammar: Any, param: str) -> Any:
    """A compiled grammar for the sampler (``engine.grammar``); 400 naming ``param`` if it fails."""
    from engine.generation import eos_token_ids
    from engine.grammar import GrammarError, GrammarFactory

    engine = request.app.state.engine
    _require_tokenizer(engine.tokenizer, param)
    try:
        return GrammarFactory(engine.tokenizer, grammar(), vocab_size(engine),
                              eos_token_ids(engine.model, engine.tokenizer))
    except ImportError:
        raise APIError(400, f"{param} needs the llguidance package (pip install 'moepager[server]')",
                       param=param) from None
    except (GrammarError, ValueError, TypeError, RuntimeError) as exc:
        raise APIError(400, f"{param}: the grammar cannot be built: {exc}", param=param) from None


def chat_constraint(request: Request, body: ChatCompletionRequest) -> Any:
    """The grammar a chat request asks for: a forced tool call or a response format; or None."""
    from engine import grammar

    forced = tools_mod.forced_tools(body)
    fmt = body.response_format
    wants_json = fmt is not None and fmt.type != "text"
    if forced is not None and wants_json:
        raise APIError(400, "response_format cannot be combined with tool_choice 'required' or a named "
                       "function (the output must be a tool call)", param="response_format")
    if forced is not None:
        specs, multiple = forced
        return grammar_constraint(request, lambda: grammar.tool_call_grammar(specs, multiple), "tool_choice")
    if wants_json:
        schema = fmt.json_schema.schema_ if fmt.type == "json_schema" else None
        if fmt.type == "json_schema" and schema is None:
            schema = {}
        return grammar_constraint(request, lambda: grammar.json_schema_grammar(schema), "response_format")
    return None


def prompt_text(tokenizer: Any, body: CompletionRequest, index: int, prompt_ids: list[int]) -> str:
    """The prompt as text, for ``echo``: the string sent, or the decoded token ids."""
    if isinstance(body.prompt, str):
        return body.prompt
    if isinstance(body.prompt, list) and body.prompt and isinstance(body.prompt[index], str):
        return body.prompt[index]
    if tokenizer is None:
        return ""
    return tokenizer.decode(prompt_ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
