"""``freshconn.ThreadPoolExecutor``: a drop-in thread pool whose tasks run as units of work.

Django keeps one connection per alias per thread, and nothing closes the connections of a pool's
worker threads: a plain ``concurrent.futures.ThreadPoolExecutor`` leaves one open connection per
thread until the process exits. A connection can only be closed safely by the thread that owns it,
so this pool runs every worker thread's loop inside a wrapper that closes that thread's connections
when the loop ends (pool shutdown, the executor garbage-collected, or interpreter exit).
"""

from __future__ import annotations

import concurrent.futures
import concurrent.futures.thread as _stdlib
import logging
import threading
import weakref
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

from django.db import connections

from ._unit import UnitOfWork, Using

__all__ = ["ThreadPoolExecutor", "close_thread_connections"]

logger = logging.getLogger("freshconn")

P = ParamSpec("P")
T = TypeVar("T")

# Python 3.14 gave the pool a per-thread WorkerContext with a finalize() hook; 3.10-3.13 run a
# bare ``_worker(executor_ref, work_queue, initializer, initargs)`` loop with no hook at all.
_HAS_WORKER_CONTEXT = hasattr(_stdlib, "WorkerContext")


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


def _run_worker(*args: Any) -> None:
    """The stdlib worker loop (3.10-3.13), then this thread's connections closed, whatever happened."""
    try:
        _stdlib._worker(*args)
    finally:
        close_thread_connections()


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
        super().__init__(max_workers, thread_name_prefix, initializer, initargs)
        self._freshconn_unit = UnitOfWork(using)

    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> concurrent.futures.Future[T]:
        return super().submit(_run_in_unit, self._freshconn_unit, fn, args, kwargs)

    if _HAS_WORKER_CONTEXT:  # pragma: no cover - Python >= 3.14

        @classmethod
        def prepare_context(cls, initializer: Any, initargs: Any) -> Any:
            return _ClosingContext.prepare(initializer, initargs)

    else:

        def _adjust_thread_count(self) -> None:
            # Same as the stdlib's (identical in 3.10-3.13) but with our loop as the thread target:
            # that loop is the only code that runs in the worker thread after its last task.
            if self._idle_semaphore.acquire(timeout=0):
                return

            def weakref_cb(_: Any, q: Any = self._work_queue) -> None:
                q.put(None)

            num_threads = len(self._threads)
            if num_threads < self._max_workers:
                thread_name = f"{self._thread_name_prefix or self}_{num_threads}"
                t = threading.Thread(
                    name=thread_name,
                    target=_run_worker,
                    args=(
                        weakref.ref(self, weakref_cb),
                        self._work_queue,
                        self._initializer,
                        self._initargs,
                    ),
                )
                t.start()
                self._threads.add(t)  # type: ignore[attr-defined]  # a set
                _stdlib._threads_queues[t] = self._work_queue  # type: ignore[index]  # a WeakKeyDictionary


if _HAS_WORKER_CONTEXT:  # pragma: no cover - Python >= 3.14

    class _ClosingContext(_stdlib.WorkerContext):  # type: ignore[name-defined,misc]
        def finalize(self) -> None:
            try:
                super().finalize()
            finally:
                close_thread_connections()
