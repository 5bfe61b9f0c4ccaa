"""freshconn for Procrastinate (>= 3.10) workers: every task runs as a unit of work.

With Procrastinate's Django app (``procrastinate.contrib.django``), one setting::

    PROCRASTINATE_ON_APP_READY = "freshconn.contrib.procrastinate.on_app_ready"

(an ``ON_APP_READY`` of your own calls ``freshconn.contrib.procrastinate.on_app_ready(app)`` too).
For a plain ``procrastinate.App``: ``App(..., worker_defaults=with_units())``.

- A sync task runs inside ``freshconn.unit_of_work`` in the thread Procrastinate runs it in (a
  thread of the event loop's default executor), on that thread's persistent connection; an async
  task inside ``freshconn.aunit_of_work``, whose checks run where Django's async ORM keeps its
  connections. The task's exception reaches the unit's end, so a disconnect drops the connection
  it broke at once.
- Sync tasks run in a ``freshconn.ThreadPoolExecutor`` of ``concurrency`` threads, made the event
  loop's default executor at the first job (Procrastinate calls ``sync_to_async(thread_sensitive=False)``,
  i.e. that executor): asyncio's own default executor grows up to ``min(32, cpus + 4)`` threads, each
  with a connection that is never closed; this one keeps one per worker slot and closes them when
  the worker's event loop ends.
- They replace the ``close_db_connections`` middlewares of Procrastinate's ``DjangoApp``, which call
  ``close_old_connections()`` before and after every task (with Django's default ``CONN_MAX_AGE=0``,
  a new connection per task; otherwise no idle notion, and a failed first task after a drop).
  Django's query log is still cleared after each task, as they do.

Procrastinate's own queries (fetching, finishing and retrying jobs, LISTEN/NOTIFY) use its own
psycopg connections, not Django's, and are not affected.
"""

from __future__ import annotations

import asyncio
import weakref
from typing import Any

from django.db import reset_queries

from freshconn import ThreadPoolExecutor, Using, aunit_of_work, unit_of_work

__all__ = ["async_task_unit", "on_app_ready", "own_default_executor", "task_unit", "with_units"]

_pools: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, ThreadPoolExecutor] = weakref.WeakKeyDictionary()


async def own_default_executor(call_next: Any, context: Any, worker: Any) -> Any:
    """Worker middleware: a freshconn thread pool (one thread per worker slot) as the loop's default executor."""
    loop = asyncio.get_running_loop()
    if loop not in _pools:
        pool = ThreadPoolExecutor(max_workers=max(1, int(getattr(worker, "concurrency", 1))))
        loop.set_default_executor(pool)  # asyncio.run() shuts it down at the end: each thread closes its own
        _pools[loop] = pool
    return await call_next()


def task_unit(call_next: Any, context: Any, worker: Any) -> Any:
    """Sync task middleware: the task as a unit of work in its own thread."""
    try:
        with unit_of_work():
            return call_next()
    finally:
        reset_queries()


async def async_task_unit(call_next: Any, context: Any, worker: Any) -> Any:
    """Async task middleware: the task as an async unit of work."""
    async with aunit_of_work():
        return await call_next()


def _is_close_db(middleware: Any) -> bool:
    return getattr(middleware, "__module__", "") == "procrastinate.contrib.django.db_cleanup" and getattr(
        middleware, "__name__", ""
    ).startswith("close_db_connections")


def with_units(worker_defaults: dict[str, Any] | None = None, *, using: Using = None) -> dict[str, Any]:
    """A copy of ``worker_defaults`` whose task middlewares begin with freshconn's (and lack Django's cleanup)."""
    base = dict(worker_defaults or {})
    rest = [m for m in base.get("task_middleware") or () if not _is_close_db(m) and m not in _MIDDLEWARES]
    if using is None:
        ours: list[Any] = list(_MIDDLEWARES)
    else:
        ours = [_scoped_sync(using), _scoped_async(using)]
    base["task_middleware"] = [*ours, *rest]
    workers = [m for m in base.get("worker_middleware") or () if m is not own_default_executor]
    base["worker_middleware"] = [own_default_executor, *workers]
    return base


def on_app_ready(app: Any) -> None:
    """``PROCRASTINATE_ON_APP_READY``: put freshconn's units in place of the DjangoApp's connection cleanup."""
    app.worker_defaults = with_units(app.worker_defaults)


_MIDDLEWARES = (task_unit, async_task_unit)


def _scoped_sync(using: Using) -> Any:
    unit = unit_of_work(using=using)

    def task_unit_scoped(call_next: Any, context: Any, worker: Any) -> Any:
        try:
            with unit:
                return call_next()
        finally:
            reset_queries()

    return task_unit_scoped


def _scoped_async(using: Using) -> Any:
    unit = aunit_of_work(using=using)

    async def async_task_unit_scoped(call_next: Any, context: Any, worker: Any) -> Any:
        async with unit:
            return await call_next()

    return async_task_unit_scoped
