"""Unit handles: opening and closing units of work, per thread, whatever shape the caller has.

Each open unit is a ``UnitHandle`` on its thread's stack. Only the outermost one acts (checks at
open, discards at close); nested ones are no-ops, like a request inside a request. A handle
records its thread: closing it elsewhere (a generator from ``each()`` finished by another thread,
a framework that sends its "task finished" signal from another thread) is refused with a clear
error, and the owning thread ends it itself at its next unit, so no thread's state is corrupted.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Generator, Iterator
from typing import Any, TypeVar

from . import _aliases, _lifecycle, _state, _stats
from ._aliases import Scope, Using
from ._errors import AmbiguousCommitError, chain, commit_alias
from ._state import LOST_ATTR, STATE_ATTR, ConnState, ThreadState, Tracker, local, tls

__all__ = ["UnitHandle", "close", "in_transaction", "in_unit", "open_unit", "run_each"]

T = TypeVar("T")

logger = logging.getLogger("freshconn")
_get_ident = threading.get_ident


class UnitHandle:
    """An open unit of work (``freshconn.open_unit()``). Close it once, in the thread that opened it.

    ``close(exc)`` ends the unit: pass the exception the unit's work raised, if any, so that a
    connection it broke is discarded at once. It raises ``AmbiguousCommitError`` (chained from
    ``exc``) when that exception means a COMMIT was lost in flight.
    """

    __slots__ = ("_ctx", "_owner", "_parent", "abandoned", "acting", "closed", "scope", "tracker", "tracking")

    def __init__(self, scope: Scope, owner: Any, acting: bool, ctx: ThreadState) -> None:
        self.scope = scope
        self._owner = owner
        #: The opening thread's ThreadState: "same thread" is one identity test, no get_ident() call.
        self._ctx = ctx
        self.acting = acting
        self.closed = False
        self.abandoned = False
        #: Classify autocommit statements too (retrying units: a completed write forbids a retry).
        self.tracking = False
        #: What the statement hook saw in this unit; made on first need (most units never need it).
        self.tracker: Tracker | None = None
        self._parent: UnitHandle | None = None

    @property
    def _thread(self) -> int:
        """The ident of the thread that opened this unit."""
        return self._ctx.ident

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        kind = "outermost" if self.acting else "nested"
        return f"<UnitHandle {kind} {state} using={sorted(self.scope) if self.scope else 'all'}>"

    def record(self) -> Tracker:
        tracker = self.tracker
        if tracker is None:
            tracker = self.tracker = Tracker()
        return tracker

    def close(self, exc: BaseException | None = None) -> None:
        """End the unit (see the class docstring)."""
        close(self, exc)


def _open(
    scope: Scope,
    owner: Any = None,
    tracking: bool = False,
    acting: bool = False,
    checks: bool = True,
    reuse: UnitHandle | None = None,
) -> UnitHandle:
    """Open a unit. ``acting`` forces an acting unit inside another (one attempt of a nested retrying function).

    ``reuse``: the handle of the caller's previous unit (``each()``), recycled when it was closed
    normally in this thread; an abandoned one may still sit on its thread's stack, so never that.
    """
    thread = tls.ctx
    stack = thread.stack
    if stack:
        if stack[-1].abandoned:
            _repair()
        if stack and not acting:
            handle = UnitHandle(scope, owner, False, thread)
            stack.append(handle)
            return handle
    elif thread.async_open and not acting:
        handle = UnitHandle(scope, owner, False, thread)
        stack.append(handle)
        return handle
    if not _state.wired:
        _state.wire()
    if reuse is not None and reuse.closed and not reuse.abandoned and reuse._ctx is thread:
        handle = reuse
        handle.closed = False
        handle.acting = True
        handle.tracker = None
    else:
        handle = UnitHandle(scope, owner, True, thread)
    handle.tracking = tracking
    if tracking:
        _state.tracking_units.add(handle)
    parent = handle._parent = thread.active
    stack.append(handle)
    thread.active = handle
    thread.lost = False
    try:
        if checks:
            _lifecycle.begin(scope, parent is None and not thread.async_open, thread)
    except BaseException:
        stack.pop()
        thread.active = parent
        handle.closed = True
        _state.tracking_units.discard(handle)
        raise
    return handle


def open_unit(using: Using = None) -> UnitHandle:
    """Open a unit of work in this thread and return its handle; ``handle.close(exc)`` ends it.

    For framework adapters whose "task started" and "task finished" are two callbacks (signals,
    middleware hooks). Everything ``unit_of_work`` does, it does: checks now, discards at close.
    """
    scope = _aliases.scope_of(using, "open_unit(using=...)")
    return _open(scope)


def close(handle: UnitHandle, exc: BaseException | None) -> None:
    thread = tls.ctx
    stack = thread.stack
    if handle._ctx is thread and stack and stack[-1] is handle and not handle.closed:
        # The common case: the innermost open unit, closed in its own thread.
        stack.pop()
        _finish(handle, exc, thread)
        return
    if handle._ctx is not thread:
        if not handle.closed and not handle.abandoned:
            handle.abandoned = True
            _stats.bump(_first(handle.scope), "abandoned_units")
        raise RuntimeError(
            f"a unit of work opened in thread {handle._thread} was closed from thread {_get_ident()}: "
            "refused (a connection belongs to the thread that opened it); that thread ends the unit "
            "at its next one. Close units in the thread that opened them."
        )
    if handle.closed or handle not in stack:
        raise RuntimeError("this unit of work is already closed")
    while stack[-1] is not handle:
        # Opened after this one and never closed (a generator from each() left unfinished).
        _finish(stack.pop(), None, thread, quiet=True)
    stack.pop()
    _finish(handle, exc, thread)


def _finish(handle: UnitHandle, exc: BaseException | None, thread: ThreadState, quiet: bool = False) -> None:
    handle.closed = True
    if not handle.acting:
        return
    if handle.tracking:
        _state.tracking_units.discard(handle)
    parent = handle._parent
    thread.active = parent
    tracker = handle.tracker
    try:
        _lifecycle.end(handle.scope, exc, thread)
    finally:
        if parent is not None and tracker is not None:
            tracker.merge_into(parent.record())
    if exc is None or quiet:
        return
    lost = _ambiguous(exc, tracker)
    if lost is not None:
        raise lost from exc


def _repair() -> None:
    """End, in their own thread, the units another thread tried to close (they are on top of the stack)."""
    thread = tls.ctx
    stack = thread.stack
    while stack and stack[-1].abandoned:
        handle = stack.pop()
        logger.warning(
            "ending a unit of work that another thread tried to close",
            extra={"alias": _first(handle.scope), "reason": "abandoned_unit"},
        )
        _finish(handle, None, thread, quiet=True)


def _first(scope: Scope) -> str:
    return sorted(scope)[0] if scope else "default"


def in_unit() -> bool:
    """True when a unit of work is running in this thread (sync, or async units in their executor thread)."""
    thread = local()
    if thread.stack and thread.stack[-1].abandoned:
        _repair()
    return bool(thread.stack) or thread.async_open > 0


def in_transaction(scope: Scope) -> bool:
    """True when an open connection in scope is inside a transaction (atomic or manual) in this thread."""
    for alias, conn in local().wrappers.items():
        if (scope is None or alias in scope) and conn.connection is not None and not conn.get_autocommit():
            return True
    return False


def _lost_session(alias: str, tracker: Tracker | None) -> int | None:
    """The server-side id of the session whose COMMIT was lost, when freshconn knows it."""
    if tracker is not None and tracker.commit_in_flight == alias:
        return tracker.commit_backend
    conn = tls.ctx.wrappers.get(alias)
    if conn is None:
        return None
    current: ConnState | None = getattr(conn, STATE_ATTR, None)
    if current is not None and current.raw is not conn.connection:
        return current.backend_id  # discarded, not reopened yet: this state is the lost one
    lost: ConnState | None = getattr(conn, LOST_ATTR, None)
    return lost.backend_id if lost is not None else None


def _ambiguous(exc: BaseException, tracker: Tracker | None) -> AmbiguousCommitError | None:
    """The AmbiguousCommitError to raise instead of ``exc``, when ``exc`` means a COMMIT was lost in flight.

    Only for errors (an interruption such as KeyboardInterrupt, or a generator's close, keeps its
    own meaning), and only once per lost COMMIT.
    """
    if not isinstance(exc, Exception) or any(isinstance(e, AmbiguousCommitError) for e in chain(exc)):
        return None
    # The record first (the COMMIT hook saw it fail), then the error chain (async units, raw SQL).
    alias = tracker.commit_in_flight if tracker is not None and not tracker.reported else None
    if alias is None:
        alias = commit_alias(exc)
    if alias is None:
        return None
    if tracker is not None:
        tracker.reported = True
    err = AmbiguousCommitError(
        f"The connection to database {alias!r} was lost while COMMIT was in flight: the transaction may "
        "or may not have been applied, and the server may still apply it after this error. Do not run "
        "the work again blindly: make it idempotent (a unique key), or call wait_until_settled() on this "
        "error before reading the outcome."
    )
    err.alias = alias
    err.backend_id = _lost_session(alias, tracker)
    err.sent_at = tracker.commit_sent_at if tracker is not None and tracker.commit_sent_at else time.monotonic()
    _stats.bump(alias, "ambiguous_commits")
    return err


def open_async(scope: Scope) -> UnitHandle:
    """Open an async unit, in the thread that owns the async ORM's connections (see freshconn._async).

    Concurrent async units share that thread's connections, so they do not nest into one: each
    checks at its start and ends on its own, and a disconnect in any of them discards the
    connection at once (unless a transaction is open on it). Inside a sync unit of that thread
    (``async_to_sync`` called within a unit), an async unit is a no-op.
    """
    thread = tls.ctx
    if thread.stack:
        return UnitHandle(scope, None, False, thread)
    if not _state.wired:
        _state.wire()
    handle = UnitHandle(scope, None, True, thread)
    thread.async_open += 1
    thread.lost = False
    try:
        _lifecycle.begin(scope, True, thread)
    except BaseException:
        thread.async_open -= 1
        handle.closed = True
        raise
    return handle


def close_async(handle: UnitHandle, exc: BaseException | None) -> None:
    if handle.closed:
        raise RuntimeError("this unit of work is already closed")
    thread = tls.ctx
    if handle._ctx is not thread:
        raise RuntimeError(
            f"an async unit of work began in thread {handle._thread} and ended in thread {_get_ident()}: "
            "the async ORM's connections moved threads (a thread_sensitive=False executor?)"
        )
    handle.closed = True
    if not handle.acting:
        return
    thread.async_open -= 1
    _lifecycle.end(handle.scope, exc, thread)
    if exc is not None:
        lost = _ambiguous(exc, None)
        if lost is not None:
            raise lost from exc


def _close_in_generator(handle: UnitHandle, exc: BaseException | None) -> None:
    try:
        close(handle, exc)
    except RuntimeError as err:
        # The generator is being finished by a thread other than the one that advanced it (or
        # garbage-collected there): refused, and its own thread ends the unit at its next one.
        logger.warning("%s", err, extra={"alias": None, "reason": "abandoned_unit"})


def run_each(items: Iterator[T], scope: Scope) -> Generator[T, None, None]:
    """``freshconn.each()``: each item of ``items`` inside its own unit (the stack protocol, fast)."""
    # The inlined steps are close() and _open() above, restricted to their commonest case (an
    # outermost unit, alone on its thread's stack); any other case takes the general functions.
    # One handle for the whole loop while each unit closes normally, and one thread-local read per
    # message: a generator's resume runs in one thread, so the thread that closes a unit is the one
    # that fetches the next item and opens the next unit (a later resume may run elsewhere, hence
    # the read after each yield).
    #
    # Once a unit has closed that way, the loop swaps two lists as its thread's stack instead of
    # pushing and popping the handle (a quarter of a busy unit's instructions): ``one`` ([handle])
    # while a unit is open, ``idle`` (empty) between units. Every reader of a stack reads
    # ``thread.stack`` afresh, and only this loop ever installs ``one``, so ``thread.stack is one``
    # also says that this is the thread the loop's units belong to. Anything unusual (a unit left
    # open between items, nesting, another thread) finds a real stack and takes the general path.
    handle: UnitHandle | None = None
    thread = tls.ctx
    one: list[UnitHandle] = []
    idle: list[UnitHandle] = []
    swapped = False  # the last unit closed by swapping ``idle`` in
    for item in items:
        if swapped and thread.stack is idle and not idle and not thread.async_open and thread.active is None:
            assert handle is not None  # set by the unit that swapped
            handle.closed = False
            handle.tracker = None
            thread.stack = one
            thread.active = handle
            thread.lost = False
            try:
                _lifecycle.begin(scope, True, thread)
            except BaseException:
                thread.stack = idle
                thread.active = None
                handle.closed = True
                raise
        else:
            # A fresh ``one``: the old one may be the thread's stack now (a general close left it
            # there), and the general path's handle may be a nested one, which must not pass for
            # the loop's own acting unit at its close.
            one = []
            handle = _open(scope, None, False, False, True, handle)
        swapped = False
        try:
            yield item
        except BaseException as exc:
            _close_in_generator(handle, exc)
            raise
        thread = tls.ctx
        stack = thread.stack
        if stack is one:
            # Normally [handle]; empty or longer after something unusual (a nested unit left open,
            # the handle repaired as abandoned), which the general close sorts out.
            fast = bool(stack) and stack[0] is handle and stack[-1] is handle
        else:
            fast = (
                handle._ctx is thread
                and len(stack) == 1
                and stack[0] is handle
                and not handle.closed
                and handle.acting
                and handle._parent is None
            )
            if fast:
                # The first unit of the loop (or the first after an unusual one): from now on the
                # loop's own two lists are the stack, the thread's original list is left empty.
                stack.pop()
                one[:] = (handle,)
                idle.clear()
        if fast:
            thread.stack = idle
            handle.closed = True
            thread.active = None
            swapped = True
            _lifecycle.end(scope, None, thread)
        else:
            _close_in_generator(handle, None)
