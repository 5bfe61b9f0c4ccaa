"""close_old_connections() as a unit boundary (FRESHCONN['ADOPT_CLOSE_OLD_CONNECTIONS']), and harmless inside units.

The loops here are shaped like the ones freshconn's users do not own (django-tasks-db's db_worker,
Django-Q2, huey's db_task): they call ``django.db.close_old_connections()`` around each job and
know nothing of freshconn.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Callable, Iterator

import pytest
from django.core.signals import request_finished, request_started
from django.db import Error, close_old_connections, connection, transaction
from django.dispatch import Signal
from django.test import override_settings
from testbed.servers import DBServer

import freshconn
from freshconn.testing import kill_connection
from tests.app.models import Order
from tests.conftest import IDLE_PAST_TIMEOUT, counters, short_server_timeout_options

pytestmark = [pytest.mark.server]

ADOPT = {"ADOPT_CLOSE_OLD_CONNECTIONS": True}


def job(ref: str) -> int:
    """One job of a loop freshconn's user does not own: a boundary, the work, a boundary."""
    close_old_connections()
    Order.objects.create(ref=ref)
    n: int = Order.objects.count()
    close_old_connections()
    return n


@pytest.fixture
def persistent_short_timeout(dbconf: Callable[..., None]) -> None:
    """Persistent connections (as a worker wants them) that the server drops after 2 s idle."""
    dbconf(CONN_MAX_AGE=None, OPTIONS=short_server_timeout_options())


@pytest.fixture
def adopted() -> Iterator[None]:
    with override_settings(FRESHCONN=ADOPT):
        yield


@pytest.mark.slow
def test_without_adoption_idle_past_the_server_timeout_breaks_the_loop(persistent_short_timeout: None) -> None:
    """For contrast: Django's own close_old_connections() does not see the server's idle drop; the job fails."""
    job("a")
    time.sleep(IDLE_PAST_TIMEOUT)
    with pytest.raises(Error) as err:
        job("b")
    assert freshconn.is_disconnect(err.value)


@pytest.mark.slow
def test_adopted_boundary_survives_idle_past_the_server_timeout(persistent_short_timeout: None, adopted: None) -> None:
    """With adoption, the loop's own close_old_connections() drops the expired connection without a round trip."""
    assert job("a") == 1
    time.sleep(IDLE_PAST_TIMEOUT)
    assert job("b") == 2
    c = counters()
    assert c["discarded_server_idle"] == 1
    assert c["pings"] == 0


def test_adopted_boundary_survives_a_kill(persistent_short_timeout: None, adopted: None) -> None:
    """After a KILL between jobs, the next job's boundary discards the dead connection and the job succeeds."""
    job("a")
    kill_connection()
    assert job("b") == 2
    assert counters()["discarded_dead"] == 1


@pytest.mark.slow
def test_adopted_boundary_waits_for_a_restarting_server(
    persistent_short_timeout: None, adopted: None, server: DBServer
) -> None:
    """A server that is down at the next boundary is waited for; the job then runs once."""
    job("a")
    server.down()
    timer = threading.Timer(2.0, server.up)
    timer.start()
    try:
        assert job("b") == 2
    finally:
        timer.join()
    assert counters()["reconnect_waits"] == 1
    assert list(Order.objects.order_by("ref").values_list("ref", flat=True)) == ["a", "b"]


def test_busy_adopted_loop_on_djangos_default_makes_no_connect_and_no_ping(
    dbconf: Callable[..., None], adopted: None
) -> None:
    """With Django's CONN_MAX_AGE=0 and adoption, 1,000 busy boundaries reuse one connection with no ping."""
    dbconf(CONN_MAX_AGE=0, OPTIONS={})
    pk = Order.objects.create(ref="x").pk
    close_old_connections()
    Order.objects.get(pk=pk)  # warm
    freshconn.reset_stats()
    for _ in range(1000):
        close_old_connections()
        assert Order.objects.get(pk=pk).ref == "x"
    c = counters()
    assert c["connects"] == 0
    assert c["pings"] == 0
    assert c["units"] == 1000


def test_without_adoption_djangos_default_reconnects_every_job(dbconf: Callable[..., None]) -> None:
    """For contrast: without adoption, Django's CONN_MAX_AGE=0 makes the same loop connect for every job."""
    dbconf(CONN_MAX_AGE=0, OPTIONS={})
    for i in range(5):
        job(f"j{i}")
    assert counters()["connects"] == 5


def test_close_old_connections_inside_a_unit_is_harmless(dbconf: Callable[..., None]) -> None:
    """Inside a unit, close_old_connections() neither closes the unit's connection nor breaks its transaction."""
    dbconf(CONN_MAX_AGE=0, OPTIONS={})
    with freshconn.unit_of_work():
        Order.objects.create(ref="u1")
        raw = connection.connection
        close_old_connections()
        assert connection.connection is raw
        with transaction.atomic():
            Order.objects.create(ref="u2")
            close_old_connections()
            Order.objects.create(ref="u3")
    assert Order.objects.count() == 3
    assert counters()["connects"] == 1


def test_adopted_boundary_leaves_an_open_transaction_alone(persistent_short_timeout: None, adopted: None) -> None:
    """An adopted boundary inside atomic() (outside units) does not close the connection, where Django's would."""
    with transaction.atomic():
        Order.objects.create(ref="t1")
        close_old_connections()
        Order.objects.create(ref="t2")
    assert Order.objects.count() == 2
    assert counters()["skipped_atomic"] == 1


def test_web_requests_keep_djangos_lifecycle_with_adoption(dbconf: Callable[..., None], adopted: None) -> None:
    """With adoption on, the request signals still run Django's own step: CONN_MAX_AGE=0 closes at request end."""
    dbconf(CONN_MAX_AGE=0, OPTIONS={})
    request_started.send(sender=None)
    Order.objects.count()
    assert connection.connection is not None
    request_finished.send(sender=None)
    assert connection.connection is None
    # The same call outside a request is an adopted boundary: the connection persists.
    Order.objects.count()
    close_old_connections()
    assert connection.connection is not None


def test_adoption_off_restores_djangos_request_receivers(dbconf: Callable[..., None]) -> None:
    """Turning adoption off points the request signals back at Django's own close_old_connections."""
    with override_settings(FRESHCONN=ADOPT):
        assert close_old_connections not in _receivers(request_started)
    assert close_old_connections in _receivers(request_started)
    assert close_old_connections in _receivers(request_finished)


def _receivers(signal: Signal) -> list[object]:
    out: list[object] = []
    for entry in signal.receivers:  # (lookup_key, receiver[, is_async]); the receiver may be a weak reference
        receiver = entry[1]
        out.append(receiver() if isinstance(receiver, weakref.ReferenceType) else receiver)
    return out
