"""``POST /v1/chat/completions``: logprobs, tools and structured output included."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response, StreamingResponse

from server import serving
from server import tools as tools_mod
from server.logprobs import TokenTexts, chat_logprobs
from server.protocol import (
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatResponseMessage,
    ChatStreamChoice,
    DeltaFunctionCall,
    DeltaMessage,
    DeltaToolCall,
    ErrorResponse,
    ResponseFunctionCall,
    ResponseToolCall,
    random_id,
)

router = APIRouter()

ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 404, 429, 503)}


def _finish_reason(reason: str | None, calls: list) -> str | None:
    return "tool_calls" if calls and reason == "stop" else reason


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses=ERRORS,
             dependencies=[Depends(serving.check_api_key)])
async def create_chat_completion(body: ChatCompletionRequest, request: Request):
    serving.ready_scheduler(request)
    model = serving.check_model(request, body.model)
    engine = request.app.state.engine
    prompt_ids = serving.chat_prompt_ids(request, body)
    constraint = serving.chat_constraint(request, body)
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    params = serving.prepare(request, body, [prompt_ids], None, body.requested_max_tokens(),
                             logprobs=logprobs, constraint=constraint)
    request_id = random_id("chatcmpl")
    streams = serving.submit(request, request_id, [prompt_ids], params)
    created = serving.now_s()
    texts = TokenTexts(engine.tokenizer)
    with_tools = tools_mod.tools_active(body)

    if body.stream:
        def chunk(choices, usage=None) -> ChatCompletionChunk:
            return ChatCompletionChunk(id=request_id, created=created, model=model, choices=choices, usage=usage)

        def start():
            return [chunk([ChatStreamChoice(index=i, delta=DeltaMessage(role="assistant", content=""))])
                    for i in range(body.n)]

        parsers = [tools_mod.ToolStreamParser(body.parallel_tool_calls) for _ in range(body.n)]

        def tool_deltas(i: int, text: str, calls: list) -> list:
            out = []
            if text:
                out.append(DeltaMessage(content=text))
            first = len(parsers[i].calls) - len(calls)
            for k, call in enumerate(calls):
                out.append(DeltaMessage(tool_calls=[DeltaToolCall(
                    index=first + k, id=call.id, type="function",
                    function=DeltaFunctionCall(name=call.name, arguments=call.arguments))]))
            return out

        def delta(i: int, event) -> list:
            lp = None
            if logprobs is not None and event.token_id is not None and event.logprob is not None:
                lp = chat_logprobs(texts, [(event.token_id, event.logprob, event.top_logprobs or [])])
            if with_tools:
                deltas = tool_deltas(i, *parsers[i].push(event.text))
            else:
                deltas = [DeltaMessage(content=event.text)] if event.text else []
            if lp is not None and not deltas:
                deltas = [DeltaMessage(content="")]
            return [chunk([ChatStreamChoice(index=i, delta=d, logprobs=lp if k == 0 else None)])
                    for k, d in enumerate(deltas)]

        def finish(i: int, reason: str) -> list:
            out = []
            if with_tools:
                rest = parsers[i].flush()
                if rest:
                    out.append(chunk([ChatStreamChoice(index=i, delta=DeltaMessage(content=rest))]))
            reason = _finish_reason(reason, parsers[i].calls)
            out.append(chunk([ChatStreamChoice(index=i, delta=DeltaMessage(), finish_reason=reason)]))
            return out

        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        events = serving.stream_events(streams, body.n, include_usage, start, delta=delta, finish=finish,
                                       usage_chunk=lambda usage: chunk([], usage))
        return StreamingResponse(events, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    results = await serving.collect(request, streams)
    if any(r.finish_reason is None for r in results):
        return Response(status_code=499)  # the client left; nobody reads this (nginx's "client closed")
    choices = []
    for i, r in enumerate(results):
        content, calls = (tools_mod.parse_calls(r.text, body.parallel_tool_calls) if with_tools
                          else (r.text, []))
        message = ChatResponseMessage(content=content, tool_calls=[
            ResponseToolCall(id=c.id, function=ResponseFunctionCall(name=c.name, arguments=c.arguments))
            for c in calls] or None)
        choices.append(ChatChoice(index=i, message=message, finish_reason=_finish_reason(r.finish_reason, calls),
                                  logprobs=chat_logprobs(texts, r.logprobs) if logprobs is not None else None))
    return ChatCompletionResponse(id=request_id, created=created, model=model,
                                  usage=serving.usage_of(results, body.n), choices=choices)
