"""Cache-aware routing (opt-in, changes model outputs): prefer a resident near-tie.

Design: when a token's selected expert is not resident but a resident expert of
the same layer, not already selected for that token, scores almost as high
(``score >= (1 - delta) * selected_score``, scores being router probabilities),
the token uses the resident expert instead and keeps the original routing weight.
This trades a little model fidelity for fewer copies; ``delta = 0`` returns the
inputs untouched, bit for bit. One pure function, no state: the engine calls it
between the router and the experts function, with the layer's residency mask.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class RoutingResult(NamedTuple):
    top_k_index: torch.Tensor  # [T, K]
    top_k_weights: torch.Tensor  # [T, K], unchanged values (original weights are kept)
    substitutions: torch.Tensor  # 0-dim int64: how many (token, slot) entries were replaced


def cache_aware_route(
    scores: torch.Tensor,  # [T, E] router probabilities
    top_k_index: torch.Tensor,  # [T, K]
    top_k_weights: torch.Tensor,  # [T, K]
    resident: torch.Tensor,  # [E] bool, this layer's residency
    delta: float,
) -> RoutingResult:
    """Substitute non-resident selections by resident near-ties; see the module docstring."""
    if delta < 0:
        raise ValueError(f"cache-aware routing delta must be >= 0, got {delta}")
    if scores.dim() != 2 or top_k_index.shape != top_k_weights.shape or top_k_index.shape[0] != scores.shape[0]:
        raise ValueError("cache_aware_route: expected scores [T, E], top_k_index and top_k_weights [T, K]")
    if resident.shape != (scores.shape[1],):
        raise ValueError(f"cache_aware_route: resident mask must be [E={scores.shape[1]}], got {tuple(resident.shape)}")
    zero = torch.zeros((), dtype=torch.int64, device=top_k_index.device)
    if delta == 0 or top_k_index.numel() == 0:
        return RoutingResult(top_k_index, top_k_weights, zero)

    resident = resident.to(device=scores.device, dtype=torch.bool)
    scores_f = scores.float()  # [T, E]
    index = top_k_index.clone()  # [T, K]
    neg_inf = torch.tensor(float("-inf"), device=scores.device)
    # Candidates: resident and not already selected for the token.
    avail = torch.where(resident.unsqueeze(0), scores_f, neg_inf)  # [T, E]
    avail = avail.scatter(1, index, neg_inf.expand(index.shape))
    count = zero.clone()
    for k in range(index.shape[1]):  # K is small; slot order = router order, best first
        chosen = index[:, k]  # [T]
        chosen_score = scores_f.gather(1, chosen.unsqueeze(1)).squeeze(1)  # [T]
        best_score, best_expert = avail.max(dim=1)  # [T], [T]
        swap = (~resident[chosen]) & torch.isfinite(best_score) & (best_score >= (1.0 - delta) * chosen_score)
        index[:, k] = torch.where(swap, best_expert, chosen)
        rows = swap.nonzero().squeeze(1)
        avail[rows, best_expert[rows]] = float("-inf")  # used now: not a candidate for the token's other slots
        count += swap.sum()
    return RoutingResult(index.to(top_k_index.dtype), top_k_weights, count)
