"""freshconn for Faust (faust-streaming) workers: each event an agent handles runs as a unit of work.

One line, where the app is made: ``app = faust.App("orders", ..., Agent=freshconn.contrib.faust.Agent)``
(in a settings object, ``Agent = "freshconn.contrib.faust:Agent"``). Then, for every agent of the app:

- each event an actor takes from its stream (``async for value in stream``, and ``stream.items()``,
  ``events()``, ``enumerate()``, which iterate the stream) is handled inside an async unit of work
  (``freshconn.aunit_of_work``). The unit begins once the event has arrived (time spent waiting for
  it counts as idle time) and ends when the agent asks for the next event, before waiting for it.
  Its checks run in the thread where Django's async ORM keeps its connections (``acreate``,
  ``sync_to_async``): no round trip while the stream is busy, a ping after ``CHECK_AFTER_IDLE``, a
  dead or expired connection replaced without one;
- an exception that leaves the agent (Faust then crashes and restarts its actor) ends the current
  event's unit with that exception, so a disconnect discards the connection at once;
- when an agent stops (worker shutdown), the async ORM thread's connections are closed.

``class MyAgent(freshconn.contrib.faust.Agent): using = "default"`` limits the aliases in scope.

``stream.take()`` / ``take_events()`` fill their batches in the background, outside the agent's
task: wrap the body of a batch in ``async with freshconn.aunit_of_work():``.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from contextvars import ContextVar
from typing import Any, ClassVar

import faust
from asgiref.sync import sync_to_async

from freshconn import AsyncUnitOfWork, Using, close_thread_connections

__all__ = ["Agent"]


class _Open:
    """The unit of the event this task is handling; ended once, by the task that began it."""

    __slots__ = ("task", "unit")

    def __init__(self, unit: AsyncUnitOfWork) -> None:
        self.unit = unit
        self.task = asyncio.current_task()


#: The event unit open in this task (an agent's actor), if any.
_current: ContextVar[_Open | None] = ContextVar("freshconn_faust_event", default=None)


async def _end(exc: BaseException | None) -> None:
    """End this task's event unit, if one is open (the agent asked for the next event, or failed)."""
    opened = _current.get()
    if opened is None or opened.task is not asyncio.current_task():
        return  # none, or a generator finalized by another task: the actor's own task ends it
    _current.set(None)
    await opened.unit.__aexit__(None if exc is None else type(exc), exc, None if exc is None else exc.__traceback__)


async def _units(events: AsyncIterator[Any], unit: AsyncUnitOfWork) -> AsyncIterator[Any]:
    """The stream's values, each handled inside its own unit (see the module docstring)."""
    if _current.get() is not None:
        # A stream iterated by a stream this task already handles in units (nested iteration).
        async for value in events:
            yield value
        return
    async for value in events:
        await unit.__aenter__()
        _current.set(_Open(unit))
        try:
            yield value
        except BaseException as exc:
            # Thrown in at the yield (aclose, athrow): end it here if this is the actor's task.
            await _end(None if isinstance(exc, GeneratorExit) else exc)
            raise
        await _end(None)


_stream_classes: dict[tuple[type[Any], type[Any]], type[Any]] = {}


def _stream_class(base: type[Any], agent: type[Agent]) -> type[Any]:
    """``base`` (the app's Stream class) iterated in units; clones (``through``, ``group_by``) keep it."""
    key = (base, agent)
    if key not in _stream_classes:
        unit = AsyncUnitOfWork(agent.using)

        def __aiter__(self: Any) -> AsyncIterator[Any]:
            return _units(super(cls, self).__aiter__(), unit)

        cls: type[Any] = type(base.__name__, (base,), {"__aiter__": __aiter__})
        _stream_classes[key] = cls
    return _stream_classes[key]


async def _awaiting(res: Awaitable[Any]) -> Any:
    try:
        result = await res
    except BaseException as exc:
        await _end(exc)
        raise
    await _end(None)
    return result


async def _yielding(res: AsyncIterable[Any]) -> AsyncIterator[Any]:
    try:
        async for value in res:
            yield value
    except BaseException as exc:
        await _end(None if isinstance(exc, GeneratorExit) else exc)
        raise
    await _end(None)


def _in_units(fun: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fun)
    def agent(stream: Any, *args: Any, **kwargs: Any) -> Any:
        res = fun(stream, *args, **kwargs)
        return _yielding(res) if isinstance(res, AsyncIterable) else _awaiting(res)

    return agent


class Agent(faust.Agent):
    """A ``faust.Agent`` that handles each event of its stream as a unit of work (see the module docstring)."""

    #: The aliases in scope (default: all); set it in a subclass.
    using: ClassVar[Using] = None

    def __init__(self, fun: Callable[..., Any], **kwargs: Any) -> None:
        AsyncUnitOfWork(self.using)  # a typo'd alias fails here, where the agent is declared
        super().__init__(_in_units(fun), **kwargs)

    def stream(self, *args: Any, **kwargs: Any) -> Any:
        stream = super().stream(*args, **kwargs)
        # Built as Faust clones streams (``clone()``), as the same stream in a class that iterates in units.
        return _stream_class(type(stream), type(self))(**stream.info())

    async def on_stop(self) -> None:
        try:
            await super().on_stop()
        finally:
            await sync_to_async(close_thread_connections, thread_sensitive=True)()
