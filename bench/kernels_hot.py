"""Compute cost of the native expert kernels with the weights in cache, one thread.

`bench.kernels` times the kernels as decode runs them, reading weights from memory; on a VM whose
memory bandwidth drifts between runs, changes to the arithmetic of a kernel are lost in that noise.
Here one expert (hidden 1024, intermediate 256: 0.4-1.5 MB of pages) is called over and over, so
its pages stay in the L2/L3 cache and the time is what the instructions cost, the op's fixed
overhead per call included. Best of ``--calls`` per case; prints a table and writes JSON.

    python -m bench.kernels_hot --out bench/results/kernels_hot.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from bench.decode import cpu_description
from bench.kernels import timeit
from cuda_ext import PageFormat, moe_ffn, native_cpu

H, I = 1024, 256
CASES = (("bf16", "float", 0), ("int8", "int8", 0), ("int4 g128", "int4", 128), ("int4 g32", "int4", 32))


def best_call_us(kind: str, group: int, T: int, calls: int) -> float:
    g = torch.Generator().manual_seed(0)
    fmt = PageFormat(kind, torch.bfloat16, H, I, False, False, False, group)
    pages = torch.empty(1, fmt.page_bytes, dtype=torch.uint8)
    fmt.pack(torch.randn(2 * I, H, generator=g) / H**0.5, torch.randn(H, I, generator=g) / I**0.5, out=pages[0])
    rows = torch.zeros(1, dtype=torch.long)
    x = torch.randn(T, H, generator=g).bfloat16()
    idx = torch.zeros(T, 1, dtype=torch.long)
    w = torch.ones(T, 1)
    for _ in range(50):
        moe_ffn(x, pages, rows, idx, w, fmt, "silu")
    best, _ = timeit(lambda i: moe_ffn(x, pages, rows, idx, w, fmt, "silu"), min_time=0.0, min_reps=calls)
    return best * 1e6


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", default="1,4", help="comma-separated token counts T")
    ap.add_argument("--calls", type=int, default=3000, help="calls per case (the best one counts)")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)
    try:
        tokens = [int(t) for t in args.tokens.split(",")]
    except ValueError:
        ap.error(f"--tokens: expected comma-separated integers, got {args.tokens!r}")
    if any(t < 1 for t in tokens) or args.calls < 1:
        ap.error("--tokens and --calls must be positive")
    if not native_cpu.available():
        print("the native CPU kernels are not available here: nothing to time")
        return 1
    torch.set_num_threads(1)
    print(f"native CPU kernels: {native_cpu.status()}; {cpu_description()}; 1 thread; expert {H}x{I}")
    print(f"{'kernel':<10} {'T':>3} {'us/call':>9}")
    results = []
    for name, kind, group in CASES:
        for T in tokens:
            us = best_call_us(kind, group, T, args.calls)
            results.append({"kernel": name, "T": T, "us_per_call": us})
            print(f"{name:<10} {T:>3} {us:>9.1f}")
    if args.out:
        meta = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": cpu_description(),
                "torch": torch.__version__, "native": native_cpu.status(), "hidden": H, "intermediate": I,
                "calls": args.calls}
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
