"""The public entry points: ``unit_of_work`` (context manager and decorator) and ``each``."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterable, Iterator, Sequence
from types import TracebackType
from typing import Any, TypeVar, overload

from . import _lifecycle, _retry
from ._errors import AmbiguousCommitError, commit_in_flight, is_disconnect

__all__ = ["UnitOfWork", "each", "unit_of_work"]

F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")

Using = str | Sequence[str] | None


def _scope(using: Using) -> frozenset[str] | None:
    if using is None:
        return None
    if isinstance(using, str):
        return frozenset((using,))
    if not all(isinstance(a, str) for a in using):
        raise TypeError(f"using must be an alias or a list of aliases, got {using!r}")
    return frozenset(using)


def raise_if_commit_was_lost(exc: BaseException | None) -> None:
    """At a unit's end: turn a disconnect that struck during COMMIT into AmbiguousCommitError."""
    if exc is not None and not isinstance(exc, AmbiguousCommitError) and is_disconnect(exc):
        alias = commit_in_flight(exc)
        if alias is not None:
            raise AmbiguousCommitError(
                f"The connection to database {alias!r} was lost while COMMIT was in flight: the "
                "transaction may or may not have been applied. Verify the outcome before doing "
                "the work again."
            ) from exc


class UnitOfWork:
    """One unit of work: a context manager and a decorator.

    The object holds only its configuration, so one instance may be entered by many threads at
    once and re-entered; the nesting depth is per thread, and only the outermost unit acts.
    """

    __slots__ = ("idempotent", "retries", "scope", "using")

    def __init__(self, using: Using = None, *, retries: int = 0, idempotent: bool = False) -> None:
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise ValueError(f"retries must be an int >= 0, got {retries!r}")
        self.using = using
        self.scope = _scope(using)
        self.retries = retries
        self.idempotent = bool(idempotent)

    def __repr__(self) -> str:
        return f"unit_of_work(using={self.using!r}, retries={self.retries}, idempotent={self.idempotent})"

    def __enter__(self) -> UnitOfWork:
        if self.retries:
            raise TypeError(
                "unit_of_work(retries=...) needs the decorator form: a with block cannot be run again. "
                "Move the block into a function decorated with @unit_of_work(retries=N)."
            )
        _lifecycle.enter(self.scope)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        _lifecycle.leave(self.scope, exc)
        raise_if_commit_was_lost(exc)

    def _single_run(self) -> UnitOfWork:
        """The same unit without retries: what each attempt of a retrying function enters."""
        return UnitOfWork(self.using)

    def __call__(self, func: F) -> F:
        if inspect.iscoroutinefunction(func) or inspect.isasyncgenfunction(func):
            raise TypeError(
                f"unit_of_work cannot wrap the coroutine function {func.__qualname__}: the ORM runs "
                "in another thread there. Run the database work in a sync function wrapped with "
                "unit_of_work and call it through asgiref.sync.sync_to_async."
            )

        if self.retries:

            @functools.wraps(func)
            def retrying(*args: Any, **kwargs: Any) -> Any:
                return _retry.run(
                    func, args, kwargs, unit=self._single_run(), retries=self.retries, idempotent=self.idempotent
                )

            return retrying  # type: ignore[return-value]

        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with self:
                return func(*args, **kwargs)

        return wrapper  # type: ignore[return-value]


@overload
def unit_of_work(func: F, /) -> F: ...


@overload
def unit_of_work(
    func: None = None, /, using: Using = None, *, retries: int = 0, idempotent: bool = False
) -> UnitOfWork: ...


def unit_of_work(
    func: Callable[..., Any] | None = None, /, using: Using = None, *, retries: int = 0, idempotent: bool = False
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


def each(iterable: Iterable[T], using: Using = None) -> Iterator[T]:
    """Yield each item of ``iterable`` inside its own unit of work.

    The unit begins after the item is fetched (time blocked fetching counts as idle time) and
    ends before the next one is fetched, or when the loop breaks, returns or raises.
    """
    # enter/leave directly rather than through a UnitOfWork: this is the per-message hot path.
    scope = _scope(using)
    for item in iterable:
        _lifecycle.enter(scope)
        try:
            yield item
        except BaseException as exc:
            _lifecycle.leave(scope, exc)
            raise
        _lifecycle.leave(scope, None)
