"""The per-connection bookkeeping and the begin/end steps of a unit of work.

This is one of the few modules that does I/O: it reads the server's idle limit when a connection
is made, polls idle sockets (no round trip), pings when the policy says so, and closes connections.
"""

from __future__ import annotations

import contextlib
import logging
import random
import select
import threading
import time
from typing import Any

from django.db import connections
from django.db.backends.base.base import BaseDatabaseWrapper
from django.db.backends.signals import connection_created

from . import _drivers, _policy, _reconnect, _sockets, _stats, conf
from ._errors import is_disconnect
from .signals import connection_discarded

logger = logging.getLogger("freshconn")

_STATE_ATTR = "_freshconn_state"
_POLL_MASK = select.POLLIN | select.POLLPRI | select.POLLERR | select.POLLHUP | select.POLLNVAL
_NO_SERVER_VENDORS = frozenset({"sqlite"})
_warned_atomic = False
# Discards that may mean the server is down or restarting: worth reconnecting patiently.
_OUTAGE_REASONS = frozenset({"dead", "error"})


class ConnState:
    """What freshconn remembers about one open connection (one per Django wrapper, replaced on reconnect)."""

    __slots__ = ("deadline", "driver", "idle_limit", "last_used", "poller", "raw")

    def __init__(self, driver: _drivers.Driver, raw: Any, now: float, deadline: float) -> None:
        self.driver = driver
        self.raw = raw
        self.last_used = now
        self.deadline = deadline
        self.idle_limit: float | None = None
        self.poller: Any = None
        fd = driver.fileno(raw)
        if fd is not None:
            self.poller = select.poll()
            self.poller.register(fd, _POLL_MASK)

    def socket_has_news(self) -> bool:
        """True when the idle socket is readable or hung up: the server spoke (or left) unasked."""
        return self.poller is not None and bool(self.poller.poll(0))


def _new_state(conn: BaseDatabaseWrapper, *, read_limit: bool) -> ConnState:
    raw = conn.connection
    driver = _drivers.for_connection(raw)
    now = time.monotonic()
    max_age = conf.get().max_age_for(conn.settings_dict)
    state = ConnState(driver, raw, now, _policy.deadline_for(now, max_age, random.random()))
    if not conf.get().max_age_override and state.deadline != float("inf"):
        # Share the jittered lifetime with Django, so its own close_old_connections() agrees.
        conn.close_at = state.deadline
    if read_limit and max_age != 0:
        # A connection closed after every unit never idles: skip the round trip for it.
        try:
            state.idle_limit = _policy.effective_idle_limit(driver.idle_limit(raw))
            if not conn.autocommit:
                raw.rollback()
        except Exception as exc:  # noqa: BLE001 - a missing limit only means more pings
            logger.debug(
                "could not read the server idle limit for %s: %s",
                conn.alias,
                type(exc).__name__,
                extra={"alias": conn.alias, "reason": "idle_limit_unknown"},
            )
    setattr(conn, _STATE_ATTR, state)
    return state


def _state_of(conn: BaseDatabaseWrapper) -> ConnState:
    state: ConnState | None = getattr(conn, _STATE_ATTR, None)
    if state is None or state.raw is not conn.connection:
        # Opened before freshconn was wired, or by a path that bypassed connection_created.
        state = _new_state(conn, read_limit=False)
    return state


class _Thread(threading.local):
    """Per-thread: unit nesting depth, and the wrappers that connected in this thread by alias.

    Django keeps one wrapper per alias per thread; remembering them here when they connect
    spares every unit a walk through ``connections`` (an asgiref Local lookup per alias).
    """

    depth = 0
    seeded = False

    def __init__(self) -> None:
        self.wrappers: dict[str, BaseDatabaseWrapper] = {}
        self.outage: set[str] = set()


_local = _Thread()


def on_connection_created(sender: Any, connection: BaseDatabaseWrapper, **kwargs: Any) -> None:
    if connection.vendor in _NO_SERVER_VENDORS:
        return
    _stats.bump(connection.alias, "connects")
    _local.wrappers[connection.alias] = connection
    _new_state(connection, read_limit=True)


_wired = False


def wire() -> None:
    """Connect freshconn's receiver to Django's connection_created (idempotent)."""
    global _wired
    if not _wired:
        connection_created.connect(on_connection_created, dispatch_uid="freshconn.connection_created")
        _wired = True


def discard(conn: BaseDatabaseWrapper, reason: str) -> None:
    """Close ``conn`` now, whatever state its socket is in, and record why."""
    # The connection is being thrown away: its close may fail on a dead socket, and that is fine.
    with contextlib.suppress(Exception):
        conn.close()
    if not conn.in_atomic_block:
        # Django's close() only forgets the driver connection when _close() succeeded.
        conn.connection = None
    if reason in _OUTAGE_REASONS:
        _local.outage.add(conn.alias)
    _stats.bump(conn.alias, "discarded")
    _stats.bump(conn.alias, "discarded_" + reason)
    level = logging.DEBUG if reason == "max_age" else logging.INFO
    logger.log(
        level,
        "discarded connection %r: %s",
        conn.alias,
        reason,
        extra={"alias": conn.alias, "reason": reason},
    )
    connection_discarded.send(sender=type(conn), alias=conn.alias, reason=reason)


def _seed() -> None:
    # Connections this thread opened before freshconn was wired never reached our receiver.
    _local.seeded = True
    for conn in connections.all(initialized_only=True):
        if conn.connection is not None and conn.vendor not in _NO_SERVER_VENDORS:
            _local.wrappers.setdefault(conn.alias, conn)


def _open_wrappers(scope: frozenset[str] | None) -> list[BaseDatabaseWrapper]:
    if not _local.seeded:
        _seed()
    return [
        conn
        for alias, conn in _local.wrappers.items()
        if conn.connection is not None and (scope is None or alias in scope)
    ]


_aliases_cache: dict[frozenset[str] | None, tuple[str, ...]] = {}


def server_aliases(scope: frozenset[str] | None) -> tuple[str, ...]:
    """The aliases in scope whose backend talks to a server (the ones a unit counts)."""
    aliases = _aliases_cache.get(scope)
    if aliases is None:
        dbs = connections.settings
        aliases = tuple(a for a in dbs if (scope is None or a in scope) and "sqlite" not in dbs[a].get("ENGINE", ""))
        _aliases_cache[scope] = aliases
    return aliases


def reset_caches(**kwargs: Any) -> None:
    """Forget per-settings caches (connected to Django's ``setting_changed``)."""
    if kwargs.get("setting") in (None, "DATABASES"):
        _aliases_cache.clear()


def _warn_atomic(alias: str) -> None:
    global _warned_atomic
    if not _warned_atomic:
        _warned_atomic = True
        logger.warning(
            "a unit of work began inside an atomic block on %r: its connection is left alone "
            "(never closed mid-transaction). Start units outside transaction.atomic().",
            alias,
            extra={"alias": alias, "reason": "atomic"},
        )


def _ping(conn: BaseDatabaseWrapper, state: ConnState, timeout: float) -> bool:
    _stats.bump(conn.alias, "pings")
    try:
        with _sockets.bounded(state.driver.fileno(state.raw), timeout):
            state.driver.ping(state.raw)
    except Exception:  # noqa: BLE001 - any failure of a liveness check means "do not reuse"
        return False
    return True


def begin(scope: frozenset[str] | None) -> None:
    """Start-of-unit checks for every open connection in scope, in the current thread."""
    cfg = conf._current or conf.get()
    _stats.count_unit(scope)
    local = _local
    if not local.seeded:
        _seed()
    check_after = cfg.check_after_idle
    now = time.monotonic()
    for alias, conn in local.wrappers.items():
        raw = conn.connection
        if raw is None or (scope is not None and alias not in scope):
            continue
        state: ConnState | None = getattr(conn, _STATE_ATTR, None)
        if (
            state is not None
            and state.raw is raw
            and not conn.in_atomic_block
            and not conn.errors_occurred
            and now < state.deadline
            and (idle := now - state.last_used)
            < (check_after if state.idle_limit is None else min(check_after, state.idle_limit))
            and (idle < _policy.SOCKET_CHECK_AFTER or state.poller is None or not state.poller.poll(0))
        ):
            # The busy case, by far the most common: recently used, nothing pending on its
            # socket. No round trip; only tell Django not to add a CONN_HEALTH_CHECKS ping.
            conn.health_check_done = True  # type: ignore[attr-defined]  # Django >= 4.1, not in the stubs
            continue
        _check(conn, cfg, now)
    if local.outage:
        _reconnect_after_outage(scope, cfg.reconnect_timeout)


def _check(conn: BaseDatabaseWrapper, cfg: conf.Config, now: float) -> None:
    """The full start-of-unit decision for one open connection that is not plainly busy and healthy."""
    if conn.in_atomic_block:
        _stats.bump(conn.alias, "skipped_atomic")
        _warn_atomic(conn.alias)
        return
    state = _state_of(conn)
    driver = state.driver
    if driver.closed(state.raw):
        discard(conn, "dead")
        return
    verdict = _policy.start_verdict(
        now, state.deadline, state.last_used, state.idle_limit, cfg.check_after_idle, conn.errors_occurred
    )
    if (verdict is None or verdict == _policy.PING) and state.socket_has_news():
        # MySQL never speaks unasked on an idle session: unread bytes or EOF mean an error
        # packet or a close (KILL, timeout, shutdown). PostgreSQL may also send notices or
        # NOTIFY, so there it only earns a ping.
        if driver.vendor == "mysql":
            discard(conn, "dead")
            return
        verdict = _policy.PING
    if verdict == _policy.PING:
        if not _ping(conn, state, cfg.ping_timeout):
            discard(conn, "dead")
            return
        conn.errors_occurred = False
    elif verdict is not None:
        discard(conn, verdict)
        return
    # freshconn has just vouched for the connection: spare Django's CONN_HEALTH_CHECKS ping.
    conn.health_check_done = True  # type: ignore[attr-defined]  # Django >= 4.1, not in the stubs


def _reconnect_after_outage(scope: frozenset[str] | None, timeout: float) -> None:
    """Reopen, patiently, the connections an outage took from this thread, before the unit's work.

    Only with RECONNECT_TIMEOUT > 0; otherwise the unit's first query connects once, as Django does.
    """
    for alias in list(_local.outage):
        if scope is not None and alias not in scope:
            continue
        _local.outage.discard(alias)
        conn = _local.wrappers.get(alias)
        if timeout > 0 and conn is not None and conn.connection is None:
            _reconnect.connect_patiently(conn, timeout)


def end(scope: frozenset[str] | None, exc: BaseException | None) -> None:
    """End-of-unit steps: drop what an error broke, enforce the lifetime, record the last use."""
    disconnect = exc is not None and is_disconnect(exc)
    discarded_for_error = False
    now = time.monotonic()
    for alias, conn in _local.wrappers.items():
        if conn.connection is None or (scope is not None and alias not in scope) or conn.in_atomic_block:
            continue
        state = _state_of(conn)
        if conn.errors_occurred and (disconnect or _looks_dead(state)):
            discard(conn, "error")
            discarded_for_error = True
        elif now >= state.deadline:
            discard(conn, "max_age")
        elif conn.autocommit != conn.settings_dict["AUTOCOMMIT"]:
            discard(conn, "autocommit")
        else:
            state.last_used = now
    if disconnect and not discarded_for_error:
        # The error did not pass through Django's wrapper (raw driver use), so no alias is
        # flagged: drop every open connection in scope rather than risk keeping the dead one.
        for conn in _open_wrappers(scope):
            if not conn.in_atomic_block:
                discard(conn, "error")


def _looks_dead(state: ConnState) -> bool:
    if state.driver.closed(state.raw):
        return True
    return state.driver.vendor == "mysql" and state.socket_has_news()


def in_unit() -> bool:
    """True when a unit of work is running in this thread."""
    return bool(_local.depth)


def in_transaction(scope: frozenset[str] | None) -> bool:
    """True when an open connection in scope is inside an atomic block in this thread."""
    return any(conn.in_atomic_block for conn in _open_wrappers(scope))


def enter(scope: frozenset[str] | None) -> None:
    """Begin a unit, unless one is already running in this thread (nested units are no-ops)."""
    if _local.depth:
        _local.depth += 1
        return
    if not _wired:
        wire()
    _local.depth = 1
    try:
        begin(scope)
    except BaseException:
        _local.depth = 0
        raise


def leave(scope: frozenset[str] | None, exc: BaseException | None) -> None:
    """End a unit; only the outermost one (the depth returns to zero) runs the end steps."""
    _local.depth -= 1
    if not _local.depth:
        end(scope, exc)
