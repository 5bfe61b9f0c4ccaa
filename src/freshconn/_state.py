"""What freshconn knows about each open connection, and the per-thread registry that holds it.

One ``ConnState`` per raw connection (replaced on reconnect), found on the Django wrapper. The
statement hook, one Django execute wrapper per managed wrapper, keeps it current: when the
connection was last used (so the start-of-unit check compares one number), whether a statement
was interrupted mid-flight or refused by a read-only node, and, for a retrying unit, its writes.
A second hook on ``_commit`` records a COMMIT lost in flight.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import select
import sys
import threading
import time
import types
import weakref
from collections.abc import Callable, Mapping
from typing import Any

from django.db.backends.base.base import BaseDatabaseWrapper
from django.db.backends.utils import CursorWrapper
from django.dispatch import Signal

from . import _aliases, _django, _drivers, _outage, _policy, _pool, _stats, conf
from ._aliases import is_server_vendor, server_aliases
from ._errors import is_database_error, is_disconnect, is_read_only, is_unsent
from ._redact import refused_login
from ._sql import COMMIT, WRITE, classify
from .signals import connection_discarded

__all__ = ["ConnState", "Tracker", "discard", "local", "notify", "on_connection_created", "state_of"]

logger = logging.getLogger("freshconn")

STATE_ATTR = "_freshconn_state"
LOST_ATTR = "_freshconn_lost_state"
#: Set by the COMMIT hook when a COMMIT succeeded; read (and cleared) by the autocommit hook.
COMMITTED_ATTR = "_freshconn_just_committed"
_HOOKED_ATTR = "_freshconn_hooked"
# getattr: eventlet's monkey-patching removes select.poll and its constants (select.select stays).
_POLL_MASK = sum(getattr(select, name, 0) for name in ("POLLIN", "POLLPRI", "POLLERR", "POLLHUP", "POLLNVAL"))
#: Discards that may mean the server is down or restarting: the next boundary reconnects patiently.
OUTAGE_REASONS = frozenset({"dead", "error"})
_monotonic = time.monotonic


class ConnState:
    """One open connection: its driver, lifetime, idle window, last use and transaction bookkeeping."""

    __slots__ = (
        "__weakref__",
        "alias",
        "autocommit",
        "backend_id",
        "check_at",
        "deadline",
        "doomed",
        "driver",
        "idle_limit",
        "last_used",
        "opened_at",
        "poller",
        "pooled",
        "raw",
        "spread",
        "window",
    )

    def __init__(self, alias: str, driver: _drivers.Driver, raw: Any, now: float) -> None:
        self.alias = alias
        self.driver = driver
        self.raw = raw
        self.opened_at = self.last_used = now
        self.spread = random.random()
        self.deadline = self.check_at = now
        self.idle_limit: float | None = None
        self.window = 0.0
        #: A discard reason the statement hook recorded: "interrupted" (a reply may be half-read) or
        #: "read_only" (the server refused a write: a failover left this connection on the wrong node).
        self.doomed: str | None = None
        self.autocommit = True
        #: Handed out by Django's connection pool: returned to it at the end of every unit.
        self.pooled = False
        try:
            self.backend_id: int | None = driver.backend_id(raw)
        except Exception:  # noqa: BLE001 - only AmbiguousCommitError.wait_until_settled needs it
            self.backend_id = None
        fd = driver.fileno(raw)
        self.poller: Any = None if fd is None else _poller(fd)

    def configure(self, cfg: conf.Config, settings_dict: dict[str, Any]) -> None:
        """(Re)compute the lifetime and idle window from the settings (at connect, and when they change)."""
        self.deadline = _policy.deadline_for(self.opened_at, cfg.max_age_for(settings_dict), self.spread)
        self.window = _policy.idle_window(self.idle_limit, cfg.check_after_idle)
        self.check_at = _policy.check_at(self.deadline, self.last_used, self.window)

    def socket_has_news(self) -> bool:
        """True when the idle socket is readable or hung up: the server spoke (or left) unasked."""
        return self.poller is not None and bool(self.poller.poll(0))

    def looks_dead(self) -> bool:
        if self.driver.closed(self.raw):
            return True
        return self.driver.vendor == "mysql" and self.socket_has_news()


class _SelectPoller:
    """poll(0) through select.select, where select.poll is missing (eventlet's green select)."""

    __slots__ = ("fd",)

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def poll(self, timeout: float) -> list[int]:
        readable, _, broken = select.select([self.fd], [], [self.fd], 0)
        return readable or broken


def _poller(fd: int) -> Any:
    make = getattr(select, "poll", None)
    if make is None:
        return _SelectPoller(fd)
    poller = make()
    poller.register(fd, _POLL_MASK)
    return poller


class Tracker:
    """What one unit (or one attempt of a retrying unit) did, as seen by the statement and COMMIT hooks."""

    __slots__ = ("applied", "commit_backend", "commit_in_flight", "commit_sent_at", "reported", "write_in_flight")

    def __init__(self) -> None:
        self.applied = False
        self.write_in_flight = False
        #: The alias whose COMMIT was sent and then failed without proof it never reached the server.
        self.commit_in_flight: str | None = None
        #: The server's id of that COMMIT's session, for AmbiguousCommitError.wait_until_settled().
        self.commit_backend: int | None = None
        #: When (time.monotonic()) that COMMIT was sent, at the latest: a server restart after it
        #: means the session is gone for good (wait_until_settled()).
        self.commit_sent_at = 0.0
        #: An AmbiguousCommitError was raised for it already (a unit around this one must not raise another).
        self.reported = False

    def confirmed(self) -> None:
        """Django's on_commit: that transaction is committed, so its writes are applied."""
        self.applied = True

    def merge_into(self, parent: Tracker) -> None:
        """A nested attempt's findings belong to the unit around it too (it must not replay them)."""
        parent.applied |= self.applied
        parent.write_in_flight |= self.write_in_flight
        if parent.commit_in_flight is None:
            parent.commit_in_flight, parent.commit_backend = self.commit_in_flight, self.commit_backend
            parent.commit_sent_at = self.commit_sent_at
            parent.reported = self.reported


class ThreadState:
    """Per thread: the wrappers it connected, its open units, and what outages took from it.

    A plain object reached through one thread-local read (``local()``): the busy path reads several
    of these fields per unit, and an attribute of a ``threading.local`` costs about ten times a slot.
    Django keeps one wrapper per alias per thread; remembering them here when they connect spares
    every unit a walk through ``connections`` (an asgiref Local lookup per alias).
    """

    __slots__ = (
        "active",
        "adopted",
        "async_open",
        "clean_scope",
        "clean_until",
        "conns",
        "ident",
        "lost",
        "needs_reconnect",
        "seeded",
        "stack",
        "units",
        "unscoped_units",
        "wrappers",
    )

    def __init__(self) -> None:
        #: Made in (and only used by) its own thread: a handle compares ThreadStates, not idents.
        self.ident = threading.get_ident()
        self.wrappers: dict[str, BaseDatabaseWrapper] = {}
        #: ``wrappers.values()`` as a tuple, for the per-unit loops (a tuple is the cheapest to walk).
        self.conns: tuple[BaseDatabaseWrapper, ...] = ()
        self.stack: list[Any] = []  # open UnitHandles, outermost first (freshconn._units)
        self.needs_reconnect: set[str] = set()
        #: The _aliases.generation at this thread's last seed() (-1: never seeded).
        self.seeded = -1
        self.async_open = 0
        #: The thread runs a loop whose close_old_connections() calls freshconn adopted as unit boundaries.
        self.adopted = False
        #: The acting unit already lost a connection: its later connects (Django reconnects in
        #: Atomic.__exit__, for one) fail fast; the next unit, or the retry, is the one that waits.
        self.lost = False
        #: The innermost acting unit's handle (freshconn._units.UnitHandle), or None outside units.
        self.active: Any = None
        #: This thread's units of every alias (scope None), and per scope (freshconn._stats), counted
        #: on the busy path without a call (an int slot is cheaper than a dict increment).
        self.unscoped_units = 0
        #: Until when the next unit of ``clean_scope`` may skip its start-of-unit checks, because the
        #: last unit's end found them all passed (freshconn._lifecycle.end); -inf: no such end.
        self.clean_until = -math.inf
        self.clean_scope: frozenset[str] | None = None
        self.units = _stats.thread_units(self)


class _TLS(threading.local):
    def __init__(self) -> None:
        self.ctx = ThreadState()


#: ``tls.ctx`` is the current thread's ThreadState (what ``local()`` returns, one call cheaper).
tls = _TLS()
_all_states: weakref.WeakSet[ConnState] = weakref.WeakSet()
#: Called with each wrapper freshconn starts managing (freshconn._adopt installs its step there).
on_register: list[Callable[[BaseDatabaseWrapper], None]] = []
#: Called once when freshconn is wired to Django (freshconn._adopt connects its settings receiver).
on_wire: list[Callable[[], None]] = []
wired = False
#: The open units, in any thread, that classify their statements (retrying units, freshconn._units):
#: while it is empty, the statement hook's success path reads no thread-local at all. set.add and
#: set.discard are atomic under the GIL, so threads need no lock for it.
tracking_units: set[Any] = set()


def wire() -> None:
    """Connect freshconn's receivers (idempotent); AppConfig.ready() calls it, and so does the first unit."""
    global wired
    if wired:
        return
    wired = True
    from django.core.signals import setting_changed
    from django.db.backends.signals import connection_created

    from . import _aliases

    connection_created.connect(on_connection_created, dispatch_uid="freshconn.connection_created")
    # In this order: the configuration is re-read before anything that reads it.
    setting_changed.connect(conf.reset, dispatch_uid="freshconn.conf.reset")
    setting_changed.connect(_aliases.reset_caches, dispatch_uid="freshconn.aliases.reset")
    setting_changed.connect(reconfigure, dispatch_uid="freshconn.state.reconfigure")
    setting_changed.connect(_pools_on_change, dispatch_uid="freshconn.pool.install")
    _pool.install_pools(raw_state)
    for hook in on_wire:
        hook()


def local() -> ThreadState:
    """The current thread's ThreadState."""
    return tls.ctx


def raw_state(alias: str, raw: Any, settings_dict: dict[str, Any], *, read_limit: bool, autocommit: bool) -> ConnState:
    """A new state for the driver connection ``raw`` of ``alias`` (reading the server's idle limit if asked)."""
    driver = _drivers.for_connection(raw)
    cfg = conf.get()
    state = ConnState(alias, driver, raw, _monotonic())
    if read_limit and cfg.max_age_for(settings_dict) != 0:
        # A connection closed after every unit never idles: skip the round trip for it.
        try:
            state.idle_limit = _policy.effective_idle_limit(driver.idle_limit(raw))
            if not autocommit:
                raw.rollback()
        except Exception as exc:  # noqa: BLE001 - a missing limit only means more pings
            logger.debug(
                "could not read the server idle limit for %s: %s",
                alias,
                type(exc).__name__,
                extra={"alias": alias, "reason": "idle_limit_unknown"},
            )
    state.autocommit = bool(settings_dict.get("AUTOCOMMIT", True))
    state.configure(cfg, settings_dict)
    _all_states.add(state)
    return state


def _new_state(conn: BaseDatabaseWrapper, *, read_limit: bool) -> ConnState:
    state = raw_state(
        conn.alias, conn.connection, conn.settings_dict, read_limit=read_limit, autocommit=conn.autocommit
    )
    setattr(conn, STATE_ATTR, state)
    return state


def state_of(conn: BaseDatabaseWrapper) -> ConnState:
    """The state of ``conn``'s open connection (made now if it bypassed connection_created)."""
    state: ConnState | None = getattr(conn, STATE_ATTR, None)
    if state is None or state.raw is not conn.connection:
        register(conn)
        state = _new_state(conn, read_limit=False)
    return state


def register(conn: BaseDatabaseWrapper) -> None:
    """Manage ``conn``, this thread's wrapper for its alias: registry and hooks."""
    thread = tls.ctx
    if thread.wrappers.get(conn.alias) is not conn:
        thread.wrappers[conn.alias] = conn
        thread.conns = tuple(thread.wrappers.values())
    hook(conn)


def hook(conn: BaseDatabaseWrapper) -> None:
    """Install freshconn's hooks on this wrapper instance (once): statement, COMMIT, connect, adoption."""
    if getattr(conn, _HOOKED_ATTR, False):
        return
    setattr(conn, _HOOKED_ATTR, True)
    if not hasattr(conn, STATE_ATTR):
        # Present on every hooked (so every registered) wrapper: the statement hook and the
        # per-unit loops read it as a plain attribute, not with getattr() and a default.
        setattr(conn, STATE_ATTR, None)
    # Index 0 is the outermost wrapper: it sees every other wrapper's errors, and Django's
    # execute_wrapper() context manager, which pops from the end, never removes it.
    conn.execute_wrappers.insert(0, statement_hook)
    if type(conn).make_cursor is BaseDatabaseWrapper.make_cursor:
        # A backend with its own make_cursor() keeps it (and Django's wrapper machinery).
        setattr(conn, _django.MAKE_CURSOR, types.MethodType(make_cursor_step, conn))
    setattr(conn, _django.COMMIT_FRAME, types.MethodType(commit_step, conn))
    setattr(conn, _django.CONNECT_STEP, types.MethodType(connect_step, conn))
    setattr(conn, _django.ROLLBACK_STEP, types.MethodType(rollback_step, conn))
    setattr(conn, _django.AUTOCOMMIT_STEP, types.MethodType(autocommit_step, conn))
    for extra in on_register:
        extra(conn)


def connect_step(conn: BaseDatabaseWrapper) -> None:
    """freshconn's ``ensure_connection()`` on a managed wrapper: Django's, patient inside units.

    A unit (or a loop whose close_old_connections() freshconn adopted) that has to open a
    connection while its server is down (a restart, a failover, a worker starting during an
    outage) waits for the server, up to RECONNECT_TIMEOUT, instead of failing at its first query.
    Elsewhere (the web tier, code outside units) Django's behaviour is unchanged.
    """
    if conn.connection is not None:
        return
    try:
        type(conn).ensure_connection(conn)
    except Exception as exc:
        thread = tls.ctx
        timeout = (conf._current or conf.get()).reconnect_timeout
        if (
            timeout <= 0
            or not (thread.stack or thread.async_open or thread.adopted)
            or thread.lost
            or conn.in_atomic_block
            or not is_disconnect(exc)
            or refused_login(exc)
        ):
            raise
        _outage.connect_patiently(conn, timeout, failed=exc)


def on_connection_created(sender: Any, connection: BaseDatabaseWrapper, **kwargs: Any) -> None:
    if not is_server_vendor(connection.vendor):
        return
    raw = connection.connection
    pooled_state: ConnState | None = getattr(raw, _pool.RAW_STATE_ATTR, None)
    if pooled_state is None:
        _stats.bump(connection.alias, "connects")  # pooled ones are counted when the pool opens them
    if _django.thread_wrapper(connection.alias) is not connection:
        # A wrapper that is not this thread's own (connections.create_connection(), Django's
        # PostgreSQL _nodb_cursor fallback): it must never stand in for the thread's connection.
        return
    old: ConnState | None = getattr(connection, STATE_ATTR, None)
    if old is not None and old.raw is not connection.connection:
        # Kept for AmbiguousCommitError: Django's Atomic.__exit__ reconnects right after a lost COMMIT.
        setattr(connection, LOST_ATTR, old)
    register(connection)
    if pooled_state is not None and pooled_state.raw is raw:
        # A pooled connection checked out: its state (idle limit, lifetime) was made when the pool
        # opened it and carries over; the pool's check has just vouched for it.
        setattr(connection, STATE_ATTR, pooled_state)
        return
    _new_state(connection, read_limit=True)


def _pools_on_change(**kwargs: Any) -> None:
    if kwargs.get("setting") == "DATABASES":
        _pool.install_pools(raw_state)


def seed() -> None:
    """At a thread's first unit: manage the connections it opened before freshconn was wired, and
    hook the wrappers of every server alias, so that even a first connect is patient."""
    from django.db import connections

    thread = tls.ctx
    thread.seeded = _aliases.generation
    for alias, wrapper in list(thread.wrappers.items()):
        if _django.thread_wrapper(alias) is not wrapper:
            del thread.wrappers[alias]  # an alias removed from DATABASES, or a wrapper Django replaced
    thread.conns = tuple(thread.wrappers.values())
    for conn in _django.initialized_wrappers():
        if conn.connection is not None and is_server_vendor(conn.vendor):
            state_of(conn)
    for alias in server_aliases(None):
        # Creating this thread's wrapper opens nothing; it stays out of the per-unit loop until it connects.
        hook(connections[alias])


def reconfigure(**kwargs: Any) -> None:
    """Settings changed (``setting_changed``): recompute every open connection's lifetime and window."""
    if kwargs.get("setting") not in (None, "FRESHCONN", "DATABASES"):
        return
    from django.core.exceptions import ImproperlyConfigured
    from django.db import connections

    try:
        cfg = conf.get()
    except ImproperlyConfigured:
        return  # reported where the setting is read (the unit, the system checks)
    for state in list(_all_states):
        # Every thread's wrapper for an alias shares the one settings dict of connections.settings.
        state.configure(cfg, connections.settings.get(state.alias, {}))


def _track(conn: BaseDatabaseWrapper, sql: str, tracker: Tracker) -> None:
    """For a retrying unit: whether this completed statement applied a write (which forbids a retry)."""
    kind = classify(sql)
    if kind not in (WRITE, COMMIT):
        return
    if conn.in_atomic_block:
        if kind == WRITE:
            # Applied only once its transaction commits: Django's robust on_commit says when.
            # Registered per write: Django drops a callback registered inside a savepoint that is
            # later rolled back, and the writes after it must still be seen committed.
            conn.on_commit(tracker.confirmed, robust=True)
    else:
        # Autocommit: applied now. A manual transaction (AUTOCOMMIT=False): its COMMIT
        # (connection.commit()) is seen by the COMMIT hook only when it fails, so a write there
        # counts as applied at once, which can only forbid a retry.
        tracker.applied = True


def _failed(conn: BaseDatabaseWrapper, sql: str, exc: BaseException, active: Any) -> None:
    # A unit starting right after this (the loop caught the error between two units) must run its
    # checks, not trust the previous unit's clean end (freshconn._lifecycle.begin).
    tls.ctx.clean_until = -math.inf
    state: ConnState | None = getattr(conn, STATE_ATTR, None)
    if not is_database_error(exc):
        # An exception raised while the statement was in flight (a time limit, SIGALRM, Ctrl-C): the
        # reply may be half-read and the next statement would read its rest. Never reuse it.
        if state is not None:
            state.doomed = "interrupted"
        conn.errors_occurred = True
        return
    if is_read_only(exc):
        if state is not None:
            state.doomed = "read_only"
        return  # refused by the server: nothing was applied
    if not is_disconnect(exc):
        return
    tls.ctx.lost = True
    if active is None:
        return
    tracker: Tracker = active.record()
    kind = classify(sql)
    if kind == COMMIT:
        if not is_unsent(exc):
            _commit_lost(tracker, conn, state)
    elif kind == WRITE and not is_unsent(exc) and not conn.in_atomic_block and conn.autocommit:
        # In a transaction the server rolls the write back with the dead session; in autocommit
        # it may have been applied.
        tracker.write_in_flight = True


def _commit_lost(
    tracker: Tracker, conn: BaseDatabaseWrapper, state: ConnState | None, sent_at: float | None = None
) -> None:
    if tracker.commit_in_flight is None:
        tracker.commit_in_flight = conn.alias
        tracker.commit_backend = state.backend_id if state is not None else None
        # Raw SQL COMMIT: the statement's start is not recorded (hot path); now is later than the
        # send, which can only make a restart harder to count as "after the COMMIT".
        tracker.commit_sent_at = sent_at if sent_at is not None else _monotonic()


def statement_hook(execute: Callable[..., Any], sql: str, params: Any, many: bool, context: Mapping[str, Any]) -> Any:
    """Django execute wrapper on every managed connection: last use, interruptions, a retrying unit's writes."""
    conn = context["connection"]
    try:
        result = execute(sql, params, many, context)
    except BaseException as exc:
        _failed(conn, sql, exc, tls.ctx.active)
        raise
    state: ConnState | None = conn._freshconn_state  # STATE_ATTR: set by hook(), a plain read
    if state is not None:
        now = _monotonic()
        state.last_used = now
        until = now + state.window
        state.check_at = until if until < state.deadline else state.deadline
    # Only while some thread runs a retrying unit is this thread's unit looked up (the busy path
    # of every other worker pays one global read, not a thread-local read per statement).
    if tracking_units:
        active = tls.ctx.active
        if active is not None and active.tracking:
            _track(conn, sql, active.record())
    return result


class _Cursor(CursorWrapper):
    """Django's cursor wrapper, minus its per-statement machinery while freshconn's hook is the only wrapper."""

    def _execute_with_wrappers(self, sql: str, params: Any, many: bool, executor: Callable[..., Any]) -> Any:
        db = self.db
        wrappers = db.execute_wrappers
        if len(wrappers) == 1 and wrappers[0] is statement_hook:
            # What Django's loop ends up calling for one wrapper, without the functools.partial it
            # builds per statement: about a third of a busy message's overhead (docs/benchmarks.md).
            return statement_hook(executor, sql, params, many, {"connection": db, "cursor": self})
        return super()._execute_with_wrappers(sql, params, many, executor)  # type: ignore[misc]


def make_cursor_step(conn: BaseDatabaseWrapper, cursor: Any) -> CursorWrapper:
    """freshconn's ``make_cursor()`` on a managed wrapper whose backend keeps Django's: the same wrapper, faster."""
    return _Cursor(cursor, conn)


def commit_step(conn: BaseDatabaseWrapper) -> Any:
    """freshconn's ``_commit()`` on a managed wrapper: Django's, plus the record of a COMMIT lost in flight.

    Django's ``commit()`` calls ``self._commit()``, which sends COMMIT through the driver (no execute
    wrapper sees it). When it fails with a disconnect (or is interrupted) after it may have reached
    the server, the unit running in this thread records it, whatever error Django's Atomic raises
    afterwards (its reconnect in ``finally`` may fail and replace this one): that unit then raises
    AmbiguousCommitError and is never retried.
    """
    sent_at = _monotonic()
    try:
        result = type(conn)._commit(conn)  # type: ignore[attr-defined]
    except BaseException as exc:
        tls.ctx.clean_until = -math.inf  # see _failed()
        if is_disconnect(exc):
            tls.ctx.lost = True
        active = tls.ctx.active
        if active is not None and (not is_database_error(exc) or is_disconnect(exc)) and not is_unsent(exc):
            _commit_lost(active.record(), conn, getattr(conn, STATE_ATTR, None), sent_at)
        raise
    # The transaction is applied now. Django runs on_commit callbacks only once set_autocommit(True)
    # has succeeded, and on MySQL that sends a statement: a connection lost right after COMMIT
    # (killed, cut) skips them, and the retry rule would think nothing was applied and replay it.
    for entry in conn.run_on_commit:
        owner = getattr(entry[1], "__self__", None)
        if isinstance(owner, Tracker):
            owner.applied = True
    setattr(conn, COMMITTED_ATTR, True)
    return result


def autocommit_step(conn: BaseDatabaseWrapper, autocommit: bool) -> Any:
    """freshconn's ``_set_autocommit()`` on a managed wrapper: Django's, except right after a COMMIT.

    When ``Atomic.__exit__`` restores autocommit right after its COMMIT succeeded and the
    connection is lost at that very moment (MySQL sends a statement for it), the transaction is
    applied: the atomic block succeeded. Django would raise, and a caller (a queue consumer that
    redelivers on error) would run the committed work again. freshconn lets the block succeed (its
    on_commit callbacks run, as for any committed transaction) and dooms the connection, which is
    discarded at the end of the unit; the next statement on it, if any, fails as a disconnect.
    """
    committed = conn.__dict__.pop(COMMITTED_ATTR, False)
    try:
        return type(conn)._set_autocommit(conn, autocommit)  # type: ignore[attr-defined]
    except Exception as exc:
        if not (autocommit and committed and is_disconnect(exc) and _django.called_from_atomic_exit(sys._getframe(1))):
            raise
        state: ConnState | None = getattr(conn, STATE_ATTR, None)
        if state is not None:
            state.doomed = "dead"
        logger.info(
            "connection %r lost right after its COMMIT succeeded: the transaction is applied; the "
            "connection is discarded",
            conn.alias,
            extra={"alias": conn.alias, "reason": "lost_after_commit"},
        )
        return None


def rollback_step(conn: BaseDatabaseWrapper) -> Any:
    """freshconn's ``_rollback()`` on a managed wrapper: Django's; a disconnect marks the unit as having lost it."""
    try:
        return type(conn)._rollback(conn)  # type: ignore[attr-defined]
    except BaseException as exc:
        tls.ctx.clean_until = -math.inf  # see _failed()
        if is_disconnect(exc):
            tls.ctx.lost = True
        raise


def notify(signal: Signal, sender: Any, **kwargs: Any) -> None:
    """Send a freshconn signal; a receiver that fails is logged and never changes a unit's outcome."""
    for receiver, result in signal.send_robust(sender=sender, **kwargs):
        if isinstance(result, Exception):
            logger.warning(
                "a receiver of a freshconn signal failed (%s): %s",
                getattr(receiver, "__qualname__", repr(receiver)),
                type(result).__name__,
                extra={"alias": kwargs.get("alias"), "reason": "receiver_failed"},
            )


def discard(conn: BaseDatabaseWrapper, reason: str) -> None:
    """Close ``conn`` now, whatever state its socket is in, and record why."""
    state: ConnState | None = getattr(conn, STATE_ATTR, None)
    if state is not None and state.pooled and conn.connection is not None:
        # Django's close() returns a pooled connection to the pool, which would hand it out again:
        # close the driver connection first, so that the pool drops it and opens a replacement.
        with contextlib.suppress(Exception):
            conn.connection.close()
    # The connection is being thrown away: its close may fail on a dead socket, and that is fine.
    with contextlib.suppress(Exception):
        conn.close()
    if not conn.in_atomic_block and conn.connection is not None:
        # Django's close() only forgets the driver connection when _close() succeeded: release its
        # socket without a word to the server, then forget it.
        raw = conn.connection
        (state.driver if state is not None else _drivers.for_connection(raw)).hard_close(raw)
        conn.connection = None
    if reason in OUTAGE_REASONS:
        tls.ctx.needs_reconnect.add(conn.alias)
    _stats.bump(conn.alias, "discarded")
    _stats.bump(conn.alias, "discarded_" + reason)
    level = logging.DEBUG if reason == "max_age" else logging.INFO
    logger.log(level, "discarded connection %r: %s", conn.alias, reason, extra={"alias": conn.alias, "reason": reason})
    notify(connection_discarded, sender=type(conn), alias=conn.alias, reason=reason)
