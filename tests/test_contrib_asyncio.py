"""freshconn.contrib.asyncio: the loop's default executor and the async ORM thread, counted in server sessions."""

from __future__ import annotations

import asyncio
import gc
import threading
import time
import warnings
from collections.abc import Iterator
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from django.db import connection
from testbed.servers import DBServer

from freshconn.contrib import asyncio as fc_asyncio
from tests.conftest import IDLE_PAST_TIMEOUT, counters
from tests.test_threads import app_connections, baseline, settle

pytestmark = pytest.mark.server

CALLS = 1000


def query(i: int = 0) -> int:
    with connection.cursor() as cursor:
        cursor.execute("SELECT %s", [i])
        cursor.fetchone()
    return threading.get_ident()


def slow_query(started: threading.Event) -> int:
    """A query, then more work on the same connection after the awaiting task has been cancelled."""
    query()
    started.set()
    time.sleep(0.3)
    return query(1)


async def in_default_executor(n: int) -> list[Any]:
    loop = asyncio.get_running_loop()
    return await asyncio.gather(*(loop.run_in_executor(None, query, i) for i in range(n)), return_exceptions=True)


async def cancel_mid_call(thread_sensitive: bool) -> None:
    """Start a sync_to_async call, cancel its awaiting task while the call runs, and let the call finish."""
    started = threading.Event()
    task = asyncio.ensure_future(sync_to_async(slow_query, thread_sensitive=thread_sensitive)(started))
    while not started.is_set():
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


def collect_leaked() -> None:
    """A garbage collection that frees what a contrast leaked (drivers warn about a connection freed open)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()


@pytest.fixture
def orm_thread_closed() -> Iterator[None]:
    """Whatever a test leaves in the async ORM's (process-wide) thread is closed after it."""
    yield
    asyncio.run(fc_asyncio.close_orm_connections())


@pytest.mark.slow
def test_default_executor_calls_are_units_reused_busy_checked_after_idle_and_closed_at_the_end(
    short_timeout: int, server: DBServer
) -> None:
    """run_in_executor(None, ...): busy calls reuse one connection per thread; after idle none fails; none left."""
    before = baseline(server)
    seen: dict[str, Any] = {}

    async def main() -> None:
        busy = await in_default_executor(CALLS)
        seen["threads"] = len(set(busy))
        seen["busy"] = counters()
        seen["open"] = app_connections(server) - before
        await asyncio.sleep(IDLE_PAST_TIMEOUT)
        seen["after_idle"] = await in_default_executor(40)

    fc_asyncio.run(main())
    after = settle(server, before)
    assert not [r for r in seen["after_idle"] if isinstance(r, BaseException)]
    assert seen["open"] == seen["threads"]
    assert seen["busy"]["connects"] == seen["threads"]
    assert seen["busy"]["pings"] == 0
    c = counters()
    assert c["units"] == CALLS + 40
    assert c["discarded_server_idle"] >= 1
    assert c["pings"] == 0
    assert after == before  # closed by the threads at the loop's end, no garbage collection needed


@pytest.mark.slow
def test_without_it_every_default_executor_thread_fails_after_idle_and_keeps_its_session(
    short_timeout: int, server: DBServer
) -> None:
    """Contrast: asyncio's own default executor fails every call after the idle limit; its sessions outlive the loop."""
    before = baseline(server)
    seen: dict[str, Any] = {}

    async def main() -> None:
        seen["first"] = await in_default_executor(40)
        await asyncio.sleep(IDLE_PAST_TIMEOUT)
        seen["after_idle"] = await in_default_executor(40)

    asyncio.run(main())
    # The executor starts its threads lazily: on a loaded machine the second batch may start one
    # that the first did not, with a new connection. Every thread that kept one across the idle spell fails.
    idle = set(seen["first"])
    assert not any(isinstance(r, BaseException) for r in seen["first"])
    assert all(isinstance(r, BaseException) or r not in idle for r in seen["after_idle"])
    assert any(isinstance(r, BaseException) for r in seen["after_idle"])
    gc.disable()  # as between two collections of a busy program
    try:
        asyncio.run(in_default_executor(40))  # a new loop, new threads, new connections
        left = app_connections(server) - before
    finally:
        gc.enable()
        collect_leaked()
    assert left >= 1  # the loop and its threads are gone; their connections are not
    assert settle(server, before) == before


@pytest.mark.parametrize("thread_sensitive", [False, True])
def test_a_cancelled_sync_to_async_call_leaves_no_session(
    live: None, server: DBServer, orm_thread_closed: None, thread_sensitive: bool
) -> None:
    """A sync_to_async call whose awaiting task was cancelled runs to its end; its connection is closed at the end."""
    before = baseline(server)
    fc_asyncio.run(cancel_mid_call(thread_sensitive))
    assert settle(server, before) == before
    if not thread_sensitive:
        assert counters()["units"] == 1  # in the default executor: a unit of its own


def test_without_it_a_cancelled_thread_sensitive_call_keeps_its_session_after_the_loop(
    live: None, server: DBServer, orm_thread_closed: None
) -> None:
    """Contrast: with plain asyncio.run, the cancelled call's connection stays open in asgiref's thread after GC."""
    before = baseline(server)
    asyncio.run(cancel_mid_call(True))
    collect_leaked()
    time.sleep(0.3)
    assert app_connections(server) == before + 1


def test_install_sets_the_running_loops_default_executor_and_checks_the_alias() -> None:
    """install() puts a freshconn pool in the running loop (asyncio.to_thread uses it); a typo'd alias fails."""

    async def main() -> tuple[Any, Any]:
        pool = fc_asyncio.install(max_workers=2)
        return pool, await asyncio.to_thread(lambda: threading.current_thread().name)

    pool, name = asyncio.run(main())
    assert pool._max_workers == 2
    assert name.startswith("asyncio-freshconn")
    loop = asyncio.new_event_loop()
    try:
        with pytest.raises(Exception, match="nope"):
            fc_asyncio.install(loop, using="nope")
    finally:
        loop.close()
