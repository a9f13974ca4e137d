"""Cache-aware routing: delta 0 is the identity; near-ties are swapped for resident experts."""

from __future__ import annotations

import pytest
import torch

from cache.routing import cache_aware_route


def _inputs(seed=0, T=6, E=8, K=2):
    g = torch.Generator().manual_seed(seed)
    scores = torch.softmax(torch.randn(T, E, generator=g), dim=-1)
    weights, index = scores.topk(K, dim=-1)
    resident = torch.zeros(E, dtype=torch.bool)
    resident[::2] = True
    return scores, index, weights, resident


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_delta_zero_is_bit_identical(seed):
    scores, index, weights, resident = _inputs(seed)
    out = cache_aware_route(scores, index, weights, resident, 0.0)
    assert torch.equal(out.top_k_index, index) and out.top_k_index.dtype == index.dtype
    assert torch.equal(out.top_k_weights, weights)
    assert int(out.substitutions) == 0


def test_substitutes_a_resident_near_tie_and_keeps_the_weight():
    scores = torch.tensor([[0.40, 0.35, 0.05, 0.20],    # picks 0, 1; 1 missing, 3 resident at 0.20
                           [0.50, 0.30, 0.15, 0.05]])   # picks 0, 1; 1 missing, best resident 2 at 0.15
    index = torch.tensor([[0, 1], [0, 1]])
    weights = torch.tensor([[0.6, 0.4], [0.7, 0.3]])
    resident = torch.tensor([True, False, True, True])
    # delta 0.5: 0.20 >= 0.175 (swap), 0.15 >= 0.15 (swap).
    out = cache_aware_route(scores, index, weights, resident, 0.5)
    assert out.top_k_index.tolist() == [[0, 3], [0, 2]]
    assert torch.equal(out.top_k_weights, weights)
    assert int(out.substitutions) == 2
    # delta 0.4: 0.20 >= 0.21 fails, 0.15 >= 0.18 fails.
    out = cache_aware_route(scores, index, weights, resident, 0.4)
    assert out.top_k_index.tolist() == [[0, 1], [0, 1]]
    assert int(out.substitutions) == 0


def test_never_selects_an_expert_twice_for_one_token():
    scores = torch.tensor([[0.30, 0.30, 0.29, 0.11]])
    index = torch.tensor([[0, 1]])
    weights = torch.tensor([[0.5, 0.5]])
    resident = torch.tensor([False, False, True, False])
    out = cache_aware_route(scores, index, weights, resident, 0.9)
    row = out.top_k_index[0].tolist()
    assert row[0] == 2 and row[1] != 2 and len(set(row)) == 2
    assert int(out.substitutions) == 1  # expert 3 is not resident, so slot 1 keeps expert 1


def test_resident_selections_are_never_swapped():
    scores, index, weights, _ = _inputs(3)
    resident = torch.ones(scores.shape[1], dtype=torch.bool)
    out = cache_aware_route(scores, index, weights, resident, 1.0)
    assert torch.equal(out.top_k_index, index)


def test_bad_shapes_raise():
    scores, index, weights, resident = _inputs()
    with pytest.raises(ValueError):
        cache_aware_route(scores, index, weights, resident[:-1], 0.1)
    with pytest.raises(ValueError):
        cache_aware_route(scores, index, weights, resident, -0.1)
