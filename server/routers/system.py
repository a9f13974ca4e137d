"""``GET /health``, ``GET /metrics``, ``GET /version``: no API key, usable by probes and scrapers."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from server.errors import error_response

router = APIRouter()


@router.get("/health")
async def health(request: Request) -> Response:
    state = request.app.state
    if state.load_error:
        return error_response(503, f"model failed to load: {state.load_error}")
    if state.scheduler is None:
        return error_response(503, "model is loading", headers={"Retry-After": "5"})
    if state.draining:
        return error_response(503, "server is shutting down")
    return JSONResponse({"status": "ok"})


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE_LATEST)


@router.get("/version")
async def version(request: Request) -> dict:
    from server.app import package_version

    engine = request.app.state.engine
    config = getattr(engine, "config", None)
    kernels = getattr(engine, "kernels", None)
    return {
        "version": package_version(),
        "model": request.app.state.settings.served_model_name or getattr(engine, "model_name", None),
        "cache_policy": getattr(engine, "cache_policy", None) if engine is not None else None,
        "prefetch": getattr(config, "prefetch", None),
        "prefetch_lookahead": getattr(config, "prefetch_lookahead", None),
        "loaded": engine is not None,
        "kernels": kernels() if callable(kernels) else None,  # which implementation serves each op
    }
