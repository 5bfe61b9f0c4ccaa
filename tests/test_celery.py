"""freshconn.contrib.celery in real Celery workers (prefork, threads, solo) with a Redis broker."""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Iterator
from typing import Any

import celery
import pytest
from celery import Celery

from tests.conftest import IDLE_PAST_TIMEOUT
from tests.queue_tasks import PARENT_KEY
from tests.queue_tasks.harness import (
    WorkerProcess,
    assert_busy_reuse,
    assert_recovered_after_idle,
    collect,
    redis_client,
    redis_server,
    row_count,
    worker_env,
)

__all__ = ["redis_client", "redis_server"]  # fixtures used by the tests below

pytestmark = [pytest.mark.server, pytest.mark.broker, pytest.mark.slow]

TASK = "freshconn_tests.record"


@pytest.fixture
def producer(redis_server: Any) -> Iterator[Celery]:
    app = Celery("freshconn_tests_producer", broker=redis_server.url, fixups=[])
    try:
        yield app
    finally:
        app.close()


def send(producer: Celery, *refs: str) -> None:
    for ref in refs:
        producer.send_task(TASK, args=[ref])


def worker(pool: str, concurrency: int, env: dict[str, str]) -> WorkerProcess:
    return WorkerProcess(
        [
            "-m",
            "celery",
            "-A",
            "tests.queue_tasks.celery_app",
            "worker",
            f"--pool={pool}",
            f"--concurrency={concurrency}",
            "--loglevel=INFO",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
        ],
        env,
    )


@pytest.mark.parametrize(("pool", "concurrency"), [("prefork", 2), ("threads", 2), ("solo", 1)])
def test_tasks_reuse_connections_and_survive_idle_past_server_timeout(
    live, redis_server, redis_client, producer, pool, concurrency
):
    """Busy tasks share one connection per worker thread with no ping; after the server's idle timeout, no error."""
    env = worker_env(redis_server, FRESHCONN_TEST_PARENT_QUERY="1" if pool == "prefork" else "0")
    with worker(pool, concurrency, env) as w:
        send(producer, *(f"busy-{i}" for i in range(4)))
        busy = collect(redis_client, 4, w)
        assert_busy_reuse(busy)
        time.sleep(IDLE_PAST_TIMEOUT)
        # As many as the busy phase: enough that threads which connected then get some of them.
        send(producer, *(f"idle-{i}" for i in range(4)))
        after = collect(redis_client, 4, w)
        assert_recovered_after_idle(busy, after)
    assert row_count() == 8
    if pool == "prefork":
        # The pool's children were forked while the parent held an open session: they never used
        # it nor closed it (no COM_QUIT / Terminate on it), so the parent can still use it at shutdown.
        init, shutdown = collect(redis_client, 2, w, key=PARENT_KEY)
        assert "error" not in init, init
        assert "error" not in shutdown, shutdown
        assert shutdown["backend"] == init["backend"]
        assert init["backend"] not in {r["backend"] for r in busy + after}


@pytest.mark.skipif(celery.VERSION < (5, 6), reason="Celery < 5.6 closed only obsolete connections per task")
def test_without_freshconn_celery_opens_a_connection_per_task(live, redis_server, redis_client, producer):
    """Contrast: Celery's own Django fix-up closes every connection after each task, so each task connects anew."""
    with worker("solo", 1, worker_env(redis_server, integration=False)) as w:
        send(producer, *(f"plain-{i}" for i in range(4)))
        reports = collect(redis_client, 4, w)
    assert [r.get("error") for r in reports] == [None] * 4
    assert len({r["backend"] for r in reports}) == 4
    assert max(r["stats"]["connects"] for r in reports) == 4


def app_sessions() -> int:
    """Sessions of the app user on the server, other than this test's own."""
    from django.db import connection

    sql = (
        "SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE USER = 'app' AND ID <> CONNECTION_ID()"
        if connection.vendor == "mysql"
        else "SELECT COUNT(*) FROM pg_stat_activity WHERE usename = 'app' AND pid <> pg_backend_pid()"
    )
    with connection.cursor() as cursor:
        cursor.execute(sql)
        return int(cursor.fetchone()[0])


@pytest.mark.parametrize("pool", ["gevent", "eventlet"])
def test_greenlet_pool_tasks_are_units_and_finished_greenlets_leave_no_session(
    live, redis_server, redis_client, producer, pool
):
    """gevent/eventlet: each task a unit in its greenlet, after idle too; finished greenlets leave no session open."""
    # Never import eventlet into the test process: it warns on every later fork() (tests/test_fork.py).
    if importlib.util.find_spec(pool) is None:
        pytest.skip(f"{pool} is not installed")
    with worker(pool, 4, worker_env(redis_server)) as w:
        send(producer, *(f"{pool}-{i}" for i in range(8)))
        first = collect(redis_client, 8, w)
        time.sleep(IDLE_PAST_TIMEOUT)
        send(producer, *(f"{pool}-idle-{i}" for i in range(4)))
        after = collect(redis_client, 4, w)
        assert [r.get("error") for r in first + after] == [None] * 12
        assert app_sessions() == 0
    assert row_count() == 12
