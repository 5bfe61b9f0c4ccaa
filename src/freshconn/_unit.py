"""The public entry points: ``unit_of_work`` (context manager and decorator) and ``each``."""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import AsyncIterator, Callable, Coroutine, Generator, Iterable
from types import TracebackType
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar, final, overload

from . import _aliases, _retry
from ._aliases import Scope, Using
from ._state import tls
from ._units import _open, close, run_each

if TYPE_CHECKING:
    from typing_extensions import deprecated
else:

    def deprecated(message: str) -> Callable[[T], T]:
        return lambda func: func


__all__ = ["UnitOfWork", "Using", "each", "unit_of_work"]

logger = logging.getLogger("freshconn")

P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T")

#: What type checkers refuse to let ``unit_of_work`` wrap: an ``async def`` or an async generator function
#: (which it refuses at run time). A sync function returning either would end its unit before they run.
_CoroutineFunction = Callable[..., Coroutine[Any, Any, Any] | AsyncIterator[Any]]


@final
class UseAunitOfWorkForCoroutineFunctions:
    """What a type checker sees ``@unit_of_work`` make of an ``async def``: nothing callable.

    ``unit_of_work`` raises TypeError for a coroutine function; this type makes the mistake a type
    error too, at the call of the decorated function (and a deprecation report where enabled).
    """

    __slots__ = ()


def _check_options(retries: Any, idempotent: Any) -> None:
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        raise TypeError(f"unit_of_work(retries=...) takes an int >= 0, got {type(retries).__name__} {retries!r}")
    if not isinstance(idempotent, bool):
        raise TypeError(
            f"unit_of_work(idempotent=...) takes True or False, got {type(idempotent).__name__} {idempotent!r}"
        )


class UnitOfWork:
    """One unit of work: a context manager and a decorator.

    The object holds only its configuration, so one instance may be entered by many threads at
    once and re-entered; each entry opens a handle on the entering thread's stack, and only the
    outermost unit of a thread acts.
    """

    __slots__ = ("idempotent", "retries", "scope", "using")

    def __init__(self, using: Using = None, *, retries: int = 0, idempotent: bool = False) -> None:
        _check_options(retries, idempotent)
        self.using = using
        self.scope: Scope = _aliases.scope_of(using)
        self.retries = retries
        self.idempotent = idempotent

    def __repr__(self) -> str:
        return f"unit_of_work(using={self.using!r}, retries={self.retries}, idempotent={self.idempotent})"

    def __enter__(self) -> UnitOfWork:
        if self.retries:
            raise TypeError(
                "unit_of_work(retries=...) needs the decorator form: a with block cannot be run again. "
                "Move the block into a function decorated with @unit_of_work(retries=N)."
            )
        scope = self.scope
        if scope is not None and scope not in _aliases.validated:
            _aliases.ensure_known(scope)
        _open(scope, self)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        stack = tls.ctx.stack
        # The innermost handle this object opened in this thread (with-blocks nest properly).
        for handle in reversed(stack):
            if handle._owner is self:
                close(handle, exc)
                return
        raise RuntimeError("unit_of_work.__exit__ without a matching __enter__ in this thread")

    @overload
    @deprecated("unit_of_work cannot wrap a coroutine function: use freshconn.aunit_of_work")
    def __call__(self, func: _CoroutineFunction) -> UseAunitOfWorkForCoroutineFunctions: ...  # type: ignore[overload-overlap]

    @overload
    def __call__(self, func: Callable[P, R]) -> Callable[P, R]: ...

    def __call__(self, func: Callable[P, R]) -> Any:
        if inspect.iscoroutinefunction(func) or inspect.isasyncgenfunction(func):
            raise TypeError(
                f"unit_of_work cannot wrap the coroutine function {func.__qualname__}: use "
                "freshconn.aunit_of_work for async code (the async ORM runs in another thread)."
            )
        scope, retries, idempotent = self.scope, self.retries, self.idempotent

        if retries:

            @functools.wraps(func)
            def retrying(*args: P.args, **kwargs: P.kwargs) -> R:
                return _retry.run(func, args, kwargs, scope=scope, retries=retries, idempotent=idempotent)

            return retrying

        @functools.wraps(func)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            if scope is not None and scope not in _aliases.validated:
                _aliases.ensure_known(scope)
            handle = _open(scope)
            try:
                result = func(*args, **kwargs)
            except BaseException as exc:
                close(handle, exc)
                raise
            close(handle, None)
            return result

        return wrapper


@overload
@deprecated("unit_of_work cannot wrap a coroutine function: use freshconn.aunit_of_work")
def unit_of_work(func: _CoroutineFunction, /) -> UseAunitOfWorkForCoroutineFunctions: ...  # type: ignore[overload-overlap]


@overload
def unit_of_work(func: Callable[P, R], /) -> Callable[P, R]: ...


@overload
def unit_of_work(
    func: None = None, /, *, using: Using = None, retries: int = 0, idempotent: bool = False
) -> UnitOfWork: ...


def unit_of_work(
    func: Callable[..., Any] | None = None,
    /,
    *,
    using: Using = None,
    retries: int = 0,
    idempotent: bool = False,
) -> Any:
    """Run a block or a function as a unit of work, the way Django runs a request.

    ``with unit_of_work():``, ``@unit_of_work`` and ``@unit_of_work(using="default")`` all work.
    ``using`` is one alias or a list of aliases; the default is every alias in DATABASES.
    ``retries`` (decorator form only): after a disconnect, run the function again up to this many
    times, but only when that cannot apply a write twice, or when ``idempotent=True`` says it may.
    """
    if func is not None:
        if isinstance(func, str) or not callable(func):
            raise TypeError(
                f"unit_of_work() takes its alias as a keyword: unit_of_work(using={func!r}), got a positional {func!r}"
            )
        return UnitOfWork(using, retries=retries, idempotent=idempotent)(func)
    return UnitOfWork(using, retries=retries, idempotent=idempotent)


def each(iterable: Iterable[T], using: Using = None) -> Generator[T, None, None]:
    """Yield each item of ``iterable`` inside its own unit of work.

    The unit begins after the item is fetched (time blocked fetching counts as idle time) and
    ends before the next one is fetched, or when the loop breaks, returns or raises.
    """
    scope = _aliases.scope_of(using, "each(using=...)")
    if isinstance(iterable, (str, bytes)) or not isinstance(iterable, Iterable):
        raise TypeError(
            f"each() takes an iterable of messages (a consumer, a queue, a list), got {type(iterable).__name__}"
        )
    return run_each(iter(iterable), scope)
