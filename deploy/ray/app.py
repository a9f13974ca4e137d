"""The Ray Serve application: an OpenAI ingress in front of N moepager engine replicas.

    serve run deploy/ray/config.yaml                       # from the repository root
    serve run deploy.ray.app:build_app num_replicas=2      # the same, without a config file

``MoepagerReplica`` owns one engine (one device) and serves it through the unchanged moepager
FastAPI app; ``OpenAIIngress`` answers HTTP, computes each request's affinity key and calls
a replica through a handle whose router is ``AffinityRouter``. A replica that dies before it
has answered, or before the whole body of a non-streaming answer arrived (the ingress reads it
in full before the client sees a byte), is retried on another one; one that dies in the middle
of a stream ends that stream with an SSE error event, never silently. ``GET /metrics`` on the
ingress shows every replica's metrics labelled ``replica`` plus the affinity counts.
"""

# No "from __future__ import annotations": FastAPI must see the real Request type through
# Serve's class-based view.
import argparse
import asyncio
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import ray
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, Field
from ray import serve
from ray.serve.config import RequestRouterConfig
from ray.serve.handle import DeploymentHandle

from deploy.ray.affinity import DEFAULT_PREFIX_CHARS, affinity_key
from deploy.ray.asgi import run_asgi
from deploy.ray.metrics import AffinityMetrics, merge_replica_metrics
from deploy.ray.protocol import REPLICA_HEADER, ForwardedRequest, ReplicaProbe, ResponseStart
from deploy.ray.router import AffinityRouter

log = logging.getLogger("moepager.ray")

KEYED_PATHS = ("/v1/chat/completions", "/v1/completions")
# A replica that is gone: retry elsewhere (before any byte reached the client).
REPLICA_GONE = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)


def parse_serve_args(serve_args: list[str]) -> argparse.Namespace:
    """Parse ``moepager serve`` flags (the same vocabulary as the CLI); host and port belong to Serve."""
    from server.cmd_serve import add_parser

    if any(a.split("=")[0] in ("--host", "--port") for a in serve_args):
        raise ValueError("--host/--port are set by Ray Serve's http_options, not in serve_args")
    parser = argparse.ArgumentParser(prog="moepager")
    add_parser(parser.add_subparsers())
    try:
        return parser.parse_args(["serve", *serve_args])
    except SystemExit:  # argparse printed the reason on stderr
        raise ValueError(f"invalid serve_args {serve_args!r} (see the message above)") from None


class MoepagerReplica:
    """One engine on its own device, served by the standard moepager app."""

    async def __init__(self, serve_args: list[str]) -> None:
        import torch

        from engine.engine import Engine
        from server.app import attach_engine, create_app
        from server.cmd_serve import resolve_serve_args

        args = parse_serve_args(serve_args)
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
        if cpus:
            torch.set_num_threads(max(1, int(cpus)))
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self.affinity = AffinityMetrics()
        config, settings, *_ = resolve_serve_args(args)
        engine = await asyncio.to_thread(Engine.from_config, config)
        self.app = create_app(engine, settings)
        attach_engine(self.app, engine, asyncio.get_running_loop())
        log.info("replica %s serving %s", self.replica_id, engine.model_name)

    async def handle(self, request: ForwardedRequest) -> AsyncIterator[ResponseStart | bytes]:
        if request.affinity_key is not None:
            self.affinity.observe(request.home, self.replica_id)
        async for item in run_asgi(self.app, request, ((REPLICA_HEADER, self.replica_id),)):
            yield item

    async def metrics(self, probe: ReplicaProbe) -> tuple[str, str]:
        return self.replica_id, self.app.state.metrics.render().decode() + self.affinity.render()

    async def check_health(self) -> None:
        """Serve's periodic probe: the app's own ``/health`` (503 while failed or draining) must be 200."""
        status = None
        async for item in run_asgi(self.app, ForwardedRequest("GET", "/health")):
            if isinstance(item, ResponseStart):
                status = item.status
        if status != 200:
            raise RuntimeError(f"replica {self.replica_id}: /health answered {status}")

    def __del__(self) -> None:  # Serve calls this on shutdown, after in-flight requests finished
        state = getattr(getattr(self, "app", None), "state", None)
        if state is not None and state.scheduler is not None:
            state.scheduler.stop()


ingress_app = FastAPI(title="moepager on Ray Serve")


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": "service_unavailable", "param": None,
                                   "code": None}}, status_code=status)


@serve.ingress(ingress_app)  # at import: the replica process re-imports this module
class OpenAIIngress:
    """HTTP front: affinity key, replica call with retry, merged metrics."""

    def __init__(self, replica: DeploymentHandle, prefix_chars: int = DEFAULT_PREFIX_CHARS,
                 attempts: int = 3, scrape_timeout_s: float = 5.0) -> None:
        self._replica = replica
        self._prefix_chars = prefix_chars
        self._attempts = attempts
        self._scrape_timeout_s = scrape_timeout_s

    @ingress_app.get("/metrics")
    async def metrics(self) -> Response:
        pages: dict[str, str] = {}
        for index in range(64):
            try:
                replica, text = await asyncio.wait_for(
                    self._replica.metrics.remote(ReplicaProbe(index)), self._scrape_timeout_s)
            except (TimeoutError, *REPLICA_GONE) as exc:
                log.warning("metrics of replica #%d not scraped: %s", index, exc)
                continue
            if replica in pages:
                break  # wrapped around: every replica answered
            pages[replica] = text
        body = merge_replica_metrics(pages)
        return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")

    @ingress_app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
    async def forward(self, path: str, request: Request) -> Response:
        body = await request.body()
        headers = tuple((k.lower(), v) for k, v in request.headers.items()
                        if k.lower() not in ("host", "content-length"))
        key = None
        if request.method == "POST" and request.url.path in KEYED_PATHS:
            key = affinity_key(dict(headers), body, self._prefix_chars)
        forwarded = ForwardedRequest(request.method, request.url.path, request.url.query, headers, body, key)
        last: BaseException | None = None
        for attempt in range(self._attempts):
            stream = self._replica.options(stream=True).handle.remote(forwarded)
            try:
                start = await stream.__anext__()
            except REPLICA_GONE as exc:
                last = exc
                log.warning("replica gone before answering (attempt %d): %s", attempt + 1, exc)
                continue
            response_headers = {k: v for k, v in start.headers if k not in ("content-length",)}
            if response_headers.get("content-type", "").startswith("text/event-stream"):
                return StreamingResponse(self._rest(stream), status_code=start.status, headers=response_headers)
            # A whole-body answer is read in full before the client sees a byte, so a replica that dies
            # between its headers and its body is retried like one that died before answering.
            try:
                body = b"".join([chunk async for chunk in stream])
            except REPLICA_GONE as exc:
                last = exc
                log.warning("replica gone while answering (attempt %d): %s", attempt + 1, exc)
                continue
            return Response(body, status_code=start.status, headers=response_headers)
        return _error(503, f"no replica could serve the request after {self._attempts} attempts: {last}")

    async def _rest(self, stream: Any) -> AsyncIterator[bytes]:
        """The rest of an event stream; a replica that dies mid-stream ends it with an error event."""
        try:
            async for chunk in stream:
                yield chunk
        except REPLICA_GONE as exc:
            error = {"error": {"message": f"the replica serving this stream died; retry the request ({exc})",
                               "type": "service_unavailable", "param": None, "code": None}}
            yield f"data: {json.dumps(error)}\n\ndata: [DONE]\n\n".encode()


class AppArgs(BaseModel):
    """Arguments of ``build_app`` (the ``args:`` of an application in a Serve config file)."""

    num_replicas: int = Field(2, ge=1)
    replica_cpus: float = Field(1.0, ge=0)
    replica_gpus: float = Field(0.0, ge=0)
    serve_args: list[str] = Field(default_factory=list, description="moepager serve flags for every replica")
    max_ongoing_requests: int = Field(64, ge=1, description="per replica, before the router looks elsewhere")
    max_imbalance: int = Field(8, ge=0, description="queue length above the shortest at which affinity yields")
    prefix_chars: int = Field(DEFAULT_PREFIX_CHARS, ge=1)
    attempts: int = Field(3, ge=1, description="tries per request when a replica dies before answering")


def build_app(args: dict[str, Any] | AppArgs | None = None) -> serve.Application:
    """Serve application builder: ``import_path: deploy.ray.app:build_app``."""
    options = args if isinstance(args, AppArgs) else AppArgs(**(args or {}))
    parse_serve_args(options.serve_args)  # fail here, in the driver, on a bad flag
    replica = serve.deployment(MoepagerReplica).options(
        num_replicas=options.num_replicas,
        max_ongoing_requests=options.max_ongoing_requests,
        ray_actor_options={"num_cpus": options.replica_cpus, "num_gpus": options.replica_gpus},
        request_router_config=RequestRouterConfig(
            request_router_class=AffinityRouter,
            request_router_kwargs={"max_imbalance": options.max_imbalance}),
        health_check_period_s=5, graceful_shutdown_timeout_s=30,
    )
    ingress = serve.deployment(OpenAIIngress).options(
        num_replicas=1, max_ongoing_requests=1024, ray_actor_options={"num_cpus": 0})
    return ingress.bind(replica.bind(options.serve_args), options.prefix_chars, options.attempts)
