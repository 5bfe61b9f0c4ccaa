"""freshconn.contrib.arq in a real arq worker process with a Redis broker."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tests.queue_tasks.faults import expect_failure_after_idle, run_scenario
from tests.queue_tasks.harness import WorkerProcess, redis_client, redis_server, worker_env

arq = pytest.importorskip("arq")

__all__ = ["redis_client", "redis_server"]  # fixtures used by the tests below

pytestmark = [pytest.mark.server, pytest.mark.broker, pytest.mark.slow]


def sender(redis_server: Any) -> Any:
    from arq.connections import RedisSettings, create_pool

    from tests.queue_tasks.arq_app import QUEUE

    def send(refs: list[str]) -> None:
        async def enqueue() -> None:
            pool = await create_pool(RedisSettings.from_dsn(redis_server.url), default_queue_name=QUEUE)
            try:
                for ref in refs:
                    await pool.enqueue_job("record_job", ref)
            finally:
                await pool.aclose()

        asyncio.run(enqueue())

    return send


def worker(env: dict[str, str]) -> WorkerProcess:
    return WorkerProcess(["-m", "arq", "tests.queue_tasks.arq_app.WorkerSettings"], env, stop_timeout=5)


def test_jobs_ride_idle_kill_and_restart_on_a_persistent_connection(live, server, redis_server, redis_client):
    """No connect or ping while busy; idle, KILL and a restart cost no job; each job applied once."""
    with worker(worker_env(redis_server)) as w:
        phases = run_scenario(sender(redis_server), redis_client, w, server)
    assert len({r["thread"] for r in phases["busy"]}) == 1  # the async ORM's one thread


def test_without_freshconn_a_job_fails_after_idle_past_server_timeout(live, redis_server, redis_client):
    """Contrast: the same worker without install() fails its first job after the server's idle timeout."""
    with worker(worker_env(redis_server, integration=False)) as w:
        assert len(expect_failure_after_idle(sender(redis_server), redis_client, w)) == 1
