"""What the ingress sends to an engine replica through a Serve handle, and what comes back.

The router reads these objects (``PendingRequest.args[0]``) to choose a replica, so they
carry the affinity key next to the raw HTTP request.
"""

from __future__ import annotations

from dataclasses import dataclass, field

REPLICA_HEADER = "x-moepager-replica"


@dataclass(frozen=True)
class ForwardedRequest:
    """One HTTP request for the replica's own moepager app (headers lower-case, body raw)."""

    method: str
    path: str
    query: str = ""
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""
    affinity_key: str | None = None
    home: str | None = None  # set by the router: the replica that served this key before, if any


@dataclass(frozen=True)
class ResponseStart:
    """The first item a replica yields: status and headers; body chunks (bytes) follow."""

    status: int
    headers: tuple[tuple[str, str], ...] = field(default=())


@dataclass(frozen=True)
class ReplicaProbe:
    """Routed to the ``index``-th replica (by id order), not by load: used to scrape every replica."""

    index: int
