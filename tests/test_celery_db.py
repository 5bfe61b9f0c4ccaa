"""freshconn.contrib.celery outside task bodies: django-celery-results writes and django-celery-beat's scheduler.

Real ``celery worker`` and ``celery beat`` processes, a Redis broker, and the test database with
the two apps' tables (created for this module only), on a server that drops sessions idle for 2 s.
"""

from __future__ import annotations

import contextlib
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from django.apps import apps
from django.conf import settings
from django.db import connection
from django.test import override_settings

from tests.conftest import IDLE_PAST_TIMEOUT, VENDOR
from tests.queue_tasks.faults import close_test_connections, kill_sessions, restart_server
from tests.queue_tasks.harness import WorkerProcess, redis_client, redis_server, row_count, worker_env

pytest.importorskip("django_celery_results", reason="django-celery-results is not installed in this environment")
pytest.importorskip("django_celery_beat", reason="django-celery-beat is not installed here (it requires Django < 6.1)")

__all__ = ["redis_client", "redis_server"]  # fixtures used by the tests below

pytestmark = [pytest.mark.server, pytest.mark.broker, pytest.mark.slow]

TASK = "freshconn_tests.record"
SLOW_TASK = "freshconn_tests.record_slowly"
APPS = ["django_celery_results", "django_celery_beat"]
#: Lines a worker or beat logs when one of its database writes or reads failed.
DB_ERRORS = ("OperationalError", "InterfaceError", "Database gave error", "gone away", "connection already closed")


@pytest.fixture(scope="module")
def celery_tables(django_db_setup: None, django_db_blocker: Any) -> Iterator[None]:
    """The two apps installed in this process and their tables created, for this module only."""
    with override_settings(INSTALLED_APPS=[*settings.INSTALLED_APPS, *APPS]), django_db_blocker.unblock():
        models = [model for label in APPS for model in apps.get_app_config(label).get_models()]
        with connection.schema_editor() as editor:
            for model in models:
                editor.create_model(model)
        try:
            yield
        finally:
            close_test_connections()
            with connection.schema_editor() as editor:
                for model in reversed(models):
                    editor.delete_model(model)
            connection.close()


@pytest.fixture
def producer(redis_server: Any) -> Iterator[Celery]:
    app = Celery("freshconn_tests_producer", broker=redis_server.url, fixups=[])
    try:
        yield app
    finally:
        app.close()


def db_env(redis_server: Any, *, integration: bool = True, **extra: str) -> dict[str, str]:
    env = worker_env(redis_server, integration=integration, FRESHCONN_TEST_CELERY_DB="1", **extra)
    env["DJANGO_SETTINGS_MODULE"] = "tests.celery_settings"
    return env


def celery(*argv: str, env: dict[str, str]) -> WorkerProcess:
    return WorkerProcess(["-m", "celery", "-A", "tests.queue_tasks.celery_app", *argv, "--loglevel=INFO"], env)


def worker(env: dict[str, str]) -> WorkerProcess:
    """A prefork worker of one child: its MainProcess writes revoked and expired states itself."""
    flags = ("--without-gossip", "--without-mingle", "--without-heartbeat")
    return celery("worker", "--pool=prefork", "--concurrency=1", *flags, env=env)


def states(task_ids: list[str]) -> dict[str, str]:
    from django_celery_results.models import TaskResult

    return dict(TaskResult.objects.filter(task_id__in=task_ids).values_list("task_id", "status"))


def wait_for(expected: dict[str, str], proc: WorkerProcess, timeout: float = 30.0) -> dict[str, str]:
    """Wait until the result table holds exactly these states (or the time is up); return what it holds."""
    deadline = time.monotonic() + timeout
    while True:
        got = states(list(expected))
        if got == expected or time.monotonic() > deadline or (proc.proc is not None and proc.proc.poll() is not None):
            return got
        time.sleep(0.05)


def worker_sessions() -> set[int]:
    """The server sessions of the app user other than this test's own."""
    sql = (
        "SELECT ID FROM information_schema.PROCESSLIST WHERE USER = 'app' AND ID <> CONNECTION_ID()"
        if VENDOR == "mysql"
        else "SELECT pid FROM pg_stat_activity WHERE usename = 'app' AND pid <> pg_backend_pid()"
    )
    with connection.cursor() as cursor:
        cursor.execute(sql)
        return {int(row[0]) for row in cursor.fetchall()}


class Tasks:
    """Sends tasks and remembers the state each must end in."""

    def __init__(self, producer: Celery) -> None:
        self.producer = producer
        self.expected: dict[str, str] = {}

    def _id(self, name: str, state: str) -> str:
        task_id = f"{name}-{uuid.uuid4().hex[:8]}"
        self.expected[task_id] = state
        return task_id

    def run(self, name: str) -> dict[str, str]:
        task_id = self._id(name, "SUCCESS")
        self.producer.send_task(TASK, args=[task_id], task_id=task_id)
        return {task_id: "SUCCESS"}

    def slow(self, name: str, seconds: float) -> dict[str, str]:
        task_id = self._id(name, "SUCCESS")
        self.producer.send_task(SLOW_TASK, args=[task_id, seconds], task_id=task_id)
        return {task_id: "SUCCESS"}

    def expired(self, name: str) -> dict[str, str]:
        """A task whose expiry has passed: the worker's MainProcess stores it as REVOKED, never runs it."""
        task_id = self._id(name, "REVOKED")
        past = datetime.now(timezone.utc) - timedelta(seconds=5)
        self.producer.send_task(TASK, args=[task_id], task_id=task_id, expires=past)
        return {task_id: "REVOKED"}

    def revoked(self, name: str) -> dict[str, str]:
        """A task revoked (and acknowledged by the worker) before it is sent: stored as REVOKED by the MainProcess."""
        task_id = self._id(name, "REVOKED")
        assert self.producer.control.revoke(task_id, reply=True, timeout=10)
        self.producer.send_task(TASK, args=[task_id], task_id=task_id)
        return {task_id: "REVOKED"}


def test_results_written_by_the_main_process_and_after_a_long_task_survive_idle_kill_and_restart(
    live, celery_tables, server, redis_server, producer
):
    """Revoked/expired states (MainProcess) and results after a long task are stored through idle, KILL, restart."""
    tasks = Tasks(producer)
    with worker(db_env(redis_server)) as w:
        phases: list[tuple[str, dict[str, str]]] = []

        def phase(name: str, *sent: dict[str, str], timeout: float = 30.0) -> None:
            expected = {k: v for s in sent for k, v in s.items()}
            phases.append((name, expected))
            assert wait_for(expected, w, timeout) == expected, (name, w.output())

        phase("warm", tasks.run("warm"), tasks.expired("warm-expired"))
        # The child's connection idles past the server's timeout inside the task; the result comes after.
        phase("long", tasks.slow("long", IDLE_PAST_TIMEOUT))
        # Meanwhile the MainProcess's connection idled as long.
        phase("idle", tasks.expired("idle-expired"), tasks.run("idle"))
        kill_sessions(server, worker_sessions())
        phase("kill", tasks.expired("kill-expired"), tasks.run("kill"))
        restart_server(server)
        close_test_connections()
        phase("restart", tasks.revoked("restart-revoked"), tasks.run("restart"))
        log = w.output()
    assert not [e for e in DB_ERRORS if e in log], log
    # Each task stored once (task_id is unique), and each task that ran wrote its one row.
    assert states(list(tasks.expected)) == tasks.expected
    assert row_count() == sum(state == "SUCCESS" for state in tasks.expected.values())


def test_without_freshconn_a_long_task_reads_failed_and_the_main_process_dies(
    live, celery_tables, redis_server, producer
):
    """Contrast: a long task's success is stored as a failure; the MainProcess's next revoked state kills the worker."""
    tasks = Tasks(producer)
    with worker(db_env(redis_server, integration=False)) as w:
        warm = {**tasks.run("warm"), **tasks.expired("warm-expired")}
        assert wait_for(warm, w) == warm
        ((long_id, _),) = tasks.slow("long", IDLE_PAST_TIMEOUT).items()
        stored = wait_for({long_id: "FAILURE"}, w, timeout=IDLE_PAST_TIMEOUT + 10)
        # The MainProcess's connection idled as long: its write of an expired task's state fails.
        expired = tasks.expired("idle-expired")
        assert w.proc is not None
        with contextlib.suppress(subprocess.TimeoutExpired):
            w.proc.wait(15)
        exited, log = w.proc.poll(), w.output(tail=None)
    # The task body ran to the end (its row is there), yet its result says it failed.
    assert stored == {long_id: "FAILURE"}, log
    assert row_count() == 2
    assert states(list(expired)) == {}
    after = log.split("idle-expired", 1)[1]
    assert "Unrecoverable error:" in after, log
    assert any(e in after.split("Unrecoverable error:", 1)[1] for e in DB_ERRORS), log
    assert exited is not None  # the whole worker is gone (Celery #8405, #9239)


def beat(env: dict[str, str], tmp_path: Path) -> WorkerProcess:
    return celery("beat", f"--pidfile={tmp_path / 'beat.pid'}", f"--schedule={tmp_path / 'schedule'}", env=env)


@pytest.fixture
def periodic(celery_tables: None, live: None) -> Callable[..., Any]:
    """One periodic task every second, sent by beat's DatabaseScheduler to the Redis queue ``celery``."""
    from django_celery_beat.models import IntervalSchedule, PeriodicTask

    every = IntervalSchedule.objects.create(every=1, period=IntervalSchedule.SECONDS)
    task = PeriodicTask.objects.create(name="freshconn-beat", task=TASK, interval=every, args='["beat"]')

    def runs() -> int:
        return int(PeriodicTask.objects.values_list("total_run_count", flat=True).get(pk=task.pk))

    def enable(on: bool) -> None:
        PeriodicTask.objects.filter(pk=task.pk).update(enabled=on)
        from django_celery_beat.models import PeriodicTasks

        PeriodicTasks.update_changed()

    runs.enable = enable  # type: ignore[attr-defined]
    return runs


def wait_runs(runs: Callable[[], int], more_than: int, proc: WorkerProcess, timeout: float = 20.0) -> int:
    deadline = time.monotonic() + timeout
    while (n := runs()) <= more_than and time.monotonic() < deadline and proc.proc.poll() is None:  # type: ignore[union-attr]
        time.sleep(0.1)
    assert n > more_than, proc.output()
    return n


def test_beat_database_scheduler_survives_idle_between_ticks_kill_and_restart(
    periodic, server, redis_server, redis_client, tmp_path
):
    """DatabaseScheduler: every tick a unit; after idle past the timeout, a KILL and a restart, beat sends and saves."""
    env = db_env(redis_server, FRESHCONN_TEST_BEAT_MAX_LOOP="3")
    with beat(env, tmp_path) as b:
        n = wait_runs(periodic, 1, b)
        kill_sessions(server, worker_sessions())
        n = wait_runs(periodic, n + 1, b)
        restart_server(server)
        close_test_connections()
        n = wait_runs(periodic, n + 1, b)
        # Nothing due: beat ticks every 3 s (beat_max_loop_interval), past the server's 2 s idle limit.
        periodic.enable(False)
        time.sleep(2 * 3 + 0.5)
        periodic.enable(True)
        n = wait_runs(periodic, periodic(), b)
        assert b.proc is not None
        assert b.proc.poll() is None
        log = b.output()
    assert not [e for e in DB_ERRORS if e in log], log
    # Every task beat sent is in the queue once, and every run it saved matches one.
    assert redis_client.llen("celery") == periodic()


def test_without_freshconn_beat_fails_its_next_tick_after_a_kill(periodic, server, redis_server, tmp_path):
    """Contrast: beat's DatabaseScheduler alone fails on the killed connection at its next tick."""
    with beat(db_env(redis_server, integration=False), tmp_path) as b:
        wait_runs(periodic, 1, b)
        kill_sessions(server, worker_sessions())
        deadline = time.monotonic() + 10
        while not any(e in b.output() for e in DB_ERRORS) and time.monotonic() < deadline:
            time.sleep(0.1)
        log = b.output()
    assert any(e in log for e in DB_ERRORS), log
