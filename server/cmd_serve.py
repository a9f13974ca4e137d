"""``moepager serve``: the OpenAI-compatible HTTP server.

uvicorn starts listening at once; the model loads on a thread (``/health`` is 503 until it
is ready). SIGTERM drains: new requests get 503, running ones finish (up to
``--drain-timeout``), then the process exits 0. A second SIGTERM or SIGINT exits at once.
"""

from __future__ import annotations

import argparse
import logging
import os

from server.flags import _non_negative_int, _positive_int, add_engine_flags, engine_config_from_args


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
    import uvicorn

    from server.app import begin_drain, create_app
    from server.draining import DrainingServer
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
    server = None

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
