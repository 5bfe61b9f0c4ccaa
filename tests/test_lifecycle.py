"""The core lifecycle against a real server, for the driver this process runs (FRESHCONN_TEST_DRIVER)."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from django.db import Error, OperationalError, connection, connections, transaction
from django.test import override_settings

import freshconn
from freshconn.testing import expire_idle, kill_connection
from tests.app.models import Order
from tests.conftest import DRIVER, IDLE_PAST_TIMEOUT, counters

pytestmark = pytest.mark.server


def select_one() -> int:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
        return int(cursor.fetchone()[0])


def test_driver_under_test_is_the_one_requested(live: None) -> None:
    """The process really talks through the driver named by FRESHCONN_TEST_DRIVER."""
    select_one()
    module = type(connection.connection).__module__.split(".")[0]
    expected = {
        "mysqlclient": "MySQLdb",
        "pymysql": "pymysql",
        "mysqlconnector": "mysql",
        "psycopg": "psycopg",
        "psycopg2": "psycopg2",
    }
    assert module == expected[DRIVER]


@pytest.mark.slow
def test_without_freshconn_idle_past_server_timeout_breaks_the_worker(short_timeout: int) -> None:
    """Without freshconn, a query after the server's idle timeout fails, and so does every later one."""
    select_one()
    time.sleep(IDLE_PAST_TIMEOUT)
    with pytest.raises(Error) as first:
        select_one()
    assert freshconn.is_disconnect(first.value)
    with pytest.raises(Error) as second:
        select_one()
    assert freshconn.is_disconnect(second.value)


@pytest.mark.slow
def test_idle_past_server_timeout_next_unit_reconnects_without_a_ping(short_timeout: int) -> None:
    """A connection idle past the server's own limit is discarded with no round trip; the unit succeeds."""
    with freshconn.unit_of_work():
        select_one()
    time.sleep(IDLE_PAST_TIMEOUT)
    with freshconn.unit_of_work():
        assert select_one() == 1
    c = counters()
    assert c["discarded"] >= 1
    assert c["discarded_server_idle"] == 1
    assert c["pings"] == 0
    assert c["connects"] == 2


@pytest.mark.slow
def test_each_counts_time_blocked_fetching_as_idle(short_timeout: int) -> None:
    """A source that blocks past the server timeout between items never hands the handler a dead connection."""

    def slow_source() -> Iterator[int]:
        for i in range(2):
            if i:
                time.sleep(IDLE_PAST_TIMEOUT)
            yield i

    seen = []
    for item in freshconn.each(slow_source()):
        seen.append((item, select_one()))
    assert seen == [(0, 1), (1, 1)]
    assert counters()["discarded_server_idle"] == 1
    assert counters()["units"] == 2


def test_kill_between_units_next_unit_succeeds(live: None) -> None:
    """After a server-side KILL / pg_terminate_backend between units, the next unit gets a fresh connection."""
    with freshconn.unit_of_work():
        select_one()
    first = connection.connection
    kill_connection()
    with freshconn.unit_of_work():
        assert select_one() == 1
    assert connection.connection is not first
    c = counters()
    assert c["discarded_dead"] == 1
    assert c["connects"] == 2


def test_kill_during_unit_reaches_caller_then_next_unit_succeeds(live: None) -> None:
    """A connection killed mid-unit raises to the caller, is discarded at once, and the next unit works."""
    with pytest.raises(OperationalError) as err, freshconn.unit_of_work():
        select_one()
        kill_connection()
        select_one()
    assert freshconn.is_disconnect(err.value)
    assert connection.connection is None  # discarded at the end of the failed unit, no round trip
    assert counters()["discarded_error"] == 1
    pings_before = counters()["pings"]
    with freshconn.unit_of_work():
        assert select_one() == 1
    assert counters()["pings"] == pings_before


def test_error_swallowed_inside_unit_still_discards_dead_connection(live: None) -> None:
    """A disconnect the handler caught itself still gets the dead connection discarded at unit end."""
    with freshconn.unit_of_work():
        select_one()
        kill_connection()
        with contextlib.suppress(OperationalError):
            select_one()
    with freshconn.unit_of_work():
        assert select_one() == 1
    assert counters()["discarded"] == 1


def test_expire_idle_between_units_next_unit_succeeds(live: None) -> None:
    """When the server drops the session for idleness behind freshconn's back, the next unit still succeeds."""
    with freshconn.unit_of_work():
        select_one()
    expire_idle()
    with freshconn.unit_of_work():
        assert select_one() == 1
    assert counters()["discarded_dead"] == 1


def test_busy_units_send_no_pings_and_reuse_one_connection(live: None) -> None:
    """1,000 units with gaps below CHECK_AFTER_IDLE cost zero pings and a single connect."""
    Order.objects.create(ref="o-1", qty=3)
    pk = Order.objects.get(ref="o-1").pk
    freshconn.reset_stats()
    for _ in range(1000):
        with freshconn.unit_of_work():
            assert Order.objects.get(pk=pk).qty == 3
    c = counters()
    assert c["units"] == 1000
    assert c["pings"] == 0
    assert c["connects"] == 0  # the connection made before reset_stats() was reused throughout
    assert c["discarded"] == 0


def test_busy_units_from_a_fresh_process_state_connect_once(live: None) -> None:
    """Counting from no connection at all, 1,000 busy units open exactly one connection."""
    for _ in range(1000):
        with freshconn.unit_of_work():
            select_one()
    assert counters()["connects"] == 1
    assert counters()["pings"] == 0


@override_settings(FRESHCONN={"CHECK_AFTER_IDLE": 0.2})
def test_idle_beyond_check_after_idle_pings_once_then_reuses(live: None) -> None:
    """A connection idle longer than CHECK_AFTER_IDLE is pinged once and, being alive, reused."""
    with freshconn.unit_of_work():
        select_one()
    first = connection.connection
    time.sleep(0.3)
    with freshconn.unit_of_work():
        select_one()
    assert connection.connection is first
    assert counters()["pings"] == 1
    assert counters()["connects"] == 1


def test_django_conn_max_age_zero_still_persists_in_units(dbconf: Callable[..., None]) -> None:
    """Django's default CONN_MAX_AGE=0 (a connection per request) does not make units reconnect every time."""
    dbconf(CONN_MAX_AGE=0)
    for _ in range(5):
        with freshconn.unit_of_work():
            select_one()
        assert connection.connection is not None
    assert counters()["connects"] == 1
    assert counters()["pings"] == 0


def test_freshconn_conn_max_age_zero_connects_once_per_unit(dbconf: Callable[..., None]) -> None:
    """FRESHCONN['CONN_MAX_AGE'] = 0 restores a connection per unit, opened and closed like a request's."""
    with override_settings(FRESHCONN={"CONN_MAX_AGE": 0}):
        for _ in range(5):
            with freshconn.unit_of_work():
                select_one()
            assert connection.connection is None
    assert counters()["connects"] == 5
    assert counters()["pings"] == 0


def test_freshconn_conn_max_age_overrides_django_in_units(dbconf: Callable[..., None]) -> None:
    """FRESHCONN['CONN_MAX_AGE'] keeps connections persistent in units while Django's setting says 0."""
    dbconf(CONN_MAX_AGE=0)
    with override_settings(FRESHCONN={"CONN_MAX_AGE": None}):
        for _ in range(5):
            with freshconn.unit_of_work():
                select_one()
        assert counters()["connects"] == 1
        assert connection.connection is not None


def test_freshconn_conn_max_age_expires_connections(dbconf: Callable[..., None]) -> None:
    """A lifetime set in FRESHCONN closes the connection at the end of the first unit past it."""
    dbconf(CONN_MAX_AGE=None)
    with override_settings(FRESHCONN={"CONN_MAX_AGE": 0.2}):
        with freshconn.unit_of_work():
            select_one()
        time.sleep(0.25)
        with freshconn.unit_of_work():
            select_one()
        with freshconn.unit_of_work():
            select_one()
    c = counters()
    assert c["discarded_max_age"] == 1
    assert c["connects"] == 2


def test_unit_inside_callers_atomic_keeps_its_connection(live: None, caplog: pytest.LogCaptureFixture) -> None:
    """A unit that begins inside the caller's atomic block never closes that transaction's connection."""
    caplog.set_level(logging.WARNING, logger="freshconn")
    with override_settings(FRESHCONN={"CHECK_AFTER_IDLE": 0.0, "CONN_MAX_AGE": 0}), transaction.atomic():
        Order.objects.create(ref="in-tx")
        raw = connection.connection
        with freshconn.unit_of_work():
            Order.objects.create(ref="in-unit")
        assert connection.connection is raw
        assert connection.in_atomic_block
    assert Order.objects.filter(ref__in=["in-tx", "in-unit"]).count() == 2
    assert counters()["skipped_atomic"] == 1
    assert counters()["pings"] == 0
    assert counters()["discarded"] == 0


def test_nested_units_are_noops(live: None) -> None:
    """Only the outermost unit runs the lifecycle and counts."""

    @freshconn.unit_of_work
    def inner() -> int:
        return select_one()

    with freshconn.unit_of_work(), freshconn.unit_of_work(using="default"):
        assert inner() == 1
    assert counters()["units"] == 1


def test_decorator_with_and_without_parentheses(live: None) -> None:
    """unit_of_work works bare, called, and with an alias list, and keeps the function's name."""

    @freshconn.unit_of_work
    def bare() -> int:
        return select_one()

    @freshconn.unit_of_work(using=["default"])
    def called() -> int:
        return select_one()

    assert bare() + called() == 2
    assert bare.__name__ == "bare"
    assert counters()["units"] == 2


def test_using_limits_the_aliases_the_unit_touches(live: None) -> None:
    """A unit scoped to another alias neither checks nor counts the default alias."""
    with freshconn.unit_of_work():
        select_one()
    with freshconn.unit_of_work(using="lite"):
        select_one()
    assert counters()["units"] == 1


def test_each_ends_the_unit_when_the_loop_breaks(live: None) -> None:
    """Breaking out of each() ends the unit: a following unit is an outermost one that counts."""
    for _ in freshconn.each(range(10)):
        select_one()
        break
    with freshconn.unit_of_work():
        select_one()
    assert counters()["units"] == 2


def test_each_discards_a_connection_killed_in_the_loop_body(live: None) -> None:
    """An error raised out of an each() loop body still gets the dead connection discarded."""
    with pytest.raises(OperationalError):
        for _ in freshconn.each(range(3)):
            select_one()
            kill_connection()
            select_one()
    assert connection.connection is None
    for _ in freshconn.each(range(2)):
        assert select_one() == 1


def test_threads_keep_their_own_connections_and_counts(live: None) -> None:
    """Units in several threads each reuse their own connection; stats sum across threads."""
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(50):
                with freshconn.unit_of_work():
                    select_one()
        except BaseException as exc:
            errors.append(exc)
        finally:
            connections.close_all()

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert counters()["units"] == 200
    assert counters()["connects"] == 4
    assert counters()["pings"] == 0


def test_every_freshconn_log_record_names_alias_and_reason(live: None, caplog: pytest.LogCaptureFixture) -> None:
    """Records of the freshconn logger carry the alias and the reason in their extra fields."""
    caplog.set_level(logging.DEBUG, logger="freshconn")

    @freshconn.unit_of_work(retries=1)
    def read_after_kill() -> int:
        select_one()
        if not getattr(read_after_kill, "killed", False):
            read_after_kill.killed = True  # type: ignore[attr-defined]
            kill_connection()
        return select_one()

    assert read_after_kill() == 1
    with freshconn.unit_of_work():
        select_one()
    kill_connection()
    with freshconn.unit_of_work():
        select_one()
    records = [r for r in caplog.records if r.name == "freshconn"]
    assert len(records) >= 3
    for record in records:
        assert hasattr(record, "alias"), record.getMessage()
        # vars(): "reason" comes from freshconn's extra=, an attribute LogRecord does not declare.
        assert isinstance(vars(record)["reason"], str), record.getMessage()
        assert vars(record)["reason"], record.getMessage()
