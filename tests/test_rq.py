"""freshconn.contrib.rq in real RQ workers (forking Worker and SimpleWorker) with a real Redis."""

from __future__ import annotations

import time
from typing import Any

import pytest
from rq import Queue
from testbed.redis import Redis

from tests.conftest import IDLE_PAST_TIMEOUT
from tests.queue_tasks import PARENT_KEY
from tests.queue_tasks.harness import (
    WorkerProcess,
    assert_busy_reuse,
    assert_recovered_after_idle,
    collect,
    errors,
    redis_client,
    redis_server,
    row_count,
    worker_env,
)

__all__ = ["redis_client", "redis_server"]  # fixtures used by the tests below

pytestmark = [pytest.mark.server, pytest.mark.broker, pytest.mark.slow]

JOB = "tests.queue_tasks.record"


def send(client: Any, *refs: str) -> None:
    queue = Queue("default", connection=client)
    for ref in refs:
        queue.enqueue(JOB, ref)


def worker(kind: str, env: dict[str, str]) -> WorkerProcess:
    return WorkerProcess(["-m", "tests.queue_tasks.rq_jobs", kind], env)


def test_simple_worker_reuses_its_connection_and_survives_idle_past_server_timeout(
    live: None, redis_server: Redis, redis_client: Any
) -> None:
    """SimpleWorker: busy jobs share one connection with no ping; after the server's idle timeout, no error."""
    with worker("simple", worker_env(redis_server)) as w:
        send(redis_client, *(f"busy-{i}" for i in range(3)))
        busy = collect(redis_client, 3, w)
        assert_busy_reuse(busy)
        time.sleep(IDLE_PAST_TIMEOUT)
        send(redis_client, "idle-0", "idle-1")
        after = collect(redis_client, 2, w)
        assert_recovered_after_idle(busy, after)
    assert row_count() == 5


def test_without_freshconn_simple_worker_fails_after_idle_past_server_timeout(
    live: None, redis_server: Redis, redis_client: Any
) -> None:
    """Contrast: a plain SimpleWorker hands the next job the connection the server already dropped."""
    with worker("simple", worker_env(redis_server, integration=False)) as w:
        send(redis_client, "busy-0")
        assert errors(collect(redis_client, 1, w)) == []
        time.sleep(IDLE_PAST_TIMEOUT)
        send(redis_client, "idle-0")
        after = collect(redis_client, 1, w)
    assert len(errors(after)) == 1


def test_forking_worker_horses_never_use_the_workers_session(
    live: None, redis_server: Redis, redis_client: Any
) -> None:
    """Forking Worker: each horse drops its inherited session and opens its own, no ping; the worker's stays usable."""
    env = worker_env(redis_server, FRESHCONN_TEST_PARENT_QUERY="1")
    with worker("fork", env) as w:
        send(redis_client, "busy-0", "busy-1")
        busy = collect(redis_client, 2, w)
        time.sleep(IDLE_PAST_TIMEOUT)
        send(redis_client, "idle-0")
        after = collect(redis_client, 1, w)
    init, shutdown = collect(redis_client, 2, w, key=PARENT_KEY)
    reports = busy + after
    assert errors(reports) == []
    assert len({r["pid"] for r in reports}) == 3  # one horse per job
    assert all(r["stats"]["connects"] == 1 and r["stats"]["pings"] == 0 for r in reports), reports
    assert init["pid"] not in {r["pid"] for r in reports}
    assert init["backend"] not in {r["backend"] for r in reports}
    assert "error" not in shutdown, shutdown
    assert shutdown["backend"] == init["backend"]
    assert row_count() == 3


def test_without_freshconn_forking_worker_horses_talk_on_the_workers_session(
    live: None, redis_server: Redis, redis_client: Any
) -> None:
    """Contrast: a plain forking Worker's horse runs its job on the session the worker process holds."""
    env = worker_env(redis_server, integration=False, FRESHCONN_TEST_PARENT_QUERY="1")
    with worker("fork", env) as w:
        send(redis_client, "plain-0")
        (report,) = collect(redis_client, 1, w)
    init, _ = collect(redis_client, 2, w, key=PARENT_KEY)
    assert report["pid"] != init["pid"]
    assert report["backend"] == init["backend"]
