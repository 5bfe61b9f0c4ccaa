"""freshconn.contrib.celery in real Celery workers (prefork, threads, solo) with a Redis broker."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from typing import Any

import celery
import pytest
from celery import Celery

from freshconn import _inspect
from tests.conftest import DRIVER, IDLE_PAST_TIMEOUT
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


PSYCOGREEN_MISSING = "psycopg2 under the gevent pool without psycogreen"


@pytest.mark.parametrize("pool", ["gevent", "eventlet"])
def test_greenlet_pool_tasks_are_units_and_finished_greenlets_leave_no_session(
    live, redis_server, redis_client, producer, pool
):
    """gevent/eventlet: each task a unit in its greenlet, after idle too; finished greenlets leave no session open."""
    pytest.importorskip(pool)
    # psycopg2 is set up as it should be under gevent: made cooperative by psycogreen.
    green = "1" if pool == "gevent" and DRIVER == "psycopg2" else "0"
    with worker(pool, 4, worker_env(redis_server, FRESHCONN_TEST_PSYCOGREEN=green)) as w:
        send(producer, *(f"{pool}-{i}" for i in range(8)))
        first = collect(redis_client, 8, w)
        time.sleep(IDLE_PAST_TIMEOUT)
        send(producer, *(f"{pool}-idle-{i}" for i in range(4)))
        after = collect(redis_client, 4, w)
        assert [r.get("error") for r in first + after] == [None] * 12
        assert app_sessions() == 0
        assert PSYCOGREEN_MISSING not in w.output(tail=None)
    assert row_count() == 12


def wait_for_log(w: WorkerProcess, text: str, timeout: float = 30.0) -> str:
    """The worker's whole log once it contains ``text`` (or the time is up, or the worker exited)."""
    deadline = time.monotonic() + timeout
    while text not in (log := w.output(tail=None)) and time.monotonic() < deadline:
        if w.proc is not None and w.proc.poll() is not None:
            break
        time.sleep(0.1)
    return log


def test_pool_start_up_warns_when_concurrency_exceeds_max_connections(live, redis_server):
    """gevent and threads workers of max_connections + 1 log W010 at start; psycopg2 without psycogreen is an error."""
    if "gevent" not in sys.modules:
        pytest.importorskip("gevent")
    limit = _inspect.inspect("default").max_connections
    assert limit
    env = worker_env(redis_server)
    with worker("gevent", limit + 1, env) as green, worker("threads", limit + 1, env) as threads:
        logs = {pool: wait_for_log(w, " ready.") for pool, w in (("gevent", green), ("threads", threads))}
    for pool, log in logs.items():
        assert f"{pool} pool: A pool of {limit + 1} threads or greenlets" in log, log
        assert f"max_connections={limit}" in log
        assert "(freshconn.W010)" in log
    # Only psycopg2 blocks the hub: psycopg 3 and the MySQL drivers are made cooperative by gevent itself.
    assert (PSYCOGREEN_MISSING in logs["gevent"]) == (DRIVER == "psycopg2"), logs["gevent"]
    assert PSYCOGREEN_MISSING not in logs["threads"]
