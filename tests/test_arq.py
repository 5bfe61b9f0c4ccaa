"""freshconn.contrib.arq in a real arq worker process with a Redis broker."""

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

arq = pytest.importorskip("arq")

__all__ = ["redis_client", "redis_server"]  # fixtures used by the tests below

pytestmark = [
    pytest.mark.server,
    pytest.mark.broker,
    pytest.mark.slow,
    one_driver_per_vendor(mysql="mysqlconnector", postgresql="psycopg2"),
]


def sender(url: str) -> Any:
    from arq.connections import RedisSettings, create_pool

    from tests.queue_tasks.arq_app import QUEUE

    def send(refs: list[str]) -> None:
        async def enqueue() -> None:
            pool = await create_pool(RedisSettings.from_dsn(url), default_queue_name=QUEUE)
            try:
                for ref in refs:
                    await pool.enqueue_job("record_job", ref)
            finally:
                await pool.aclose()

        asyncio.run(enqueue())

    return send


def worker(env: dict[str, str]) -> WorkerProcess:
    return WorkerProcess(["-m", "arq", "tests.queue_tasks.arq_app.WorkerSettings"], env, stop_timeout=5)


def test_jobs_ride_idle_kill_and_restart_on_a_persistent_connection(
    live: None, server: DBServer, redis_server: Redis, redis_client: Any
) -> None:
    """No connect or ping while busy; idle, KILL and a restart cost no job, each once; without it, idle fails."""
    scenario, plain = worker_env(redis_server), worker_env(redis_server, integration=False, db=1)
    with side_by_side(worker(scenario), worker(plain)) as (w, p):
        contrast = Contrast(sender(redis_db(redis_server, 1)), redis_db_client(redis_server, 1), p, after=2)
        phases = run_scenario(sender(redis_db(redis_server, 0)), redis_client, w, server, contrast=contrast)
    assert len({r["thread"] for r in phases["busy"]}) == 1  # the async ORM's one thread
    # Without install() the first job after the idle spell fails, and so does the next one.
    assert all(contrast.errors), contrast.errors
