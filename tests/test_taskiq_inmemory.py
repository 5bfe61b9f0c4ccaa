"""freshconn.contrib.taskiq in-process, on taskiq's InMemoryBroker (the broker projects test their tasks with)."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from django.db import connections
from testbed.servers import DBServer

import freshconn
from freshconn._units import in_unit
from tests.app.models import Order
from tests.conftest import backend_id, run_async
from tests.queue_tasks.faults import kill_sessions

pytest.importorskip("taskiq")

from taskiq import InMemoryBroker

from freshconn.contrib.taskiq import FreshconnMiddleware

pytestmark = pytest.mark.server


def _record(ref: str) -> dict[str, Any]:
    Order.objects.create(ref=ref)
    return {"thread": threading.get_ident(), "backend": backend_id(), "in_unit": in_unit()}


def make_broker() -> Any:
    """A broker with the middleware and one sync and one async task that write a row and report their session."""
    broker = InMemoryBroker(sync_tasks_pool_size=1).with_middlewares(FreshconnMiddleware())

    @broker.task(task_name="record_sync")
    def record_sync(ref: str) -> Any:  # Any: taskiq parses a return annotation it can resolve
        return _record(ref)

    @broker.task(task_name="record_async")
    async def record_async(ref: str) -> Any:
        report: dict[str, Any] = await sync_to_async(_record, thread_sensitive=True)(ref)
        return report

    return broker, record_sync, record_async


async def run(task: Any, ref: str) -> dict[str, Any]:
    result = await (await task.kiq(ref)).wait_result(timeout=30)
    assert not result.is_err, result.error
    report: dict[str, Any] = result.return_value
    return report


def test_sync_and_async_tasks_are_units_that_survive_a_killed_session(live: None, server: DBServer) -> None:
    """Both kinds of task run inside a unit on a persistent connection; after a KILL the next task reconnects."""
    broker, record_sync, record_async = make_broker()

    async def main() -> dict[str, list[dict[str, Any]]]:
        await broker.startup()
        try:
            seen: dict[str, list[dict[str, Any]]] = {"sync": [], "async": []}
            for kind, task in (("sync", record_sync), ("async", record_async)):
                seen[kind] += [await run(task, f"{kind}-{i}") for i in range(3)]
                kill_sessions(server, {seen[kind][-1]["backend"]})
                seen[kind].append(await run(task, f"{kind}-after-kill"))
            # The sync tasks' pool thread keeps its connection between tasks: close it there.
            broker.executor.submit(freshconn.close_thread_connections).result()
            assert await sync_to_async(lambda: connections["default"].connection is not None, thread_sensitive=True)()
            return seen
        finally:
            broker.is_worker_process = True  # as `taskiq worker` sets it: its shutdown closes the ORM thread's
            await broker.shutdown()
            left = await sync_to_async(lambda: connections["default"].connection, thread_sensitive=True)()
            assert left is None, "the worker's shutdown left the async ORM thread's connection open"

    seen = run_async(main())
    for kind, reports in seen.items():
        assert all(r["in_unit"] for r in reports), kind
        busy = {r["backend"] for r in reports[:3]}
        assert len(busy) == 1, f"{kind}: busy tasks reconnected: {busy}"
        assert reports[3]["backend"] not in busy, f"{kind}: the task after the KILL reused the dead session"
    assert Order.objects.filter(ref__endswith="-after-kill").count() == 2


def test_the_middleware_wraps_each_task_once_and_rejects_an_unknown_alias(live: None) -> None:
    """A task's function is wrapped on its first message only, and a typo'd alias fails where the broker is built."""
    broker, record_sync, _ = make_broker()

    async def main() -> tuple[Any, Any]:
        await broker.startup()
        try:
            await run(record_sync, "first")
            first = broker.find_task("record_sync").original_func
            await run(record_sync, "second")
            broker.executor.submit(freshconn.close_thread_connections).result()
            return first, broker.find_task("record_sync").original_func
        finally:
            await broker.shutdown()

    first, second = run_async(main())
    assert first is second
    with pytest.raises(Exception, match="nope"):
        FreshconnMiddleware(using="nope")
