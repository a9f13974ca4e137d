"""``moepager serve``: the OpenAI-compatible HTTP server.

uvicorn starts listening at once; the model loads on a thread (``/health`` is 503 until it
is ready). SIGTERM drains: new requests get 503, running ones finish (up to
``--drain-timeout``), then the process exits 0. A second SIGTERM or SIGINT exits at once.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from types import FrameType

import uvicorn

from server.flags import _positive_int, add_engine_flags, engine_config_from_args


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}")
    return value


def _port(text: str) -> int:
    value = _non_negative_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"expected a port in 0..65535, got {text!r}")
    return value


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("serve", help="run the OpenAI-compatible server",
                              description="Serve a MoE model over an OpenAI-compatible HTTP API.")
    add_engine_flags(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=_port, default=8000)
    p.add_argument("--max-model-len", type=_positive_int, default=None,
                   help="context length (prompt + output); default: the model's")
    p.add_argument("--max-num-seqs", type=_positive_int, default=16, help="sequences in the running batch")
    p.add_argument("--max-queued", type=_non_negative_int, default=64,
                   help="sequences allowed to wait for a batch slot; beyond this requests get 429")
    p.add_argument("--api-key", default=os.environ.get("MOEPAGER_API_KEY") or None,
                   help="require 'Authorization: Bearer KEY' on /v1 endpoints (default: $MOEPAGER_API_KEY)")
    p.add_argument("--served-model-name", default=None, help="model id clients send (default: the model's name)")
    p.add_argument("--drain-timeout", type=float, default=60.0,
                   help="on SIGTERM, seconds running requests may take before the server exits")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    p.set_defaults(run=run)
    return p


def run(args: argparse.Namespace) -> int:
    from server.app import begin_drain, create_app
    from server.settings import ServerSettings

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = engine_config_from_args(args, max_model_len=args.max_model_len)
    settings = ServerSettings(api_key=args.api_key, served_model_name=args.served_model_name,
                              max_num_seqs=args.max_num_seqs, max_queued=args.max_queued,
                              max_model_len=args.max_model_len, drain_timeout_s=args.drain_timeout)

    def load():
        from engine.engine import Engine

        return Engine.from_config(config)

    failed: list[BaseException] = []
    server: DrainingServer | None = None

    def on_load_error(exc: BaseException) -> None:
        failed.append(exc)
        if server is not None:
            server.should_exit = True

    app = create_app(load, settings, on_load_error=on_load_error)
    server = DrainingServer(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                                           timeout_graceful_shutdown=5),
                            drain=lambda: begin_drain(app),
                            idle=lambda: app.state.scheduler is None or app.state.scheduler.is_idle(),
                            drain_timeout_s=args.drain_timeout)
    server.run()
    if failed:
        raise failed[0]
    return 0


class DrainingServer(uvicorn.Server):
    """uvicorn.Server whose first SIGTERM drains instead of closing the socket at once."""

    def __init__(self, config: uvicorn.Config, *, drain: Callable[[], None], idle: Callable[[], bool],
                 drain_timeout_s: float) -> None:
        super().__init__(config)
        self._drain = drain
        self._idle = idle
        self._drain_timeout_s = drain_timeout_s
        self._draining = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if sig == signal.SIGTERM and not self._draining and not self.should_exit:
            self._draining = True
            self._drain()
            threading.Thread(target=self._wait_idle, name="moepager-drain", daemon=True).start()
            return
        # Not recorded in _captured_signals: uvicorn would re-raise it after a clean exit.
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True
        self.should_exit = True

    def _wait_idle(self) -> None:
        deadline = time.monotonic() + self._drain_timeout_s
        while not self._idle() and time.monotonic() < deadline:
            time.sleep(0.1)
        self.should_exit = True
