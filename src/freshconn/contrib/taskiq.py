"""freshconn for taskiq workers: a middleware that runs every task as a unit of work.

``broker = ListQueueBroker(url).with_middlewares(FreshconnMiddleware())`` where the broker is built.

- An ``async def`` task runs inside ``freshconn.aunit_of_work``: its checks run in the thread
  where Django's async ORM (and ``sync_to_async``) keeps the connections, so concurrent tasks share
  that connection, each checking it at its start, and a disconnect discards it at once.
- A plain ``def`` task runs inside ``freshconn.unit_of_work`` in the worker's thread-pool thread
  that runs it (taskiq calls it there), on that thread's persistent connection.
- When the worker stops, the async ORM thread's connections are closed.

How: taskiq runs its middlewares' ``pre_execute`` on the event loop, not in the thread that runs a
sync task, so the middleware wraps each task's function (``task.original_func``, once per task, the
first time one of its messages arrives) rather than opening a unit there. The wrapper keeps the
function's signature and type hints, so taskiq's argument parsing and dependencies are unchanged.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from asgiref.sync import sync_to_async
from taskiq import TaskiqMessage, TaskiqMiddleware

from freshconn import UnitOfWork, Using, aunit_of_work, close_thread_connections, unit_of_work

__all__ = ["FreshconnMiddleware"]

_MARK = "_freshconn_unit"


def as_unit(func: Callable[..., Any], using: Using = None) -> Callable[..., Any]:
    """``func`` run as a unit of work: async for a coroutine function, in its own thread otherwise."""
    if getattr(func, _MARK, False):
        return func
    if inspect.iscoroutinefunction(func):
        wrapped: Callable[..., Any] = aunit_of_work(using=using)(func)
    else:
        wrapped = unit_of_work(using=using)(func)
    setattr(wrapped, _MARK, True)
    return wrapped


class FreshconnMiddleware(TaskiqMiddleware):
    """Each task a unit of work; ``using`` limits the aliases in scope (default: all)."""

    def __init__(self, using: Using = None) -> None:
        super().__init__()
        UnitOfWork(using)  # a typo'd alias fails here, where the broker is built
        self.using = using

    def pre_execute(self, message: TaskiqMessage) -> TaskiqMessage:
        task = self.broker.find_task(message.task_name)
        if task is not None:
            task.original_func = as_unit(task.original_func, self.using)
        return message

    async def shutdown(self) -> None:
        if self.broker.is_worker_process:
            await sync_to_async(close_thread_connections, thread_sensitive=True)()
