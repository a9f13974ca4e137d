"""``POST /tokenize`` and ``POST /detokenize`` in vLLM's request and response shapes."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from server import serving
from server.errors import APIError
from server.protocol import (
    DetokenizeRequest,
    DetokenizeResponse,
    ErrorResponse,
    TokenizeRequest,
    TokenizeResponse,
)

router = APIRouter()

ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 404, 503)}


def _tokenizer(request: Request):
    tokenizer = request.app.state.engine.tokenizer
    if tokenizer is None:
        raise APIError(400, "this model has no tokenizer")
    return tokenizer


@router.post("/tokenize", response_model=TokenizeResponse, responses=ERRORS,
             dependencies=[Depends(serving.check_api_key)])
async def tokenize(body: TokenizeRequest, request: Request) -> TokenizeResponse:
    scheduler = serving.ready_scheduler(request)
    serving.check_model(request, body.model)
    tokenizer = _tokenizer(request)
    if body.messages is not None:
        ids = serving.render_chat(tokenizer, serving.chat_template(request), body.messages,
                                  add_generation_prompt=body.add_generation_prompt)
    else:
        ids = list(tokenizer(body.prompt, add_special_tokens=body.add_special_tokens)["input_ids"])
    strs = tokenizer.convert_ids_to_tokens(ids) if body.return_token_strs else None
    return TokenizeResponse(count=len(ids), max_model_len=scheduler.max_model_len, tokens=ids, token_strs=strs)


@router.post("/detokenize", response_model=DetokenizeResponse, responses=ERRORS,
             dependencies=[Depends(serving.check_api_key)])
async def detokenize(body: DetokenizeRequest, request: Request) -> DetokenizeResponse:
    serving.ready_scheduler(request)
    serving.check_model(request, body.model)
    tokenizer = _tokenizer(request)
    vocab = serving.vocab_size(request.app.state.engine)
    bad = [t for t in body.tokens if not 0 <= t < vocab]
    if bad:
        raise APIError(400, f"token id {bad[0]} is out of range [0, {vocab})", param="tokens")
    return DetokenizeResponse(prompt=tokenizer.decode(body.tokens, skip_special_tokens=False,
                                                      clean_up_tokenization_spaces=False))
