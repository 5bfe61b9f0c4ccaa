"""freshconn.contrib.taskiq in a real taskiq worker process with a Redis broker (taskiq-redis)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tests.queue_tasks.faults import expect_failure_after_idle, run_scenario
from tests.queue_tasks.harness import WorkerProcess, redis_client, redis_server, worker_env

taskiq_redis = pytest.importorskip("taskiq_redis")

__all__ = ["redis_client", "redis_server"]  # fixtures used by the tests below

pytestmark = [pytest.mark.server, pytest.mark.broker, pytest.mark.slow]


def sender(redis_server: Any, *task_names: str) -> Any:
    """Enqueue messages with a producer-side broker, taking turns between ``task_names``."""
    from taskiq.kicker import AsyncKicker

    def send(refs: list[str]) -> None:
        async def kick() -> None:
            broker = taskiq_redis.ListQueueBroker(redis_server.url, queue_name="freshconn-tests-taskiq")
            await broker.startup()
            try:
                kickers = [AsyncKicker(task_name=name, broker=broker, labels={}) for name in task_names]
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


def test_tasks_ride_idle_kill_and_restart_on_persistent_connections(live, server, redis_server, redis_client):
    """Async and sync tasks: no connect or ping while busy; idle, KILL and a restart cost no task; each applied once."""
    with worker(worker_env(redis_server)) as w:
        phases = run_scenario(sender(redis_server, "record_async", "record_sync"), redis_client, w, server)
    # Two threads served them: the async ORM's thread and the pool's thread for the sync task.
    assert len({r["thread"] for r in phases["busy"]}) == 2


def test_without_freshconn_a_task_fails_after_idle_past_server_timeout(live, redis_server, redis_client):
    """Contrast: the same worker without the middleware fails its first task after the server's idle timeout."""
    with worker(worker_env(redis_server, integration=False)) as w:
        assert len(expect_failure_after_idle(sender(redis_server, "record_async"), redis_client, w)) == 1
