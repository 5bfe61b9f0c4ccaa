"""freshconn for Temporal workers (``temporalio``): every activity attempt runs as a unit of work.

``Worker(client, ..., interceptors=[FreshconnInterceptor()], activity_executor=freshconn.ThreadPoolExecutor(8))``.

- A sync activity (``def``) runs inside ``freshconn.unit_of_work`` in the executor thread that runs
  it: its persistent connection is checked only after an idle spell, replaced without a round
  trip once the server's idle limit has passed, and discarded at once when the attempt failed on a
  disconnect, so Temporal's retry of that attempt gets a good connection instead of the same dead
  one. With ``freshconn.ThreadPoolExecutor`` as the executor, each thread also closes its
  connections when the worker shuts the executor down.
- An async activity (``async def``) runs inside ``freshconn.aunit_of_work``, whose checks run in the
  thread where Django's async ORM (and ``sync_to_async``) keeps the connections.
- Workflows are not touched: workflow code must not do I/O, let alone use the database.

Each attempt is its own unit, so a retry after a heartbeat timeout or a worker restart starts
with the same checks. With a process-pool executor the wrapper is pickled with the activity.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

from temporalio.worker import ActivityInboundInterceptor, ExecuteActivityInput, Interceptor

from freshconn import AsyncUnitOfWork, UnitOfWork, Using

__all__ = ["FreshconnInterceptor"]


class _SyncUnit:
    """A sync activity function run as a unit of work; a class so that process pools can pickle it."""

    def __init__(self, fn: Any, using: Using) -> None:
        self.fn = fn
        self.using = using

    def __call__(self, *args: Any) -> Any:
        with UnitOfWork(self.using):
            return self.fn(*args)


class _Inbound(ActivityInboundInterceptor):
    def __init__(self, next: ActivityInboundInterceptor, using: Using) -> None:
        super().__init__(next)
        self._using = using

    async def execute_activity(self, input: ExecuteActivityInput) -> Any:
        fn = input.fn
        if inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(getattr(fn, "__call__", None)):  # noqa: B004
            unit = AsyncUnitOfWork(self._using)

            async def run(*args: Any) -> Any:
                async with unit:
                    return await fn(*args)

            wrapped: Any = run
        else:
            wrapped = _SyncUnit(fn, self._using)
        return await self.next.execute_activity(dataclasses.replace(input, fn=wrapped))


class FreshconnInterceptor(Interceptor):
    """Each activity attempt a unit of work; ``using`` limits the aliases in scope (default: all)."""

    def __init__(self, using: Using = None) -> None:
        UnitOfWork(using)  # a typo'd alias fails here, where the worker is built
        self.using = using

    def intercept_activity(self, next: ActivityInboundInterceptor) -> ActivityInboundInterceptor:
        return _Inbound(next, self.using)
