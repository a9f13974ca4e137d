"""The per-layer routing bookkeeping: its short paths for a few decode tokens agree with the torch ops.

``unique_experts`` tallies small routings in Python and calls ``torch.unique`` past 256 entries;
``Routing`` sorts positions only when a per-expert strategy asks; ``PagedMoeCompute`` maps each
(token, slot) to its row in the wave by a lookup in Python for small routings, by index ops else.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from engine.offload import Routing, unique_experts


@pytest.mark.parametrize("shape", [(1, 1), (1, 8), (2, 6), (7, 4), (32, 8), (33, 8), (300, 2)])
def test_unique_experts_equals_torch_unique(shape):
    gen = torch.Generator().manual_seed(shape[0] * 31 + shape[1])
    idx = torch.randint(0, 40, shape, generator=gen)
    want_experts, want_counts = torch.unique(idx, return_counts=True)
    assert unique_experts(idx) == (want_experts.tolist(), want_counts.tolist())


@pytest.mark.parametrize("shape", [(1, 8), (5, 4), (40, 8)])
def test_routing_positions_group_each_experts_tokens(shape):
    gen = torch.Generator().manual_seed(7)
    idx = torch.randint(0, 12, shape, generator=gen)
    experts, counts = unique_experts(idx)
    routing = Routing(idx, idx, torch.rand(shape, generator=gen), experts, counts)
    flat = idx.reshape(-1).tolist()
    for e in experts:
        start, n = routing.span[e]
        want = [p for p, x in enumerate(flat) if x == e]  # token order within the expert
        assert routing.order[start:start + n] == want
        assert routing.positions(start, n).tolist() == want


@pytest.mark.parametrize("tokens", [1, 3, 40])
def test_wave_lookup_marks_other_waves_experts(tokens):
    from engine.host_compute import PagedMoeCompute

    gen = torch.Generator().manual_seed(tokens)
    idx = torch.randint(0, 16, (tokens, 8), generator=gen)
    experts, counts = unique_experts(idx)
    wave = experts[::2]  # half the layer's experts in this wave
    seen = {}

    def fake_moe_ffn(x, pages, rows, local, weights, *rest):
        seen["local"] = local
        return torch.zeros(x.shape[0], x.shape[1])

    compute = object.__new__(PagedMoeCompute)
    compute.fmt, compute.act, compute.alpha, compute.limit = None, "silu", 1.0, 7.0
    compute._lut = torch.full((16,), -1, dtype=torch.int64)
    routing = Routing(idx, idx, torch.rand(tokens, 8, generator=gen), experts, counts)

    class Out:
        def add(self, y):
            seen["y"] = y

    import engine.host_compute as hc

    real, hc.moe_ffn = hc.moe_ffn, fake_moe_ffn
    try:
        compute(None, torch.zeros(tokens, 4), routing, SimpleNamespace(pages=None), wave, list(range(len(wave))),
                Out())
    finally:
        hc.moe_ffn = real
    at = {e: i for i, e in enumerate(wave)}
    want = torch.tensor([[at.get(e, -1) for e in row] for row in idx.tolist()])
    assert torch.equal(seen["local"], want)
    assert (seen["local"] == -1).any() and (seen["local"] >= 0).any()
