"""The Prometheus collector exports freshconn.stats() as counters, scraped from a real registry."""

from __future__ import annotations

from django.db import connections
from prometheus_client import CollectorRegistry, generate_latest

import freshconn
from freshconn import _stats
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
    assert registry.get_sample_value("freshconn_discarded_total", {"alias": "default", "reason": "dead"}) == 1
    assert registry.get_sample_value("freshconn_discarded_total", {"alias": "default", "reason": "max_age"}) == 0


def test_discards_are_one_counter_with_a_reason_label(live: None) -> None:
    """Every ``discarded_<reason>`` counter is a reason of freshconn_discarded_total, new reasons included."""
    _stats.bump("default", "discarded_error")
    _stats.bump("default", "discarded_some_new_reason", 2)  # a reason a later core adds: no change needed here
    registry = CollectorRegistry()
    register(registry)
    try:
        text = generate_latest(registry).decode()
    finally:
        freshconn.reset_stats()  # the made-up reason must not reach other tests
    reasons = [c.removeprefix("discarded_") for c in COUNTERS if c.startswith("discarded_")]
    for reason in reasons:
        assert f'freshconn_discarded_total{{alias="default",reason="{reason}"}}' in text
    assert 'freshconn_discarded_total{alias="default",reason="some_new_reason"} 2.0' in text
    assert "freshconn_discarded_error_total" not in text  # no separate family per reason any more
    assert text.count("# TYPE freshconn_discarded_total counter") == 1


def test_every_counter_has_a_family_even_before_any_unit() -> None:
    """With no stats yet, every counter is still declared (HELP and TYPE), with no samples."""
    freshconn.reset_stats()
    registry = CollectorRegistry()
    register(registry)
    text = generate_latest(registry).decode()
    for counter in COUNTERS:
        if not counter.startswith("discarded_"):
            assert f"# TYPE freshconn_{counter}_total counter" in text
    assert "alias=" not in text


def test_registering_twice_is_harmless() -> None:
    """register() a second time returns the collector already there: no DuplicateTimeseries, one family each."""
    registry = CollectorRegistry()
    first = register(registry)
    assert register(registry) is first
    direct = CollectorRegistry()
    mine = FreshconnCollector()
    direct.register(mine)  # registered by hand, then register() called as the docs say
    assert register(direct) is mine
    direct.unregister(mine)
    assert register(direct) is not mine  # gone from the registry: a fresh one is registered
    assert generate_latest(direct).decode().count("# TYPE freshconn_units_total counter") == 1


def test_custom_namespace(live: None) -> None:
    """A namespace renames the families, so two exporters can coexist in one registry."""
    with freshconn.unit_of_work():
        _query()
    registry = CollectorRegistry()
    register(registry)
    register(registry, namespace="worker_db")
    assert registry.get_sample_value("worker_db_units_total", {"alias": "default"}) == 1
    assert registry.get_sample_value("freshconn_units_total", {"alias": "default"}) == 1


def test_serve_exposes_the_counters_over_http(live: None) -> None:
    """serve(port) gives a worker without a web server a /metrics endpoint with freshconn's counters."""
    import socket
    import urllib.request

    from prometheus_client import CollectorRegistry

    from freshconn.contrib.prometheus import serve

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    registry = CollectorRegistry()
    server, thread = serve(port, registry=registry)
    try:
        with freshconn.unit_of_work(), connections["default"].cursor() as cursor:
            cursor.execute("SELECT 1")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
            body = reply.read().decode()
        assert 'freshconn_units_total{alias="default"} 1.0' in body
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)
