"""freshconn for arq workers: every job runs as a unit of work, through arq's job hooks.

``@freshconn.contrib.arq.install`` on the ``WorkerSettings`` class (or ``install(WorkerSettings)``,
or ``install(settings_dict)``); hooks the class already has keep running, inside the unit.

- ``on_job_start`` begins an async unit of work (``freshconn.aunit_of_work``) and ``on_job_end``
  ends it, in the job's own asyncio task: arq jobs are coroutines, whose ORM calls
  (``acreate``, ``sync_to_async``) run in the one thread where Django's async ORM keeps its
  connections, so that is where the unit checks them. Concurrent jobs share that connection;
  each checks it at its start (no round trip while busy) and ends on its own.
- ``on_shutdown`` closes that thread's connections when the worker stops.

arq does not pass a job's exception to ``on_job_end``: a connection the job broke is found by the
end-of-unit check (Django flagged the error; the socket or driver shows it closed) or, failing
that, at the next job's start, before any query.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from asgiref.sync import sync_to_async

from freshconn import AsyncUnitOfWork, Using, close_thread_connections

__all__ = ["install"]

_KEY = "_freshconn_unit"
Hook = Callable[[dict[Any, Any]], Awaitable[Any]]
S = TypeVar("S")


def install(settings: S, *, using: Using = None) -> S:
    """Run every job of these worker settings as a unit of work (``using``: aliases in scope).

    Returns ``settings`` (so it works as a class decorator); installing twice is harmless.
    """
    unit = AsyncUnitOfWork(using)  # a typo'd alias fails here, at import

    def get(name: str) -> Hook | None:
        value = settings.get(name) if isinstance(settings, dict) else getattr(settings, name, None)
        return value

    def put(name: str, hook: Hook) -> None:
        if isinstance(settings, dict):
            settings[name] = hook
        else:
            setattr(settings, name, staticmethod(hook))

    if getattr(get("on_job_start"), _KEY, False):
        return settings
    start, end, shutdown = get("on_job_start"), get("on_job_end"), get("on_shutdown")

    async def on_job_start(ctx: dict[Any, Any]) -> None:
        await unit.__aenter__()
        ctx[_KEY] = True
        if start is not None:
            await start(ctx)

    async def on_job_end(ctx: dict[Any, Any]) -> None:
        try:
            if end is not None:
                await end(ctx)
        finally:
            if ctx.pop(_KEY, False):
                # The same asyncio task as on_job_start (arq's run_job awaits both).
                await unit.__aexit__(None, None, None)

    async def on_shutdown(ctx: dict[Any, Any]) -> None:
        try:
            if shutdown is not None:
                await shutdown(ctx)
        finally:
            await sync_to_async(close_thread_connections, thread_sensitive=True)()

    setattr(on_job_start, _KEY, True)
    put("on_job_start", on_job_start)
    put("on_job_end", on_job_end)
    put("on_shutdown", on_shutdown)
    return settings
