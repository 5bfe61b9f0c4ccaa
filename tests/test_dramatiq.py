"""freshconn.contrib.dramatiq in a real Dramatiq worker process (worker threads) with a Redis broker."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import dramatiq
import pytest
from dramatiq.brokers.redis import RedisBroker
from testbed.redis import Redis

from tests.conftest import IDLE_PAST_TIMEOUT
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


@pytest.fixture
def producer(redis_server: Any) -> Iterator[RedisBroker]:
    broker = RedisBroker(url=redis_server.url)  # type: ignore[no-untyped-call]  # dramatiq leaves its __init__ unannotated
    broker.declare_queue("default")
    try:
        yield broker
    finally:
        broker.client.connection_pool.disconnect()  # RedisBroker.close() leaves its client's socket open


def send(producer: RedisBroker, *refs: str) -> None:
    for ref in refs:
        producer.enqueue(
            dramatiq.Message(queue_name="default", actor_name="record", args=(ref,), kwargs={}, options={})
        )


def worker(env: dict[str, str], threads: int = 2) -> WorkerProcess:
    return WorkerProcess(
        ["-m", "dramatiq", "tests.queue_tasks.dramatiq_actors", "--processes", "1", "--threads", str(threads)], env
    )


def test_messages_reuse_connections_and_survive_idle_past_server_timeout(
    live: None, redis_server: Redis, redis_client: Any, producer: RedisBroker
) -> None:
    """Busy messages share one connection per worker thread with no ping; after the server's idle timeout, no error."""
    with worker(worker_env(redis_server)) as w:
        send(producer, *(f"busy-{i}" for i in range(4)))
        busy = collect(redis_client, 4, w)
        assert_busy_reuse(busy)
        time.sleep(IDLE_PAST_TIMEOUT)
        # As many as the busy phase: enough that threads which connected then get some of them.
        send(producer, *(f"idle-{i}" for i in range(4)))
        after = collect(redis_client, 4, w)
        assert_recovered_after_idle(busy, after)
    assert row_count() == 8


def test_without_freshconn_a_worker_thread_fails_after_idle_past_server_timeout(
    live: None, redis_server: Redis, redis_client: Any, producer: RedisBroker
) -> None:
    """Contrast: without the middleware, a message after the server's idle timeout gets a dead connection."""
    with worker(worker_env(redis_server, integration=False), threads=1) as w:
        send(producer, "busy-0")
        assert errors(collect(redis_client, 1, w)) == []
        time.sleep(IDLE_PAST_TIMEOUT)
        send(producer, "idle-0")
        after = collect(redis_client, 1, w)
    assert len(errors(after)) == 1
