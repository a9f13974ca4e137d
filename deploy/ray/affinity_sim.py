"""What affinity routing is worth: replay interleaved conversations over N replicas' expert caches.

Each replica has its own ``ExpertCache`` (the engine's, with a policy from the registry). A
stream of conversation turns, interleaved across conversations, arrives as a Poisson process
at a chosen utilization; a routing policy assigns each turn to a replica, and every replica
replays its turns' routing (one cache step per forward pass and MoE layer, as the engine
does) in the order they arrive. Hit rates per routing policy are what the table reports.

Routing policies mirror ``deploy.ray.router``:
- ``round_robin``: turn i goes to replica i mod N;
- ``least_loaded``: the replica with the fewest unfinished turns (ties: lowest index);
- ``affinity``: the replica that served the conversation's previous turn, unless its queue is
  more than ``max_imbalance`` turns longer than the shortest; otherwise least-loaded.

Model of time: a replica serves its turns one after the other (batch 1, FIFO), a turn taking
one time unit per routed token (prompt rows plus decode rows). Conversations resend their
history, so turn t re-prefills every earlier turn's tokens (no prefix cache): the rows of
turn t begin with the rows of turn t-1.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from cache.base import build_policy
from cache.manager import ExpertCache

ROUTINGS = ("round_robin", "least_loaded", "affinity")


@dataclass(frozen=True)
class Turn:
    """One request of a conversation: its forward passes, each a tuple of per-layer unique experts."""

    conversation: int
    index: int
    steps: tuple[tuple[tuple[int, ...], ...], ...]  # [step][layer] -> sorted unique expert ids
    phases: tuple[int, ...]  # per step: 0 prefill, 1 decode
    tokens: int  # routed rows: the turn's service time


def _steps_from_rows(experts: np.ndarray, phase: np.ndarray, step: np.ndarray | None):
    """Group rows [n, L, K] into forward passes: by ``step`` if given, else the prefill together
    and one decode row per pass."""
    n = len(experts)
    if step is not None:
        bounds = [0, *(np.flatnonzero(np.diff(step)) + 1).tolist(), n]
    else:
        decode = np.flatnonzero(phase == 1)
        first_decode = int(decode[0]) if len(decode) else n
        bounds = sorted({0, first_decode, *range(first_decode, n + 1)} | {n})
    steps, phases = [], []
    for a, b in itertools.pairwise(bounds):
        if b <= a:
            continue
        block = experts[a:b]  # [rows, L, K]
        steps.append(tuple(tuple(np.unique(block[:, layer, :]).tolist()) for layer in range(block.shape[1])))
        phases.append(int(phase[a]))
    return tuple(steps), tuple(phases)


def conversations_from_trace(trace) -> list[list[Turn]]:
    """Turns of a recorded trace, grouped by ``meta["conversations"]`` (lists of request ids in
    turn order); without it every request is a one-turn conversation."""
    groups = trace.meta.get("conversations")
    if groups is None:
        groups = [[int(r)] for r in dict.fromkeys(trace.request.tolist())]
    out = []
    for c, requests in enumerate(groups):
        turns = []
        for t, request in enumerate(requests):
            rows = np.flatnonzero(trace.request == request)
            step = None if trace.step is None else trace.step[rows]
            steps, phases = _steps_from_rows(trace.experts[rows].astype(np.int64), trace.phase[rows], step)
            turns.append(Turn(c, t, steps, phases, len(rows)))
        out.append(turns)
    return out


def synthetic_conversations(*, conversations: int = 32, turns: int = 4, prompt_tokens: int = 32,
                            decode_tokens: int = 16, layers: int = 8, experts: int = 64, top_k: int = 4,
                            topic_experts: int = 12, locality: float = 0.8, seed: int = 0) -> list[list[Turn]]:
    """Conversations with a topic each: per layer, a token picks its experts from the topic's
    ``topic_experts`` with probability ``locality``, else uniformly. History is re-prefilled."""
    if not top_k <= topic_experts <= experts:
        raise ValueError(f"need top_k <= topic_experts <= experts, got {top_k}, {topic_experts}, {experts}")
    rng = np.random.default_rng(seed)
    out = []
    for c in range(conversations):
        topic = [rng.choice(experts, size=topic_experts, replace=False) for _ in range(layers)]

        def token(topic: list[np.ndarray] = topic) -> np.ndarray:  # [L, K]
            rows = np.empty((layers, top_k), dtype=np.int64)
            for layer in range(layers):
                pool = topic[layer] if rng.random() < locality else np.arange(experts)
                rows[layer] = rng.choice(pool, size=top_k, replace=False)
            return rows

        history: list[np.ndarray] = []
        convo = []
        for t in range(turns):
            prompt = history + [token() for _ in range(prompt_tokens)]
            decode = [token() for _ in range(decode_tokens)]
            rows = np.stack(prompt + decode)
            phase = np.array([0] * len(prompt) + [1] * len(decode), dtype=np.int8)
            steps, phases = _steps_from_rows(rows, phase, None)
            convo.append(Turn(c, t, steps, phases, len(rows)))
            history = prompt + decode
        out.append(convo)
    return out


def interleave(conversations: Sequence[Sequence[Turn]], seed: int = 0) -> list[Turn]:
    """One arrival order: conversations interleaved at random, each keeping its turn order."""
    rng = random.Random(seed)
    cursors = [0] * len(conversations)
    live = [c for c in range(len(conversations)) if conversations[c]]
    order = []
    while live:
        c = rng.choice(live)
        order.append(conversations[c][cursors[c]])
        cursors[c] += 1
        if cursors[c] == len(conversations[c]):
            live.remove(c)
    return order


def route(turns: Sequence[Turn], routing: str, replicas: int, *, utilization: float = 0.7,
          max_imbalance: int = 8, seed: int = 0) -> list[int]:
    """The replica of each turn under ``routing`` (one of ``ROUTINGS``)."""
    if routing not in ROUTINGS:
        raise ValueError(f"unknown routing {routing!r}; known: {', '.join(ROUTINGS)}")
    rng = random.Random(seed)
    mean_service = sum(t.tokens for t in turns) / max(1, len(turns))
    rate = utilization * replicas / mean_service
    finish: list[list[float]] = [[] for _ in range(replicas)]  # finish times of each replica's turns
    free_at = [0.0] * replicas
    home: dict[int, int] = {}
    clock = 0.0
    out = []
    for i, turn in enumerate(turns):
        clock += rng.expovariate(rate)
        queue = [sum(1 for f in finish[r] if f > clock) for r in range(replicas)]
        least = min(range(replicas), key=lambda r: (queue[r], r))
        if routing == "round_robin":
            chosen = i % replicas
        elif routing == "least_loaded":
            chosen = least
        else:
            warm = home.get(turn.conversation)
            chosen = warm if warm is not None and queue[warm] - queue[least] <= max_imbalance else least
        home[turn.conversation] = chosen
        start = max(clock, free_at[chosen])
        free_at[chosen] = start + turn.tokens
        finish[chosen].append(free_at[chosen])
        out.append(chosen)
    return out


def _policy(name: str, layers: int, experts: int):
    kwargs = {"num_layers": layers, "num_experts": experts} if name == "eam" else {}
    if name == "nextuse":
        kwargs = {"num_layers": layers}
    return build_policy(name, **kwargs)


def replay(turns: Sequence[Turn], assignment: Sequence[int], replicas: int, *, policy: str = "lru",
           slots_per_layer: int, layers: int, experts: int) -> dict[str, float]:
    """Hit rates when every replica replays its turns, in arrival order, through its own cache."""
    caches = [ExpertCache(_policy(policy, layers, experts), layers, [slots_per_layer] * layers)
              for _ in range(replicas)]
    steps = [0] * replicas
    queries = [0, 0]
    hits = [0, 0]
    for turn, r in zip(turns, assignment):
        cache = caches[r]
        cache.start_request((turn.conversation, turn.index))
        for per_layer, phase in zip(turn.steps, turn.phases):
            before_q, before_h = sum(cache.queries), sum(cache.hits)
            for layer, chosen in enumerate(per_layer):
                cache.access(layer, chosen, steps[r])
                steps[r] += 1
            queries[phase] += sum(cache.queries) - before_q
            hits[phase] += sum(cache.hits) - before_h
    total_q = sum(queries)
    return {"hit_rate": sum(hits) / total_q if total_q else 0.0,
            "prefill_hit_rate": hits[0] / queries[0] if queries[0] else 0.0,
            "decode_hit_rate": hits[1] / queries[1] if queries[1] else 0.0}


def warm_turn_share(turns: Sequence[Turn], assignment: Sequence[int]) -> float:
    """Share of returning turns (index > 0) served by the replica of the conversation's previous turn."""
    last: dict[int, int] = {}
    warm = returning = 0
    for turn, r in zip(turns, assignment):
        if turn.conversation in last:
            returning += 1
            warm += last[turn.conversation] == r
        last[turn.conversation] = r
    return warm / returning if returning else 0.0


def affinity_table(conversations: Sequence[Sequence[Turn]], *, replicas: int, slots_per_layer: int,
                   layers: int, experts: int, policy: str = "lru", utilization: float = 0.7,
                   max_imbalance: int = 8, seeds: Sequence[int] = (0, 1, 2)) -> list[dict]:
    """One row per routing policy: hit rates averaged over ``seeds`` (arrival orders and times)."""
    rows = []
    for routing in ROUTINGS:
        acc: dict[str, float] = {}
        for seed in seeds:
            turns = interleave(conversations, seed)
            assignment = route(turns, routing, replicas, utilization=utilization, max_imbalance=max_imbalance,
                               seed=seed)
            result = replay(turns, assignment, replicas, policy=policy, slots_per_layer=slots_per_layer,
                            layers=layers, experts=experts)
            result["warm_turn_share"] = warm_turn_share(turns, assignment)
            for key, value in result.items():
                acc[key] = acc.get(key, 0.0) + value / len(seeds)
        rows.append({"routing": routing, "replicas": replicas, "policy": policy,
                     "slots_per_layer": slots_per_layer, **acc})
    return rows
