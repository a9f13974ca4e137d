"""``moepager serve``: the OpenAI-compatible HTTP server.

uvicorn starts listening at once; the model loads on a thread (``/health`` is 503 until it
is ready). SIGTERM drains: new requests get 503, running ones finish (up to
``--drain-timeout``), then the process exits 0. A second SIGTERM or SIGINT exits at once.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from engine.errors import MoepagerError
from server.flags import (
    _non_negative_int,
    _positive_float,
    _positive_int,
    add_engine_flags,
    checkpoint_dtype,
    engine_config_from_args,
    resolve_expert_budget,
)

log = logging.getLogger("moepager.server")


def _port(text: str) -> int:
    value = _non_negative_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"expected a port in 0..65535, got {text!r}")
    return value


def _kv_gb(text: str) -> float | str:
    if text == "auto":
        return text
    value = _positive_float(text)
    return value


def resolve_serve_args(args: argparse.Namespace):
    """Parsed serve flags -> (EngineConfig, ServerSettings, dtype, expert budget summary, KV bytes or None).

    Shared by ``moepager serve`` and the Ray Serve replicas, so both resolve the flags the same way.
    """
    from server.settings import ServerSettings

    # Read here, not as the flag's default, so --help never prints the key.
    args.api_key = getattr(args, "api_key", None) or os.environ.get("MOEPAGER_API_KEY") or None
    if args.model_path is not None:
        if args.model is not None and args.model != args.model_path:
            raise MoepagerError(f"give the model once: MODEL {args.model_path!r} and --model {args.model!r} differ")
        args.model = args.model_path
    template = None
    if args.chat_template is not None:
        path = Path(args.chat_template).expanduser()
        if not path.is_file():
            raise MoepagerError(f"--chat-template: no such file: {path}")
        template = path.read_text()
    kv_bytes = None if args.kv_cache_gb == "auto" else int(args.kv_cache_gb * 1e9)
    dtype = checkpoint_dtype(args.model) if args.dtype == "auto" else args.dtype
    expert_gb, expert_summary = resolve_expert_budget(args, dtype, kv_reserve_bytes=kv_bytes or 0)
    config = engine_config_from_args(args, max_model_len=args.max_model_len, expert_cache_gb=expert_gb)
    settings = ServerSettings(api_key=args.api_key, served_model_name=args.served_model_name,
                              max_num_seqs=args.max_num_seqs, max_queued=args.max_queued,
                              max_model_len=args.max_model_len, drain_timeout_s=args.drain_timeout,
                              chat_template=template, kv_cache_bytes=kv_bytes, host=args.host)
    return config, settings, dtype, expert_summary, kv_bytes


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("serve", help="run the OpenAI-compatible server",
                              description="Serve a MoE model over an OpenAI-compatible HTTP API.",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("model_path", nargs="?", default=None, metavar="MODEL",
                   help="local Hugging Face folder (same as --model; default: the embedded model)")
    add_engine_flags(p, serving=True)
    p.add_argument("--host", default="127.0.0.1", help="address to bind; admin routes need --api-key off loopback")
    p.add_argument("--port", type=_port, default=8000, help="port to listen on")
    p.add_argument("--chat-template", default=None, metavar="FILE",
                   help="Jinja chat template file to use instead of the tokenizer's")
    p.add_argument("--kv-cache-gb", type=_kv_gb, default="auto",
                   help="KV cache budget checked at admission (prompt + max_tokens per sequence); auto: "
                        "--max-num-seqs full-length sequences, capped at 45%% of the memory free after loading")
    p.add_argument("--max-model-len", type=_positive_int, default=None,
                   help="context length (prompt + output); default: the model's")
    p.add_argument("--max-num-seqs", type=_positive_int, default=16, help="sequences in the running batch")
    p.add_argument("--max-queued", type=_non_negative_int, default=64,
                   help="sequences allowed to wait for a batch slot; beyond this requests get 429")
    p.add_argument("--api-key", default=argparse.SUPPRESS,
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

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config, settings, dtype, expert_summary, kv_bytes = resolve_serve_args(args)
    log.info("serving %s on %s:%d: device %s, dtype %s%s; experts: %s; KV budget: %s; max %d running, %d queued; "
             "API key %s; chat template %s", args.model or "the embedded model", args.host, args.port, args.device,
             dtype, " (auto: the checkpoint's)" if args.dtype == "auto" else "", expert_summary,
             "auto (sized after loading)" if kv_bytes is None else f"{args.kv_cache_gb:g} GB",
             args.max_num_seqs, args.max_queued, "set" if args.api_key else "not set",
             args.chat_template or "the tokenizer's")

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
