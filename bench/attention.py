"""Decode attention per call: the native kernel against torch's SDPA, over cache lengths.

One query token (a decode step) against L cached keys and values, the cache as transformers'
in-place KV layers hand it (prefix views of larger buffers), q as a transpose of [B, T, H, D].
The baseline is transformers' own ``sdpa_attention_forward`` (torch's SDPA, with its GQA
handling), and both return the layout it returns ([B, T, H, D], contiguous). Each case alternates the two methods and keeps each one's best of ``--repeat``
rounds; ``KV GB/s`` is the cache bytes read per call over the native kernel's time.

    python -m bench.attention --out bench/results/attention.json
"""

from __future__ import annotations

import argparse
import time

import torch

from bench.decode import cpu_description
from bench.policy_table import write_report

SHAPES = {  # name -> (query heads, KV heads, head dim)
    "mha16x64": (16, 16, 64),  # OLMoE
    "gqa32/8x128": (32, 8, 128),  # Mixtral, Qwen-MoE
}


class _Attention(torch.nn.Module):
    """What transformers' sdpa function reads from an attention module."""

    is_causal = True

    def __init__(self, groups: int) -> None:
        super().__init__()
        self.num_key_value_groups = groups


def _inputs(heads: int, kv_heads: int, dim: int, L: int, dtype: torch.dtype):
    g = torch.Generator().manual_seed(L)
    q = torch.randn(1, 1, heads, dim, generator=g).to(dtype).transpose(1, 2)  # [1, H, 1, D]
    k = torch.randn(1, kv_heads, L + 64, dim, generator=g).to(dtype)[:, :, :L]
    v = torch.randn(1, kv_heads, L + 64, dim, generator=g).to(dtype)[:, :, :L]
    return q, k, v


def _time(fn, calls: int) -> float:
    with torch.no_grad():
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        return (time.perf_counter() - start) / calls


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--contexts", default="20,200,1000,4000", help="cache lengths L (tokens)")
    ap.add_argument("--dtypes", default="bfloat16,float32")
    ap.add_argument("--shapes", default=",".join(SHAPES), help=f"among {', '.join(SHAPES)}")
    ap.add_argument("--calls", type=int, default=20, help="calls per timing round")
    ap.add_argument("--repeat", type=int, default=5, help="rounds per method; the best counts")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    try:
        contexts = [int(c) for c in args.contexts.split(",")]
    except ValueError:
        ap.error(f"--contexts: comma-separated token counts, got {args.contexts!r}")
    dtypes = [getattr(torch, d, None) for d in args.dtypes.split(",")]
    if any(not isinstance(d, torch.dtype) or d not in (torch.float32, torch.bfloat16, torch.float16) for d in dtypes):
        ap.error(f"--dtypes: among float32, bfloat16, float16, got {args.dtypes!r}")
    shapes = args.shapes.split(",")
    if any(s not in SHAPES for s in shapes):
        ap.error(f"--shapes: among {', '.join(SHAPES)}, got {args.shapes!r}")
    if min(contexts) < 1 or args.calls < 1 or args.repeat < 1:
        ap.error("--contexts, --calls and --repeat must be >= 1")
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from cuda_ext import attention, native_cpu

    if not native_cpu.build():
        ap.error(f"the native kernels are not available here: {native_cpu.status()}")
    rows = []
    print(f"{'shape':>12} {'dtype':>9} {'L':>6} {'sdpa us':>9} {'native us':>10} {'speedup':>8} {'KV GB/s':>8}", flush=True)
    for shape in shapes:
        heads, kv_heads, dim = SHAPES[shape]
        for dtype in dtypes:
            for L in contexts:
                q, k, v = _inputs(heads, kv_heads, dim, L, dtype)
                scale = dim**-0.5
                rep = heads // kv_heads

                module = _Attention(rep)

                def sdpa(q=q, k=k, v=v, scale=scale, module=module):
                    return sdpa_attention_forward(module, q, k, v, None, scaling=scale)[0]

                def native(q=q, k=k, v=v, scale=scale):
                    return attention(q, k, v, None, scale)

                with torch.no_grad():
                    err = (native().float() - sdpa().float()).abs().max().item()
                best = {"sdpa": float("inf"), "native": float("inf")}
                for _ in range(args.repeat):
                    for name, fn in (("sdpa", sdpa), ("native", native)):
                        best[name] = min(best[name], _time(fn, args.calls))
                kv_bytes = 2 * k.numel() * k.element_size()
                row = {"shape": shape, "dtype": str(dtype).split(".")[-1], "context": L,
                       "sdpa_us": best["sdpa"] * 1e6, "native_us": best["native"] * 1e6,
                       "speedup": best["sdpa"] / best["native"], "kv_gb_per_s": kv_bytes / best["native"] / 1e9,
                       "max_abs_diff": err}
                rows.append(row)
                print(f"{shape:>12} {row['dtype']:>9} {L:6d} {row['sdpa_us']:9.0f} {row['native_us']:10.0f} "
                      f"{row['speedup']:7.2f}x {row['kv_gb_per_s']:8.1f}", flush=True)
    if args.out:
        report = {"cpu": cpu_description(), "threads": torch.get_num_threads(), "isa": native_cpu.isa(),
                  "calls": args.calls, "repeat": args.repeat, "rows": rows, "date": time.strftime("%Y-%m-%d")}
        write_report(args.out, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
