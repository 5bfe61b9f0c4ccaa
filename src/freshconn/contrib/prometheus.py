"""Export ``freshconn.stats()`` to Prometheus (extra ``prometheus``: ``pip install django-freshconn[prometheus]``).

    from freshconn.contrib.prometheus import register
    register()                      # into prometheus_client's default REGISTRY; calling it again is harmless

Each counter becomes one counter family ``freshconn_<counter>_total`` with an ``alias`` label,
read from ``freshconn.stats()`` at scrape time (nothing is counted twice, nothing runs per query).
Discards are one family, ``freshconn_discarded_total``, with labels ``alias`` and ``reason``: one
reason per ``discarded_<reason>`` counter, so reasons the core adds later appear by themselves.
``freshconn.reset_stats()`` makes the counters go back to zero, which Prometheus treats as a reset.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import REGISTRY, Collector, CollectorRegistry

from freshconn import COUNTERS, stats

__all__ = ["FreshconnCollector", "register", "serve"]

DISCARDED = "discarded"
_REASON_PREFIX = DISCARDED + "_"

HELP: dict[str, str] = {
    "units": "Units of work that ran freshconn's lifecycle for this alias.",
    "pings": "Liveness round trips sent before reusing a connection that sat idle.",
    "connects": "Database connections opened.",
    DISCARDED: "Connections closed by freshconn, by reason (max_age: lifetime over; server_idle: idle past the "
    "server's limit; dead: found dead before use; error: a disconnect during a unit; autocommit: left in an "
    "unexpected state).",
    "skipped_atomic": "Units that began inside the caller's atomic block, leaving the connection alone.",
    "retries": "Units run again after a disconnect because that was provably safe.",
    "not_retried_unsafe": "Disconnects after which a retry was refused because it could apply a write twice.",
    "retries_exhausted": "Disconnects still failing after the last allowed retry.",
    "reconnect_waits": "Times a unit waited for its server to come back (restart, failover, outage).",
    "reconnect_attempts": "Connection attempts made while reopening what an outage took.",
    "ambiguous_commits": "COMMITs lost in flight (AmbiguousCommitError raised).",
}


def _split(names: Iterable[str]) -> tuple[list[str], list[str]]:
    """(plain counters, discard reasons): the total ``discarded`` is the sum of the reasons, not exported."""
    plain, reasons = [], []
    for name in names:
        if name.startswith(_REASON_PREFIX):
            reasons.append(name[len(_REASON_PREFIX) :])
        elif name != DISCARDED:
            plain.append(name)
    return plain, reasons


class FreshconnCollector(Collector):
    """A custom collector: one counter family per freshconn counter, labelled by database alias."""

    def __init__(self, namespace: str = "freshconn") -> None:
        self.namespace = namespace

    def _family(self, counter: str) -> CounterMetricFamily:
        labels = ["alias", "reason"] if counter == DISCARDED else ["alias"]
        return CounterMetricFamily(
            f"{self.namespace}_{counter}", HELP.get(counter, f"freshconn counter {counter}."), labels=labels
        )

    def describe(self) -> Iterable[CounterMetricFamily]:
        plain, _ = _split(COUNTERS)
        return [self._family(counter) for counter in (*plain, DISCARDED)]

    def collect(self) -> Iterator[CounterMetricFamily]:
        snapshot = stats()
        seen = {c for row in snapshot.values() for c in row} - set(COUNTERS)
        plain, reasons = _split([*COUNTERS, *sorted(seen)])
        aliases = sorted(snapshot)
        for counter in plain:
            family = self._family(counter)
            for alias in aliases:
                family.add_metric([alias], snapshot[alias].get(counter, 0))
            yield family
        discarded = self._family(DISCARDED)
        for alias in aliases:
            for reason in reasons:
                discarded.add_metric([alias, reason], snapshot[alias].get(_REASON_PREFIX + reason, 0))
        yield discarded


_lock = threading.Lock()
#: The collector register() put in each registry, per namespace: registering again returns it.
_registered: weakref.WeakKeyDictionary[CollectorRegistry, dict[str, FreshconnCollector]] = weakref.WeakKeyDictionary()


def _registered_here(registry: CollectorRegistry, namespace: str) -> FreshconnCollector | None:
    """The FreshconnCollector for ``namespace`` that ``registry`` holds now, if any.

    prometheus_client has no public lookup: its ``_collector_to_names`` is read when present (a
    collector registered directly, or one unregistered since), else what register() remembers.
    """
    remembered = _registered.get(registry, {}).get(namespace)
    collectors = getattr(registry, "_collector_to_names", None)
    if not isinstance(collectors, dict):
        return remembered
    if remembered is not None and remembered in collectors:
        return remembered
    return next((c for c in collectors if isinstance(c, FreshconnCollector) and c.namespace == namespace), None)


def register(registry: CollectorRegistry = REGISTRY, namespace: str = "freshconn") -> FreshconnCollector:
    """Register a FreshconnCollector in ``registry`` (default: prometheus_client's global one), once.

    Calling it again (an ``AppConfig.ready()`` run twice, a test re-importing the worker module)
    returns the collector already registered instead of raising "Duplicated timeseries".
    """
    with _lock:
        collector = _registered_here(registry, namespace)
        if collector is None:
            collector = FreshconnCollector(namespace)
            registry.register(collector)
        _registered.setdefault(registry, {})[namespace] = collector
        return collector


def serve(port: int, addr: str = "127.0.0.1", registry: CollectorRegistry = REGISTRY) -> Any:
    """Register the collector and serve ``/metrics`` on ``addr:port`` from a daemon thread.

    For a worker that has no web server of its own: one line, e.g. in ``AppConfig.ready()`` or at
    the top of the worker command, and its counters can be scraped (or read with ``curl``). Binds
    loopback by default: expose it deliberately. Returns prometheus_client's (server, thread).
    """
    from prometheus_client import start_http_server

    register(registry)
    return start_http_server(port, addr=addr, registry=registry)
