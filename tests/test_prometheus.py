"""The Prometheus collector exports freshconn.stats() as counters, scraped from a real registry."""

from __future__ import annotations

from django.db import connections
from prometheus_client import CollectorRegistry, generate_latest

import freshconn
from freshconn._stats import COUNTERS
from freshconn.contrib.prometheus import FreshconnCollector, register
from freshconn.testing import kill_connection


def _query() -> None:
    with connections["default"].cursor() as cursor:
        cursor.execute("SELECT 1")
        cursor.fetchall()


def test_scrape_after_real_units(live: None) -> None:
    """After three real units and a server-side kill, the scrape shows the units, connects and the discard."""
    for _ in range(2):
        with freshconn.unit_of_work():
            _query()
    kill_connection("default")
    with freshconn.unit_of_work():
        _query()
    registry = CollectorRegistry()
    register(registry)
    text = generate_latest(registry).decode()
    assert "# TYPE freshconn_units_total counter" in text
    assert 'freshconn_units_total{alias="default"} 3.0' in text
    assert 'freshconn_connects_total{alias="default"} 2.0' in text
    assert registry.get_sample_value("freshconn_discarded_total", {"alias": "default"}) == 1
    assert registry.get_sample_value("freshconn_discarded_dead_total", {"alias": "default"}) == 1


def test_every_counter_has_a_family_even_before_any_unit() -> None:
    """With no stats yet, every counter is still declared (HELP and TYPE), with no samples."""
    freshconn.reset_stats()
    registry = CollectorRegistry()
    register(registry)
    text = generate_latest(registry).decode()
    for counter in COUNTERS:
        assert f"# TYPE freshconn_{counter}_total counter" in text
    assert "alias=" not in text


def test_custom_namespace(live: None) -> None:
    """A namespace renames the families, so two exporters can coexist in one registry."""
    with freshconn.unit_of_work():
        _query()
    registry = CollectorRegistry()
    registry.register(FreshconnCollector(namespace="worker_db"))
    assert registry.get_sample_value("worker_db_units_total", {"alias": "default"}) == 1
