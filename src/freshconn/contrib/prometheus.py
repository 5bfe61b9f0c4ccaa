"""Export ``freshconn.stats()`` to Prometheus (extra ``prometheus``: ``pip install django-freshconn[prometheus]``).

    from freshconn.contrib.prometheus import register
    register()                      # into prometheus_client's default REGISTRY

Each counter becomes one counter family ``freshconn_<counter>_total`` with an ``alias`` label,
read from ``freshconn.stats()`` at scrape time (nothing is counted twice, nothing runs per query).
``freshconn.reset_stats()`` makes the counters go back to zero, which Prometheus treats as a reset.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import REGISTRY, Collector, CollectorRegistry

from .._stats import COUNTERS, stats

__all__ = ["FreshconnCollector", "register"]

HELP: dict[str, str] = {
    "units": "Units of work that ran freshconn's lifecycle for this alias.",
    "pings": "Liveness round trips sent before reusing a connection that sat idle.",
    "connects": "Database connections opened.",
    "discarded": "Connections closed by freshconn, whatever the reason.",
    "discarded_max_age": "Connections closed because their lifetime (CONN_MAX_AGE) was over.",
    "discarded_server_idle": "Connections closed because they sat idle past the server's own idle limit.",
    "discarded_dead": "Connections found dead before use (driver flag, closed socket, failed ping).",
    "discarded_error": "Connections closed after a disconnect error during a unit.",
    "discarded_autocommit": "Connections closed because a unit left autocommit in an unexpected state.",
    "skipped_atomic": "Units that began inside the caller's atomic block, leaving the connection alone.",
    "retries": "Units run again after a disconnect because that was provably safe.",
    "not_retried_unsafe": "Disconnects after which a retry was refused because it could apply a write twice.",
    "retries_exhausted": "Disconnects still failing after the last allowed retry.",
}


class FreshconnCollector(Collector):
    """A custom collector: one counter family per freshconn counter, labelled by database alias."""

    def __init__(self, namespace: str = "freshconn") -> None:
        self.namespace = namespace

    def _family(self, counter: str) -> CounterMetricFamily:
        return CounterMetricFamily(
            f"{self.namespace}_{counter}",
            HELP.get(counter, f"freshconn counter {counter}."),
            labels=["alias"],
        )

    def describe(self) -> Iterable[CounterMetricFamily]:
        return [self._family(counter) for counter in COUNTERS]

    def collect(self) -> Iterator[CounterMetricFamily]:
        snapshot = stats()
        names = list(COUNTERS) + sorted({c for row in snapshot.values() for c in row} - set(COUNTERS))
        for counter in names:
            family = self._family(counter)
            for alias in sorted(snapshot):
                family.add_metric([alias], snapshot[alias].get(counter, 0))
            yield family


def register(registry: CollectorRegistry = REGISTRY, namespace: str = "freshconn") -> FreshconnCollector:
    """Register a FreshconnCollector in ``registry`` (default: prometheus_client's global one)."""
    collector = FreshconnCollector(namespace)
    registry.register(collector)
    return collector
