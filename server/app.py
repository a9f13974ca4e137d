"""The FastAPI app: ``create_app(engine_or_loader, settings)``.

State lives on ``app.state`` (settings, metrics, engine, scheduler, draining flag), never in
module globals, so tests can run several apps in one process. Given a loader (a callable
returning an ``Engine``) the app starts answering at once and loads the model on a thread:
``/health`` is 503 until the scheduler is running, then 200.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from fastapi import FastAPI

from engine.errors import MoepagerError
from server import budget
from server.errors import install_error_handlers
from server.metrics import ServerMetrics
from server.routers import admin, chat, completions, models, system, tokenize
from server.scheduler import Scheduler
from server.settings import ServerSettings

log = logging.getLogger("moepager.server")


def package_version() -> str:
    try:
        return version("moepager")
    except PackageNotFoundError:
        return "0.0.0+local"


def _is_engine(obj: Any) -> bool:
    return hasattr(obj, "batch_generator")


def attach_engine(app: FastAPI, engine: Any, loop: asyncio.AbstractEventLoop) -> None:
    """Start the scheduler for a loaded engine; from then on the app serves requests."""
    settings: ServerSettings = app.state.settings
    engine_len = int(getattr(engine, "max_model_len", 0) or 0)
    max_model_len = settings.max_model_len or engine_len
    if engine_len and max_model_len > engine_len:
        raise MoepagerError(f"--max-model-len {max_model_len} exceeds the model's maximum {engine_len}")
    per_token = budget.kv_bytes_per_token(engine)
    kv_budget = settings.kv_cache_bytes
    if kv_budget is None:
        kv_budget = budget.default_kv_budget(per_token, settings.max_num_seqs, max_model_len,
                                             budget.free_memory_bytes(engine.device))
    log.info("KV cache budget %.3f GB (%s): %d bytes per token, %d full-length sequences of %d tokens",
             kv_budget / 1e9, "--kv-cache-gb" if settings.kv_cache_bytes else "default: sized from free memory",
             per_token, kv_budget // max(1, per_token * max_model_len), max_model_len)
    scheduler = Scheduler(engine, max_num_seqs=settings.max_num_seqs, max_queued=settings.max_queued,
                          max_model_len=max_model_len, metrics=app.state.metrics, kv_budget_bytes=kv_budget,
                          kv_bytes_per_token=per_token)
    scheduler.start(loop)
    app.state.engine = engine
    app.state.scheduler = scheduler  # set last: handlers check it to decide "ready"


def begin_drain(app: FastAPI) -> None:
    """Refuse new requests with 503; running ones finish."""
    app.state.draining = True


def create_app(engine_or_loader: Any, settings: ServerSettings | None = None, *,
               on_load_error: Callable[[BaseException], None] | None = None) -> FastAPI:
    settings = settings or ServerSettings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loop = asyncio.get_running_loop()
        if _is_engine(engine_or_loader):
            attach_engine(app, engine_or_loader, loop)
        else:
            def load() -> None:
                try:
                    engine = engine_or_loader()
                    attach_engine(app, engine, loop)
                    log.info("model %s loaded; serving", getattr(engine, "model_name", "?"))
                except BaseException as exc:  # noqa: BLE001 - reported by /health and the callback
                    log.error("model failed to load: %s", exc)
                    app.state.load_error = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                    if on_load_error is not None:
                        on_load_error(exc)

            threading.Thread(target=load, name="moepager-load", daemon=True).start()
        try:
            yield
        finally:
            if app.state.scheduler is not None:
                app.state.scheduler.stop()

    app = FastAPI(title="moepager", version=package_version(), lifespan=lifespan,
                  description="OpenAI-compatible server for Mixture-of-Experts models with paged experts.")
    app.state.settings = settings
    app.state.engine = None
    app.state.scheduler = None
    app.state.draining = False
    app.state.load_error = None
    app.state.started_at = time.time()
    app.state.metrics = ServerMetrics(lambda: app.state.engine)
    install_error_handlers(app)
    for module in (chat, completions, tokenize, models, admin, system):
        app.include_router(module.router)
    return app
