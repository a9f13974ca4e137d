"""Offload introspection and control: ``GET /v1/expert_stats``, ``POST /v1/admin/cache_policy``.

Admin routes need the API key when one is set, and are refused on a non-loopback bind without
one (anyone who can reach the port could otherwise change the engine). Both run on the engine's
worker thread between steps (the engine is not thread-safe), so a
policy switch lands at a step boundary and never under a running layer.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from cache.base import policy_names
from server import serving
from server.errors import APIError
from server.protocol import CachePolicyRequest, ErrorResponse

router = APIRouter()


@router.get("/v1/expert_stats", dependencies=[Depends(serving.check_api_key)])
async def expert_stats(request: Request) -> dict:
    scheduler = serving.ready_scheduler(request)
    return await scheduler.call(lambda engine: engine.expert_stats())


@router.post("/v1/admin/cache_policy", dependencies=[Depends(serving.check_admin)],
             responses={code: {"model": ErrorResponse} for code in (400, 401, 403, 503)})
async def set_cache_policy(body: CachePolicyRequest, request: Request) -> dict:
    scheduler = serving.ready_scheduler(request)

    def switch(engine) -> str:
        engine.set_cache_policy(body.policy)
        return engine.cache_policy

    try:
        policy = await scheduler.call(switch)
    except ValueError as exc:
        known = ", ".join(policy_names(online_only=True))
        raise APIError(400, f"unknown or unusable cache policy {body.policy!r}: {exc}; known policies: {known}",
                       param="policy") from None
    return {"cache_policy": policy}
