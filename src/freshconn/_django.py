"""Every Django internal freshconn relies on, named once, with why it is safe to rely on it.

Public API (``connections``, ``connection_created``, execute wrappers, ``on_commit``) is not
listed; what is here is documented behaviour or long-stable attributes that Django itself uses in
``close_old_connections()`` and ``Atomic``. tests/test_django_internals.py checks, on every Django
leg (4.2, 5.2, 6.x), that each still exists and behaves as assumed.
"""

from __future__ import annotations

from types import FrameType
from typing import Any

from django.db import connections, transaction
from django.db.backends.base.base import BaseDatabaseWrapper

__all__ = [
    "AUTOCOMMIT_STEP",
    "COMMIT_FRAME",
    "CONNECT_STEP",
    "HEALTH_CHECK_DONE",
    "MAKE_CURSOR",
    "PER_CONNECTION_STEP",
    "ROLLBACK_STEP",
    "commit_frame_alias",
    "initialized_wrappers",
    "thread_wrapper",
]

#: ``BaseDatabaseWrapper.health_check_done`` (Django >= 4.1): set True, it spares the next cursor
#: the CONN_HEALTH_CHECKS ping. freshconn sets it after vouching for a connection itself.
HEALTH_CHECK_DONE = "health_check_done"

#: ``BaseDatabaseWrapper.close_if_unusable_or_obsolete()``: the per-connection step of
#: ``django.db.close_old_connections()``, which calls it on every initialized wrapper of the thread.
#: freshconn shadows it on the instances it manages (never on the class) to make those calls unit
#: boundaries (FRESHCONN['ADOPT_CLOSE_OLD_CONNECTIONS']) and harmless inside units.
PER_CONNECTION_STEP = "close_if_unusable_or_obsolete"

#: ``BaseDatabaseWrapper.ensure_connection()``: every cursor (and Django's own reconnects, e.g. in
#: ``Atomic.__exit__``) opens a missing connection through it. freshconn shadows it on the instances
#: it manages to make that connect patient inside units; the class's method (which pytest-django's
#: database blocker patches) is always what actually connects.
CONNECT_STEP = "ensure_connection"

#: ``BaseDatabaseWrapper.make_cursor()``: ``_prepare_cursor()`` calls it for every cursor when no
#: query is logged (``make_debug_cursor()`` otherwise) and returns ``utils.CursorWrapper(cursor,
#: self)``. ``CursorWrapper._execute_with_wrappers(sql, params, many, executor)`` runs every statement
#: of ``execute()``/``executemany()``: it calls each of ``execute_wrappers`` as ``wrapper(executor,
#: sql, params, many, {"connection": ..., "cursor": ...})``, the last one innermost, through a
#: ``functools.partial`` per wrapper per statement. freshconn shadows ``make_cursor`` on the
#: instances it manages (when the backend has not overridden it) with a ``CursorWrapper`` subclass
#: that makes the same call to its statement hook directly when that hook is the only wrapper.
MAKE_CURSOR = "make_cursor"

#: ``BaseDatabaseWrapper._commit()``: ``commit()`` calls it, and it wraps the driver's ``commit()``
#: in ``wrap_database_errors``. An error raised during a COMMIT carries a traceback through its
#: frame, with the wrapper as ``self`` (``commit`` itself is wrapped by ``async_unsafe``).
COMMIT_FRAME = "_commit"

#: ``BaseDatabaseWrapper._set_autocommit()``: ``set_autocommit()`` calls it, then sets ``autocommit``
#: and runs the ``on_commit`` callbacks. ``Atomic.__exit__`` calls ``set_autocommit(True)`` right
#: after a successful ``commit()``; on MySQL that is a statement, which a connection lost at that
#: moment fails, although the transaction is applied. freshconn shadows it on managed instances.
AUTOCOMMIT_STEP = "_set_autocommit"

#: ``django.db.transaction.Atomic.__exit__``: the only caller whose ``set_autocommit(True)`` follows
#: its own successful ``commit()`` with nothing in between.
ATOMIC_EXIT_CODE = transaction.Atomic.__exit__.__code__

#: ``BaseDatabaseWrapper._rollback()``: ``rollback()`` calls it. When it fails, ``Atomic.__exit__``
#: closes the connection and, in its ``finally``, reconnects through ``set_autocommit(True)``.
#: freshconn shadows it on managed instances to learn that the unit lost its connection even when
#: the first error never passed through an execute wrapper (mysql-connector-python pings in
#: ``cursor()``), so that reconnect fails fast instead of waiting inside the failed unit.
ROLLBACK_STEP = "_rollback"


def thread_wrapper(alias: str) -> BaseDatabaseWrapper | None:
    """This thread's wrapper for ``alias`` if it exists, without creating one.

    ``ConnectionHandler._connections`` is the asgiref ``Local(thread_critical=True)`` holding one
    wrapper per alias per thread; ``connections.all(initialized_only=True)`` reads it the same way.
    """
    found: BaseDatabaseWrapper | None = getattr(connections._connections, alias, None)  # type: ignore[attr-defined]
    return found


def initialized_wrappers() -> list[BaseDatabaseWrapper]:
    """The wrappers this thread has created (Django >= 4.1's ``initialized_only``), connected or not."""
    return list(connections.all(initialized_only=True))


def called_from_atomic_exit(frame: FrameType | None, depth: int = 6) -> bool:
    """True when ``Atomic.__exit__`` is among the ``depth`` frames from ``frame`` outwards (error path only)."""
    while frame is not None and depth > 0:
        if frame.f_code is ATOMIC_EXIT_CODE:
            return True
        frame, depth = frame.f_back, depth - 1
    return False


def commit_frame_alias(frame: FrameType) -> str | None:
    """The alias when ``frame`` is Django's ``_commit`` of a database wrapper, else None."""
    if frame.f_code.co_name != COMMIT_FRAME:
        return None
    wrapper: Any = frame.f_locals.get("self")
    return wrapper.alias if isinstance(wrapper, BaseDatabaseWrapper) else None
