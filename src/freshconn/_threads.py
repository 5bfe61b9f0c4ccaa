"""``freshconn.ThreadPoolExecutor``: a drop-in thread pool whose tasks run as units of work.

Django keeps one connection per alias per thread, and nothing closes the connections of a pool's
worker threads: a plain ``concurrent.futures.ThreadPoolExecutor`` leaves one open connection per
thread until the process exits. A connection can only be closed safely by the thread that owns it,
so each worker thread of this pool closes its own connections as its loop ends (pool shutdown,
the executor garbage-collected, or interpreter exit), through the pool's work queue (_ClosingQueue).
"""

from __future__ import annotations

import concurrent.futures
import logging
import queue
import threading
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

from django.db import connections

from ._unit import UnitOfWork, Using
from ._units import in_unit

__all__ = ["ThreadPoolExecutor", "close_thread_connections"]

logger = logging.getLogger("freshconn")

P = ParamSpec("P")
T = TypeVar("T")


def close_thread_connections() -> None:
    """Close every database connection the *current* thread opened (one per alias at most)."""
    for conn in connections.all(initialized_only=True):
        if conn.connection is None:
            continue
        try:
            if conn.in_atomic_block:
                # A task leaked an open transaction and this thread is ending: nobody can ever
                # commit it, and Django's close() refuses inside atomic. Closing the socket makes
                # the server roll it back.
                raw = conn.connection
                conn.connection = None
                raw.close()
            else:
                conn.close()
        except Exception as exc:  # noqa: BLE001 - the thread is ending; a dead socket must not stop the others
            logger.debug(
                "closing %r at thread end failed: %s",
                conn.alias,
                type(exc).__name__,
                extra={"alias": conn.alias, "reason": "thread_end"},
            )
            conn.connection = None


class _ClosingQueue(queue.SimpleQueue[Any]):
    """The pool's work queue: a worker thread that takes the pool's stop sentinel closes its connections.

    The stdlib gives its worker loop no end-of-thread hook before Python 3.14 (and a different one
    there), but on every version from 3.10 the loop ends the same way: it takes ``None`` from
    ``executor._work_queue`` (put there by ``shutdown()``, by the executor's garbage collection
    and at interpreter exit) and returns. Taking that ``None`` is the last thing the thread does
    as a worker, in the worker thread itself: the one moment its connections can be closed safely.
    """

    def __init__(self) -> None:
        # Idents of this pool's worker threads that have not stopped yet (set by _start_worker).
        self.workers: set[int] = set()

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        item = super().get(block, timeout)
        # shutdown(cancel_futures=True) drains the queue in the calling thread, which may be one of
        # the pool's own workers inside a task (so inside its unit): a sentinel drained there is
        # not that thread's stop.
        if item is None and not in_unit():
            ident = threading.get_ident()
            if ident in self.workers:
                self.workers.discard(ident)
                close_thread_connections()
        return item

    def get_nowait(self) -> Any:
        # The C get_nowait() does not go through get(): route it there.
        return self.get(False)


def _start_worker(
    work_queue: _ClosingQueue, initializer: Callable[..., object] | None, initargs: tuple[Any, ...]
) -> None:
    """Every worker thread's first code (the stdlib runs it as the pool's initializer)."""
    ident = threading.get_ident()
    work_queue.workers.add(ident)
    if initializer is None:
        return
    try:
        initializer(*initargs)
    except BaseException:
        # The stdlib marks the pool broken and ends this thread without taking a sentinel.
        work_queue.workers.discard(ident)
        close_thread_connections()
        raise


def _run_in_unit(unit: UnitOfWork, fn: Callable[..., T], args: tuple[Any, ...], kwargs: dict[str, Any]) -> T:
    with unit:
        return fn(*args, **kwargs)


class ThreadPoolExecutor(concurrent.futures.ThreadPoolExecutor):
    """A ``concurrent.futures.ThreadPoolExecutor`` whose tasks run as units of work.

    Every submitted callable (``submit`` and ``map``) runs inside ``freshconn.unit_of_work(using=using)``
    in its worker thread, and every worker thread closes its own connections when it ends, so
    ``shutdown()`` (or leaving the ``with`` block) leaves no connection open on the server.
    ``shutdown(wait=False)`` returns at once; each thread still closes its connections when it
    finishes its last task.
    """

    def __init__(
        self,
        max_workers: int | None = None,
        thread_name_prefix: str = "",
        initializer: Callable[..., object] | None = None,
        initargs: tuple[Any, ...] = (),
        *,
        using: Using = None,
    ) -> None:
        if initializer is not None and not callable(initializer):
            raise TypeError("initializer must be a callable")
        work_queue = _ClosingQueue()
        super().__init__(max_workers, thread_name_prefix, _start_worker, (work_queue, initializer, initargs))
        # Replaced before any thread exists: threads are started by submit() and take this queue.
        self._work_queue = work_queue
        self._freshconn_unit = UnitOfWork(using)

    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> concurrent.futures.Future[T]:
        return super().submit(_run_in_unit, self._freshconn_unit, fn, args, kwargs)
