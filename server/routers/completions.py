"""``POST /v1/completions``: a string, a batch of strings, or token ids."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response, StreamingResponse

from server import serving
from server.protocol import CompletionChoice, CompletionRequest, CompletionResponse, ErrorResponse, random_id

router = APIRouter()

ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 404, 429, 503)}


@router.post("/v1/completions", response_model=CompletionResponse, responses=ERRORS,
             dependencies=[Depends(serving.check_api_key)])
async def create_completion(body: CompletionRequest, request: Request):
    serving.ready_scheduler(request)
    model = serving.check_model(request, body.model)
    engine = request.app.state.engine
    prompts = serving.completion_prompts(engine.tokenizer, body, serving.vocab_size(engine))
    params = serving.prepare(request, body, prompts, serving.DEFAULT_COMPLETION_MAX_TOKENS,
                             body.requested_max_tokens())
    request_id = random_id("cmpl")
    streams = serving.submit(request, request_id, prompts, params)
    created = serving.now_s()

    if body.stream:
        def chunk(choices, usage=None) -> CompletionResponse:
            return CompletionResponse(id=request_id, created=created, model=model, choices=choices, usage=usage)

        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        events = serving.stream_events(
            streams, body.n, include_usage, start=list,
            delta=lambda i, text: chunk([CompletionChoice(index=i, text=text, finish_reason=None)]),
            finish=lambda i, reason: chunk([CompletionChoice(index=i, text="", finish_reason=reason)]),
            usage_chunk=lambda usage: chunk([], usage))
        return StreamingResponse(events, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    results = await serving.collect(request, streams)
    if any(r.finish_reason is None for r in results):
        return Response(status_code=499)  # the client left; nobody reads this (nginx's "client closed")
    return CompletionResponse(
        id=request_id, created=created, model=model, usage=serving.usage_of(results, body.n),
        choices=[CompletionChoice(index=i, text=r.text, finish_reason=r.finish_reason)
                 for i, r in enumerate(results)])
