"""freshconn.contrib.celery in real Celery workers (prefork, threads, solo) with a Redis broker."""

from __future__ import annotations

import contextlib
import importlib.util
import time
from collections.abc import Iterator
from typing import Any

import celery
import pytest
from celery import Celery
from testbed.redis import Redis

from freshconn import _inspect
from tests.conftest import DRIVER, IDLE_PAST_TIMEOUT
from tests.queue_tasks import PARENT_KEY
from tests.queue_tasks.harness import (
    WorkerProcess,
    assert_busy_reuse,
    assert_recovered_after_idle,
    collect,
    one_driver_per_vendor,
    redis_client,
    redis_db,
    redis_db_client,
    redis_server,
    row_count,
    side_by_side,
    worker_env,
)

__all__ = ["redis_client", "redis_server"]  # fixtures used by the tests below

pytestmark = [pytest.mark.server, pytest.mark.broker, pytest.mark.slow]

TASK = "freshconn_tests.record"


def producer_for(redis_server: Any, db: int) -> Celery:
    return Celery(f"freshconn_tests_producer_{db}", broker=redis_db(redis_server, db), fixups=[])


@pytest.fixture
def producer(redis_server: Any) -> Iterator[Celery]:
    app = producer_for(redis_server, 0)
    try:
        yield app
    finally:
        app.close()


def send(producer: Celery, *refs: str) -> None:
    for ref in refs:
        producer.send_task(TASK, args=[ref])


def worker(pool: str, concurrency: int, env: dict[str, str], name: str = "celery") -> WorkerProcess:
    return WorkerProcess(
        [
            "-m",
            "celery",
            "-A",
            "tests.queue_tasks.celery_app",
            "worker",
            f"--pool={pool}",
            f"--concurrency={concurrency}",
            f"--hostname={name}@%h",
            "--loglevel=INFO",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
        ],
        env,
    )


@pytest.mark.parametrize(("pool", "concurrency"), [("prefork", 2), ("threads", 2), ("solo", 1)])
def test_tasks_reuse_connections_and_survive_idle_past_server_timeout(
    live: None, redis_server: Redis, redis_client: Any, producer: Celery, pool: str, concurrency: int
) -> None:
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
def test_without_freshconn_celery_opens_a_connection_per_task(
    live: None, redis_server: Redis, redis_client: Any, producer: Celery
) -> None:
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


def wait_for_log(w: WorkerProcess, text: str, timeout: float = 30.0) -> str:
    """The worker's whole log once it contains ``text`` (or the time is up, or the worker exited)."""
    deadline = time.monotonic() + timeout
    while text not in (log := w.output(tail=None)) and time.monotonic() < deadline:
        if w.proc is not None and w.proc.poll() is not None:
            break
        time.sleep(0.1)
    return log


@one_driver_per_vendor(mysql="pymysql", postgresql="psycopg2")
def test_greenlet_pools_run_units_leave_no_session_and_warn_at_start(
    live: None, redis_server: Redis, redis_client: Any
) -> None:
    """gevent/eventlet: a unit per task in its greenlet, none left open; at start, W010 and psycopg2's error."""
    # Never import eventlet (or gevent) into the test process: eventlet warns on every later fork().
    for pool in ("gevent", "eventlet"):
        if importlib.util.find_spec(pool) is None:
            pytest.skip(f"{pool} is not installed")
    limit = _inspect.inspect("default").max_connections
    assert limit
    # Side by side, each with its own Redis database: gevent with more greenlets than the server
    # allows connections (psycopg2 made cooperative by psycogreen, as it should be), eventlet, and
    # a threads pool as large; on psycopg2, a gevent worker without psycogreen too.
    green = "1" if DRIVER == "psycopg2" else "0"
    runs = {
        "gevent": worker("gevent", limit + 1, worker_env(redis_server, FRESHCONN_TEST_PSYCOGREEN=green), "g"),
        "eventlet": worker("eventlet", 4, worker_env(redis_server, db=1), "e"),
        "threads": worker("threads", limit + 1, worker_env(redis_server, db=2), "t"),
    }
    if DRIVER == "psycopg2":
        runs["unpatched"] = worker("gevent", 4, worker_env(redis_server, db=3), "u")
    with contextlib.ExitStack() as stack:
        stack.enter_context(side_by_side(*runs.values()))
        for w in runs.values():
            wait_for_log(w, " ready.")
        lanes = [(f"{pool}-", runs[pool], db) for db, pool in enumerate(("gevent", "eventlet"))]
        producers = {db: stack.enter_context(contextlib.closing(producer_for(redis_server, db))) for _, _, db in lanes}
        clients = {db: redis_client if db == 0 else redis_db_client(redis_server, db) for _, _, db in lanes}
        reports: list[dict[str, Any]] = []
        for name, n in (("busy", 8), ("idle", 4)):
            if name == "idle":
                time.sleep(IDLE_PAST_TIMEOUT)
            for prefix, _, db in lanes:
                send(producers[db], *(f"{prefix}{name}-{i}" for i in range(n)))
            for _, w, db in lanes:
                reports += collect(clients[db], n, w)
        # A task reports before its greenlet ends (and closes): wait for the last ones to leave.
        deadline = time.monotonic() + 10
        while (left := app_sessions()) and time.monotonic() < deadline:
            time.sleep(0.05)
        logs = {pool: w.output(tail=None) for pool, w in runs.items()}
    assert [r.get("error") for r in reports] == [None] * 24
    assert left == 0
    assert row_count() == 24
    for pool in ("gevent", "threads"):
        assert f"{pool} pool: A pool of {limit + 1} threads or greenlets" in logs[pool], logs[pool]
        assert f"max_connections={limit}" in logs[pool]
        assert "(freshconn.W010)" in logs[pool]
    assert "(freshconn.W010)" not in logs["eventlet"]
    # Only psycopg2 blocks the hub; psycopg 3 and the MySQL drivers are made cooperative by gevent.
    assert PSYCOGREEN_MISSING not in logs["gevent"] + logs["eventlet"] + logs["threads"]
    if DRIVER == "psycopg2":
        assert PSYCOGREEN_MISSING in logs["unpatched"], logs["unpatched"]
