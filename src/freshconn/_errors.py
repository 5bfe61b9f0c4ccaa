"""Classifying database errors: does this error mean the connection is gone?

Codes and SQLSTATEs come first, then driver flags; message text is consulted only for the
client-side libpq/psycopg errors that carry no code at all. Classes are matched by name and
module, not by ``isinstance``, because ``pymysql.install_as_MySQLdb()`` can load a driver's
error classes twice.
"""

from __future__ import annotations

from types import TracebackType
from typing import Any

from django.db import OperationalError
from django.db.backends.base.base import BaseDatabaseWrapper

__all__ = ["AmbiguousCommitError", "commit_in_flight", "failed_alias", "is_disconnect", "is_unsent"]

# MySQL / MariaDB client (2xxx) and server error codes that mean the session is gone.
MYSQL_DISCONNECT_CODES = frozenset(
    {
        2002,  # CR_CONNECTION_ERROR: cannot connect through the socket
        2003,  # CR_CONN_HOST_ERROR: cannot connect to the server
        2006,  # CR_SERVER_GONE_ERROR: failed while sending (the statement never ran)
        2013,  # CR_SERVER_LOST: lost during the query (the statement MAY have run)
        2014,  # CR_COMMANDS_OUT_OF_SYNC: protocol state broken, the session is unusable
        2055,  # CR_SERVER_LOST_EXTENDED
        1053,  # ER_SERVER_SHUTDOWN
        1158,  # ER_NET_READ_ERROR
        1159,  # ER_NET_READ_INTERRUPTED
        1160,  # ER_NET_ERROR_ON_WRITE
        1161,  # ER_NET_WRITE_INTERRUPTED
        1927,  # ER_CONNECTION_KILLED (MariaDB)
        4031,  # ER_CLIENT_INTERACTION_TIMEOUT (MySQL >= 8.0.24 idle disconnect)
    }
)

# SQLSTATEs (beyond class 08, connection exception) after which the session no longer exists.
PG_DISCONNECT_SQLSTATES = frozenset(
    {
        "57P01",  # admin_shutdown, also pg_terminate_backend()
        "57P02",  # crash_shutdown
        "57P03",  # cannot_connect_now (starting up / shutting down)
        "57P05",  # idle_session_timeout (PostgreSQL 14+)
        "25P03",  # idle_in_transaction_session_timeout
    }
)

# libpq and psycopg raise these client-side, with no SQLSTATE at all.
_PG_CLIENT_MESSAGES = (
    "server closed the connection unexpectedly",
    "terminating connection",
    "connection already closed",
    "the connection is closed",
    "the connection is lost",
    "could not receive data from server",
    "could not send data to server",
    "no connection to the server",
    "connection not open",
    "ssl connection has been closed unexpectedly",
    "ssl syscall error",
    "consuming input failed",
    "lost synchronization with server",
    # Opening a connection failed: nothing was ever sent, the server is (for now) unreachable.
    "connection refused",
    "could not connect to server",
    "connection to server at",
    "connection timeout expired",
)

_MYSQL_MODULES = ("MySQLdb", "_mysql", "pymysql")
_PG_MODULES = ("psycopg", "psycopg2", "psycopg_pool")


class AmbiguousCommitError(OperationalError):
    """The connection was lost while COMMIT was in flight: the transaction may or may not be applied.

    Verify the outcome before doing the work again. The driver's error is chained as ``__cause__``.
    """


def _module_root(exc: BaseException) -> str:
    return type(exc).__module__.split(".", 1)[0]


def _mysql_gone(exc: BaseException) -> bool:
    args: tuple[Any, ...] = exc.args
    code = args[0] if args else None
    if isinstance(code, int) and not isinstance(code, bool):
        if code in MYSQL_DISCONNECT_CODES:
            return True
        # Both drivers raise InterfaceError(0, '') for every call on a connection they have dropped.
        return code == 0 and any(c.__name__ == "InterfaceError" for c in type(exc).__mro__)
    return False


def _pg_gone(exc: BaseException) -> bool:
    sqlstate = getattr(exc, "sqlstate", None) or getattr(exc, "pgcode", None)
    if isinstance(sqlstate, str) and sqlstate:
        return sqlstate.startswith("08") or sqlstate in PG_DISCONNECT_SQLSTATES
    # No code: ask the driver's own flags when the error carries the connection.
    pgconn = getattr(exc, "pgconn", None)
    if pgconn is not None and getattr(pgconn, "status", 0) == 1:  # libpq CONNECTION_BAD
        return True
    cursor = getattr(exc, "cursor", None)
    if cursor is not None and getattr(getattr(cursor, "connection", None), "closed", False):
        return True
    text = str(exc).lower()
    return any(m in text for m in _PG_CLIENT_MESSAGES)


def is_disconnect(exc: BaseException | None) -> bool:
    """True when ``exc`` means the database connection is gone and must be discarded.

    Works for mysqlclient, PyMySQL, psycopg 3 and psycopg2 errors, raw or wrapped by Django
    (Django chains the driver's error as ``__cause__``, which is followed).
    """
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, AmbiguousCommitError):
            return True
        root = _module_root(exc)
        if root in _MYSQL_MODULES:
            if _mysql_gone(exc):
                return True
        elif root in _PG_MODULES and _pg_gone(exc):
            return True
        exc = exc.__cause__
        seen += 1
    return False


def _chain(exc: BaseException | None) -> list[BaseException]:
    out: list[BaseException] = []
    while exc is not None and len(out) < 8:
        out.append(exc)
        exc = exc.__cause__
    return out


def is_unsent(exc: BaseException) -> bool:
    """True when the failed statement provably never reached the server.

    MySQL's 2006 is raised when the client finds the session gone before or while sending; a
    driver that already knows its connection is closed refuses before sending anything. A 2013
    ("lost during query") or an unexpected EOF after sending may have let the statement run.
    """
    for e in _chain(exc):
        root = _module_root(e)
        if root in _MYSQL_MODULES:
            code = e.args[0] if e.args else None
            if code == 2006 or (code == 0 and _mysql_gone(e)):
                return True
        elif root in _PG_MODULES:
            text = str(e).lower()
            if "connection already closed" in text or "the connection is closed" in text:
                return True
    return False


_COMMIT_CODES = frozenset({BaseDatabaseWrapper.commit.__code__, BaseDatabaseWrapper._commit.__code__})  # type: ignore[attr-defined]


def _frames(tb: TracebackType | None) -> list[Any]:
    frames = []
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    return frames


def commit_in_flight(exc: BaseException) -> str | None:
    """The alias whose COMMIT was interrupted by ``exc``, or None when it did not strike during COMMIT.

    Read from the traceback: the error passed through Django's ``commit()`` of that wrapper.
    Error path only, so the cost is irrelevant, and no Django method needs patching.
    """
    for e in _chain(exc):
        for frame in _frames(e.__traceback__):
            code = frame.f_code
            if code in _COMMIT_CODES or (code.co_name == "_commit" and "self" in frame.f_locals):
                wrapper = frame.f_locals.get("self")
                if isinstance(wrapper, BaseDatabaseWrapper):
                    return wrapper.alias
    return None


def failed_alias(exc: BaseException) -> str | None:
    """The alias of the innermost Django wrapper or cursor the error passed through, if any."""
    alias: str | None = None
    for e in _chain(exc):
        for frame in _frames(e.__traceback__):
            obj = frame.f_locals.get("self")
            if isinstance(obj, BaseDatabaseWrapper):
                alias = obj.alias
            else:
                db = getattr(obj, "db", None)
                if isinstance(db, BaseDatabaseWrapper):
                    alias = db.alias
        if alias is not None:
            return alias
    return alias
