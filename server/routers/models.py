"""``GET /v1/models``: the one served model, its context length and current cache policy."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from server import serving
from server.protocol import ModelCard, ModelList

router = APIRouter()


@router.get("/v1/models", response_model=ModelList, dependencies=[Depends(serving.check_api_key)])
async def list_models(request: Request) -> ModelList:
    scheduler = serving.ready_scheduler(request)
    engine = request.app.state.engine
    card = ModelCard(id=serving.served_model_name(request), created=int(request.app.state.started_at),
                     max_model_len=scheduler.max_model_len, cache_policy=engine.cache_policy)
    return ModelList(data=[card])
