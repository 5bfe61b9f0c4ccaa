"""aunit_of_work / aeach with Django's async ORM against a real server."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Coroutine
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from django.db import Error, connections

import freshconn
from freshconn.testing import kill_connection
from tests.app.models import Order
from tests.conftest import DJANGO_TEMP_CONNECTS_PER_NEW_THREAD, IDLE_PAST_TIMEOUT, counters

pytestmark = pytest.mark.server


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    """asyncio.run(coro), then close the connections the async ORM opened in its own thread."""

    async def main() -> Any:
        try:
            return await coro
        finally:
            await sync_to_async(connections.close_all, thread_sensitive=True)()

    return asyncio.run(main())


async def slow_source(n: int, idle_before: int) -> AsyncIterator[int]:
    for i in range(n):
        if i == idle_before:
            await asyncio.sleep(IDLE_PAST_TIMEOUT)
        yield i


@pytest.mark.slow
def test_async_consumer_idles_past_server_timeout_and_carries_on(short_timeout: int) -> None:
    """An aeach consumer on the async ORM idles past the server's timeout and handles the next message."""

    async def consumer() -> list[int]:
        seen = []
        async for i in freshconn.aeach(slow_source(3, idle_before=2)):
            await Order.objects.acreate(ref=f"a{i}", qty=i)
            seen.append((await Order.objects.aget(ref=f"a{i}")).qty)
        return seen

    assert run(consumer()) == [0, 1, 2]
    c = counters()
    assert Order.objects.count() == 3
    assert c["units"] == 3
    assert c["discarded"] >= 1
    assert c["discarded_server_idle"] + c["discarded_dead"] >= 1
    assert c["connects"] == 2 + DJANGO_TEMP_CONNECTS_PER_NEW_THREAD


@pytest.mark.slow
def test_without_a_unit_the_async_orm_fails_after_the_server_timeout(short_timeout: int) -> None:
    """For contrast, the same async ORM loop without aeach fails once the server dropped the idle session."""

    async def consumer() -> None:
        async for i in slow_source(3, idle_before=2):
            await Order.objects.acreate(ref=f"b{i}")

    with pytest.raises(Error) as err:
        run(consumer())
    assert freshconn.is_disconnect(err.value)


def test_decorated_coroutine_recovers_from_a_kill_between_units(live: None) -> None:
    """@aunit_of_work: a connection killed between two calls is replaced; no SynchronousOnlyOperation."""

    @freshconn.aunit_of_work
    async def handle(ref: str) -> int:
        order = await Order.objects.acreate(ref=ref)
        pk: int = order.pk
        return pk

    @freshconn.aunit_of_work(using="default")
    async def kill() -> None:
        await sync_to_async(kill_connection, thread_sensitive=True)()

    async def main() -> None:
        await handle("k1")
        await kill()
        await handle("k2")

    run(main())
    c = counters()
    assert sorted(Order.objects.values_list("ref", flat=True)) == ["k1", "k2"]
    assert c["discarded_dead"] == 1
    assert c["connects"] == 2


def test_disconnect_inside_a_unit_reaches_the_caller_then_the_next_unit_works(live: None) -> None:
    """A kill mid-unit raises to the caller, the dead connection is discarded at once, the next unit succeeds."""

    async def main() -> str:
        with pytest.raises(Error) as err:
            async with freshconn.aunit_of_work():
                await Order.objects.acreate(ref="m1")
                await sync_to_async(kill_connection, thread_sensitive=True)()
                await Order.objects.acreate(ref="m2")
        assert freshconn.is_disconnect(err.value)
        async with freshconn.aunit_of_work():
            ref: str = (await Order.objects.acreate(ref="m3")).ref
            return ref

    assert run(main()) == "m3"
    assert sorted(Order.objects.values_list("ref", flat=True)) == ["m1", "m3"]
    assert counters()["discarded_error"] == 1


def test_aeach_closed_early_ends_the_current_unit(live: None) -> None:
    """Breaking out of aeach inside contextlib.aclosing ends the unit in progress (units are not left open)."""
    from freshconn import _state

    async def main() -> int:
        # aeach() is declared to return an AsyncIterator, which has no aclose(); it returns an async generator.
        async with contextlib.aclosing(freshconn.aeach([1, 2, 3])) as items:
            async for item in items:
                await Order.objects.acreate(ref=f"e{item}")
                break
        return await sync_to_async(
            lambda: _state.local().async_open + len(_state.local().stack), thread_sensitive=True
        )()

    assert run(main()) == 0
    assert counters()["units"] == 1


def test_aunit_of_work_rejects_sync_functions_and_positional_aliases() -> None:
    """aunit_of_work wraps only coroutine functions, and takes the alias as a keyword."""
    with pytest.raises(TypeError, match="coroutine"):
        freshconn.aunit_of_work(lambda: None)  # type: ignore[type-var]  # the misuse under test
    with pytest.raises(TypeError, match="keyword"):
        freshconn.aunit_of_work("default")  # type: ignore[call-overload]


def test_overlapping_async_units_each_act_and_a_kill_fails_only_the_tasks_in_flight(live: None) -> None:
    """60 overlapping aunit_of_work tasks: each is its own unit; after a KILL mid-stream only tasks in flight fail."""
    kill_at = 30
    outcomes: dict[int, object] = {}
    started: dict[int, float] = {}
    killed_at: list[float] = []

    async def task(i: int) -> None:
        started[i] = asyncio.get_running_loop().time()
        try:
            async with freshconn.aunit_of_work():
                await Order.objects.filter(ref=f"t{i}").aexists()
                await asyncio.sleep(0.02)
                await Order.objects.acreate(ref=f"t{i}")
            outcomes[i] = "ok"
        except Error as exc:
            outcomes[i] = exc

    async def main() -> None:
        tasks = []
        for i in range(60):
            tasks.append(asyncio.ensure_future(task(i)))
            if i == kill_at:
                await sync_to_async(kill_connection, thread_sensitive=True)()
                killed_at.append(asyncio.get_running_loop().time())
            await asyncio.sleep(0.01)
        await asyncio.gather(*tasks)

    run(main())
    failed = sorted(i for i, o in outcomes.items() if o != "ok")
    assert all(freshconn.is_disconnect(outcomes[i]) for i in failed)
    assert len(failed) <= 6, failed  # only the tasks whose queries were queued around the kill
    late = [i for i in outcomes if started[i] > killed_at[0] + 0.2]
    assert late
    assert all(outcomes[i] == "ok" for i in late)
    assert Order.objects.count() == 60 - len(failed)
    c = counters()
    assert c["units"] == 60
    assert c["discarded"] >= 1  # found dead at a unit's start, or dropped at the end of a failed one
