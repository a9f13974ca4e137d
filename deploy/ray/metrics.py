"""One Prometheus page for the whole deployment: every replica's metrics with a ``replica`` label.

Design: each replica renders its own moepager registry (``server.metrics``) exactly as
``moepager serve`` would; the ingress scrapes every replica through the router
(``ReplicaProbe``) and adds ``replica="<id>"`` to each sample. Each replica also counts where
the router placed its keyed requests (``AffinityMetrics``). Prometheus then needs one target per ingress, and the dashboards and alerts written
for one server keep working with ``sum by (replica)`` or without it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

AFFINITY_METRIC = "moepager_affinity_requests"  # exported as moepager_affinity_requests_total
RESERVED_LABEL = "replica"


OUTCOMES = ("hit", "moved", "new")


class AffinityMetrics:
    """A replica's count of keyed requests by routing outcome, in its own registry.

    ``hit``: the router sent the request to the replica that served its key before (this
    one: its warm replica); ``moved``: the key had a warm replica elsewhere (dead or
    overloaded); ``new``: no replica had served the key.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(AFFINITY_METRIC, "Keyed requests by routing outcome; hit = landed on the "
                                "replica that served the key before", ["outcome"], registry=self.registry)
        for outcome in OUTCOMES:
            self.requests.labels(outcome=outcome)

    def observe(self, home: str | None, replica: str) -> str:
        outcome = "new" if home is None else ("hit" if home == replica else "moved")
        self.requests.labels(outcome=outcome).inc()
        return outcome

    def render(self) -> str:
        return generate_latest(self.registry).decode()


class _Families(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterable[Metric]:
        return iter(self._families)


def merge_replica_metrics(pages: Mapping[str, str]) -> bytes:
    """Merge ``{replica id: exposition text}`` into one exposition with a ``replica`` label."""
    merged: dict[str, Metric] = {}
    for replica, text in sorted(pages.items()):
        for family in text_string_to_metric_families(text):
            target = merged.get(family.name)
            if target is None:
                target = merged[family.name] = Metric(family.name, family.documentation, family.type, family.unit)
            for sample in family.samples:
                labels = {RESERVED_LABEL: replica, **sample.labels}
                target.add_sample(sample.name, labels, sample.value, sample.timestamp)
    registry = CollectorRegistry()
    registry.register(_Families(list(merged.values())))
    return generate_latest(registry)
