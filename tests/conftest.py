"""Fixtures: one throwaway server per test session, fault injection, per-test connection settings."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol, cast

import django
import pytest
from django.conf import settings
from django.db import connections
from testbed.servers import DBServer, MariaDB, PostgreSQL

import freshconn
from freshconn import _outage, _state

DRIVER: str = settings.DRIVER
VENDOR: str = settings.VENDOR
#: The name freshconn gives the driver in its output (doctor, checks, start-up line).
DRIVER_NAME: str = {"mysqlconnector": "mysql-connector"}.get(DRIVER, DRIVER)

#: Django >= 6.0's MySQL backend reads the server's version and modes (``mysql_server_data``) the first
#: time a new thread's wrapper builds an INSERT, through ``temporary_connection()``: one extra connect
#: and close per new thread, before the connection the thread then keeps (measured with Django 6.1).
#: mysql-connector-python's own Django backend does not.
DJANGO_TEMP_CONNECTS_PER_NEW_THREAD = (
    1 if VENDOR == "mysql" and DRIVER != "mysqlconnector" and django.VERSION >= (6, 0) else 0
)

# The server enforces these on the session; the tests idle a little longer than SHORT_TIMEOUT.
SHORT_TIMEOUT = 2
IDLE_PAST_TIMEOUT = SHORT_TIMEOUT + 1.2


def pytest_report_header() -> str:
    return f"freshconn driver under test: {DRIVER} ({VENDOR})"


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


# A CI timeout or an impatient developer sends SIGTERM: turn it into the interruption pytest
# handles, so session fixtures still stop their servers instead of leaving them running.
signal.signal(signal.SIGTERM, _interrupt)


class _HasDriver(Protocol):
    Database: ModuleType


def driver_module(alias: str = "default") -> ModuleType:
    """The DB-API module the alias's backend loaded (its ``DatabaseWrapper.Database``: psycopg, MySQLdb...)."""
    # Every concrete backend sets Database; BaseDatabaseWrapper, the type connections[alias] has, does not.
    return cast(_HasDriver, connections[alias]).Database


def admin_connection(server: DBServer) -> Any:
    """A raw superuser DB-API connection (autocommit) to the test server, through the loaded driver."""
    if VENDOR == "mysql":
        import MySQLdb

        assert isinstance(server, MariaDB)
        return MySQLdb.connect(unix_socket=server.socket, user="root", autocommit=True)
    raw = driver_module().connect(host=server.tmp, port=server.port, user="postgres", dbname="postgres")
    raw.autocommit = True
    return raw


@pytest.fixture(scope="session")
def server() -> Iterator[DBServer]:
    """The session's throwaway MariaDB or PostgreSQL server, on a loopback port."""
    srv: DBServer = MariaDB() if VENDOR == "mysql" else PostgreSQL()
    srv.start()
    try:
        yield srv
    finally:
        for conn in connections.all():
            _close_quietly(conn)
        srv.stop()


@pytest.fixture(scope="session")
def django_db_modify_db_settings(server: DBServer) -> None:
    settings.DATABASES["default"]["PORT"] = str(server.port)
    os.environ["FRESHCONN_TEST_DB_PORT"] = str(server.port)


ROOT = Path(__file__).resolve().parent.parent


def subprocess_env(**extra: str) -> dict[str, str]:
    """Environment for a real worker subprocess: same driver, same server, same test database.

    Call it from a test that uses ``live`` (the test database exists by then).
    """
    env = dict(os.environ)
    env.update(
        DJANGO_SETTINGS_MODULE="tests.settings",
        FRESHCONN_TEST_DRIVER=DRIVER,
        FRESHCONN_TEST_DB_PORT=str(connections["default"].settings_dict["PORT"]),
        FRESHCONN_TEST_DB_NAME=str(connections["default"].settings_dict["NAME"]),
        PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "src"), env.get("PYTHONPATH", "")]),
        **extra,
    )
    return env


def _close_quietly(conn: Any) -> None:
    try:
        conn.close()
    except Exception:
        conn.connection = None


@pytest.fixture
def live(transactional_db: None) -> Iterator[None]:
    """Real transactions on the real server; every connection is closed before the table flush."""
    for conn in connections.all(initialized_only=True):
        _close_quietly(conn)
    freshconn.reset_stats()
    _outage.reset()
    _state.local().needs_reconnect.clear()  # a reconnect an earlier test left pending in this thread
    yield
    for conn in connections.all(initialized_only=True):
        if conn.in_atomic_block:
            conn.in_atomic_block = False
            conn.atomic_blocks = []
        _close_quietly(conn)


@pytest.fixture
def dbconf(live: None) -> Iterator[Callable[..., None]]:
    """Change the default alias's Django settings (CONN_MAX_AGE, OPTIONS...) for one test."""
    settings_dict = connections["default"].settings_dict
    saved = {k: settings_dict.get(k) for k in ("CONN_MAX_AGE", "OPTIONS", "CONN_HEALTH_CHECKS", "HOST", "PORT", "NAME")}

    def apply(**changes: Any) -> None:
        _close_quietly(connections["default"])
        settings_dict.update(changes)

    yield apply
    _close_quietly(connections["default"])
    settings_dict.update(saved)


def short_server_timeout_options(seconds: int = SHORT_TIMEOUT) -> dict[str, Any]:
    """Django OPTIONS that make the server itself drop the session after ``seconds`` idle."""
    if VENDOR == "mysql":
        return {"init_command": f"SET SESSION wait_timeout = {seconds}"}
    return {"options": f"-c idle_session_timeout={seconds * 1000}"}


@pytest.fixture
def short_timeout(dbconf: Callable[..., None]) -> int:
    """A persistent connection that the server drops after SHORT_TIMEOUT seconds idle."""
    dbconf(CONN_MAX_AGE=None, OPTIONS=short_server_timeout_options())
    return SHORT_TIMEOUT


def run_async(coro: Any) -> Any:
    """asyncio.run(coro), then close the connections the async ORM opened in its own thread."""
    import asyncio

    from asgiref.sync import sync_to_async

    async def main() -> Any:
        try:
            return await coro
        finally:
            await sync_to_async(connections.close_all, thread_sensitive=True)()

    return asyncio.run(main())


def counters(alias: str = "default") -> dict[str, int]:
    return freshconn.stats().get(alias, {})


def wait_until_socket_shows_close(alias: str = "default", timeout: float = 5.0) -> None:
    """After the server dropped a session, wait until the FIN reached this side of the socket."""
    conn = connections[alias]
    state = getattr(conn, _state.STATE_ATTR)
    deadline = time.monotonic() + timeout
    while not state.socket_has_news() and time.monotonic() < deadline:
        time.sleep(0.01)


def backend_id(alias: str = "default") -> int:
    """The server-side session id of this thread's connection on ``alias`` (no round trip)."""
    from freshconn import _drivers

    connections[alias].ensure_connection()
    raw = connections[alias].connection
    session = _drivers.for_connection(raw).backend_id(raw)
    assert session is not None, "the driver exposes no session id"
    return int(session)
