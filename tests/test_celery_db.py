"""freshconn.contrib.celery outside task bodies: django-celery-results writes and django-celery-beat's scheduler.

Real ``celery worker`` and ``celery beat`` processes, a Redis broker, and the test database with
the two apps' tables (created for this module only), on a server that drops sessions idle for 2 s.
Each process with freshconn runs side by side with the same process without it (its own Redis
database for its broker queue), through one timeline of faults: they share start-ups and waits.
"""

from __future__ import annotations

import contextlib
import subprocess
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from django.apps import apps
from django.conf import settings
from django.db import connection
from django.test import override_settings
from testbed.redis import Redis
from testbed.servers import DBServer

from tests.conftest import IDLE_PAST_TIMEOUT, VENDOR
from tests.queue_tasks.faults import close_test_connections, kill_sessions, restart_server
from tests.queue_tasks.harness import (
    WorkerProcess,
    one_driver_per_vendor,
    redis_client,
    redis_db,
    redis_db_client,
    redis_server,
    row_count,
    side_by_side,
    worker_env,
)

pytest.importorskip("django_celery_results", reason="django-celery-results is not installed in this environment")
pytest.importorskip("django_celery_beat", reason="django-celery-beat is not installed here (it requires Django < 6.1)")

__all__ = ["redis_client", "redis_server"]  # fixtures used by the tests below

pytestmark = [
    pytest.mark.server,
    pytest.mark.broker,
    pytest.mark.slow,
    one_driver_per_vendor(mysql="mysqlclient", postgresql="psycopg2"),
]

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


def producer(redis_server: Any, db: int) -> Celery:
    return Celery(f"freshconn_tests_producer_{db}", broker=redis_db(redis_server, db), fixups=[])


def db_env(redis_server: Any, *, integration: bool = True, db: int = 0, **extra: str) -> dict[str, str]:
    env = worker_env(redis_server, integration=integration, db=db, FRESHCONN_TEST_CELERY_DB="1", **extra)
    env["DJANGO_SETTINGS_MODULE"] = "tests.celery_settings"
    return env


def celery(*argv: str, env: dict[str, str]) -> WorkerProcess:
    return WorkerProcess(["-m", "celery", "-A", "tests.queue_tasks.celery_app", *argv, "--loglevel=INFO"], env)


def worker(env: dict[str, str], name: str) -> WorkerProcess:
    """A prefork worker of one child: its MainProcess writes revoked and expired states itself."""
    flags = ("--without-gossip", "--without-mingle", "--without-heartbeat")
    return celery("worker", "--pool=prefork", "--concurrency=1", f"--hostname={name}@%h", *flags, env=env)


def beat(env: dict[str, str], tmp_path: Path, name: str) -> WorkerProcess:
    return celery("beat", f"--pidfile={tmp_path / name}.pid", f"--schedule={tmp_path / name}", env=env)


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
    """Sends tasks to one worker's queue and remembers the state each must end in."""

    def __init__(self, producer: Celery, prefix: str = "") -> None:
        self.producer = producer
        self.prefix = prefix
        self.expected: dict[str, str] = {}

    def _id(self, name: str, state: str) -> str:
        task_id = f"{self.prefix}{name}-{uuid.uuid4().hex[:8]}"
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
        assert self.producer.control.revoke(task_id, reply=True, timeout=10, limit=1)  # the one worker
        self.producer.send_task(TASK, args=[task_id], task_id=task_id)
        return {task_id: "REVOKED"}


class Periodic:
    """One periodic task (every second) per beat, disabled until ``enable()``: a beat then ticks every 3 s."""

    def __init__(self, name: str) -> None:
        from django_celery_beat.models import IntervalSchedule, PeriodicTask

        every, _ = IntervalSchedule.objects.get_or_create(every=1, period=IntervalSchedule.SECONDS)
        self.name = name
        self.task = PeriodicTask.objects.create(name=name, task=TASK, interval=every, args='["beat"]', enabled=False)

    def runs(self) -> int:
        from django_celery_beat.models import PeriodicTask

        return int(PeriodicTask.objects.values_list("total_run_count", flat=True).get(pk=self.task.pk))

    def enable(self) -> None:
        from django_celery_beat.models import PeriodicTask, PeriodicTasks

        PeriodicTask.objects.filter(pk=self.task.pk).update(enabled=True)
        PeriodicTasks.update_changed()

    def wait_runs(self, more_than: int, proc: WorkerProcess, timeout: float = 20.0) -> int:
        deadline = time.monotonic() + timeout
        while (n := self.runs()) <= more_than and time.monotonic() < deadline and proc.proc.poll() is None:  # type: ignore[union-attr]
            time.sleep(0.1)
        assert n > more_than, proc.output()
        return n


def db_errors(log: str) -> list[str]:
    return [e for e in DB_ERRORS if e in log]


def test_main_process_states_long_task_results_and_beat_ride_idle_kill_and_restart(
    live: None, celery_tables: None, server: DBServer, redis_server: Redis, tmp_path: Path
) -> None:
    """MainProcess states, a long task's result and beat survive idle, KILL and a restart; without it they fail."""
    tasks, plain = Tasks(producer(redis_server, 0)), Tasks(producer(redis_server, 1), prefix="plain-")
    beats, plain_beats = Periodic("freshconn-beat"), Periodic("plain-beat")
    max_loop = "3"  # FRESHCONN_TEST_BEAT_MAX_LOOP: each beat wakes up at least every 3 s
    with side_by_side(
        worker(db_env(redis_server), "fc"),
        worker(db_env(redis_server, integration=False, db=1), "plain"),
        beat(
            db_env(redis_server, db=2, FRESHCONN_TEST_BEAT_TASK=beats.name, FRESHCONN_TEST_BEAT_MAX_LOOP=max_loop),
            tmp_path,
            "fc",
        ),
        beat(
            db_env(
                redis_server,
                integration=False,
                db=3,
                FRESHCONN_TEST_BEAT_TASK=plain_beats.name,
                FRESHCONN_TEST_BEAT_MAX_LOOP=max_loop,
            ),
            tmp_path,
            "p",
        ),
    ) as (w, pw, b, pb):

        def phase(name: str, *sent: dict[str, str], timeout: float = 30.0) -> None:
            expected = {k: v for s in sent for k, v in s.items()}
            assert wait_for(expected, w, timeout) == expected, (name, w.output())

        # Until the long task is done, the beats' entries are disabled: each beat ticks every 3 s,
        # past the server's 2 s idle limit, and each tick reads the schedule's changes.
        phase("warm", tasks.run("warm"), tasks.expired("warm-expired"))
        warm = {**plain.run("warm"), **plain.expired("warm-expired")}
        assert wait_for(warm, pw) == warm
        # Each child's connection idles past the server's timeout inside the task; the result comes after.
        ((plain_long, _),) = plain.slow("long", IDLE_PAST_TIMEOUT).items()
        phase("long", tasks.slow("long", IDLE_PAST_TIMEOUT))
        plain_stored = wait_for({plain_long: "FAILURE"}, pw, timeout=10)
        beats.enable()
        # Meanwhile the MainProcesses' connections idled as long.
        phase("idle", tasks.expired("idle-expired"), tasks.run("idle"))
        plain_expired = plain.expired("idle-expired")
        n = beats.wait_runs(0, b)
        kill_sessions(server, worker_sessions())
        phase("kill", tasks.expired("kill-expired"), tasks.run("kill"))
        n = beats.wait_runs(n + 1, b)
        restart_server(server)
        close_test_connections()
        phase("restart", tasks.revoked("restart-revoked"), tasks.run("restart"))
        n = beats.wait_runs(n + 1, b)
        assert b.proc is not None
        assert b.proc.poll() is None
        assert pw.proc is not None
        with contextlib.suppress(subprocess.TimeoutExpired):
            # The plain worker's MainProcess dies of its write (below): once it logged its
            # "Unrecoverable error", its shutdown (pool children, broker) took over 10 s in a loaded CI.
            pw.proc.wait(60)
        logs = {"worker": w.output(tail=None), "beat": b.output(tail=None)}
        plain_logs = {"worker": pw.output(tail=None), "beat": pb.output(tail=None)}
        plain_exited = pw.proc.poll()
    # With freshconn: no database error anywhere, each task's state stored once (task_id is unique),
    # each task that ran wrote its one row, and every task beat sent is in its queue once per saved run.
    assert {k: db_errors(v) for k, v in logs.items()} == {"worker": [], "beat": []}, logs
    assert states(list(tasks.expected)) == tasks.expected
    assert row_count() == sum(s == "SUCCESS" for s in tasks.expected.values()) + 2  # + plain warm and long
    assert redis_db_client(redis_server, 2).llen("celery") == beats.runs() >= n
    # Without: the long task ran to its end (its row is there) but its result says FAILURE; the next
    # expired state killed the whole worker (Celery #8405, #9239); beat's idle ticks failed.
    assert plain_stored == {plain_long: "FAILURE"}, plain_logs["worker"]
    assert states(list(plain_expired)) == {}
    after = plain_logs["worker"].split("idle-expired", 1)[1]
    assert "Unrecoverable error:" in after, plain_logs["worker"]
    assert db_errors(after.split("Unrecoverable error:", 1)[1]), plain_logs["worker"]
    assert plain_exited is not None
    assert "Database gave error" in plain_logs["beat"], plain_logs["beat"]
