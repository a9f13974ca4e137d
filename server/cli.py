"""`moepager` command line: one parser, one subcommand module per verb.

Each subcommand module exposes ``add_parser(subparsers)`` and ``run(args) -> int``.
User errors print one line (``moepager: error: ...``) and exit 2; nothing prints
a traceback unless MOEPAGER_DEBUG=1.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# (subcommand, module): modules are imported lazily so `moepager --help` stays fast.
SUBCOMMANDS = (
    ("generate", "server.cmd_generate"),
    ("serve", "server.cmd_serve"),
    ("trace", "server.cmd_trace"),
    ("predictor", "server.cmd_predictor"),
    ("train-tiny", "server.cmd_train_tiny"),
    ("bench", "server.cmd_bench"),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moepager", description="Serve MoE models larger than the GPU.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for _name, module_name in SUBCOMMANDS:
        importlib.import_module(module_name).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from engine.errors import MoepagerError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        print("moepager: interrupted", file=sys.stderr)
        return 130
    except (MoepagerError, ValueError, FileNotFoundError, NotImplementedError, OSError) as exc:
        if os.environ.get("MOEPAGER_DEBUG"):
            raise
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"moepager: error: {message}", file=sys.stderr)
        return 2
    except Exception as exc:
        if os.environ.get("MOEPAGER_DEBUG"):
            raise
        print(f"moepager: internal error: {type(exc).__name__}: {exc} (set MOEPAGER_DEBUG=1 for a traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
