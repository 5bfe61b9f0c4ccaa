"""freshconn's pytest plugin is auto-loaded and its fixtures prove a worker survives real connection loss."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from django.db import connections

import freshconn
from freshconn import pytest_plugin
from freshconn._stats import COUNTERS


def _handle(ref: str) -> int:
    """A worker's unit: one query in one unit of work."""
    with freshconn.unit_of_work(), connections["default"].cursor() as cursor:
        cursor.execute("SELECT 1")
        return int(cursor.fetchone()[0])


def test_plugin_is_loaded_through_its_entry_point(request: pytest.FixtureRequest) -> None:
    """The pytest11 entry point registers freshconn.pytest_plugin under the name 'freshconn'."""
    assert request.config.pluginmanager.get_plugin("freshconn") is pytest_plugin


def test_stats_fixture_starts_from_zero(live: None, freshconn_stats: pytest_plugin.StatsProbe) -> None:
    """The stats fixture resets the counters and returns every counter, at zero before any unit."""
    assert freshconn_stats("default") == dict.fromkeys(COUNTERS, 0)
    _handle("a")
    assert freshconn_stats("default")["units"] == 1
    assert freshconn_stats.all()["default"]["connects"] == 1
    freshconn_stats.reset()
    assert freshconn_stats.all() == {}


def test_worker_survives_a_kill(
    live: None, freshconn_kill: Callable[..., int], freshconn_stats: pytest_plugin.StatsProbe
) -> None:
    """After the kill fixture has the server kill the connection, the next unit reconnects and succeeds."""
    assert _handle("a") == 1
    killed = freshconn_kill()
    assert killed > 0
    assert _handle("b") == 1
    counts = freshconn_stats()
    assert (counts["connects"], counts["discarded"], counts["units"]) == (2, 1, 2)


def test_worker_survives_an_idle_expiry(
    live: None, freshconn_expire_idle: Callable[..., int], freshconn_stats: pytest_plugin.StatsProbe
) -> None:
    """After the expire-idle fixture has the server drop the idle session, the next unit reconnects."""
    assert _handle("a") == 1
    freshconn_expire_idle("default")
    assert _handle("b") == 1
    counts = freshconn_stats()
    assert (counts["connects"], counts["discarded"]) == (2, 1)


def test_stats_fixture_resets_counters_left_by_earlier_code(request: pytest.FixtureRequest) -> None:
    """Counters bumped before the fixture is set up read as zero through it."""
    from freshconn import _stats

    _stats.bump("default", "units", 5)
    probe: pytest_plugin.StatsProbe = request.getfixturevalue("freshconn_stats")
    assert probe("default")["units"] == 0
