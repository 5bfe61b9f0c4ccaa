"""freshconn.contrib.huey in a real Huey consumer (thread and process workers) with a Redis broker."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
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
    session_exists,
    worker_env,
)
from tests.queue_tasks.huey_tasks import build

__all__ = ["redis_client", "redis_server"]  # fixtures used by the tests below

pytestmark = [pytest.mark.server, pytest.mark.broker, pytest.mark.slow]


@pytest.fixture
def producer(redis_server: Any) -> Iterator[Any]:
    huey, record_task = build(redis_server.url, integration=False)
    try:
        yield record_task
    finally:
        huey.storage.pool.disconnect()


def send(record_task: Any, *refs: str) -> None:
    for ref in refs:
        record_task(ref)


def consumer(env: dict[str, str], workers: int, kind: str = "thread") -> WorkerProcess:
    return WorkerProcess(
        ["-m", "huey.bin.huey_consumer", "tests.queue_tasks.huey_tasks.huey", "-w", str(workers), "-k", kind], env
    )


@pytest.mark.parametrize("kind", ["thread", "process"])
def test_tasks_reuse_connections_and_survive_idle_past_server_timeout(
    live: None, redis_server: Redis, redis_client: Any, producer: Any, kind: str
) -> None:
    """Busy tasks share one connection per worker with no ping; after the server's idle timeout, no error."""
    env = worker_env(redis_server, FRESHCONN_TEST_PARENT_QUERY="1")
    with consumer(env, 2, kind) as w:
        send(producer, *(f"busy-{i}" for i in range(4)))
        busy = collect(redis_client, 4, w)
        # With thread workers, the consumer's own session counts in the same process's stats.
        assert_busy_reuse(busy, other_connects=1 if kind == "thread" else 0)
        time.sleep(IDLE_PAST_TIMEOUT)
        # As many as the busy phase: enough that threads which connected then get some of them.
        send(producer, *(f"idle-{i}" for i in range(4)))
        after = collect(redis_client, 4, w)
        assert_recovered_after_idle(busy, after)
        # The consumer held a session when it started its workers: none used it, none ended it.
        (parent,) = collect(redis_client, 1, w, key=PARENT_KEY)
        assert "error" not in parent, parent
        assert parent["backend"] not in {r["backend"] for r in busy + after}
        assert session_exists(parent["backend"])
    assert row_count() == 8


def test_without_freshconn_a_task_fails_after_idle_past_server_timeout(
    live: None, redis_server: Redis, redis_client: Any, producer: Any
) -> None:
    """Contrast: a plain @huey.task after the server's idle timeout gets a dead connection."""
    with consumer(worker_env(redis_server, integration=False), 1) as w:
        send(producer, "busy-0")
        assert errors(collect(redis_client, 1, w)) == []
        time.sleep(IDLE_PAST_TIMEOUT)
        send(producer, "idle-0")
        after = collect(redis_client, 1, w)
    assert len(errors(after)) == 1
