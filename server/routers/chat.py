"""``POST /v1/chat/completions``."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response, StreamingResponse

from server import serving
from server.protocol import (
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatResponseMessage,
    ChatStreamChoice,
    DeltaMessage,
    ErrorResponse,
    random_id,
)

router = APIRouter()

ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 404, 429, 503)}


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses=ERRORS,
             dependencies=[Depends(serving.check_api_key)])
async def create_chat_completion(body: ChatCompletionRequest, request: Request):
    serving.ready_scheduler(request)
    model = serving.check_model(request, body.model)
    engine = request.app.state.engine
    prompt_ids = serving.chat_prompt_ids(engine.tokenizer, body)
    params = serving.prepare(request, body, [prompt_ids], None, body.requested_max_tokens())
    request_id = random_id("chatcmpl")
    streams = serving.submit(request, request_id, [prompt_ids], params)
    created = serving.now_s()

    if body.stream:
        def chunk(choices, usage=None) -> ChatCompletionChunk:
            return ChatCompletionChunk(id=request_id, created=created, model=model, choices=choices, usage=usage)

        def start():
            return [chunk([ChatStreamChoice(index=i, delta=DeltaMessage(role="assistant", content=""))])
                    for i in range(body.n)]

        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        events = serving.stream_events(
            streams, body.n, include_usage, start,
            delta=lambda i, text: chunk([ChatStreamChoice(index=i, delta=DeltaMessage(content=text))]),
            finish=lambda i, reason: chunk([ChatStreamChoice(index=i, delta=DeltaMessage(), finish_reason=reason)]),
            usage_chunk=lambda usage: chunk([], usage))
        return StreamingResponse(events, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    results = await serving.collect(request, streams)
    if any(r.finish_reason is None for r in results):
        return Response(status_code=499)  # the client left; nobody reads this (nginx's "client closed")
    return ChatCompletionResponse(
        id=request_id, created=created, model=model, usage=serving.usage_of(results, body.n),
        choices=[ChatChoice(index=i, message=ChatResponseMessage(content=r.text), finish_reason=r.finish_reason)
                 for i, r in enumerate(results)])
