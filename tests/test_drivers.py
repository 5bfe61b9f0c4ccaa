"""freshconn._drivers against a real connection of the session's driver, and the generic fallback on SQLite."""

from __future__ import annotations

import sqlite3

import pytest
from django.db import connection
from testbed.servers import DBServer

from freshconn import _drivers
from tests.conftest import DRIVER_NAME, VENDOR

pytestmark = pytest.mark.server


def _server_session_id(server: DBServer) -> int:
    with connection.cursor() as cursor:
        cursor.execute("SELECT CONNECTION_ID()" if VENDOR == "mysql" else "SELECT pg_backend_pid()")
        return int(cursor.fetchone()[0])


def test_the_session_s_driver_is_recognised_and_reads_its_socket_and_session_id(live: None, server: DBServer) -> None:
    """The strategy of this driver: its name and vendor, a real socket descriptor, the server's own session id."""
    connection.ensure_connection()
    raw = connection.connection
    driver = _drivers.for_connection(raw)
    assert (driver.name, driver.vendor) == (DRIVER_NAME, VENDOR)
    fd = driver.fileno(raw)
    assert isinstance(fd, int)
    assert fd >= 0
    assert driver.backend_id(raw) == _server_session_id(server)
    assert driver.closed(raw) is False
    driver.ping(raw)
    assert _drivers.for_connection(raw) is driver  # cached by module


def test_a_closed_connection_is_seen_as_closed_and_hard_close_never_raises(live: None) -> None:
    """After the driver's own close(): closed() is True, no socket is reported, and hard_close() is harmless twice."""
    connection.ensure_connection()
    raw = connection.connection
    driver = _drivers.for_connection(raw)
    connection.connection = None  # Django forgets it; the test owns the raw connection now
    raw.close()
    # mysql-connector keeps its socket object after close(), with the socket inside it closed.
    assert driver.closed(raw) is True
    assert driver.fileno(raw) is None
    driver.hard_close(raw)
    driver.hard_close(raw)
    with pytest.raises(Exception):  # noqa: B017 - each driver raises its own class
        driver.ping(raw)


def test_the_session_idle_limit_is_the_server_s_value(live: None, server: DBServer) -> None:
    """idle_limit() reads the session's own limit: wait_timeout on MariaDB, idle_session_timeout on PostgreSQL."""
    connection.ensure_connection()
    raw = connection.connection
    driver = _drivers.for_connection(raw)
    with connection.cursor() as cursor:
        if VENDOR == "mysql":
            cursor.execute("SET SESSION wait_timeout = 321")
            assert driver.idle_limit(raw) == 321.0
        else:
            cursor.execute("SET idle_session_timeout = '4s'")
            assert driver.idle_limit(raw) == 4.0
            cursor.execute("SET idle_session_timeout = 0")
            assert driver.idle_limit(raw) is None


def test_an_unknown_driver_gets_the_generic_strategy() -> None:
    """A DB-API connection of an unknown module (sqlite3): no socket, no limit, no id, and a plain SELECT 1 ping."""
    raw = sqlite3.connect(":memory:")
    try:
        driver = _drivers.for_connection(raw)
        assert driver is _drivers.GENERIC
        assert (driver.fileno(raw), driver.idle_limit(raw), driver.backend_id(raw)) == (None, None, None)
        assert driver.closed(raw) is False
        driver.ping(raw)
    finally:
        _drivers.GENERIC.hard_close(raw)
    _drivers.GENERIC.hard_close(raw)  # a second close of a closed connection never raises
    with pytest.raises(sqlite3.ProgrammingError):
        _drivers.GENERIC.ping(raw)


def test_set_autocommit_works_for_method_and_attribute_spellings() -> None:
    """set_autocommit() calls autocommit(True) where it is a method and assigns it where it is an attribute."""

    class Method:
        value = False

        def autocommit(self, on: bool) -> None:
            self.value = on

    class Attribute:
        autocommit = False

    m, a = Method(), Attribute()
    _drivers.set_autocommit(m)
    _drivers.set_autocommit(a)
    assert m.value is True
    assert a.autocommit is True


@pytest.mark.parametrize(
    ("seconds", "expected"), [(None, None), (0.0, None), (-3.0, None), (float("inf"), None), (5.0, 5.0)]
)
def test_only_a_finite_positive_limit_counts(seconds: float | None, expected: float | None) -> None:
    """A limit of 0, negative, infinite or unknown means no limit."""
    assert _drivers._positive(seconds) == expected
