"""freshconn.contrib.taskiq in a real taskiq worker process with a Redis broker (taskiq-redis)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from testbed.redis import Redis
from testbed.servers import DBServer

from tests.queue_tasks.faults import Contrast, run_scenario
from tests.queue_tasks.harness import (
    WorkerProcess,
    one_driver_per_vendor,
    redis_client,
    redis_db,
    redis_db_client,
    redis_server,
    side_by_side,
    worker_env,
)

taskiq_redis = pytest.importorskip("taskiq_redis")

__all__ = ["redis_client", "redis_server"]  # fixtures used by the tests below

pytestmark = [
    pytest.mark.server,
    pytest.mark.broker,
    pytest.mark.slow,
    one_driver_per_vendor(mysql="pymysql", postgresql="psycopg"),
]


def sender(url: str, *task_names: str) -> Any:
    """Enqueue messages with a producer-side broker, taking turns between ``task_names``."""
    from taskiq.kicker import AsyncKicker

    def send(refs: list[str]) -> None:
        async def kick() -> None:
            broker = taskiq_redis.ListQueueBroker(url, queue_name="freshconn-tests-taskiq")
            await broker.startup()
            try:
                kickers: list[AsyncKicker[Any, Any]] = [
                    AsyncKicker(task_name=name, broker=broker, labels={}) for name in task_names
                ]
                for i, ref in enumerate(refs):
                    await kickers[i % len(kickers)].kiq(ref)
            finally:
                await broker.shutdown()

        asyncio.run(kick())

    return send


def worker(env: dict[str, str]) -> WorkerProcess:
    return WorkerProcess(
        [
            "-m",
            "taskiq",
            "worker",
            "tests.queue_tasks.taskiq_app:broker",
            "--workers",
            "1",
            "--max-threadpool-threads",
            "1",
            "--log-level",
            "WARNING",
            "--shutdown-timeout",
            "1",
            "--wait-tasks-timeout",
            "1",
        ],
        env,
        stop_timeout=2,
    )


def test_tasks_ride_idle_kill_and_restart_on_persistent_connections(
    live: None, server: DBServer, redis_server: Redis, redis_client: Any
) -> None:
    """Async and sync tasks ride idle, KILL and a restart with no connect or ping while busy; without it, idle fails."""
    scenario, plain = worker_env(redis_server), worker_env(redis_server, integration=False, db=1)
    with side_by_side(worker(scenario), worker(plain)) as (w, p):
        contrast = Contrast(
            sender(redis_db(redis_server, 1), "record_async"), redis_db_client(redis_server, 1), p, after=2
        )
        send = sender(redis_db(redis_server, 0), "record_async", "record_sync")
        phases = run_scenario(send, redis_client, w, server, contrast=contrast)
    # Two threads served them: the async ORM's thread and the pool's thread for the sync task.
    assert len({r["thread"] for r in phases["busy"]}) == 2
    # Without the middleware the first task after the idle spell fails, and so does the next: nothing
    # ever closes the dead connection.
    assert all(contrast.errors), contrast.errors
