"""Reopening a connection while its server restarts or fails over, without storming it.

Every thread that lost a connection on an alias passes through that alias's gate. While the server
answers, everyone connects at once. When it stops answering, one thread at a time probes it, at
exponentially spaced, jittered moments shared by the whole process; the others wait for the
probe's result instead of trying themselves. So 100 worker threads across a restart make about one
attempt per second between them (not 100), and are all back within about a second of the server
listening again. Each thread gives up after its own RECONNECT_TIMEOUT with the error of its own
last attempt. One WARNING per outage, one INFO when the server is back.

A stop signal (SIGTERM/SIGINT) ends a wait at once: in the main thread, the handlers the program
installed are chained for the duration of the wait; WorkerCommand also calls ``request_stop()``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import signal
import threading
import time
from collections.abc import Iterator
from types import FrameType
from typing import Any

from django.db.backends.base.base import BaseDatabaseWrapper

from . import _policy, _stats
from ._errors import ReconnectStopped, error_code, is_disconnect
from ._redact import refused_login

__all__ = ["connect_patiently", "request_stop", "reset"]

logger = logging.getLogger("freshconn")

_PROBING, _DOWN, _UP = "probing", "down", "up"
#: After a success, threads that lost their connection in the same event connect in parallel for this long;
#: later, the first one probes alone again (an outage starting then must not meet a crowd).
_UP_FOR = 2.0


class _Gate:
    __slots__ = ("attempts", "down_since", "next_try", "state", "up_since", "warned")

    def __init__(self) -> None:
        self.state = _PROBING
        self.attempts = 0
        self.down_since = 0.0
        self.next_try = 0.0
        self.up_since = 0.0
        self.warned = False


# Reentrant, so that request_stop() called from a signal handler in a thread that holds it can notify.
_cond = threading.Condition(threading.RLock())
_gates: dict[str, _Gate] = {}
# A plain flag, not an Event: a signal handler sets it, and Event.set() takes a lock the interrupted
# main thread may be holding. Written once per stop, read without the lock (a bool, under the GIL).
_stopping = False
#: Bumped at every notify, so that the main thread (which never sleeps in _cond.wait) sees news.
_news = 0
#: How long the main thread sleeps at a time while it waits (it rechecks the stop flag and the news).
_MAIN_SLICE = 0.05


def _after_fork_in_child() -> None:
    _cond.release()
    # The parent's outages and waits are not the child's: it probes for itself.
    _gates.clear()


# Held across fork() by the forking thread, so no thread that does not exist in the child holds it there.
os.register_at_fork(before=_cond.acquire, after_in_parent=_cond.release, after_in_child=_after_fork_in_child)


def _notify() -> None:
    """Under the lock: wake every waiting thread (the main thread sees ``_news`` change)."""
    global _news
    _news += 1
    _cond.notify_all()


def request_stop() -> None:
    """Every wait for a server, in every thread, ends now (with ReconnectStopped): the process is stopping."""
    global _stopping
    _stopping = True
    with _cond:
        _notify()


def clear_stop() -> None:
    global _stopping
    _stopping = False


def reset() -> None:
    """Forget outages and stop requests (tests; a process that chose to carry on)."""
    clear_stop()
    with _cond:
        _gates.clear()


def _turn(alias: str, deadline: float) -> float | None:
    """Under the lock: None when this thread attempts now, else how long to wait before asking again."""
    now = time.monotonic()
    gate = _gates.get(alias)
    if gate is None or (gate.state == _UP and now - gate.up_since > _UP_FOR):
        gate = _gates[alias] = _Gate()
        return None
    if gate.state == _UP:
        return None
    if now >= deadline:
        return None  # this thread's last chance: its own attempt, so it fails with its own error
    if gate.state == _DOWN and now >= gate.next_try:
        gate.state = _PROBING
        return None
    wake = gate.next_try if gate.state == _DOWN else now + 0.25
    return max(0.0, min(wake, deadline) - now)


def _failed(alias: str, exc: BaseException) -> None:
    with _cond:
        gate = _gates.setdefault(alias, _Gate())
        now = time.monotonic()
        if gate.state != _DOWN:
            gate.down_since = gate.down_since or now
        gate.state = _DOWN
        gate.attempts += 1
        gate.next_try = now + _policy.reconnect_pause(gate.attempts, random.random())
        first = not gate.warned
        gate.warned = True
        _notify()
    if first:
        logger.warning(
            "database %r is unreachable (%s): units wait for it to come back, up to "
            "FRESHCONN['RECONNECT_TIMEOUT'] each",
            alias,
            error_code(exc),
            extra={"alias": alias, "reason": "server_unavailable"},
        )


def _succeeded(alias: str) -> None:
    with _cond:
        gate = _gates.get(alias)
        was_down = gate is not None and gate.warned
        down_for = time.monotonic() - gate.down_since if gate is not None and gate.down_since else 0.0
        attempts = gate.attempts if gate is not None else 0
        fresh = _Gate()
        fresh.state, fresh.up_since = _UP, time.monotonic()
        _gates[alias] = fresh
        _notify()
    if was_down:
        logger.info(
            "database %r is reachable again after %.1fs (%d failed attempts)",
            alias,
            down_for,
            attempts,
            extra={"alias": alias, "reason": "server_available"},
        )


def _give_back(alias: str) -> None:
    """An attempt ended in an error that says nothing about the server: let the next thread try."""
    with _cond:
        gate = _gates.get(alias)
        if gate is not None and gate.state == _PROBING:
            del _gates[alias]
        _notify()


@contextlib.contextmanager
def _stop_signals() -> Iterator[None]:
    """In the main thread, chain the program's SIGTERM/SIGINT handlers so that a stop ends the wait."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved: dict[signal.Signals, Any] = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
        previous = signal.getsignal(sig)
        if not callable(previous):
            continue  # SIG_DFL ends the process at once anyway; SIG_IGN means "not a stop signal here"

        def chained(signum: int, frame: FrameType | None, previous: Any = previous) -> None:
            # Only a flag: the main thread sleeps in short slices holding no lock and rechecks it. Raising
            # here (as an earlier version did) could land inside Condition.wait() between its release and
            # its try block, leaving the lock released under a `with` that then fails to release it.
            global _stopping
            previous(signum, frame)  # the program's own handler first: it may raise (KeyboardInterrupt...)
            _stopping = True
            # Other threads' waits end too, unless a thread holds the lock right now (never block in a
            # handler): that one rechecks the flag at its next turn.
            if _cond.acquire(blocking=False):
                try:
                    _notify()
                finally:
                    _cond.release()

        try:
            signal.signal(sig, chained)
        except ValueError:  # pragma: no cover - only in a subinterpreter, where no test (and no driver) runs
            continue
        saved[sig] = previous
    try:
        yield
    finally:
        for sig, previous in saved.items():
            with contextlib.suppress(ValueError):
                signal.signal(sig, previous)


def _wait(seconds: float) -> None:
    """Wait up to ``seconds`` for news about a gate or a stop request."""
    if threading.current_thread() is not threading.main_thread():
        with _cond:
            if not _stopping:
                _cond.wait(seconds)
        return
    # The main thread runs signal handlers, which may raise (KeyboardInterrupt, a task time limit):
    # an exception raised inside Condition.wait() at the wrong bytecode leaves the lock in a state
    # the `with` cannot undo. time.sleep() holds nothing, and an exception leaves it cleanly.
    seen = _news
    end = time.monotonic() + seconds
    while not _stopping and _news == seen:
        left = end - time.monotonic()
        if left <= 0:
            return
        time.sleep(min(left, _MAIN_SLICE))


def connect_patiently(conn: BaseDatabaseWrapper, timeout: float, failed: BaseException | None = None) -> None:
    """Open ``conn`` through Django, waiting for its server for up to ``timeout`` seconds.

    Errors that are not about reaching the server (wrong password, unknown database) are raised at
    once: waiting would not fix them. When time runs out, this thread's last connection error is
    raised; after a stop signal, ReconnectStopped (chained from it). ``failed``: the error of an
    attempt the caller already made (it counts as this thread's first failed attempt).
    """
    alias = conn.alias
    deadline = time.monotonic() + timeout
    last: BaseException | None = failed
    waited = False
    if failed is not None:
        _stats.bump(alias, "reconnect_attempts")
        _failed(alias, failed)
    with _stop_signals():
        while True:
            if _stopping:
                raise ReconnectStopped(
                    f"stopped waiting for database {alias!r} to come back: the process is stopping"
                ) from last
            with _cond:
                pause = _turn(alias, deadline)
            if pause is not None:
                if not waited:
                    waited = True
                    _stats.bump(alias, "reconnect_waits")
                _wait(pause)
                continue
            _stats.bump(alias, "reconnect_attempts")
            try:
                # The class's method: a managed wrapper's own ensure_connection() is freshconn's patient one.
                type(conn).ensure_connection(conn)
            except Exception as exc:
                if not is_disconnect(exc) or refused_login(exc):
                    _give_back(alias)
                    raise
                last = exc
                _failed(alias, exc)
                if time.monotonic() >= deadline:
                    raise
                if not waited:
                    waited = True
                    _stats.bump(alias, "reconnect_waits")
                continue
            except BaseException:
                _give_back(alias)
                raise
            _succeeded(alias)
            return
