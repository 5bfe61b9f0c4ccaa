"""Running real worker processes and reading their reports, for the task-queue integration tests."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import pytest
from testbed.redis import Redis

from tests.conftest import DRIVER, ROOT, VENDOR, short_server_timeout_options, subprocess_env
from tests.queue_tasks import REDIS_URL_ENV, REPORTS_KEY


@pytest.fixture(scope="module")
def redis_server() -> Iterator[Redis]:
    """A throwaway Redis for this test module."""
    with Redis() as server:
        yield server


@pytest.fixture
def redis_client(redis_server: Redis) -> Iterator[Any]:
    """A client of the module's Redis (database 0), every database emptied before each test."""
    client = redis_server.client()
    client.flushall()
    try:
        yield client
    finally:
        client.close()


def redis_db(redis_server: Redis, db: int) -> str:
    """The URL of one of the Redis server's numbered databases: one per worker run side by side."""
    return f"{redis_server.url.rsplit('/', 1)[0]}/{db}"


def redis_db_client(redis_server: Redis, db: int) -> Any:
    """A client of one of the server's numbered databases (``client(db=...)`` would keep the URL's /0)."""
    import redis

    return redis.Redis.from_url(redis_db(redis_server, db))


def worker_env(redis_server: Redis, *, integration: bool = True, db: int = 0, **extra: str) -> dict[str, str]:
    """The environment of a worker process: same DB, a 2 s server idle timeout, this Redis (database ``db``).

    Workers run side by side (a contrast without freshconn next to the scenario) each get a Redis
    database of their own, for their broker queue and their reports.
    """
    return subprocess_env(
        FRESHCONN_TEST_DB_OPTIONS=json.dumps(short_server_timeout_options()),
        FRESHCONN_TEST_INTEGRATION="1" if integration else "0",
        **{REDIS_URL_ENV: redis_db(redis_server, db)},
        **extra,
    )


def one_driver_per_vendor(mysql: str, postgresql: str) -> pytest.MarkDecorator:
    """Run a runtime's worker-process proofs on one driver of each vendor only (CI time budget).

    These tests prove what a framework integration does with connections; how each driver's
    disconnects are seen is proven for every driver by the core tests. FRESHCONN_ALL_DRIVERS=1
    runs them on every driver.
    """
    chosen = mysql if VENDOR == "mysql" else postgresql
    return pytest.mark.skipif(
        chosen != DRIVER and os.environ.get("FRESHCONN_ALL_DRIVERS") != "1",
        reason=f"CI time budget: this runtime's worker proofs run on {chosen} for {VENDOR} "
        f"(FRESHCONN_ALL_DRIVERS=1 runs them on {DRIVER} too)",
    )


class WorkerProcess:
    """A worker command in its own process group; ``stop()`` ends it (and its children) for sure."""

    def __init__(self, argv: list[str], env: dict[str, str], *, stop_timeout: float = 20.0) -> None:
        self.argv = [sys.executable, *argv]
        self.stop_timeout = stop_timeout
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None
        self._signaled = False
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 - closed in __exit__, read before

    def __enter__(self) -> WorkerProcess:
        self.proc = subprocess.Popen(
            self.argv, env=self.env, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True
        )
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.stop()
        finally:
            self.log.close()

    def terminate(self) -> None:
        """Ask for a warm shutdown (SIGTERM, once) without waiting: ``stop()`` then waits for it."""
        if self.proc is not None and self.proc.poll() is None and not self._signaled:
            self.proc.send_signal(signal.SIGTERM)
            self._signaled = True

    def stop(self, timeout: float | None = None) -> None:
        timeout = self.stop_timeout if timeout is None else timeout
        proc = self.proc
        if proc is None:
            return

        if proc.poll() is None:
            # A warm shutdown first: the worker finishes its task and closes what it can.
            self.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout)
        # Then anything left in the group (pool children that outlived their parent).
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        if proc.poll() is None:
            proc.wait(10)
        self.proc = None
        self._signaled = False

    def output(self, tail: int | None = 6000) -> str:
        """What the process wrote so far (its last ``tail`` characters; None: all of it)."""
        self.log.seek(0)
        text = self.log.read().decode(errors="replace")
        return text if tail is None else text[-tail:]


@contextlib.contextmanager
def side_by_side(*workers: WorkerProcess) -> Iterator[tuple[WorkerProcess, ...]]:
    """Run worker processes together; at the end all are signalled first, so their shutdowns overlap."""
    with contextlib.ExitStack() as stack:
        for w in workers:
            stack.enter_context(w)
        try:
            yield workers
        finally:
            for w in workers:
                w.terminate()


def collect(client: Any, n: int, worker: WorkerProcess, timeout: float = 60.0, key: str = REPORTS_KEY) -> list[Any]:
    """Wait for ``n`` reports from the worker; fail with its log when they do not come."""
    reports: list[Any] = []
    deadline = time.monotonic() + timeout
    while len(reports) < n:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        item = client.blpop([key], timeout=max(1, min(3, int(left))))
        if item is not None:
            reports.append(json.loads(item[1]))
        elif worker.proc is not None and worker.proc.poll() is not None:
            break
    if len(reports) < n:
        raise AssertionError(f"got {len(reports)} of {n} reports: {reports}\n--- worker log ---\n{worker.output()}")
    return reports


def errors(reports: list[dict[str, Any]]) -> list[str]:
    return [r["error"] for r in reports if "error" in r]


def assert_busy_reuse(reports: list[dict[str, Any]], other_connects: int = 0) -> None:
    """Busy tasks: one session per worker thread, one connect per thread, no ping, no error.

    ``other_connects``: connections the worker process opened outside tasks (counted in its stats).
    """
    assert errors(reports) == []
    by_thread: dict[tuple[int, int], set[int]] = {}
    for r in reports:
        by_thread.setdefault((r["pid"], r["thread"]), set()).add(r["backend"])
    assert all(len(backends) == 1 for backends in by_thread.values()), by_thread
    for pid in {r["pid"] for r in reports}:
        mine = [r for r in reports if r["pid"] == pid]
        threads = {r["thread"] for r in mine}
        assert max(r["stats"]["connects"] for r in mine) == len(threads) + other_connects, mine
        assert max(r["stats"]["pings"] for r in mine) == 0, mine


def assert_recovered_after_idle(before: list[dict[str, Any]], after: list[dict[str, Any]]) -> None:
    """After idling past the server's timeout: no error, new sessions, still no ping."""
    assert errors(after) == []
    old = {(r["pid"], r["thread"]): r["backend"] for r in before}
    # Otherwise no task found a connection that had idled: nothing would have been tested.
    assert any((r["pid"], r["thread"]) in old for r in after), (before, after)
    for r in after:
        key = (r["pid"], r["thread"])
        if key in old:
            assert r["backend"] != old[key], "a connection the server dropped was reused"
        assert r["stats"]["pings"] == 0, r
    assert max(r["stats"]["discarded_server_idle"] for r in after) >= 1, after


def row_count() -> int:
    from tests.app.models import Order

    rows: int = Order.objects.count()
    return rows


def session_exists(backend: int) -> bool:
    """Whether the server still has the session ``backend`` (asked on the test's own connection)."""
    from django.db import connection

    sql = (
        "SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE ID = %s"
        if connection.vendor == "mysql"
        else "SELECT COUNT(*) FROM pg_stat_activity WHERE pid = %s"
    )
    with connection.cursor() as cursor:
        cursor.execute(sql, [backend])
        return bool(cursor.fetchone()[0])
