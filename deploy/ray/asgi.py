"""Run one HTTP request through an in-process ASGI app and yield its response as it is produced.

A replica hosts the unchanged moepager FastAPI app (``server.app.create_app``); the ingress
hands it requests as ``ForwardedRequest`` objects instead of sockets. Streaming responses
(SSE) come out chunk by chunk; when the consumer goes away (the client disconnected, Serve
cancelled the call) the app sees ``http.disconnect`` and aborts the generation.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from deploy.ray.protocol import ForwardedRequest, ResponseStart

_DONE = object()


async def run_asgi(app: Any, request: ForwardedRequest,
                   extra_headers: tuple[tuple[str, str], ...] = ()) -> AsyncIterator[ResponseStart | bytes]:
    """Yield a ``ResponseStart`` and then the body chunks (bytes) of ``request`` served by ``app``."""
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "scheme": "http",
        "method": request.method, "path": request.path, "raw_path": request.path.encode(),
        "query_string": request.query.encode("latin-1"), "root_path": "",
        "headers": [(k.encode("latin-1"), v.encode("latin-1")) for k, v in request.headers],
        "client": ("127.0.0.1", 0), "server": ("127.0.0.1", 80),
    }
    queue: asyncio.Queue[Any] = asyncio.Queue()
    finished = asyncio.Event()
    body_sent = False

    async def receive() -> dict[str, Any]:
        nonlocal body_sent
        if not body_sent:
            body_sent = True
            return {"type": "http.request", "body": request.body, "more_body": False}
        await finished.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        await queue.put(message)

    task = asyncio.ensure_future(app(scope, receive, send))
    task.add_done_callback(lambda _: queue.put_nowait(_DONE))
    try:
        while True:
            message = await queue.get()
            if message is _DONE:
                task.result()  # re-raise what the app raised
                return
            if message["type"] == "http.response.start":
                headers = tuple((k.decode("latin-1"), v.decode("latin-1")) for k, v in message.get("headers", ()))
                yield ResponseStart(int(message["status"]), headers + extra_headers)
            elif message["type"] == "http.response.body":
                if message.get("body"):
                    yield bytes(message["body"])
                if not message.get("more_body", False):
                    return
    finally:
        finished.set()
        if not task.done():
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(task, timeout=5.0)
