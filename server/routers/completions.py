"""``POST /v1/completions``: a string, a batch of strings, token ids or a batch of them; ``logprobs``
and ``echo`` (with ``max_tokens: 0`` it scores the prompt, as evaluation harnesses do)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response, StreamingResponse

from server import serving
from server.logprobs import TokenTexts, completion_logprobs
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
    if body.echo and body.stream:
        raise serving.APIError(400, "echo is not supported with stream", param="echo")
    prompt_logprobs = body.logprobs if body.echo and body.logprobs is not None else None
    if body.max_tokens == 0 and prompt_logprobs is None:
        prompt_logprobs = 0  # echo without logprobs: nothing to generate, only the prompt comes back
    params = serving.prepare(request, body, prompts, serving.DEFAULT_COMPLETION_MAX_TOKENS,
                             body.requested_max_tokens(), logprobs=body.logprobs, prompt_logprobs=prompt_logprobs)
    request_id = random_id("cmpl")
    streams = serving.submit(request, request_id, prompts, params)
    created = serving.now_s()
    texts = TokenTexts(engine.tokenizer)

    if body.stream:
        def chunk(choices, usage=None) -> CompletionResponse:
            return CompletionResponse(id=request_id, created=created, model=model, choices=choices, usage=usage)

        offsets = [0] * (len(prompts) * body.n)

        def delta(i: int, event) -> list:
            lp = None
            if body.logprobs is not None and event.token_id is not None and event.logprob is not None:
                lp = completion_logprobs(texts, [(event.token_id, event.logprob, event.top_logprobs or [])],
                                         offset=offsets[i])
            offsets[i] += len(event.text)
            if not event.text and lp is None:
                return []
            return [chunk([CompletionChoice(index=i, text=event.text, logprobs=lp, finish_reason=None)])]

        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        events = serving.stream_events(
            streams, body.n, include_usage, start=list, delta=delta,
            finish=lambda i, reason: [chunk([CompletionChoice(index=i, text="", finish_reason=reason)])],
            usage_chunk=lambda usage: chunk([], usage))
        return StreamingResponse(events, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    results = await serving.collect(request, streams)
    if any(r.finish_reason is None for r in results):
        return Response(status_code=499)  # the client left; nobody reads this (nginx's "client closed")
    choices = []
    for i, r in enumerate(results):
        prompt_ids = prompts[i // body.n]
        prefix = serving.prompt_text(engine.tokenizer, body, i // body.n, prompt_ids) if body.echo else ""
        lp = None
        if body.logprobs is not None:
            lp = completion_logprobs(texts, r.logprobs, prompt=prompt_ids if body.echo else None,
                                     prompt_logprobs=r.prompt_logprobs, offset=0)
        choices.append(CompletionChoice(index=i, text=prefix + r.text, logprobs=lp, finish_reason=r.finish_reason))
    return CompletionResponse(id=request_id, created=created, model=model,
                              usage=serving.usage_of(results, body.n), choices=choices)
