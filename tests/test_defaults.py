"""What a new user gets with only "freshconn" in INSTALLED_APPS and Django's default CONN_MAX_AGE=0.

No FRESHCONN setting anywhere in this module: every behaviour here is the product's default.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import pytest
from django.conf import settings
from django.db import Error, connection, transaction
from testbed.servers import DBServer

import freshconn
from freshconn.testing import kill_connection
from tests.app.models import Order
from tests.conftest import counters

pytestmark = [pytest.mark.server]


@pytest.fixture
def django_defaults(dbconf: Callable[..., None]) -> None:
    """The default alias exactly as Django's defaults leave it: CONN_MAX_AGE=0, no OPTIONS."""
    assert not hasattr(settings, "FRESHCONN")
    dbconf(CONN_MAX_AGE=0, OPTIONS={}, CONN_HEALTH_CHECKS=False)


def up_later(server: DBServer, seconds: float) -> threading.Timer:
    timer = threading.Timer(seconds, server.up)
    timer.start()
    return timer


def test_busy_units_make_one_connect_and_no_ping(django_defaults: None) -> None:
    """1,000 busy units on Django's CONN_MAX_AGE=0 reuse one connection with zero pings."""
    pk = Order.objects.create(ref="busy", qty=1).pk
    connection.close()
    freshconn.reset_stats()
    for _ in range(1000):
        with freshconn.unit_of_work():
            assert Order.objects.get(pk=pk).qty == 1
    c = counters()
    assert c["connects"] == 1
    assert c["pings"] == 0
    assert c["units"] == 1000


def test_code_outside_units_keeps_djangos_own_lifecycle(django_defaults: None) -> None:
    """Outside units Django's CONN_MAX_AGE=0 still applies: close_old_connections() closes the connection."""
    from django.db import close_old_connections

    with freshconn.unit_of_work():
        Order.objects.count()
    assert connection.connection is not None
    close_old_connections()
    assert connection.connection is None


@pytest.mark.slow
def test_server_restart_between_units_next_unit_waits_and_succeeds(django_defaults: None, server: DBServer) -> None:
    """A server that is down when the next unit starts is waited for; the unit then succeeds."""
    with freshconn.unit_of_work():
        Order.objects.count()
    server.down()
    timer = up_later(server, 2.0)
    try:
        with freshconn.unit_of_work():
            assert Order.objects.count() == 0
    finally:
        timer.join()
    c = counters()
    assert c["discarded_dead"] == 1
    assert c["reconnect_waits"] == 1
    assert c["reconnect_attempts"] >= 2


@pytest.mark.slow
def test_outage_inside_atomic_next_unit_waits_and_succeeds(django_defaults: None, server: DBServer) -> None:
    """When the server goes away inside atomic() (Django closes the connection itself), the next unit waits for it."""
    try:
        with pytest.raises(Error) as err, freshconn.unit_of_work(), transaction.atomic():
            Order.objects.create(ref="lost-in-tx")
            server.down()
            Order.objects.create(ref="never")
    finally:
        timer = up_later(server, 2.0)  # whatever happened, the server comes back for the next tests
    assert freshconn.is_disconnect(err.value)
    try:
        with freshconn.unit_of_work():
            assert Order.objects.count() == 0  # the transaction died with its session
    finally:
        timer.join()
    assert counters()["reconnect_waits"] == 1


@pytest.mark.slow
def test_retries_ride_an_outage_instead_of_burning_their_attempts(django_defaults: None, server: DBServer) -> None:
    """A retrying unit whose server went down waits for it before its retry, and succeeds on the second attempt."""
    calls: list[int] = []
    timers: list[threading.Timer] = []

    @freshconn.unit_of_work(retries=2)
    def work() -> int:
        calls.append(1)
        n: int = Order.objects.count()
        if len(calls) == 1:
            server.down()
            timers.append(up_later(server, 2.0))
            Order.objects.count()
        return n

    try:
        assert work() == 0
    finally:
        for t in timers:
            t.join()
    assert len(calls) == 2
    c = counters()
    assert c["retries"] == 1
    assert c["retries_exhausted"] == 0
    assert c["reconnect_waits"] == 1


@pytest.mark.slow
def test_an_outage_logs_one_warning_and_one_info_without_exception_names(
    django_defaults: None, server: DBServer, caplog: pytest.LogCaptureFixture
) -> None:
    """An outage is reported once as a WARNING and its end once as an INFO, in words (no exception class names)."""
    caplog.set_level(logging.INFO, logger="freshconn")
    with freshconn.unit_of_work():
        Order.objects.count()
    server.down()
    timer = up_later(server, 2.5)
    try:
        with freshconn.unit_of_work():
            Order.objects.count()
    finally:
        timer.join()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    # vars(): "reason" comes from freshconn's extra=, an attribute LogRecord does not declare.
    infos = [r for r in caplog.records if r.levelno == logging.INFO and vars(r)["reason"] == "server_available"]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert vars(warnings[0])["reason"] == "server_unavailable"
    assert "unreachable" in warnings[0].getMessage()
    for word in ("OperationalError", "Error:", "Exception", "app-secret-pw"):
        assert word not in warnings[0].getMessage()
    assert len(infos) == 1
    assert "reachable again" in infos[0].getMessage()


def test_kill_between_units_reconnects_at_once_without_waiting(django_defaults: None) -> None:
    """A killed session is not an outage: the next unit reconnects at its first attempt, no wait, no warning."""
    with freshconn.unit_of_work():
        Order.objects.count()
    kill_connection()
    with freshconn.unit_of_work():
        assert Order.objects.count() == 0
    c = counters()
    assert c["reconnect_attempts"] == 1
    assert c["reconnect_waits"] == 0


@pytest.mark.slow
def test_a_stop_signal_ends_a_wait_for_the_database_at_once(django_defaults: None, server: DBServer) -> None:
    """A SIGTERM handled by the program's own handler ends a unit's wait for a down server (ReconnectStopped)."""
    import os
    import signal

    stopped: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: stopped.append(signum))
    with freshconn.unit_of_work():
        Order.objects.count()
    server.down()
    sender = threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGTERM))
    sender.start()
    try:
        with pytest.raises(freshconn.ReconnectStopped), freshconn.unit_of_work():
            Order.objects.count()
    finally:
        sender.join()
        signal.signal(signal.SIGTERM, previous)
        server.up()
    assert stopped == [signal.SIGTERM]  # the program's own handler ran first
    # Far fewer attempts than a 60 s RECONNECT_TIMEOUT would make: the wait ended with the signal.
    assert counters()["reconnect_attempts"] <= 8


def test_stats_log_interval_logs_a_line_of_counters_from_unit_boundaries(
    dbconf: Callable[..., None], caplog: pytest.LogCaptureFixture
) -> None:
    """With STATS_LOG_INTERVAL, a running worker logs its counters periodically without any plumbing."""
    from django.test import override_settings

    from freshconn import _lifecycle

    caplog.set_level(logging.INFO, logger="freshconn")
    _lifecycle._next_stats_line = 0.0
    with override_settings(FRESHCONN={"STATS_LOG_INTERVAL": 0.2}):
        for _ in range(3):
            with freshconn.unit_of_work():
                Order.objects.count()
            threading.Event().wait(0.25)
        with freshconn.unit_of_work():
            Order.objects.count()
    lines = [r.getMessage() for r in caplog.records if getattr(r, "reason", None) == "stats"]
    assert lines
    assert any("units=" in line and "connects=" in line for line in lines)
