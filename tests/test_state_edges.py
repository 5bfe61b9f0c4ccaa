"""Edges of the connection state, error classification and redaction: rare but real paths, on real servers."""

from __future__ import annotations

import os
import select
import socket
import sys
import time
import types
from collections.abc import Callable, Iterator
from typing import Any

import django
import psycopg2
import pymysql
import pytest
from django.db import Error, IntegrityError, connection, connections, transaction
from django.test import override_settings
from testbed.servers import DBServer

import freshconn
from freshconn import _django, _doctor, _drivers, _pool, _state, conf
from freshconn._errors import AmbiguousCommitError, error_code
from freshconn._findings import by_doctor_id, hit
from freshconn._redact import ParamsError, describe_failure, safe_location
from freshconn._sessions import wait_session_gone
from freshconn.testing import kill_connection
from tests import test_retries
from tests.app.models import Order
from tests.conftest import (
    DRIVER,
    SHORT_TIMEOUT,
    VENDOR,
    backend_id,
    counters,
    run_async,
    short_server_timeout_options,
    wait_until_socket_shows_close,
)
from tests.test_retries import KillWhen, _block_commits

#: The fixture that makes the next COMMIT wait on the server (shared with tests/test_retries.py).
commit_blocker = test_retries.commit_blocker

SECRET = "Hunter2-s3cr3t"


def select_one() -> int:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
        return int(cursor.fetchone()[0])


# --- Pure: no server ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("location", "shown"),
    [
        # Only secret query parameters: no "?" is left behind.
        (f"postgresql://app:{SECRET}@db:5432/x?password={SECRET}&sslpassword={SECRET}", "postgresql://app@db:5432/x"),
        # Spaces around "=", as libpq allows.
        (f"host = db port= 5432 password ={SECRET}", "host=db port=5432"),
        # A value that needs quoting keeps its quotes (and stays parseable); an empty one too.
        (f"host='db one' dbname='' password='{SECRET} x'", "host='db one' dbname=''"),
        (f"host=db password='it\\'s {SECRET}' user='o\\\\k'", "host=db user='o\\\\k'"),
        # A key with no "=": malformed, shown as a placeholder, never as its text.
        (f"host=db {SECRET}", "<connection string>"),
    ],
)
def test_safe_location_keeps_no_credential_of_unusual_connection_strings(location: str, shown: str) -> None:
    """URIs and conninfo strings of unusual shapes are rebuilt from their non-secret parts only."""
    result = safe_location(location)
    assert result == shown
    assert SECRET not in (result or "")
    if "=" in shown and not shown.startswith("<"):
        assert safe_location(shown) == shown  # what is shown is itself a valid, stable conninfo string


def test_a_driver_error_without_an_error_number_is_not_a_mysql_disconnect() -> None:
    """A MySQL driver error carrying only text (no error number) is not taken for a disconnect."""
    exc = pymysql.err.OperationalError("Lost connection to MySQL server")
    assert not freshconn.is_disconnect(exc)
    assert not freshconn.is_read_only(exc)


@pytest.mark.parametrize("value", [None, "25006", 1290, ("read-only",)])
def test_is_read_only_is_false_for_anything_but_an_exception(value: object) -> None:
    """is_read_only() answers False for values that are not exceptions, whatever they look like."""
    assert freshconn.is_read_only(value) is False


@pytest.mark.parametrize(
    ("exc", "label"),
    [
        (
            psycopg2.OperationalError(f"connection to server at db failed: timeout expired ({SECRET})"),
            "connection timed out",
        ),
        (psycopg2.OperationalError(f'could not translate host name "{SECRET}" to address'), "unknown host"),
        (psycopg2.OperationalError(f"FATAL: {SECRET}"), "connection failed"),
        (ValueError(SECRET), "connection failed"),
        (None, "connection failed"),
    ],
)
def test_error_code_labels_never_quote_the_message(exc: BaseException | None, label: str) -> None:
    """error_code() reduces any error to a fixed label: a PostgreSQL timeout is named, anything else is generic."""
    assert error_code(exc) == label


def test_ambiguous_commit_without_a_session_id_cannot_settle() -> None:
    """wait_until_settled() answers False at once when the lost session's id is unknown."""
    err = AmbiguousCommitError("lost")
    assert err.backend_id is None
    start = time.monotonic()
    assert err.wait_until_settled(timeout=30) is False
    assert time.monotonic() - start < 1


def test_frames_outside_atomic_exit_are_not_taken_for_it() -> None:
    """called_from_atomic_exit() is False for a stack without Atomic.__exit__, however deep, and for no frame."""
    assert _django.called_from_atomic_exit(sys._getframe()) is False
    assert _django.called_from_atomic_exit(sys._getframe(), depth=1000) is False
    assert _django.called_from_atomic_exit(None) is False


def test_findings_are_found_by_their_doctor_id() -> None:
    """Every catalogued finding is found by its doctor id; an unknown id is a KeyError, never a made-up finding."""
    finding = by_doctor_id("lifetime-above-idle-limit")
    assert finding.check_id == "freshconn.W004"
    assert finding.severity == "warning"
    assert hit("lifetime-above-idle-limit", "default", "m", "f").finding is finding
    with pytest.raises(KeyError):
        by_doctor_id("no-such-finding")


@pytest.mark.parametrize(
    ("exc", "options", "setting"),
    [
        (ValueError(f"invalid port: {SECRET}"), frozenset(), ("PORT",)),
        (TypeError(f"host number out of range: {SECRET}"), frozenset(), ("HOST",)),
        (TypeError(f"an integer is required ({SECRET})"), frozenset({"sslmode"}), None),
        (TypeError(f"sslmode must be a string, not {SECRET}"), frozenset({"ssl", "sslmode"}), ("OPTIONS", "sslmode")),
    ],
)
def test_rejected_options_name_only_settings_we_hold(
    exc: BaseException, options: frozenset[str], setting: tuple[str, ...] | None
) -> None:
    """A driver's refusal of the options names PORT, HOST or one of our OPTIONS keys, and never quotes its text."""
    failure = describe_failure(exc, options)
    assert failure.kind == "options_rejected"
    assert failure.setting == setting
    assert SECRET not in failure.summary


def test_a_settings_refusal_of_unknown_wording_gets_our_generic_detail() -> None:
    """Django refusing the settings with an error we have no wording for gets our generic detail, not its text."""
    try:
        try:
            int(SECRET)  # what Django's MySQL backend does with a non-numeric PORT
        except ValueError as exc:
            raise ParamsError() from exc
    except ParamsError as err:
        failure = describe_failure(err)
    assert failure.kind == "settings_rejected"
    assert failure.detail == "HOST, PORT, NAME, USER or an OPTIONS value has the wrong type"
    assert SECRET not in failure.summary
    assert failure.source == "builtins ValueError"


def test_select_fallback_poller_sees_what_the_peer_sent_or_closed() -> None:
    """Without select.poll (eventlet), the select()-based poller sees a socket readable once its peer left."""
    left, right = socket.socketpair()
    with left, right:
        poller = _state._SelectPoller(left.fileno())
        assert not poller.poll(0)
        right.close()
        assert poller.poll(0)


# --- Against the real server -------------------------------------------------------------------


@pytest.mark.server
def test_without_select_poll_a_killed_connection_is_still_found_at_the_next_unit(
    live: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where select.poll is missing (eventlet's green select), a killed session is still caught at the next unit."""
    monkeypatch.setattr(_state, "select", types.SimpleNamespace(select=select.select))
    with freshconn.unit_of_work():
        select_one()
    state = getattr(connection, _state.STATE_ATTR)
    assert isinstance(state.poller, _state._SelectPoller)
    assert not state.socket_has_news()
    killed = kill_connection()
    wait_until_socket_shows_close()
    freshconn.reset_stats()
    with freshconn.unit_of_work():
        assert select_one() == 1
    assert backend_id() != killed
    # MySQL never speaks unasked: news on the socket is proof enough. PostgreSQL's earns a ping.
    assert counters()["discarded_dead"] == 1
    assert counters()["pings"] == (0 if VENDOR == "mysql" else 1)


@pytest.mark.server
def test_a_state_for_a_connection_already_closed_has_no_session_id_rather_than_failing(live: None) -> None:
    """Making the state of a driver connection that is already closed never fails: its session id is unknown then."""
    connection.ensure_connection()
    raw = connection.connection
    driver = getattr(connection, _state.STATE_ATTR).driver
    session = driver.backend_id(raw)
    raw.close()
    state = _state.ConnState("default", driver, raw, time.monotonic())
    # mysqlclient, psycopg and psycopg2 raise when asked on a closed connection, mysql-connector
    # forgets the id; only PyMySQL keeps answering with the old one.
    assert state.backend_id == (session if DRIVER == "pymysql" else None)
    connection.connection = None


@pytest.mark.server
def test_with_autocommit_off_reading_the_idle_limit_leaves_no_transaction_open(
    dbconf: Callable[..., None], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With AUTOCOMMIT False, the idle limit is still read at connect and its query's transaction is rolled back."""
    dbconf(CONN_MAX_AGE=None, OPTIONS=short_server_timeout_options())
    monkeypatch.setitem(connections["default"].settings_dict, "AUTOCOMMIT", False)
    connection.ensure_connection()
    try:
        assert connection.get_autocommit() is False
        state = getattr(connection, _state.STATE_ATTR)
        assert state.autocommit is False
        assert state.idle_limit is not None
        assert 0 < state.idle_limit < SHORT_TIMEOUT
        raw = connection.connection
        if DRIVER == "psycopg":
            import psycopg

            assert raw.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        elif DRIVER == "psycopg2":
            import psycopg2.extensions

            assert raw.get_transaction_status() == psycopg2.extensions.TRANSACTION_STATUS_IDLE
    finally:
        connection.close()


@pytest.mark.server
def test_waiting_for_a_session_on_an_unreachable_server_gives_up_at_the_timeout(dbconf: Callable[..., None]) -> None:
    """wait_until_settled() keeps asking a server it cannot reach and answers False once its timeout is up."""
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))  # bound, never listening: every connect is refused at once
        dbconf(PORT=str(blocker.getsockname()[1]))
        err = AmbiguousCommitError("lost")
        err.alias, err.backend_id, err.sent_at = "default", 424242, time.monotonic()
        start = time.monotonic()
        assert err.wait_until_settled(timeout=0.5) is False
        elapsed = time.monotonic() - start
        assert wait_session_gone("default", 424242, timeout=0.0) is False
    assert 0.5 <= elapsed < 5


@pytest.mark.server
def test_a_commit_refused_before_it_was_sent_is_not_ambiguous(live: None) -> None:
    """A COMMIT the driver refuses because it knows its connection is closed is an error, not an ambiguous commit."""
    with pytest.raises(Error) as err, freshconn.unit_of_work(), transaction.atomic():
        Order.objects.create(ref="refused-commit")
        connection.connection.close()
    assert not isinstance(err.value, AmbiguousCommitError)
    assert counters()["ambiguous_commits"] == 0
    with freshconn.unit_of_work():
        assert not Order.objects.filter(ref="refused-commit").exists()


@pytest.mark.server
def test_a_raw_sql_commit_lost_in_flight_is_ambiguous(live: None, server: DBServer, commit_blocker: Any) -> None:
    """A COMMIT sent as raw SQL and lost in flight raises AmbiguousCommitError naming the lost session."""
    with pytest.raises(AmbiguousCommitError) as err, freshconn.unit_of_work():
        session = backend_id()
        with connection.cursor() as cursor:
            cursor.execute("BEGIN")
            cursor.execute("INSERT INTO app_order (ref, qty) VALUES ('amb-edge-raw', 1)")
            _block_commits(commit_blocker)
            killer = KillWhen(server, session, "commit")
            killer.start()
            try:
                cursor.execute("COMMIT")
            finally:
                killer.join()
    lost = err.value
    assert lost.alias == "default"
    assert lost.backend_id == session
    assert lost.sent_at is not None
    assert lost.sent_at <= time.monotonic()
    assert freshconn.is_disconnect(lost.__cause__)
    assert counters()["ambiguous_commits"] == 1
    assert lost.wait_until_settled(timeout=10) is True


@pytest.mark.server
@pytest.mark.skipif(VENDOR != "postgresql", reason="only PostgreSQL defers a constraint check to COMMIT")
def test_a_commit_the_server_refuses_is_an_ordinary_error_not_an_ambiguous_one(live: None) -> None:
    """A COMMIT refused by a deferred constraint raises IntegrityError: nothing was lost in flight."""
    with pytest.raises(IntegrityError) as err, freshconn.unit_of_work():
        with connection.cursor() as cursor:
            cursor.execute("CREATE TEMPORARY TABLE fc_edges_deferred (k int UNIQUE DEFERRABLE INITIALLY DEFERRED)")
        with transaction.atomic(), connection.cursor() as cursor:
            cursor.execute("INSERT INTO fc_edges_deferred VALUES (1), (1)")  # accepted until COMMIT
    assert not isinstance(err.value, AmbiguousCommitError)
    assert counters()["ambiguous_commits"] == 0
    with freshconn.unit_of_work():
        assert select_one() == 1


@pytest.mark.server
@pytest.mark.skipif(VENDOR != "postgresql", reason="SQLSTATEs are PostgreSQL's")
def test_a_failure_with_a_known_sqlstate_is_reduced_to_it(live: None) -> None:
    """A server error with a SQLSTATE we know is reported by that code and our summary, not by its message."""
    with pytest.raises(Error) as err, connection.cursor() as cursor:
        cursor.execute("SET ROLE postgres")  # the app role may not: 42501 insufficient_privilege
    failure = describe_failure(err.value.__cause__ or err.value)
    assert (failure.kind, failure.code, failure.source) == ("access_denied", "42501", "SQLSTATE 42501")
    assert error_code(err.value) == "SQLSTATE 42501"
    assert "permission denied" not in failure.summary.lower()


@pytest.mark.server
def test_a_password_the_driver_cannot_encode_is_reported_without_it(dbconf: Callable[..., None]) -> None:
    """A PASSWORD the driver cannot encode is diagnosed as an encoding problem, with no trace of the password."""
    password = SECRET + "\udc80"
    settings_dict = connections["default"].settings_dict
    saved = settings_dict["PASSWORD"]
    settings_dict["PASSWORD"] = password
    try:
        report = _doctor.diagnose("default", conf.get())
    finally:
        settings_dict["PASSWORD"] = saved
    assert report.failure is not None
    assert report.failure.kind == "encoding"
    assert SECRET not in report.failure.summary
    assert all(SECRET not in h.message and SECRET not in h.fix for h in report.hits)


needs_django_pool = pytest.mark.skipif(
    DRIVER != "psycopg" or django.VERSION < (5, 1), reason="Django's pool needs psycopg 3, Django 5.1+"
)


@pytest.fixture
def pool_cleanup(dbconf: Callable[..., None]) -> Iterator[Callable[..., None]]:
    """dbconf, plus closing and forgetting the pool the test made for the default alias."""
    yield dbconf
    connections["default"].close()
    pools = _pool.pools_of(type(connections["default"]))
    if pools is not None:
        pool = pools.pop("default", None)
        if pool is not None:
            pool.close()


@pytest.mark.server
@needs_django_pool
def test_a_pool_configured_later_gets_freshconns_check_when_databases_change(
    pool_cleanup: Callable[..., None],
) -> None:
    """A pool added to DATABASES after start-up is built with freshconn's check when the setting change is signalled."""
    pool_cleanup(CONN_MAX_AGE=0, OPTIONS={"pool": {"min_size": 1, "max_size": 2, "timeout": 10}})
    pools = _pool.pools_of(type(connections["default"]))
    assert pools is not None
    assert "default" not in pools
    from django.conf import settings

    with pytest.warns(UserWarning, match="DATABASES"), override_settings(DATABASES=settings.DATABASES):
        pass
    assert pools["default"]._check is _pool.check


@pytest.mark.server
@needs_django_pool
def test_a_pooled_connection_left_on_a_read_only_session_never_goes_back_to_the_pool(
    pool_cleanup: Callable[..., None],
) -> None:
    """A pooled connection refused a write as read-only is closed, not returned: the pool opens a healthy one."""
    pool_cleanup(CONN_MAX_AGE=0, OPTIONS={"pool": {"min_size": 1, "max_size": 1, "timeout": 10}})
    _pool.install_pools(_state.raw_state)
    with pytest.raises(Error) as err, freshconn.unit_of_work():
        with connection.cursor() as cursor:
            cursor.execute("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY")
        doomed = backend_id()
        Order.objects.create(ref="pooled-read-only")
    assert freshconn.is_read_only(err.value)
    assert counters()["discarded_read_only"] == 1
    with freshconn.unit_of_work():
        Order.objects.create(ref="pooled-after")
        assert backend_id() != doomed


@pytest.mark.server
def test_an_async_unit_whose_commit_is_lost_in_flight_raises_ambiguous_commit(
    live: None, server: DBServer, commit_blocker: Any
) -> None:
    """An async unit whose transaction's COMMIT is lost in flight raises AmbiguousCommitError, found from the error."""
    from asgiref.sync import sync_to_async

    def work() -> None:
        killer = KillWhen(server, backend_id(), "commit")
        try:
            with transaction.atomic():
                Order.objects.create(ref="amb-edge-async")
                _block_commits(commit_blocker)
                killer.start()
        finally:
            killer.join()

    async def main() -> None:
        async with freshconn.aunit_of_work():
            await sync_to_async(work)()

    with pytest.raises(AmbiguousCommitError) as err:
        run_async(main())
    assert err.value.alias == "default"
    assert freshconn.is_disconnect(err.value.__cause__)
    assert counters()["ambiguous_commits"] == 1


@pytest.mark.server
def test_a_raw_sql_commit_on_a_connection_already_closed_is_not_ambiguous(live: None) -> None:
    """A raw SQL COMMIT the driver refuses because its connection is closed is an error, never an ambiguous commit."""
    with pytest.raises(Error) as err, freshconn.unit_of_work(), connection.cursor() as cursor:
        cursor.execute("BEGIN")
        cursor.execute("INSERT INTO app_order (ref, qty) VALUES ('edge-closed-raw', 1)")
        connection.connection.close()
        cursor.execute("COMMIT")
    assert not isinstance(err.value, AmbiguousCommitError)
    assert counters()["ambiguous_commits"] == 0
    with freshconn.unit_of_work():
        assert not Order.objects.filter(ref="edge-closed-raw").exists()


needs_mysql_connector = pytest.mark.skipif(DRIVER != "mysqlconnector", reason="mysql-connector-python's own socket")


def test_hard_closing_a_mysql_connector_connection_that_never_connected_is_harmless() -> None:
    """Releasing a mysql-connector connection that never got a socket (its connect failed) neither fails nor blocks."""
    import mysql.connector

    raw = mysql.connector.connection.MySQLConnection()  # no arguments: nothing is opened
    driver = _drivers.for_connection(raw)
    assert driver.name == "mysql-connector"
    assert driver.closed(raw)
    driver.hard_close(raw)
    assert driver.fileno(raw) is None


@pytest.mark.server
@needs_mysql_connector
def test_hard_closing_a_mysql_connector_socket_whose_descriptor_is_gone_never_raises(live: None) -> None:
    """A mysql-connector socket whose descriptor was closed behind its back (a daemonizing fork) is released quietly."""
    connection.ensure_connection()
    raw = connection.connection
    driver = getattr(connection, _state.STATE_ATTR).driver
    fd = driver.fileno(raw)
    assert fd is not None
    os.close(fd)  # what closing every inherited descriptor after a fork does
    driver.hard_close(raw)  # the socket's own close() now fails with EBADF
    assert driver.fileno(raw) is None
    connection.connection = None
