"""Classifying database errors: does this error mean the connection is gone? Did it strike a COMMIT?

Codes and SQLSTATEs come first, then driver flags; message text is consulted only for the
client-side libpq/psycopg errors that carry no code at all. Classes are matched by name and
module, not by ``isinstance``, because ``pymysql.install_as_MySQLdb()`` can load a driver's
error classes twice.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from typing import Any

from django.db import Error as DjangoDatabaseError
from django.db import OperationalError
from django.db.backends.base.base import BaseDatabaseWrapper

from . import _django

__all__ = [
    "AmbiguousCommitError",
    "ReconnectStopped",
    "chain",
    "commit_alias",
    "error_code",
    "failed_alias",
    "interrupted_alias",
    "is_database_error",
    "is_disconnect",
    "is_read_only",
    "is_unsent",
]

# MySQL / MariaDB client (2xxx) and server error codes that mean the session is gone, or that no
# session could be opened because the server cannot be reached (nothing was sent: a unit may wait
# for it, see _outage). Checked against libmariadb's errmsg.h, PyMySQL's constants/CR.py and
# mysql-connector-python's errorcode.py / network.py; tests/test_error_codes.py triggers each one
# the test bed can produce. Deliberately absent: 2005 CR_UNKNOWN_HOST (a wrong HOST, or DNS: not a
# dead session; the doctor reports it), 2012 CR_SERVER_HANDSHAKE_ERR (a greeting the client cannot
# parse: another service on that port; a handshake the server or a proxy drops is 2013 in every
# driver), 2026 CR_SSL_CONNECTION_ERROR (client and server disagree on TLS or the certificate: a
# refusal that waiting cannot fix, see _redact.REFUSAL_KINDS), 1317 ER_QUERY_INTERRUPTED (KILL
# QUERY: the statement was cancelled, the session lives on).
MYSQL_DISCONNECT_CODES = frozenset(
    {
        2001,  # CR_SOCKET_CREATE_ERROR: socket() for the unix socket failed (e.g. EMFILE): nothing sent
        2002,  # CR_CONNECTION_ERROR: cannot connect through the socket (libmariadb: over TCP too)
        2003,  # CR_CONN_HOST_ERROR: cannot connect to the server (PyMySQL: any OSError while connecting)
        2004,  # CR_IPSOCK_ERROR: socket() for TCP failed (e.g. EMFILE); PyMySQL reports the same as 2003
        2006,  # CR_SERVER_GONE_ERROR: failed while sending (the statement never ran)
        2013,  # CR_SERVER_LOST: lost during the query (the statement MAY have run)
        2014,  # CR_COMMANDS_OUT_OF_SYNC: protocol state broken, the session is unusable
        2055,  # CR_SERVER_LOST_EXTENDED: mysql-connector-python, a send on a dead socket (EPIPE)
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
    # psycopg 3's own wait loop, when poll() reports the socket hung up with nothing to read (the
    # server closed it: seen after pg_terminate_backend, depending on when the close arrives).
    "connection socket closed",
    "lost synchronization with server",
    # Opening a connection failed: nothing was ever sent, the server is (for now) unreachable.
    "connection refused",
    "could not connect to server",
    "connection to server at",
    "connection to server on socket",  # libpq, a unix socket: psycopg2 has no other sign of it
    "connection timeout expired",
)

# MySQL / MariaDB errors that mean "this server is (now) read-only": a failover left the client on
# the demoted primary (or a reader). 1290 is also "--secure-file-priv" and others: read-only only.
MYSQL_READ_ONLY_CODES = frozenset(
    {
        1290,  # ER_OPTION_PREVENTS_STATEMENT with --read-only / --super-read-only
        1836,  # ER_READ_ONLY_MODE
        1792,  # ER_CANT_EXECUTE_IN_READ_ONLY_TRANSACTION
    }
)
PG_READ_ONLY_SQLSTATES = frozenset(
    {"25006"}
)  # read_only_sql_transaction (a hot standby, default_transaction_read_only)

MYSQL_MODULES = ("MySQLdb", "_mysql", "pymysql", "mysql")  # mysql: mysql-connector-python
_PG_MODULES = ("psycopg", "psycopg2", "psycopg_pool")
_CHAIN_LIMIT = 16


class AmbiguousCommitError(OperationalError):
    """The connection was lost while COMMIT was in flight: the transaction may or may not be applied.

    Raised from the error that ended the unit (its ``__cause__``). ``alias`` names the database;
    ``backend_id`` is the server's id of the lost session (MySQL thread id, PostgreSQL backend
    PID) when known. The server may still complete that COMMIT after the client saw the error:
    ``wait_until_settled()`` returns once the old session is gone, after which reading the outcome
    is meaningful. A unique idempotency key is the only protection that needs no such wait.
    """

    alias: str = "default"
    backend_id: int | None = None
    #: ``time.monotonic()`` when the COMMIT was sent (at the latest), None when unknown.
    sent_at: float | None = None

    def wait_until_settled(self, timeout: float = 30.0) -> bool:
        """Wait until the server no longer has the lost session; False if unknown or still there at ``timeout``.

        A server restarted since the COMMIT was sent counts as settled: MariaDB and MySQL number
        sessions from 1 again after a restart, so a new session may carry the lost one's id.
        """
        from ._sessions import wait_session_gone

        if self.backend_id is None:
            return False
        return wait_session_gone(self.alias, self.backend_id, timeout, since=self.sent_at)


class ReconnectStopped(OperationalError):
    """A stop signal arrived while a unit waited for its database to come back (never retried)."""


def _module_root(exc: BaseException) -> str:
    return type(exc).__module__.split(".", 1)[0]


# mysql-connector-python closes the connection after its own read/write timeout and raises these
# (with errno 3024, which the server itself uses for max_execution_time, a live-session error).
_MYSQL_CONNECTOR_GONE_CLASSES = frozenset({"ReadTimeoutError", "WriteTimeoutError"})


def _mysql_gone(exc: BaseException) -> bool:
    if type(exc).__name__ in _MYSQL_CONNECTOR_GONE_CLASSES and type(exc).__module__.startswith("mysql.connector"):
        return True
    args: tuple[Any, ...] = exc.args
    code = args[0] if args else None
    if isinstance(code, int) and not isinstance(code, bool):
        if code in MYSQL_DISCONNECT_CODES:
            return True
        # mysqlclient and PyMySQL raise InterfaceError(0, '') for every call on a connection they
        # have dropped; mysql-connector-python pings in cursor() and raises errno -1 "not available".
        if code == 0:
            return any(c.__name__ == "InterfaceError" for c in type(exc).__mro__)
        return code == -1 and "not available" in str(exc).lower()
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


def _gone(exc: BaseException) -> bool:
    if isinstance(exc, (AmbiguousCommitError, ReconnectStopped)):
        return True
    root = _module_root(exc)
    if root in MYSQL_MODULES:
        return _mysql_gone(exc)
    return root in _PG_MODULES and _pg_gone(exc)


def _causes(exc: BaseException | None) -> Iterator[BaseException]:
    seen = 0
    while exc is not None and seen < _CHAIN_LIMIT:
        yield exc
        exc = exc.__cause__
        seen += 1


def _read_only(exc: BaseException) -> bool:
    root = _module_root(exc)
    if root in MYSQL_MODULES:
        code = exc.args[0] if exc.args else None
        if code in MYSQL_READ_ONLY_CODES:
            text = str(exc).lower()
            return code != 1290 or "read-only" in text or "read_only" in text
        return False
    if root in _PG_MODULES:
        sqlstate = getattr(exc, "sqlstate", None) or getattr(exc, "pgcode", None)
        return sqlstate in PG_READ_ONLY_SQLSTATES
    return False


def is_read_only(exc: object) -> bool:
    """True when ``exc`` means the server refused a write because it is read-only (a wrong node).

    After a failover, a client that reconnected through a stale DNS answer or a proxy can land on
    the demoted, now read-only, former primary: MySQL/MariaDB 1290 (``--read-only``), 1836, 1792;
    PostgreSQL SQLSTATE 25006. Raw driver errors or Django's wrappers (``__cause__`` is followed).
    The statement was refused, not applied. This is not a disconnect (``is_disconnect`` stays
    False), but the connection is on the wrong node: freshconn discards it at once.
    """
    if not isinstance(exc, BaseException):
        return False
    return any(_read_only(e) for e in _causes(exc))


def is_disconnect(exc: object) -> bool:
    """True when ``exc`` means the database connection is gone and must be discarded.

    Works for mysqlclient, PyMySQL, psycopg 3 and psycopg2 errors, raw or wrapped by Django
    (Django chains the driver's error as ``__cause__``, which is followed). Anything that is not
    an exception is simply not a disconnect.
    """
    if not isinstance(exc, BaseException):
        return False
    return any(_gone(e) for e in _causes(exc))


def chain(exc: BaseException | None) -> list[BaseException]:
    """``exc`` and every exception it was raised from or while handling (``__cause__`` and ``__context__``)."""
    out: list[BaseException] = []
    seen: set[int] = set()
    todo = [exc] if exc is not None else []
    while todo and len(out) < _CHAIN_LIMIT:
        e = todo.pop(0)
        if id(e) in seen:
            continue
        seen.add(id(e))
        out.append(e)
        todo.extend(x for x in (e.__cause__, e.__context__) if x is not None)
    return out


def is_database_error(exc: BaseException) -> bool:
    """A Django database error or a driver's own (DB-API) error, as opposed to an interruption or a bug."""
    if isinstance(exc, DjangoDatabaseError):
        return True
    return _module_root(exc) in MYSQL_MODULES + _PG_MODULES


def is_unsent(exc: BaseException) -> bool:
    """True when the failed statement provably never reached the server.

    MySQL's 2006 is raised when the client finds the session gone before or while sending; a
    driver that already knows its connection is closed refuses before sending anything. A 2013
    ("lost during query") or an unexpected EOF after sending may have let the statement run.
    """
    for e in _causes(exc):
        root = _module_root(e)
        if root in MYSQL_MODULES:
            code = e.args[0] if e.args else None
            if code == 2006 or (code in (0, -1) and _mysql_gone(e)):
                return True
            # mysql-connector-python's 2055 wraps the socket error of the send: EBADF ("Errno 9: Bad
            # file descriptor") means the client had closed that socket already, so no byte left.
            if code == 2055 and any(t in str(e).lower() for t in ("errno 9", "bad file descriptor")):
                return True
        elif root in _PG_MODULES:
            text = str(e).lower()
            if "connection already closed" in text or "the connection is closed" in text:
                return True
    return False


def _frames(exc: BaseException) -> Iterator[Any]:
    tb = exc.__traceback__
    while tb is not None:
        yield tb.tb_frame
        tb = tb.tb_next


def commit_alias(exc: BaseException | None) -> str | None:
    """The alias whose COMMIT a disconnect interrupted, found anywhere in ``exc``'s chain, or None.

    An error raised inside Django's ``_commit`` carries that frame in its traceback. Django's
    ``Atomic.__exit__`` may then reconnect in its ``finally`` and fail, raising a new error while
    handling the COMMIT's one: that is why ``__context__`` is followed as well as ``__cause__``.
    A COMMIT refused before it was sent (the driver already knew the connection was closed) is
    not ambiguous. Error path only: the cost of walking frames is irrelevant.
    """
    for e in chain(exc):
        for frame in _frames(e):
            alias = _django.commit_frame_alias(frame)
            if alias is not None:
                if is_disconnect(e) and not is_unsent(e):
                    return alias
                break
    return None


def _frame_alias(frame: Any) -> str | None:
    obj = frame.f_locals.get("self")
    if isinstance(obj, BaseDatabaseWrapper):
        return str(obj.alias)
    db = _cursor_wrapper_db(obj)
    return str(db.alias) if db is not None else None


def _cursor_wrapper_db(obj: Any) -> BaseDatabaseWrapper | None:
    """``obj.db`` when it is a Django wrapper (a CursorWrapper keeps its wrapper there), else None.

    Read statically: a traceback's frames hold driver objects whose ``db`` is a property that raises
    once the connection is closed (psycopg's ``PGconn.db``), and the end of a unit must not fail there.
    """
    if obj is None:
        return None
    try:
        db = inspect.getattr_static(obj, "db", None)
    except Exception:  # noqa: BLE001 - an odd object in a frame is simply "not a cursor wrapper"
        return None
    return db if isinstance(db, BaseDatabaseWrapper) else None


def failed_alias(exc: BaseException | None) -> str | None:
    """The alias of the innermost Django wrapper or cursor a disconnect in ``exc``'s chain passed through."""
    for e in chain(exc):
        if not is_disconnect(e):
            continue
        alias: str | None = None
        for frame in _frames(e):
            alias = _frame_alias(frame) or alias
        if alias is not None:
            return alias
    return None


def interrupted_alias(exc: BaseException | None) -> str | None:
    """The alias of a Django cursor that ``exc`` interrupted, when ``exc`` is not a database error.

    A signal handler that raises (a task time limit, ``SIGALRM``), ``KeyboardInterrupt`` or a
    cancellation can strike while a result is being read: the connection is then half-read and
    must not be reused. Database errors are Django's business (``errors_occurred``).
    """
    if exc is None or is_database_error(exc) or isinstance(exc, GeneratorExit):
        return None
    alias: str | None = None
    for frame in _frames(exc):
        db = _cursor_wrapper_db(frame.f_locals.get("self"))
        if db is not None:
            alias = str(db.alias)
    return alias


def error_code(exc: BaseException | None) -> str:
    """A short, secret-free label of a database error: "MySQL error 2002", "SQLSTATE 08006", or its kind."""
    for e in _causes(exc):
        root = _module_root(e)
        if root in MYSQL_MODULES and e.args and isinstance(e.args[0], int):
            return f"MySQL error {e.args[0]}"
        if root in _PG_MODULES:
            sqlstate = getattr(e, "sqlstate", None) or getattr(e, "pgcode", None)
            if sqlstate:
                return f"SQLSTATE {sqlstate}"
            text = str(e).lower()
            for needle, label in (
                ("connection refused", "connection refused"),
                ("timeout", "connection timed out"),
                ("could not translate host name", "unknown host"),
            ):
                if needle in text:
                    return label
            return "connection failed"
    return "connection failed"
