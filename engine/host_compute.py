"""Computing experts straight from host pages: the native per-layer kernel, chosen once.

On a CPU-only machine every expert is computed from its host page (a slot is
the page); on a GPU machine the misses that hybrid execution keeps on the host
are. Either way one ``cuda_ext.moe_ffn`` call per wave reads each expert's page
once for all its tokens, float or int8 / int4, with the native kernels where
they built, and the torch reference otherwise.
"""

from __future__ import annotations

import sys

import numpy as np
import torch

from cuda_ext import moe_ffn, native_cpu, silu_layout
from cuda_ext.pages import apply_act
from engine.errors import MoepagerError
from engine.offload import SMALL_ROUTING, LayerOutput, PageTable, Routing, TorchExpertCompute


class PagedMoeCompute:
    """The host strategy: one ``cuda_ext.moe_ffn`` call per wave, straight from the pages.

    The native kernel reads each expert's page once for all its tokens, float or quantized, and
    splits (expert, output rows) over the threads; nothing is gathered or copied out of the pages.
    """

    def __init__(self, fmt, act: str, alpha: float, limit: float, num_experts: int) -> None:
        self.fmt, self.act, self.alpha, self.limit = fmt, act, alpha, limit
        self._lut = torch.full((num_experts,), -1, dtype=torch.int64)  # expert -> index into the wave's rows

    def __call__(self, module, hidden: torch.Tensor, routing: Routing, table: PageTable, experts: list[int],
                 rows: list[int], out: LayerOutput) -> None:
        if hidden.device.type == "cpu":
            x, weights = hidden, routing.top_k_weights
        else:
            x, weights = routing.on_host(hidden)  # misses computed on the host of a GPU machine
        idx_host = routing.idx_host
        if idx_host.numel() <= SMALL_ROUTING:  # a lookup in Python beats three index ops
            at = {e: i for i, e in enumerate(experts)}
            local = torch.from_numpy(np.array([[at.get(e, -1) for e in row] for row in idx_host.tolist()],
                                              dtype=np.int64))  # [T, K]; numpy builds it several us sooner
        else:
            lut = self._lut
            wave = torch.tensor(experts, dtype=torch.int64)  # [U]
            lut[wave] = torch.arange(len(experts))
            local = lut[idx_host]  # [T, K]: index into rows, -1 for experts of other waves
            lut[wave] = -1
        y = moe_ffn(x, table.pages, torch.from_numpy(np.array(rows, dtype=np.int64)), local, weights, self.fmt,
                    self.act, self.alpha, self.limit)  # [T, H]
        out.add(y)


def native_act(module: torch.nn.Module) -> tuple[str, float, float] | None:
    """The native kernels' activation for this experts module: (act, alpha, limit), or None.

    SiLU-gated modules are recognised by ``cuda_ext.silu_layout``; GPT-OSS's clamped SwiGLU by its
    parameters and a numerical probe with large values, so a variant the kernel does not compute
    can never pass.
    """
    if silu_layout(module) is not None:
        return "silu", 1.702, 7.0
    alpha, limit = getattr(module, "alpha", None), getattr(module, "limit", None)
    if alpha is None or limit is None or getattr(module, "is_concatenated", True):
        return None
    probe = torch.randn(3, 16, generator=torch.Generator().manual_seed(0)) * 20  # [3, 2I], I = 8
    try:
        got = module._apply_gate(probe)
    except Exception:  # noqa: BLE001 - an unusual gate is simply not the kernel's
        return None
    want = apply_act(probe, True, "swiglu_oai", float(alpha), float(limit))
    return ("swiglu_oai", float(alpha), float(limit)) if torch.allclose(got, want, rtol=1e-5, atol=1e-5) else None


def host_compute_for(store, module: torch.nn.Module, progress: bool = True):
    """How experts read from host pages are computed: one native ``moe_ffn`` call per wave when the
    kernels serve this CPU (or the pages are quantized, which only ``moe_ffn`` reads), else the torch
    reference one expert at a time (the ground truth, also with ``MOEPAGER_NATIVE=0``)."""
    act = native_act(module)
    quantized = store.fmt.kind != "float" or store.fmt.dtype != store.dtype
    native = native_cpu.build(progress=_progress_line if progress else None)
    if act is not None and (native or quantized):
        return PagedMoeCompute(store.fmt, *act, store.num_experts)
    if quantized:
        raise MoepagerError("--expert-dtype: quantized or converted expert pages need the moe_ffn kernel, which "
                            "does not support this architecture's activation; use --expert-dtype auto")
    return TorchExpertCompute()


def _progress_line(line: str) -> None:
    print(f"moepager: {line}", file=sys.stderr, flush=True)


