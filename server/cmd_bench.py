"""`moepager bench decode|long-context|offload-overhead|gpu|sim-speed ...`: the benchmarks behind one subcommand.

Each verb hands its arguments to the benchmark module's own parser (``--help`` lists them):
``decode`` (``bench.decode``: plain transformers against moepager on the CPU or a GPU),
``long-context`` (``bench.long_context``: decode speed against context length, in-place KV
layers against transformers' concatenating cache, native attention against SDPA, or fused
attention blocks against the modules' own forward),
``offload-overhead`` (``bench.offload_overhead``: time per MoE layer outside the expert compute,
and a torch profile of decode),
``gpu`` (``bench.gpu_bench``: the GPU decode grid; ``bash bench/gpu_suite.sh`` runs it with the
tests), ``sim-speed`` (``bench.sim_speed``: simulator throughput).
"""

from __future__ import annotations

import argparse
import importlib

VERBS = {"decode": "bench.decode", "long-context": "bench.long_context",
         "offload-overhead": "bench.offload_overhead", "gpu": "bench.gpu_bench", "sim-speed": "bench.sim_speed"}


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("bench", help="run a benchmark (decode, long-context, offload-overhead, gpu, sim-speed)",
                              description=__doc__.split("\n\n", 1)[1])
    p.add_argument("verb", choices=sorted(VERBS), help="which benchmark")
    p.add_argument("args", nargs=argparse.REMAINDER, help="the benchmark's own flags (see its --help)")
    p.set_defaults(run=run)
    return p


def run(args: argparse.Namespace) -> int:
    module = importlib.import_module(VERBS[args.verb])
    return int(module.main(list(args.args)) or 0)
