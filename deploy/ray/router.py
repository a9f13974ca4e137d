"""Ray Serve request router that keeps a conversation on the replica whose expert cache it warmed.

Design: each replica's expert cache warms to the traffic it serves, so moving a conversation
to another replica costs it a cold cache. The router remembers, per affinity key (see
``deploy.ray.affinity``), the replica that last served it and ranks that replica first while
it is alive and not overloaded: its queue is at most ``max_imbalance`` requests longer than
the shortest queue (and below Serve's ``max_ongoing_requests``). Otherwise, and for requests
without a key, every replica is a candidate and Serve's base router takes the one with the
shortest queue. The key's home moves to wherever the request lands, so a conversation
that had to move stays on its new replica.

The router runs inside whichever process holds the handle (the ingress). It writes the key's
home into the request (``ForwardedRequest.home``) so the replica can count the outcome, and
moves the home to the replica that served the request when it completes. Serve ships this
module to the router by value: keep module-level state out of it.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import replace
from typing import Any

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from deploy.ray.protocol import ReplicaProbe


def _request_of(pending: PendingRequest | None) -> Any:
    return pending.args[0] if pending is not None and pending.args else None


class AffinityRouter(RequestRouter):
    """Same affinity key -> same replica while it is healthy and not overloaded; else least-loaded."""

    def initialize_state(self, max_imbalance: int = 8, max_keys: int = 100_000, **kwargs: Any) -> None:
        self._max_imbalance = int(max_imbalance)
        self._max_keys = int(max_keys)
        self._home: OrderedDict[str, ReplicaID] = OrderedDict()  # key -> replica that last served it
        self._in_flight: dict[str, str] = {}  # internal request id -> key, until the request completes

    def _queue_len(self, replica: RunningReplica) -> int | None:
        return self.replica_queue_len_cache.get(replica.replica_id)

    def _overloaded(self, home: RunningReplica, candidates: list[RunningReplica]) -> bool:
        home_len = self._queue_len(home)
        if home_len is None:
            return False  # unknown: the base router probes it and skips it if it is full
        shortest = min((q for r in candidates if (q := self._queue_len(r)) is not None), default=home_len)
        return home_len - shortest > self._max_imbalance

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        if pending_request is not None:
            # after every rank failed (all full), wait before trying again instead of spinning
            pending_request.routing_context.should_backoff = True
        request = _request_of(pending_request)
        if isinstance(request, ReplicaProbe):
            ordered = sorted(candidate_replicas, key=lambda r: r.replica_id.unique_id)
            return [[ordered[request.index % len(ordered)]]]
        key = getattr(request, "affinity_key", None)
        if key is None:
            return [list(candidate_replicas)]
        home_id = self._home.get(key)
        if len(self._in_flight) > self._max_keys:  # requests cancelled before they completed
            self._in_flight.clear()
        self._in_flight[pending_request.metadata.internal_request_id] = key
        pending_request.args = [replace(request, home=home_id.unique_id if home_id else None),
                                *pending_request.args[1:]]
        home = self._replicas.get(home_id) if home_id is not None else None
        alive = {r.replica_id for r in candidate_replicas}
        if home is None or home_id not in alive or self._overloaded(home, candidate_replicas):
            return [list(candidate_replicas)]
        others = [r for r in candidate_replicas if r.replica_id != home_id]
        return [[home], others] if others else [[home]]

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        key = self._in_flight.pop(internal_request_id, None)
        if key is None:
            return
        self._home[key] = replica_id
        self._home.move_to_end(key)
        while len(self._home) > self._max_keys:
            self._home.popitem(last=False)
