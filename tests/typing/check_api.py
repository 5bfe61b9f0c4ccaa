"""What a type checker sees of freshconn's public API. Checked by ``mypy`` (``files`` in pyproject.toml), never run.

Each ``# type: ignore[code]`` below is a misuse that must stay a type error: mypy's ``warn_unused_ignores``
(part of ``strict``) fails the check if one of them stops being an error.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Callable, Coroutine, Generator
from typing import Any

from typing_extensions import assert_type

import freshconn
from freshconn import AsyncUnitOfWork, UnitOfWork
from freshconn._unit import UseAunitOfWorkForCoroutineFunctions

# --- unit_of_work: bare decorator, called decorator, context manager -----------------------------------


@freshconn.unit_of_work
def bare(message: str, *, retry: bool = False) -> int:
    return len(message)


@freshconn.unit_of_work(using="default", retries=3, idempotent=True)
def called(message: str, count: int = 1) -> list[str]:
    return [message] * count


@freshconn.unit_of_work()
def empty_call() -> None:
    pass


# The decorated functions keep their signatures: parameters, keywords and return types.
assert_type(bare("x"), int)
assert_type(bare("x", retry=True), int)
assert_type(called("x"), list[str])
assert_type(called("x", 2), list[str])
assert_type(empty_call(), None)
bare(1)  # type: ignore[arg-type]
bare("x", True)  # type: ignore[call-arg]
called("x", count="2")  # type: ignore[arg-type]
bare_result: str = bare("x")  # type: ignore[assignment]

assert_type(freshconn.unit_of_work(), UnitOfWork)
assert_type(freshconn.unit_of_work(using=["default", "replica"], retries=1), UnitOfWork)
with freshconn.unit_of_work() as unit:
    assert_type(unit, UnitOfWork)
with freshconn.unit_of_work(using="default"):
    pass

# The alias is a keyword: a positional alias is a type error (and a TypeError at run time).
freshconn.unit_of_work("default")  # type: ignore[call-overload]
freshconn.unit_of_work(using="default", retries="3")  # type: ignore[call-overload]
freshconn.unit_of_work(retries=1, idempotent=None)  # type: ignore[call-overload]


def plain(message: str) -> int:
    return len(message)


# Wrapping keeps the exact callable type (parameter names included): it still fits where plain fits.
wrapped: Callable[[str], int] = freshconn.unit_of_work(plain)
wrapped_retrying: Callable[[str], int] = UnitOfWork(retries=2)(plain)
wrong_wrapped: Callable[[bytes], int] = wrapped  # type: ignore[assignment]


# --- unit_of_work on a coroutine function: a type error (and a TypeError at run time) ------------------


async def coroutine_function(message: str) -> int:
    return len(message)


not_callable = freshconn.unit_of_work(coroutine_function)  # type: ignore[deprecated]
assert_type(not_callable, UseAunitOfWorkForCoroutineFunctions)
not_callable("x")  # type: ignore[operator]
assert_type(freshconn.unit_of_work(retries=2)(coroutine_function), UseAunitOfWorkForCoroutineFunctions)  # type: ignore[deprecated]


@freshconn.unit_of_work  # type: ignore[deprecated]
async def decorated_coroutine_function() -> None:
    pass


@freshconn.unit_of_work(using="default")  # type: ignore[deprecated]
async def decorated_async_generator() -> AsyncIterator[int]:
    yield 1


decorated_coroutine_function()  # type: ignore[operator]
decorated_async_generator()  # type: ignore[operator]

# --- aunit_of_work -------------------------------------------------------------------------------------


@freshconn.aunit_of_work
async def abare(message: str, *, retry: bool = False) -> int:
    return len(message)


@freshconn.aunit_of_work(using="default")
async def acalled(message: str) -> list[str]:
    return [message]


async def use_async() -> None:
    assert_type(await abare("x"), int)
    assert_type(await abare("x", retry=True), int)
    assert_type(await acalled("x"), list[str])
    await assert_type(abare("x"), Coroutine[Any, Any, int])
    await abare(1)  # type: ignore[arg-type]
    async with freshconn.aunit_of_work() as unit:
        assert_type(unit, AsyncUnitOfWork)
    async with freshconn.aunit_of_work(using=["default"]):
        pass
    async for item in freshconn.aeach(aitems()):
        assert_type(item, bytes)
    async for number in freshconn.aeach([1, 2], using="default"):
        assert_type(number, int)
    assert_type(freshconn.aeach(aitems()), AsyncGenerator[bytes, None])


assert_type(freshconn.aunit_of_work(), AsyncUnitOfWork)
freshconn.aunit_of_work("default")  # type: ignore[call-overload]
freshconn.aunit_of_work(plain)  # type: ignore[type-var]
freshconn.aunit_of_work(retries=2)  # type: ignore[call-overload]


async def aitems() -> AsyncIterator[bytes]:
    yield b"message"


# --- each ----------------------------------------------------------------------------------------------

for message in freshconn.each(["a", "b"]):
    assert_type(message, str)
for key in freshconn.each({b"k": 1}, using="default"):
    assert_type(key, bytes)
assert_type(freshconn.each(iter([1.0])), Generator[float, None, None])
freshconn.each(3)  # type: ignore[arg-type]
freshconn.each(aitems())  # type: ignore[arg-type]
