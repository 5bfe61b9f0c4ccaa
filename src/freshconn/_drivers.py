"""What freshconn needs to know about each DB-API driver, behind one small interface.

Everything here takes the raw driver connection (``wrapper.connection``), never Django's wrapper,
so that no call can trigger Django's ``ensure_connection()`` and open a connection by accident.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any


class Driver:
    """Generic fallback: no socket to look at, no server idle limit, Django-independent ping."""

    name = "generic"
    vendor = "generic"

    def fileno(self, raw: Any) -> int | None:
        return None

    def closed(self, raw: Any) -> bool:
        """True when the driver itself already knows the connection is unusable (no I/O)."""
        return False

    def ping(self, raw: Any) -> None:
        """One round trip; raises on failure. Never reconnects at the driver level."""
        cursor = raw.cursor()
        try:
            cursor.execute("SELECT 1")
            cursor.fetchall()
        finally:
            cursor.close()

    def hard_close(self, raw: Any) -> None:
        """Release what a connection whose close() failed still holds; never raises."""
        with contextlib.suppress(Exception):  # a dead connection may fail in any driver-specific way
            raw.close()

    def idle_limit(self, raw: Any) -> float | None:
        """The idle limit (seconds) the server enforces on this session, or None if unlimited/unknown."""
        return None

    def backend_id(self, raw: Any) -> int | None:
        """The server-side id of this session (MySQL thread id, PostgreSQL backend PID), without I/O."""
        return None

    def _row(self, raw: Any, sql: str) -> Any:
        cursor = raw.cursor()
        try:
            cursor.execute(sql)
            row = cursor.fetchone()
        finally:
            cursor.close()
        return row


def set_autocommit(raw: Any) -> None:
    """Put a raw connection in autocommit, whatever the driver's spelling."""
    if callable(getattr(raw, "autocommit", None)):
        raw.autocommit(True)  # mysqlclient, PyMySQL: a method
    else:
        raw.autocommit = True  # psycopg, psycopg2, mysql-connector-python: an attribute


def _fileno_of(raw: Any) -> int | None:
    try:
        fd = int(raw.fileno())
    except Exception:  # noqa: BLE001 - each driver raises its own class; any means no socket
        return None
    # A closed Python socket reports -1 rather than raising; poll() would skip it as "no events".
    return fd if fd >= 0 else None


def _positive(seconds: float | None) -> float | None:
    if seconds is None or not math.isfinite(seconds) or seconds <= 0:
        return None
    return seconds


class _MySQLBase(Driver):
    vendor = "mysql"

    def idle_limit(self, raw: Any) -> float | None:
        # The session value, not the global one: the server copies wait_timeout (or
        # interactive_timeout for CLIENT_INTERACTIVE clients) into the session at connect,
        # and an init_command may have changed it since.
        row = self._row(raw, "SELECT @@SESSION.wait_timeout")
        return None if row is None else _positive(float(row[0]))


class MySQLClient(_MySQLBase):
    name = "mysqlclient"

    def fileno(self, raw: Any) -> int | None:
        return _fileno_of(raw)

    def closed(self, raw: Any) -> bool:
        # ``open`` drops to 0 only after a client-side close; a server-side KILL leaves it at 1,
        # which is why the socket itself is also inspected.
        return not getattr(raw, "open", 1)

    def ping(self, raw: Any) -> None:
        # mysqlclient >= 2.1 never reconnects from ping() unless asked to.
        raw.ping()

    def backend_id(self, raw: Any) -> int | None:
        return int(raw.thread_id())


class PyMySQL(_MySQLBase):
    name = "pymysql"

    def fileno(self, raw: Any) -> int | None:
        sock = getattr(raw, "_sock", None)
        return None if sock is None else _fileno_of(sock)

    def closed(self, raw: Any) -> bool:
        # PyMySQL drops its socket after any network error, so ``open`` is reliable here.
        return not raw.open

    def ping(self, raw: Any) -> None:
        # reconnect=True would reopen the socket behind Django's back and silently lose the
        # session setup Django ran in init_connection_state() (isolation level, sql_mode...).
        raw.ping(reconnect=False)

    def backend_id(self, raw: Any) -> int | None:
        tid = getattr(raw, "server_thread_id", None)
        return int(tid[0]) if tid else None


class MySQLConnector(_MySQLBase):
    """mysql-connector-python (Oracle's driver, Django engine ``mysql.connector.django``), pure Python."""

    name = "mysql-connector"

    def fileno(self, raw: Any) -> int | None:
        sock = getattr(getattr(raw, "_socket", None), "sock", None)
        return None if sock is None else _fileno_of(sock)

    def closed(self, raw: Any) -> bool:
        # A failed connect leaves no socket object; close() keeps it but closes the socket inside
        # it (its fileno() is then -1). is_connected() would be a round trip.
        return self.fileno(raw) is None

    def ping(self, raw: Any) -> None:
        # reconnect=False: a driver-level reconnect would skip Django's session setup.
        raw.ping(reconnect=False)

    def hard_close(self, raw: Any) -> None:
        # A pure-Python socket: left to the garbage collector it is a ResourceWarning (and an fd held).
        sock = getattr(getattr(raw, "_socket", None), "sock", None)
        try:
            if sock is not None:
                sock.close()
        except OSError:
            pass

    def backend_id(self, raw: Any) -> int | None:
        value = raw.connection_id
        return int(value) if value is not None else None


class _PostgresBase(Driver):
    vendor = "postgresql"

    def idle_limit(self, raw: Any) -> float | None:
        # pg_settings has no row for idle_session_timeout before PostgreSQL 14: no limit then.
        row = self._row(raw, "SELECT setting, unit FROM pg_settings WHERE name = 'idle_session_timeout'")
        if row is None:  # pragma: no cover - PostgreSQL < 14 only; the test bed runs PostgreSQL 15
            return None
        value, unit = float(row[0]), row[1]
        return _positive(value / 1000.0 if unit == "ms" else value)


class Psycopg3(_PostgresBase):
    name = "psycopg"

    def fileno(self, raw: Any) -> int | None:
        try:
            return int(raw.pgconn.socket)
        except Exception:  # noqa: BLE001 - each driver raises its own class; any means no socket
            return None

    def closed(self, raw: Any) -> bool:
        return bool(raw.closed or raw.broken)

    def ping(self, raw: Any) -> None:
        raw.execute("SELECT 1").fetchall()

    def backend_id(self, raw: Any) -> int | None:
        return int(raw.info.backend_pid)


class Psycopg2(_PostgresBase):
    name = "psycopg2"

    def fileno(self, raw: Any) -> int | None:
        return _fileno_of(raw)

    def closed(self, raw: Any) -> bool:
        return bool(raw.closed)

    def backend_id(self, raw: Any) -> int | None:
        return int(raw.get_backend_pid())


GENERIC = Driver()
_BY_MODULE: dict[str, Driver] = {}
_KNOWN = (
    ("MySQLdb", MySQLClient()),
    ("pymysql", PyMySQL()),
    ("mysql", MySQLConnector()),
    ("psycopg2", Psycopg2()),
    ("psycopg", Psycopg3()),
)


def for_connection(raw: Any) -> Driver:
    """The driver strategy for a raw DB-API connection, chosen by the module that defines its class."""
    module = type(raw).__module__
    driver = _BY_MODULE.get(module)
    if driver is None:
        top = module.split(".", 1)[0]
        driver = next((d for prefix, d in _KNOWN if top == prefix), GENERIC)
        _BY_MODULE[module] = driver
    return driver
