"""Weight-read bandwidth of the host kernels against torch, next to the machine's read bandwidth.

    python -m bench.kernels [--threads 1,2] [--tokens 1,4] [--out kernels.json]

Shapes: an OLMoE-like MoE layer (H = I = 1024, 64 experts, top-8) and dense
1024x1024 / 50304x1024 linears. GB/s counts the weight bytes each call must read
(the unique routed experts' weights, or the dense matrix) over the call's time.
Every call reads weights that are not in the last-level cache: the experts
rotate over enough layers, and the dense matrices over enough copies, to span
at least ``--span-gb``. The read bandwidth is the faster of a torch int64 sum and the native streaming read of a 1 GiB
buffer, over the same threads.
Methods: torch bf16 / fp32 (a loop over experts as transformers runs it),
oneDNN prepacked bf16 (``mkldnn._linear_pointwise``), and the native kernels on
bf16, int8 and int4 pages (``cuda_ext.moe_ffn`` / ``cuda_ext.linear``), and int8 dense weights
(``cuda_ext.linear_int8``). "4-row" methods run the native kernels with their earlier loop,
which reads 4 rows interleaved per tile, instead of one row front to back.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from bench.decode import cpu_description
from cuda_ext import PageFormat, linear, linear_int8, moe_ffn, native_cpu
from cuda_ext.pages import quantize_int8

H, I, E, TOP_K = 1024, 1024, 64, 8
GiB = 2**30


def timeit(fn: Callable[[int], object], min_time: float = 0.4, min_reps: int = 5) -> tuple[float, float]:
    """(best, median) seconds per call of fn(i) over consecutive i (each i reads different weights).

    The best is reported: on a shared machine it is the call least disturbed by other processes.
    """
    fn(0)
    times, i, start = [], 1, time.perf_counter()
    while len(times) < min_reps or time.perf_counter() - start < min_time:
        t0 = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - t0)
        i += 1
    times.sort()
    return times[0], times[len(times) // 2]


def routing(T: int, layers: int, calls: int = 64, seed: int = 0) -> list[tuple[int, torch.Tensor]]:
    """Per call: (layer, idx [T, K] of distinct experts per token), layers visited in turn."""
    g = torch.Generator().manual_seed(seed)
    return [(c % layers, torch.stack([torch.randperm(E, generator=g)[:TOP_K] for _ in range(T)]))
            for c in range(calls)]


def four_row_tiles(make: Callable[[], tuple]) -> Callable[[], tuple]:
    """The same native method with the kernels' earlier loop over 4 interleaved rows per tile."""
    def made():
        call, nbytes = make()

        def call4(i):
            prev = native_cpu.set_row_block(4)
            try:
                return call(i)
            finally:
                native_cpu.set_row_block(prev)
        return call4, nbytes
    return made


def onednn_bf16() -> bool:
    """oneDNN's prepacked bf16 linear runs only where it has a bf16 path (AVX512-BW/VL/DQ or
    AVX-NE-CONVERT); on AVX2-only CPUs its reorder raises, so the method is left out."""
    ops = torch.ops.mkldnn
    return (hasattr(ops, "_linear_pointwise") and torch.backends.mkldnn.is_available()
            and bool(ops._is_mkldnn_bf16_supported()))


def moe_methods(T: int, span: float) -> dict[str, tuple[Callable[[int], object], Callable[[int], int]]]:
    """name -> (call(i), weight bytes read by call i), each over its own rotating layers."""
    out = {}
    g = torch.Generator().manual_seed(1)
    x = torch.randn(T, H, generator=g)
    w = torch.rand(T, TOP_K, generator=g)

    def module_loop(dtype: torch.dtype, packed: bool):
        es = torch.empty((), dtype=dtype).element_size()
        layers = max(2, math.ceil(span * 1e9 / (E * 3 * H * I * es)))
        gate_up = torch.randn(layers, E, 2 * I, H, dtype=dtype) / H**0.5  # [L, E, 2I, H]
        down = torch.randn(layers, E, H, I, dtype=dtype) / I**0.5  # [L, E, H, I]
        if packed:
            gate_up = [[torch.ops.mkldnn._reorder_linear_weight(gate_up[l, e], T) for e in range(E)]
                       for l in range(layers)]
            down = [[torch.ops.mkldnn._reorder_linear_weight(down[l, e], T) for e in range(E)]
                    for l in range(layers)]
        route = routing(T, layers)
        xd = x.to(dtype)

        def lin(inp, wt):
            return torch.ops.mkldnn._linear_pointwise(inp, wt, None, "none", [], "") if packed else F.linear(inp, wt)

        def call(i):
            layer, idx = route[i % len(route)]
            y = torch.zeros(T, H, dtype=dtype)
            for e in idx.unique().tolist():
                tok, kk = (idx == e).nonzero(as_tuple=True)
                gu = lin(xd[tok], gate_up[layer][e])  # [n, 2I]
                gate, up = gu.chunk(2, dim=-1)
                y.index_add_(0, tok, lin(F.silu(gate) * up, down[layer][e]) * w[tok, kk, None].to(dtype))
            return y

        return call, lambda i: len(route[i % len(route)][1].unique()) * 3 * H * I * es

    def native(kind: str, dtype: torch.dtype, group: int):
        fmt = PageFormat(kind, dtype, H, I, False, False, False, group)
        weight_bytes = fmt.page_bytes  # scales included: they are read too
        layers = max(2, math.ceil(span * 1e9 / (E * weight_bytes)))
        pages = torch.empty(layers * E, fmt.page_bytes, dtype=torch.uint8)
        for p in range(layers * E):
            fmt.pack(torch.randn(2 * I, H, generator=g) / H**0.5, torch.randn(H, I, generator=g) / I**0.5,
                     out=pages[p])
        route = routing(T, layers)
        rows = [torch.arange(l * E, (l + 1) * E) for l in range(layers)]

        def call(i):
            layer, idx = route[i % len(route)]
            return moe_ffn(x.to(torch.bfloat16), pages, rows[layer], idx, w, fmt, "silu")

        return call, lambda i: len(route[i % len(route)][1].unique()) * weight_bytes

    out["torch bf16"] = lambda: module_loop(torch.bfloat16, False)
    out["torch fp32"] = lambda: module_loop(torch.float32, False)
    if onednn_bf16():
        out["oneDNN bf16 prepacked"] = lambda: module_loop(torch.bfloat16, True)
    out["native bf16"] = lambda: native("float", torch.bfloat16, 0)
    out["native int8"] = lambda: native("int8", torch.bfloat16, 0)
    out["native int4 g32"] = lambda: native("int4", torch.bfloat16, 32)
    out["native int4 g128"] = lambda: native("int4", torch.bfloat16, 128)
    if native_cpu.available():
        for name in ("native bf16", "native int8", "native int4 g128"):
            out[f"{name} 4-row"] = four_row_tiles(out[name])
    return out


def dense_methods(T: int, out_features: int, span: float):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(T, H, generator=g)

    def make(dtype: torch.dtype, how: str):
        es = torch.empty((), dtype=dtype).element_size()
        copies = max(2, math.ceil(span * 1e9 / (out_features * H * es)))
        ws = [torch.randn(out_features, H, generator=g).to(dtype) for _ in range(copies)]
        xd = x.to(dtype)
        if how == "onednn":
            ws = [torch.ops.mkldnn._reorder_linear_weight(wt, T) for wt in ws]

            def call(i):
                return torch.ops.mkldnn._linear_pointwise(xd, ws[i % copies], None, "none", [], "")
        elif how == "native":
            def call(i):
                return linear(xd, ws[i % copies])
        else:
            def call(i):
                return F.linear(xd, ws[i % copies])
        return call, lambda i: out_features * H * es

    def make_int8():  # --dense-dtype int8: int8 rows and fp32 scales, bf16 x
        copies = max(2, math.ceil(span * 1e9 / (out_features * H)))
        qs = [quantize_int8(torch.randn(out_features, H, generator=g), torch.float32) for _ in range(copies)]
        xb = x.to(torch.bfloat16)

        def call(i):
            q, s = qs[i % copies]
            return linear_int8(xb, q, s)
        return call, lambda i: out_features * (H + 4)

    methods = {"torch bf16": lambda: make(torch.bfloat16, "torch"), "torch fp32": lambda: make(torch.float32, "torch")}
    if onednn_bf16():
        methods["oneDNN bf16 prepacked"] = lambda: make(torch.bfloat16, "onednn")
    methods["native bf16"] = lambda: make(torch.bfloat16, "native")
    methods["native fp32"] = lambda: make(torch.float32, "native")
    methods["native int8"] = lambda: make_int8()
    if native_cpu.available():
        methods["native bf16 4-row"] = four_row_tiles(methods["native bf16"])
    return methods


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", default="1,2", help="comma-separated torch thread counts")
    ap.add_argument("--tokens", default="1,4", help="comma-separated token counts T")
    ap.add_argument("--span-gb", type=float, default=0.8, help="weights each method rotates over (GB)")
    ap.add_argument("--skip-dense", action="store_true")
    ap.add_argument("--only", help="comma-separated method names to run (default: all)")
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args(argv)
    threads = [int(v) for v in args.threads.split(",")]
    tokens = [int(v) for v in args.tokens.split(",")]
    native_cpu.build(progress=print)
    print(f"native CPU kernels: {native_cpu.status()}")

    results: list[dict] = []
    bandwidth = {}
    for th in threads:
        torch.set_num_threads(th)
        bandwidth[th] = native_cpu.read_bandwidth()
        print(f"read bandwidth, {th} thread(s): {bandwidth[th]:.1f} GB/s")

    def measure(section: str, shape: str, T: int, methods: dict) -> None:
        for name, make in methods.items():
            if args.only and name not in args.only.split(","):
                continue
            call, nbytes = make()
            with torch.inference_mode():
                for th in threads:
                    torch.set_num_threads(th)
                    sec, median = timeit(call)
                    # calls differ in bytes at T > 1: use the rotation's mean
                    gbs = sum(nbytes(i) for i in range(64)) / 64 / sec / 1e9
                    row = {"section": section, "shape": shape, "method": name, "T": T, "threads": th,
                           "ms": sec * 1e3, "median_ms": median * 1e3, "GBps": gbs,
                           "of_bandwidth": gbs / bandwidth[th]}
                    results.append(row)
                    print(f"{section:6} {shape:12} T={T:<3} {name:24} threads={th} {sec * 1e3:8.3f} ms "
                          f"(median {median * 1e3:.3f}) {gbs:6.1f} GB/s  {row['of_bandwidth']:5.2f} of read bw",
                          flush=True)
            del call, nbytes

    for T in tokens:
        measure("moe", f"{H}x{I}x{E}e", T, moe_methods(T, args.span_gb))
    if not args.skip_dense:
        for out_features in (1024, 50304):
            for T in tokens:
                measure("dense", f"{out_features}x{H}", T, dense_methods(T, out_features, args.span_gb))

    if args.out:
        meta = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": cpu_description(),
                "torch": torch.__version__, "native": native_cpu.status(),
                "read_bandwidth_GBps": {str(k): v for k, v in bandwidth.items()}}
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
