"""freshconn.contrib.apscheduler: APScheduler 3 jobs in a real BackgroundScheduler, in this process."""

from __future__ import annotations

import gc
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from apscheduler.events import EVENT_JOB_ERROR, EVENT_JOB_EXECUTED
from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.background import BackgroundScheduler
from django.db import connection

import freshconn
from freshconn.contrib.apscheduler import FreshconnThreadPoolExecutor
from tests.app.models import Order
from tests.conftest import DJANGO_TEMP_CONNECTS_PER_NEW_THREAD, DRIVER, IDLE_PAST_TIMEOUT, counters
from tests.queue_tasks import backend_id
from tests.queue_tasks.harness import session_exists

pytestmark = [pytest.mark.server, pytest.mark.slow]


class Runs:
    """The scheduler's job outcomes, in order: ("ok", thread, backend) or ("error", exception)."""

    def __init__(self, scheduler: BackgroundScheduler) -> None:
        self.items: list[tuple[Any, ...]] = []
        self.cond = threading.Condition()
        scheduler.add_listener(self._on_event, EVENT_JOB_EXECUTED | EVENT_JOB_ERROR)

    def _on_event(self, event: Any) -> None:
        with self.cond:
            self.items.append(event.retval if event.exception is None else ("error", event.exception))
            self.cond.notify_all()

    def wait(self, n: int, timeout: float = 30.0) -> list[tuple[Any, ...]]:
        with self.cond:
            assert self.cond.wait_for(lambda: len(self.items) >= n, timeout), self.items
            return list(self.items)


def record_job(ref: str) -> tuple[Any, ...]:
    Order.objects.create(ref=ref)
    return ("ok", threading.get_ident(), backend_id())


def run_now(scheduler: BackgroundScheduler, *refs: str) -> None:
    for ref in refs:
        scheduler.add_job(record_job, args=[ref], id=ref)


@pytest.fixture
def scheduler() -> Iterator[BackgroundScheduler]:
    sched = BackgroundScheduler(executors={"default": FreshconnThreadPoolExecutor(2)})
    try:
        yield sched
    finally:
        if sched.running:
            sched.shutdown(wait=True)


def test_jobs_reuse_connections_and_survive_idle_past_server_timeout(
    short_timeout: int, scheduler: BackgroundScheduler
) -> None:
    """Busy jobs share one connection per pool thread with no ping; after the server's idle timeout, no error."""
    runs = Runs(scheduler)
    scheduler.start()
    run_now(scheduler, *(f"busy-{i}" for i in range(4)))
    busy = runs.wait(4)
    assert all(r[0] == "ok" for r in busy), busy
    per_thread = {t: {b for _, t2, b in busy if t2 == t} for _, t, _ in busy}
    assert all(len(backends) == 1 for backends in per_thread.values()), per_thread
    assert counters()["connects"] == len(per_thread) * (1 + DJANGO_TEMP_CONNECTS_PER_NEW_THREAD)
    assert counters()["pings"] == 0

    time.sleep(IDLE_PAST_TIMEOUT)
    run_now(scheduler, *(f"idle-{i}" for i in range(4)))
    after = runs.wait(8)[4:]
    assert all(r[0] == "ok" for r in after), after
    assert counters()["pings"] == 0
    assert counters()["discarded_server_idle"] >= 1

    # Shutdown: each pool thread closes its own connection, so the server lets go of every session.
    scheduler.shutdown(wait=True)
    last = {t: b for _, t, b in busy + after}
    assert Order.objects.count() == 8
    deadline = time.monotonic() + 5
    while any(session_exists(b) for b in last.values()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(session_exists(b) for b in last.values())


@pytest.mark.filterwarnings(
    # Seen with mysql-connector-python only, and only here, without freshconn: the socket of the
    # connection broken in APScheduler's own pool thread is released by the garbage collector.
    "ignore::pytest.PytestUnraisableExceptionWarning" if DRIVER == "mysqlconnector" else "default::UserWarning"
)
def test_without_freshconn_a_job_fails_after_idle_past_server_timeout(short_timeout: int) -> None:
    """Contrast: APScheduler's own thread pool hands the next job the connection the server dropped."""
    sched = BackgroundScheduler(executors={"default": ThreadPoolExecutor(1)})
    runs = Runs(sched)
    sched.start()
    try:
        run_now(sched, "busy-0")
        assert runs.wait(1)[0][0] == "ok"
        time.sleep(IDLE_PAST_TIMEOUT)
        run_now(sched, "idle-0")
        outcome = runs.wait(2)[1]
        assert outcome[0] == "error"
        assert freshconn.is_disconnect(outcome[1])
        # Leave nothing behind: the pool's only thread closes the connection it broke.
        sched.add_job(connection.close, id="cleanup")
        runs.wait(3)
    finally:
        sched.shutdown(wait=True)
        # Collected now, under this test's filter, not at some later test's garbage collection.
        gc.collect()
