"""The start and end steps of a unit of work, for every open connection of the thread in scope.

One of the few modules that does I/O: it polls idle sockets (no round trip), pings when the policy
says so, closes connections, and reopens, patiently, what an outage took.
"""

from __future__ import annotations

import logging
import math
import time

from django.db.backends.base.base import BaseDatabaseWrapper

from . import _aliases, _outage, _policy, _stats, conf
from ._aliases import Scope
from ._errors import failed_alias, interrupted_alias, is_disconnect
from ._sockets import bounded
from ._state import ConnState, ThreadState, discard, local, seed, state_of, tls

__all__ = ["begin", "boundary", "end"]

logger = logging.getLogger("freshconn")

_monotonic = time.monotonic
_warned_atomic = False
#: When begin() next reads the settings and STATS_LOG_INTERVAL (0.0: never yet, and the first
#: line is skipped; inf: the line is off and the settings have not changed since).
_next_stats_line = 0.0


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
        with bounded(state.driver.fileno(state.raw), timeout):
            state.driver.ping(state.raw)
    except Exception:  # noqa: BLE001 - any failure of a liveness check means "do not reuse"
        return False
    return True


def _check(conn: BaseDatabaseWrapper, now: float) -> None:
    """The full start-of-unit decision for one open connection that is not plainly busy and healthy."""
    cfg = conf._current or conf.get()
    if conn.in_atomic_block:
        _stats.bump(conn.alias, "skipped_atomic")
        _warn_atomic(conn.alias)
        return
    state = state_of(conn)
    if state.doomed:
        discard(conn, state.doomed)
        return
    if state.driver.closed(state.raw):
        discard(conn, "dead")
        return
    verdict = _policy.start_verdict(
        now, state.deadline, state.last_used, state.idle_limit, cfg.check_after_idle, conn.errors_occurred
    )
    if (verdict is None or verdict == _policy.PING) and state.socket_has_news():
        # MySQL never speaks unasked on an idle session: unread bytes or EOF mean an error
        # packet or a close (KILL, timeout, shutdown). PostgreSQL may also send notices or
        # NOTIFY, so there it only earns a ping.
        if state.driver.vendor == "mysql":
            discard(conn, "dead")
            return
        verdict = _policy.PING
    if verdict == _policy.PING:
        if not _ping(conn, state, cfg.ping_timeout):
            discard(conn, "dead")
            return
        conn.errors_occurred = False
        now = _monotonic()
        state.last_used = now
        state.check_at = _policy.check_at(state.deadline, now, state.window)
    elif verdict is not None:
        discard(conn, verdict)
        return
    # freshconn has just vouched for the connection: spare Django's CONN_HEALTH_CHECKS ping.
    conn.health_check_done = True  # type: ignore[attr-defined]  # Django >= 4.1, not in the stubs


def begin(scope: Scope, count: bool = True, thread: ThreadState | None = None) -> None:
    """Start-of-unit checks for every open connection in scope, in the current thread."""
    if thread is None:
        thread = tls.ctx
    if count:
        # _stats.count_unit(), inlined: no call and no thread-local read; units of every alias (the
        # commonest) in an int slot, cheaper than the per-scope dict increment.
        if scope is None:
            thread.unscoped_units += 1
        else:
            units = thread.units
            units[scope] = units.get(scope, 0) + 1
    if thread.seeded != _aliases.generation:
        seed()
    now = _monotonic()
    # Back to back (now < clean_until): the previous unit of this scope ended in this thread less
    # than SOCKET_CHECK_AFTER ago, and its end() found every connection in scope outside a
    # transaction, healthy, just used and inside its window beyond this moment, so the checks below
    # would all pass, the socket poll included (see _policy.SOCKET_CHECK_AFTER). Only the loop's
    # own code ran since; a statement that failed there cleared the mark (_state._failed).
    if now >= thread.clean_until or thread.clean_scope is not scope:
        for conn in thread.conns:
            raw = conn.connection
            if raw is None or (scope is not None and conn.alias not in scope):
                continue
            # The healthy path: recently used (check_at, see _policy.check_at), nothing pending on
            # its socket, no round trip. Every registered wrapper has the STATE_ATTR attribute: a
            # plain read, not getattr() with a default (this runs once per unit per open connection).
            state: ConnState | None = conn._freshconn_state  # type: ignore[attr-defined]
            if (
                state is not None
                and state.raw is raw
                and now < state.check_at
                and not conn.errors_occurred
                and not conn.in_atomic_block
                and (state.poller is None or not state.poller.poll(0))
            ):
                if not conn.health_check_done:  # type: ignore[attr-defined]  # Django >= 4.1, not in the stubs
                    conn.health_check_done = True  # type: ignore[attr-defined]
                continue
            _check(conn, now)
    if thread.needs_reconnect:
        _reconnect_pending(scope)
    if now >= _next_stats_line:
        _maybe_log_stats(now)


def _reconnect_pending(scope: Scope) -> None:
    """Reopen, patiently, the connections an outage took from this thread, before the unit's work."""
    cfg = conf._current or conf.get()
    thread = local()
    for alias in list(thread.needs_reconnect):
        if scope is not None and alias not in scope:
            continue
        thread.needs_reconnect.discard(alias)
        conn = thread.wrappers.get(alias)
        if cfg.reconnect_timeout <= 0 or conn is None or conn.connection is not None:
            continue
        try:
            _outage.connect_patiently(conn, cfg.reconnect_timeout)
        except BaseException:
            # Still unreachable: the next unit waits again rather than failing at once.
            thread.needs_reconnect.add(alias)
            raise


def _end_one(conn: BaseDatabaseWrapper, now: float, disconnect: bool, interrupted: bool) -> bool:
    """End-of-unit steps for one open connection outside a transaction; True if discarded for an error."""
    state = state_of(conn)
    if state.doomed or interrupted:
        discard(conn, state.doomed or "interrupted")
    elif conn.errors_occurred and (disconnect or state.looks_dead()):
        discard(conn, "error")
        return True
    elif now >= state.deadline:
        discard(conn, "max_age")
    elif conn.autocommit != state.autocommit:
        discard(conn, "autocommit")
    elif state.pooled:
        # Back to the pool, as Django does after a request: a thread holds no pooled connection
        # between units (threads outnumbering the pool's max_size would exhaust it otherwise).
        conn.close()
    return False


def end(scope: Scope, exc: BaseException | None, thread: ThreadState | None = None) -> None:
    """End-of-unit steps: drop what an error or interruption broke, enforce the lifetime."""
    if thread is None:
        thread = tls.ctx
    if exc is None:
        now = _monotonic()
        # Until when the next unit of this scope can skip its per-connection checks (begin()):
        # SOCKET_CHECK_AFTER from now, if every open connection in scope is outside a transaction,
        # healthy and used less than SOCKET_CHECK_IDLE ago, and no later than any one's check_at.
        until = now + _policy.SOCKET_CHECK_AFTER
        for conn in thread.conns:
            raw = conn.connection
            if raw is None or (scope is not None and conn.alias not in scope):
                continue
            if conn.in_atomic_block:
                until = -math.inf
                continue
            state: ConnState | None = conn._freshconn_state  # type: ignore[attr-defined]  # see begin()
            if (
                state is not None
                and state.raw is raw
                and not conn.errors_occurred
                and not state.doomed
                and now < state.deadline
                and conn.autocommit == state.autocommit
                and not state.pooled
            ):
                # The common case: nothing to do but note whether the connection is busy, not idle.
                if now - state.last_used >= _policy.SOCKET_CHECK_IDLE:
                    until = -math.inf
                elif state.check_at < until:
                    until = state.check_at
                continue
            until = -math.inf
            _end_one(conn, now, False, False)
        thread.clean_until = until
        thread.clean_scope = scope
        return
    thread.clean_until = -math.inf
    disconnect = is_disconnect(exc)
    failed = failed_alias(exc) if disconnect else None
    interrupted = interrupted_alias(exc) if not disconnect else None
    now = _monotonic()
    flagged = False
    for alias, conn in thread.wrappers.items():
        if scope is not None and alias not in scope:
            continue
        here = disconnect and (failed is None or failed == alias)
        if conn.connection is None:
            if here:
                # Django closed it itself (a failure inside atomic(), then its own reconnect failed):
                # the next unit reopens it patiently instead of failing at once.
                thread.needs_reconnect.add(alias)
            continue
        if conn.in_atomic_block:
            continue
        flagged |= _end_one(conn, now, here, interrupted == alias)
    if disconnect and failed is None and not flagged:
        # The error did not pass through any Django wrapper (raw driver use), so nothing says which
        # connection broke: drop every open one in scope rather than risk keeping the dead one.
        for alias, conn in list(thread.wrappers.items()):
            if conn.connection is not None and not conn.in_atomic_block and (scope is None or alias in scope):
                discard(conn, "error")


def boundary(conn: BaseDatabaseWrapper) -> None:
    """An adopted ``close_old_connections()`` for one connection: the end of a unit, then the start of the next."""
    thread = tls.ctx
    thread.adopted = True
    thread.lost = False
    if thread.seeded != _aliases.generation:
        seed()
    if conn.connection is not None:
        if conn.in_atomic_block:
            # Django's own step would close it here (autocommit differs) and break the transaction.
            _stats.count_unit(frozenset((conn.alias,)))
            _stats.bump(conn.alias, "skipped_atomic")
            _warn_atomic(conn.alias)
            return
        _end_one(conn, _monotonic(), False, False)
    begin(frozenset((conn.alias,)), True, thread)


def _settings_changed() -> None:
    """FRESHCONN changed: the next unit reads (and validates) it again, a due stats line first."""
    global _next_stats_line
    if _next_stats_line != 0.0:
        _next_stats_line = -math.inf  # due now, and not the silent first one after start-up


conf.on_reset.append(_settings_changed)


def _maybe_log_stats(now: float) -> None:
    """At most one line of counters per interval, process-wide (FRESHCONN['STATS_LOG_INTERVAL'])."""
    global _next_stats_line
    if now < _next_stats_line:
        return
    # Also where a busy worker's units read (so validate) the settings: at the first unit, and at
    # the first after a change (conf.on_reset); a bad FRESHCONN fails that unit, loudly.
    interval = (conf._current or conf.get()).stats_log_interval
    if interval is None:
        _next_stats_line = math.inf
        return
    first = _next_stats_line == 0.0
    _next_stats_line = now + interval
    if first:
        return  # the first line after start-up would only say zero
    for alias, row in sorted(_stats.stats().items()):
        shown = " ".join(f"{k}={v}" for k, v in row.items() if v)
        logger.info("freshconn stats %r: %s", alias, shown or "nothing yet", extra={"alias": alias, "reason": "stats"})
