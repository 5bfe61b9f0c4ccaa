"""Pure decisions of the connection lifecycle: numbers in, a verdict out, no I/O."""

from __future__ import annotations

import math

__all__ = [
    "PING",
    "check_at",
    "deadline_for",
    "effective_idle_limit",
    "idle_window",
    "reconnect_pause",
    "retry_verdict",
    "start_verdict",
]

#: Verdict meaning "send one liveness round trip before reuse".
PING = "ping"

#: A unit that starts less than this (seconds) after the previous unit of the same scope ended in
#: the same thread skips its start-of-unit checks, the zero-timeout poll() of each socket
#: included, when that unit's end found them all passed for longer than this (see
#: SOCKET_CHECK_IDLE; freshconn._lifecycle.end computes the moment, ThreadState.clean_until).
#: Back-to-back units (a busy consumer iterating a fetched batch) are a few microseconds apart; the
#: poll, although only a system call, measurably slows the query that follows (2-3 % of a
#: primary-key SELECT here: docs/benchmarks.md). Any real pause between units, even one network
#: round trip (a queue's BLPOP; a KILL sent from another session takes longer), is checked.
SOCKET_CHECK_AFTER = 25e-6

#: A unit that ends more than this (seconds) after its last statement on a connection leaves the
#: connection idle, not busy: the next unit checks it (and polls its socket) however soon it
#: starts. So the back-to-back skip covers only the unit's own tail (reading rows, building
#: objects: tens of microseconds), never an alias the busy units do not touch, which may sit for
#: seconds behind a proxy that drops idle clients. The trade, measured (docs/benchmarks.md, the
#: KILL table): a server-side close landing in that tail is found by the next unit's query
#: failing, not by the poll.
SOCKET_CHECK_IDLE = 1e-3

#: Lifetimes are shortened by up to this fraction, at random, so that a fleet of workers started
#: together does not reconnect together; never lengthened, so they stay under infrastructure limits.
MAX_AGE_JITTER = 0.05


def deadline_for(opened_at: float, max_age: float | None, spread: float) -> float:
    """When a connection opened at ``opened_at`` must be closed; ``spread`` is uniform in [0, 1)."""
    if max_age is None:
        return math.inf
    if max_age <= 0:
        return opened_at
    return opened_at + max_age * (1.0 - MAX_AGE_JITTER * spread)


def effective_idle_limit(server_limit: float | None) -> float | None:
    """The idle time after which the server's own limit has (or is about to have) closed the session.

    The margin absorbs the time between our clock read and the server's, and the time it takes
    the next statement to reach the server: a connection that close is not worth a ping.
    """
    if server_limit is None or server_limit <= 0:
        return None
    margin = min(max(0.5, 0.05 * server_limit), 60.0)
    if margin >= server_limit:
        return server_limit / 2.0
    return server_limit - margin


def idle_window(idle_limit: float | None, check_after_idle: float) -> float:
    """How long a connection may sit idle and still be reused with no check at all."""
    return check_after_idle if idle_limit is None else min(check_after_idle, idle_limit)


def check_at(deadline: float, last_used: float, window: float) -> float:
    """The moment from which a connection needs ``start_verdict``; before it, reuse it as it is.

    The start-of-unit fast path compares the clock with this one number, computed when the
    connection was last used: ``now < check_at(...)`` exactly when ``start_verdict`` (with nothing
    suspect) returns None. tests/test_pure.py checks that the two agree.
    """
    until = last_used + window
    return until if until < deadline else deadline


def start_verdict(
    now: float,
    deadline: float,
    last_used: float,
    idle_limit: float | None,
    check_after_idle: float,
    suspect: bool,
) -> str | None:
    """What to do with an open connection at the start of a unit.

    Returns a discard reason ("max_age", "server_idle"), ``PING``, or None (reuse, no round trip).
    ``suspect`` is true when something seen without I/O (a pending error, unread bytes on an idle
    socket) makes the connection doubtful but not certainly dead.
    """
    if now >= deadline:
        return "max_age"
    idle = now - last_used
    if idle_limit is not None and idle >= idle_limit:
        return "server_idle"
    if suspect or idle >= check_after_idle:
        return PING
    return None


#: Pauses between connection attempts while a server is unreachable (seconds), before jitter.
#: The cap keeps "back within ~1 s of the server listening again"; one prober per alias and
#: process makes these attempts (the other threads wait for its result), so a fleet of threads
#: does not storm a restarting server.
RECONNECT_FIRST_PAUSE = 0.1
RECONNECT_MAX_PAUSE = 1.0


def reconnect_pause(attempt: int, spread: float) -> float:
    """Pause after failed attempt ``attempt`` (1-based): exponential, capped, jittered to [50 %, 100 %]."""
    ceiling = min(RECONNECT_MAX_PAUSE, RECONNECT_FIRST_PAUSE * float(2 ** max(0, attempt - 1)))
    return ceiling * (0.5 + 0.5 * spread)


#: Retry verdicts: why a retry is safe, or why it is refused (a token for logs and metrics, and words).
SAFE_IDEMPOTENT = "idempotent"
SAFE_NOTHING_APPLIED = "nothing_applied"
UNSAFE_COMMIT = "commit_in_flight"
UNSAFE_APPLIED = "write_applied"
UNSAFE_IN_FLIGHT = "write_in_flight"
UNSAFE_STOPPING = "stopping"

#: Each verdict token in words, for log messages.
VERDICT_TEXT = {
    SAFE_IDEMPOTENT: "the caller declared the unit idempotent",
    SAFE_NOTHING_APPLIED: "nothing the failed attempt did can have been applied",
    UNSAFE_COMMIT: "the connection was lost while COMMIT was in flight",
    UNSAFE_APPLIED: "a write had already been applied (autocommit or a committed transaction)",
    UNSAFE_IN_FLIGHT: "a write in autocommit was in flight and may have been applied",
    UNSAFE_STOPPING: "a stop signal arrived while waiting for the database",
}


def retry_verdict(
    *,
    idempotent: bool,
    commit_in_flight: bool,
    applied: bool,
    write_in_flight: bool,
) -> tuple[bool, str]:
    """Whether a unit that failed with a disconnect may run again, and the reason, in words.

    Writes inside a transaction the disconnect rolled back do not count as applied: the server
    discards an uncommitted transaction when its session dies.
    """
    if idempotent:
        return True, SAFE_IDEMPOTENT
    if commit_in_flight:
        return False, UNSAFE_COMMIT
    if applied:
        return False, UNSAFE_APPLIED
    if write_in_flight:
        return False, UNSAFE_IN_FLIGHT
    return True, SAFE_NOTHING_APPLIED
