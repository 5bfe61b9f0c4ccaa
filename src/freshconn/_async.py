"""Units of work for asyncio code that uses Django's async ORM.

Django runs every async ORM call (``acreate``, ``aget``...) through ``sync_to_async`` with
``thread_sensitive=True``: in one thread that owns those connections (the thread of the outermost
``async_to_sync``, or asgiref's single shared executor thread in a plain ``asyncio.run`` program).
A connection can be checked or closed only by the thread that owns it, so the begin and end of an
async unit run in that same thread, through the same thread-sensitive ``sync_to_async``.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import AsyncGenerator, AsyncIterable, Callable, Coroutine, Iterable
from contextvars import ContextVar
from types import TracebackType
from typing import Any, TypeVar, overload

from asgiref.sync import sync_to_async

from . import _aliases
from ._aliases import Scope, Using
from ._units import UnitHandle, close_async, open_async

__all__ = ["AsyncUnitOfWork", "aeach", "aunit_of_work"]

T = TypeVar("T")
AF = TypeVar("AF", bound=Callable[..., Coroutine[Any, Any, Any]])

_open = sync_to_async(open_async, thread_sensitive=True)
_close = sync_to_async(close_async, thread_sensitive=True)
#: The async units this task (and the code it awaits) is inside, innermost last. A context
#: variable, because concurrent tasks share a thread but each has its own units.
_open_units: ContextVar[tuple[UnitHandle | None, ...]] = ContextVar("freshconn_async_units", default=())


class AsyncUnitOfWork:
    """One async unit of work: ``async with`` context manager and decorator for coroutine functions.

    Like the sync unit, the object holds only configuration. Nesting is per task: a unit inside a
    unit of the same task is a no-op, while units of concurrent tasks are separate units that
    share the async ORM thread's connections, each checked at its start and ended on its own.
    """

    __slots__ = ("scope", "using")

    def __init__(self, using: Using = None) -> None:
        self.using = using
        self.scope: Scope = _aliases.scope_of(using, "aunit_of_work(using=...)")

    def __repr__(self) -> str:
        return f"aunit_of_work(using={self.using!r})"

    async def __aenter__(self) -> AsyncUnitOfWork:
        units = _open_units.get()
        outer = next((h for h in reversed(units) if h is not None), None)
        if outer is not None and not outer.closed:
            # Inside a unit of this task, or of the task that created this one while its unit was open.
            _open_units.set((*units, None))
            return self
        _aliases.ensure_known(self.scope, "aunit_of_work(using=...)")
        handle = await _open(self.scope)
        _open_units.set((*units, handle))
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        units = _open_units.get()
        if not units:
            raise RuntimeError("aunit_of_work.__aexit__ without a matching __aenter__ in this task")
        _open_units.set(units[:-1])
        handle = units[-1]
        if handle is not None:
            await _close(handle, exc)

    def __call__(self, func: AF) -> AF:
        if not inspect.iscoroutinefunction(func):
            raise TypeError(
                f"aunit_of_work wraps coroutine functions (async def), not {func.__qualname__}: "
                "use freshconn.unit_of_work for a sync function."
            )

        @functools.wraps(func)
        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            async with self:
                return await func(*args, **kwargs)

        return wrapper  # type: ignore[return-value]


@overload
def aunit_of_work(func: AF, /) -> AF: ...


@overload
def aunit_of_work(func: None = None, /, *, using: Using = None) -> AsyncUnitOfWork: ...


def aunit_of_work(func: Callable[..., Any] | None = None, /, *, using: Using = None) -> Any:
    """Run an async block or a coroutine function as a unit of work.

    ``async with aunit_of_work():``, ``@aunit_of_work`` and ``@aunit_of_work(using="default")``
    all work. The unit's checks run in the thread where the async ORM keeps its connections.
    """
    if func is not None:
        if isinstance(func, str) or not callable(func):
            raise TypeError(
                f"aunit_of_work() takes its alias as a keyword: aunit_of_work(using={func!r}), "
                f"got a positional {func!r}"
            )
        return AsyncUnitOfWork(using)(func)
    return AsyncUnitOfWork(using)


def aeach(items: AsyncIterable[T] | Iterable[T], using: Using = None) -> AsyncGenerator[T, None]:
    """Yield each item of an async (or plain) iterable inside its own async unit of work.

    As with ``each``, the unit begins after the item arrived (time awaiting it counts as idle)
    and ends before the next one is awaited. Leaving the loop early with ``break`` ends the
    current unit when the generator is closed: wrap it in ``contextlib.aclosing`` to make that
    immediate.
    """
    unit = AsyncUnitOfWork(using)
    if not isinstance(items, (AsyncIterable, Iterable)) or isinstance(items, (str, bytes)):
        raise TypeError(f"aeach() takes an async or plain iterable of messages, got {type(items).__name__}")
    return _aeach(items, unit)


async def _aeach(items: AsyncIterable[T] | Iterable[T], unit: AsyncUnitOfWork) -> AsyncGenerator[T, None]:
    if isinstance(items, AsyncIterable):
        async for item in items:
            async with unit:
                yield item
    else:
        for item in items:
            async with unit:
                yield item
