"""Splitting a slot budget across MoE layers: ``uniform``, ``global`` or ``profile``.

Design: layers differ in how many distinct experts they touch per window of
tokens (early layers are often more diverse). ``profile`` gives each layer slots
in proportion to such a per-layer weight (e.g. working-set sizes measured on a
trace, see ``traces.stats.working_set_profile``), with at least ``min_per_layer``
slots (the engine passes top_k) and at most ``num_experts`` per layer, rounded by largest remainder so the total is
exact. ``global`` returns one capacity for a single shared pool. The string
forms (``profile:TRACE``) are parsed at the edge, in ``traces.simulate``.
"""

from __future__ import annotations

from collections.abc import Sequence

SPLITS = ("uniform", "global", "profile")


def split_capacity(
    total_slots: int,
    num_layers: int,
    split: str = "uniform",
    *,
    num_experts: int | None = None,
    profile: Sequence[float] | None = None,
    min_per_layer: int = 1,
) -> list[int]:
    """Capacities for ``ExpertCache``: one per layer, or ``[total]`` for ``split="global"``."""
    if num_layers < 1:
        raise ValueError("need at least one MoE layer")
    cap_max = num_experts if num_experts else total_slots
    if split == "global":
        if total_slots < 1:
            raise ValueError(f"a global cache needs at least one slot, got {total_slots}")
        return [min(total_slots, cap_max * num_layers)]
    floor = max(1, min(min_per_layer, cap_max))  # e.g. top_k: fewer slots than a token needs only thrash
    if total_slots < num_layers * floor:
        raise ValueError(f"{total_slots} slots cannot give each of {num_layers} layers {floor} slot(s)")
    if split == "uniform":
        weights = [1.0] * num_layers
    elif split == "profile":
        if profile is None or len(profile) != num_layers:
            raise ValueError(f"a profile split needs one weight per layer ({num_layers})")
        if any(w < 0 for w in profile) or sum(profile) <= 0:
            raise ValueError("profile weights must be non-negative with a positive sum")
        weights = [float(w) for w in profile]
    else:
        raise ValueError(f"unknown cache split {split!r}; choose one of {', '.join(SPLITS)}")
    total = min(total_slots, cap_max * num_layers)
    caps = [floor] * num_layers
    left = total - num_layers * floor
    # Water-filling with largest remainder, respecting the per-layer maximum.
    while left > 0:
        open_layers = [i for i in range(num_layers) if caps[i] < cap_max]
        if not open_layers:
            break
        wsum = sum(weights[i] for i in open_layers) or float(len(open_layers))
        shares = {i: left * ((weights[i] / wsum) if wsum else 1.0 / len(open_layers)) for i in open_layers}
        given = 0
        for i in open_layers:
            add = min(int(shares[i]), cap_max - caps[i])
            caps[i] += add
            given += add
        if given == 0:  # hand out the remainder one by one, largest fractional share first
            for i in sorted(open_layers, key=lambda i: (-(shares[i] - int(shares[i])), i)):
                if left - given == 0:
                    break
                if caps[i] < cap_max:
                    caps[i] += 1
                    given += 1
        left -= given
    return caps
