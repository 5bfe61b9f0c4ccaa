"""Real third-party workers with FRESHCONN['ADOPT_CLOSE_OLD_CONNECTIONS']: idle, KILL and a restart survived.

The packages are the real ones, run as real worker processes, with only "freshconn" in INSTALLED_APPS
and no freshconn integration: django-tasks-db's ``db_worker`` (Django >= 6.0), Django-Q2's
``qcluster`` (ORM broker), Dramatiq through django_dramatiq's ``rundramatiq`` and its
``DbConnectionsMiddleware`` (Redis), huey's ``run_huey`` with ``@db_task`` (Redis). Each calls
``close_old_connections()`` around its jobs, and that call is all freshconn gets.

One scenario per worker: warm up, 1,000 busy tasks, a server restart, a KILL / pg_terminate_backend of
every session the worker holds, idle past the server's timeout (3 s). Adopted, on Django's
default ``CONN_MAX_AGE=0``: every task runs exactly once, no process of the worker dies, and the
1,000 busy tasks make 0 connects and 0 pings across all its processes. Without the setting (and
persistent connections, so that the worker does not pay a connect per task), the same scenario
breaks at its first fault that reaches the worker: a task fails, or the worker dies.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import django
import pytest
from django.apps import apps as django_apps
from django.conf import settings
from django.db import connections
from django.test import override_settings
from testbed.freeze import frozen_between_queries
from testbed.servers import DBServer

from tests.app.models import Order
from tests.conftest import DRIVER, VENDOR, short_server_timeout_options, subprocess_env
from tests.queue_tasks.harness import WorkerProcess, redis_server
from tests.realworkers import EVENTS_ENV, FRAMEWORK_ENV, Q_CLUSTER, STATS_DIR_ENV, TASKS

__all__ = ["redis_server"]  # a fixture used below

pytestmark = [pytest.mark.server, pytest.mark.slow]

BUSY = 1000
#: The server drops sessions idle this long. Above the 2 s of the in-process tests: freshconn expires a
#: connection 0.5 s before the server would, and a connection it expires while the server is down is
#: reopened without waiting (the core gap in tests/test_core_gaps.py), so the gap between the worker's
#: last task and its first task during the outage must stay below 2.5 s, even on a loaded CI machine.
SERVER_IDLE_LIMIT = 3
IDLE_PAST_LIMIT = SERVER_IDLE_LIMIT + 1.2
#: A generous bound on any one wait; a worker that needs it has failed (its log is shown).
PATIENCE = 90.0


# --- reading what the worker did -------------------------------------------------------------------


def read_events(path: Path) -> dict[str, list[dict[str, Any]]]:
    """Events per task key: one per run of the task (two would mean it ran twice)."""
    out: dict[str, list[dict[str, Any]]] = {}
    if path.exists():
        # A line without its newline is still being written (a read may see half of a worker's
        # one write() to its log): it is read at the next look.
        for line in path.read_text().split("\n")[:-1]:
            event = json.loads(line)
            out.setdefault(event["key"], []).append(event)
    return out


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, dead but not yet reaped by its parent, does not)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def read_stats(folder: Path) -> dict[int, dict[str, Any]]:
    out: dict[int, dict[str, Any]] = {}
    for path in folder.glob("*.json"):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):  # replaced between listing and reading
            continue
        out[data["pid"]] = data
    return out


def total(snapshot: dict[int, dict[str, Any]], counter: str) -> int:
    """A counter summed over every process of the worker."""
    return sum(d["stats"].get(counter, 0) for d in snapshot.values())


# --- the worker under test -------------------------------------------------------------------------


@dataclass
class Framework:
    """One real worker package: how to run its worker, enqueue a task, and read its own verdicts."""

    name: str
    argv: list[str]
    enqueue: Callable[[list[str]], None]
    #: Its queue lives in the database: nothing can be enqueued while the server is down.
    queue_in_db: bool
    #: How many tasks the framework itself recorded as succeeded (None: it keeps no results).
    succeeded: Callable[[], int | None] = lambda: None
    #: Whether the framework has finished its own bookkeeping of ``n`` tasks (results saved,
    #: messages acknowledged): a fault is injected only then, between tasks, not in the middle
    #: of one (a fault there is at-least-once territory, see docs/adoption.md).
    settled: Callable[[int], bool] = lambda n: True
    close: Callable[[], None] = lambda: None


@dataclass
class Run:
    """A worker process with its events file and stats folder, and what the scenario saw."""

    framework: Framework
    tmp: Path
    adopt: bool
    conn_max_age: str
    worker: WorkerProcess = field(init=False)
    keys: list[str] = field(default_factory=list)
    pids_after_warmup: set[int] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.events = self.tmp / "events.jsonl"
        self.stats_dir = self.tmp / "stats"
        self.stats_dir.mkdir()
        env = subprocess_env(
            FRESHCONN_TEST_DB_OPTIONS=json.dumps(short_server_timeout_options(SERVER_IDLE_LIMIT)),
            FRESHCONN_TEST_ADOPT="1" if self.adopt else "0",
            FRESHCONN_TEST_CONN_MAX_AGE=self.conn_max_age,
            FRESHCONN_TEST_REDIS_URL=os.environ.get("FRESHCONN_TEST_REDIS_URL", ""),
            **{FRAMEWORK_ENV: self.framework.name, EVENTS_ENV: str(self.events), STATS_DIR_ENV: str(self.stats_dir)},
        )
        env["DJANGO_SETTINGS_MODULE"] = "tests.realworkers.settings"
        # Dramatiq fetches 2 messages per worker thread at a time by default: 1,000 busy tasks would take
        # 500 Redis polls. A deeper prefetch keeps the busy phase short; each task still runs alone.
        env["dramatiq_queue_prefetch"] = "100"
        self.worker = WorkerProcess(self.framework.argv, env)

    def submit(self, prefix: str, n: int) -> list[str]:
        keys = [f"{prefix}-{i}" for i in range(n)]
        self.framework.enqueue(keys)
        self.keys += keys
        return keys

    def kill(self) -> None:
        """End the worker and its children at once: a graceful stop is not under test, and takes seconds."""
        proc = self.worker.proc
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)

    def died(self) -> bool:
        return self.worker.proc is None or self.worker.proc.poll() is not None

    def wait_done(self, keys: list[str]) -> dict[str, list[dict[str, Any]]]:
        """Wait until every key has run (or the worker died); return the events of those keys."""
        deadline = time.monotonic() + PATIENCE
        while True:
            events = read_events(self.events)
            if all(k in events for k in keys) or self.died():
                return {k: events.get(k, []) for k in keys}
            if time.monotonic() > deadline:
                raise AssertionError(f"{len(events)} events, waiting for {keys[:3]}...\n{self.worker.output()}")
            time.sleep(0.05)

    def wait_settled(self) -> None:
        """Wait until the framework has saved and acknowledged every task so far (or a process died)."""
        deadline = time.monotonic() + PATIENCE
        while not self.framework.settled(len(self.keys)):
            if self.died() or (self.pids_after_warmup and self.new_pids()):
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.framework.name} never settled its tasks\n{self.worker.output()}")
            time.sleep(0.05)

    def stats(self) -> dict[int, dict[str, Any]]:
        """Counters of every process, each written after this call began (a dead process: its last)."""
        first = read_stats(self.stats_dir)
        deadline = time.monotonic() + PATIENCE
        while True:
            now = read_stats(self.stats_dir)
            if all(not alive(pid) or now[pid]["seq"] >= first.get(pid, {"seq": 0})["seq"] + 2 for pid in now):
                return now
            if time.monotonic() > deadline:
                raise AssertionError(f"stats files went stale: {now}\n{self.worker.output()}")
            time.sleep(0.05)

    def wait_counter(self, counter: str, above: int) -> None:
        """Wait until the worker's ``counter`` (summed over its processes) exceeds ``above``."""
        deadline = time.monotonic() + PATIENCE
        while total(read_stats(self.stats_dir), counter) <= above:
            if time.monotonic() > deadline or self.died():
                raise AssertionError(f"{counter} never went above {above}\n{self.worker.output()}")
            time.sleep(0.05)

    def new_pids(self) -> set[int]:
        """Processes of the worker born after the warm-up: a process died and was replaced."""
        return set(read_stats(self.stats_dir)) - self.pids_after_warmup


@dataclass
class Outcome:
    phase: str
    errors: list[str]
    died: bool
    new_pids: set[int]

    @property
    def ok(self) -> bool:
        return not self.errors and not self.died and not self.new_pids


def outcome(run: Run, phase: str, keys: list[str]) -> Outcome:
    """What the worker did with ``keys``, once it has run them and finished its own bookkeeping."""
    events = run.wait_done(keys)
    errors = [e["error"] for evs in events.values() for e in evs if "error" in e]
    missing = [k for k, evs in events.items() if not evs]
    errors += [f"{k}: never ran" for k in missing if not run.died()]
    if not errors:
        run.wait_settled()
    return Outcome(phase, errors, run.died(), run.new_pids())


# --- faults ------------------------------------------------------------------------------------------


def app_sessions(server: Any) -> list[int]:
    if VENDOR == "mysql":
        out = server.admin_sql("SELECT ID FROM information_schema.PROCESSLIST WHERE USER = 'app'")
    else:
        out = server.admin_sql("SELECT pid FROM pg_stat_activity WHERE usename = 'app'")
    return [int(x) for x in out.split()]


def kill_every_app_session(server: Any) -> int:
    """KILL / pg_terminate_backend every session of the app user (the worker's and this test's)."""
    connections["default"].close()
    victims = app_sessions(server)
    for session in victims:
        sql = f"KILL {session}" if VENDOR == "mysql" else f"SELECT pg_terminate_backend({session})"
        with contextlib.suppress(Exception):  # it ended by itself meanwhile
            server.admin_sql(sql)
    deadline = time.monotonic() + PATIENCE
    while set(app_sessions(server)) & set(victims):
        assert time.monotonic() < deadline, "killed sessions never went away"
        time.sleep(0.02)
    return len(victims)


@contextlib.contextmanager
def between_queries(run: Run) -> Iterator[None]:
    """Freeze the worker's processes (SIGSTOP) so that a fault strikes between their queries, never during one.

    A loop that polls its queue in the database (db_worker, Django-Q2's pusher) always has a query
    about to run: a fault that strikes while one is in flight, or between the loop's own
    close_old_connections() and its query, fails that query in the framework's own code, where no
    boundary can help (a task in flight is at-least-once territory, see docs/adoption.md). So the
    freeze waits for a moment when no thread of the worker is running code or talking to its
    database (testbed.freeze), and a short pause lets the server finish before the fault.
    """
    pgid = run.worker.proc.pid if run.worker.proc is not None else 0
    # Right after a burst of tasks the loop has not reached its idle wait yet (it does not sleep
    # between tasks, and a loaded machine slows it): let it settle into its polling rhythm first.
    time.sleep(0.3)
    with frozen_between_queries(pgid, int(connections["default"].settings_dict["PORT"])):
        time.sleep(0.3)
        yield


def restart_server(server: Any, while_down: Callable[[], None]) -> None:
    """Stop the server (keeping its data), run ``while_down``, start it again on the same port."""
    if VENDOR == "postgresql":
        # The test bed runs PostgreSQL with synchronous_commit=off and stops it with -m immediate:
        # without a checkpoint, COMMITs acknowledged just before the stop could be lost.
        server.admin_sql("CHECKPOINT")
    connections["default"].close()
    server.down()
    try:
        while_down()
    finally:
        server.up()


# --- the scenario ------------------------------------------------------------------------------------


def warm_up(run: Run) -> None:
    keys = run.submit("warm", 3)
    first = outcome(run, "warm-up", keys)
    assert not first.errors, (first, run.worker.output())
    assert not first.died, run.worker.output()
    # Every process the worker runs has started by now (and connected, if it uses the database).
    run.pids_after_warmup = set(run.stats())


def busy_phase(run: Run) -> tuple[Outcome, dict[str, int]]:
    """1,000 tasks back to back; the counters they cost, summed over the worker's processes."""
    before = run.stats()
    keys = run.submit("busy", BUSY)
    result = outcome(run, "busy", keys)
    after = run.stats()
    cost = {c: total(after, c) - total(before, c) for c in ("units", "connects", "pings", "reconnect_waits")}
    cost["reconnect_waits_so_far"] = total(after, "reconnect_waits")
    return result, cost


def idle_phase(run: Run) -> Outcome:
    time.sleep(IDLE_PAST_LIMIT)  # the server drops every session idle for SERVER_IDLE_LIMIT
    return outcome(run, "idle past the server timeout", run.submit("idle", 3))


def kill_phase(run: Run, server: Any) -> Outcome:
    killed = 0
    for attempt in range(3):
        if attempt:
            # The worker's session outlived its idle spell past the server's 3 s limit (a loaded
            # machine: the wait for results and the freeze), so the server dropped it: a correct
            # outcome, but not this phase's fault. One task reconnects it; then KILL again.
            reconnected = outcome(run, "reconnect before the KILL", run.submit(f"pre-kill-{attempt}", 1))
            assert reconnected.ok, (reconnected, run.worker.output())
        with between_queries(run):
            killed = kill_every_app_session(server)
        if killed:
            break
    assert killed >= 1, "the worker never had a session open to KILL"
    return outcome(run, "KILL", run.submit("kill", 3))


def restart_phase(run: Run, server: Any, waits: int) -> Outcome:
    """The server restarts between tasks; ``waits``: the worker's reconnect_waits before (from the last stats)."""
    keys: list[str] = []

    def while_down() -> None:
        paused.close()  # SIGCONT: the worker runs again, and meets the outage
        if not run.framework.queue_in_db:
            keys.extend(run.submit("down", 3))  # the broker is up: tasks arrive while the database is down
        if run.adopt:
            run.wait_counter("reconnect_waits", waits)  # a unit of the worker is waiting for the server
        else:
            time.sleep(1.0)  # the worker meets the outage (a poll, a task) while the server is down

    with contextlib.ExitStack() as paused:
        paused.enter_context(between_queries(run))
        restart_server(server, while_down)
    if run.framework.queue_in_db:
        keys += run.submit("after-restart", 3)
    return outcome(run, "server restart", keys)


def scenario(run: Run, server: Any, *, stop_at_failure: bool, waits: int = 0) -> list[Outcome]:
    """Restart, KILL, idle: in that order, so that the restart comes right after the last tasks ran."""
    outcomes = []
    for phase in (lambda r: restart_phase(r, server, waits), lambda r: kill_phase(r, server), idle_phase):
        result = phase(run)
        outcomes.append(result)
        if stop_at_failure and not result.ok:
            break
    return outcomes


# --- the frameworks ----------------------------------------------------------------------------------


def db_worker_framework() -> Framework:
    from django.tasks import TaskResultStatus
    from django_tasks_db.models import DBTaskResult

    from tests.realworkers.dj_tasks import record_task

    def enqueue(keys: list[str]) -> None:
        for key in keys:
            record_task.enqueue(key)

    return Framework(
        name="db_worker",
        argv=["-m", "django", "db_worker", "--interval", "0.1", "--no-startup-delay"],
        enqueue=enqueue,
        queue_in_db=True,
        succeeded=lambda: DBTaskResult.objects.filter(status=TaskResultStatus.SUCCESSFUL).count(),
        settled=lambda n: (
            not DBTaskResult.objects.filter(status__in=[TaskResultStatus.READY, TaskResultStatus.RUNNING]).exists()
        ),
    )


def qcluster_framework() -> Framework:
    from django_q.models import OrmQ, Task
    from django_q.tasks import async_task

    def enqueue(keys: list[str]) -> None:
        for key in keys:
            async_task("tests.realworkers.record", key)

    return Framework(
        name="qcluster",
        # mysql-connector-python's Django backend (26.x) declares display_name as a cached_property over
        # a staticmethod, which raises TypeError when read; Django's models.W037 check reads it for
        # Django-Q2's (>= 1.11) conditional index on MySQL, and qcluster dies in its start-up checks.
        # Not what this test is about: skip the checks there (tests/test_checks.py runs freshconn's).
        argv=["-m", "django", "qcluster", *(["--skip-checks"] if DRIVER == "mysqlconnector" else [])],
        enqueue=enqueue,
        queue_in_db=True,
        succeeded=lambda: Task.objects.filter(success=True).count(),
        # Its monitor saves each result, then deletes the queue row: both done for every task.
        settled=lambda n: Task.objects.count() == n and not OrmQ.objects.exists(),
    )


def dramatiq_framework(redis_url: str) -> Framework:
    import dramatiq
    from dramatiq.brokers.redis import RedisBroker

    broker = RedisBroker(url=redis_url)  # type: ignore[no-untyped-call]  # dramatiq leaves its __init__ unannotated
    broker.declare_queue("default")

    def enqueue(keys: list[str]) -> None:
        for key in keys:
            message: dramatiq.Message[Any] = dramatiq.Message(
                queue_name="default", actor_name="record", args=(key,), kwargs={}, options={}
            )
            broker.enqueue(message)

    return Framework(
        name="dramatiq",
        argv=["-m", "django", "rundramatiq", "--processes", "1", "--threads", "1", "--skip-logging"],
        enqueue=enqueue,
        queue_in_db=False,
        # RedisBroker.close() does nothing: its client's pooled socket would be left to the garbage
        # collector (a ResourceWarning at the end of the session, an error here).
        close=broker.client.connection_pool.disconnect,
    )


def huey_framework(redis_url: str) -> Framework:
    from huey import RedisHuey

    # The producer side of the worker's djhuey instance: same name, same task name.
    huey = RedisHuey("freshconn-real", url=redis_url, results=False)

    def record_task(key: str) -> None:  # pragma: no cover - runs in the worker
        raise AssertionError("runs in the worker")

    # huey names a task by its module and name: the same as the worker's, in tests/realworkers/tasks.py.
    record_task.__module__ = "tests.realworkers.tasks"
    record_task = huey.task(name="record")(record_task)

    def enqueue(keys: list[str]) -> None:
        for key in keys:
            record_task(key)

    return Framework(
        name="huey",
        argv=["-m", "django", "run_huey"],
        enqueue=enqueue,
        queue_in_db=False,
        close=huey.storage.pool.disconnect,
    )


@pytest.fixture(scope="module")
def db_apps(django_db_setup: None, django_db_blocker: Any) -> Iterator[None]:
    """Django-Q2's and django-tasks-db's apps installed in this process for this module, their tables created.

    Not in tests/settings.py: their models' system checks would run in every ``manage.py check`` test.
    """
    names = [name for name, ok in (("django_q", True), ("django_tasks_db", django.VERSION >= (6, 0))) if ok]
    names = [name for name in names if importlib.util.find_spec(name) is not None]
    # Their settings first: override_settings installs apps before it applies the other settings, and
    # Django-Q2 reads Q_CLUSTER when its app loads.
    with (
        override_settings(Q_CLUSTER=Q_CLUSTER, TASKS=TASKS),
        override_settings(INSTALLED_APPS=[*settings.INSTALLED_APPS, *names]),
    ):
        models = [
            model
            for config in django_apps.get_app_configs()
            if config.name in names
            for model in config.get_models()
            if not model._meta.proxy
        ]
        with django_db_blocker.unblock(), connections["default"].schema_editor() as editor:
            for model in models:
                editor.create_model(model)
        try:
            yield
        finally:
            with django_db_blocker.unblock(), connections["default"].schema_editor() as editor:
                for model in reversed(models):
                    editor.delete_model(model)


def needs(module: str, reason: str) -> None:
    try:
        __import__(module)
    except ImportError:
        pytest.skip(reason)


@pytest.fixture
def framework(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[Framework]:
    name = request.param
    if name == "db_worker":
        if django.VERSION < (6, 0):
            pytest.skip("django-tasks-db's db_worker runs Django >= 6.0's django.tasks (tested on the Django 6.x leg)")
        needs("django_tasks_db", "django-tasks-db is not installed (requirements-dev.txt, Python >= 3.12)")
        request.getfixturevalue("db_apps")
        fw = db_worker_framework()
    elif name == "qcluster":
        needs("django_q", "django-q2 is not installed (requirements-dev.txt)")
        request.getfixturevalue("db_apps")
        fw = qcluster_framework()
    else:
        needs("django_dramatiq" if name == "dramatiq" else "huey", f"{name} is not installed (requirements-dev.txt)")
        redis = request.getfixturevalue("redis_server")
        monkeypatch.setenv("FRESHCONN_TEST_REDIS_URL", redis.url)
        client = redis.client()
        client.flushdb()
        client.close()
        fw = dramatiq_framework(redis.url) if name == "dramatiq" else huey_framework(redis.url)
    try:
        yield fw
    finally:
        fw.close()


FRAMEWORKS = [
    pytest.param("db_worker", id="db_worker"),
    pytest.param("qcluster", id="qcluster", marks=pytest.mark.broker),
    pytest.param("dramatiq", id="dramatiq", marks=pytest.mark.broker),
    pytest.param("huey", id="huey", marks=pytest.mark.broker),
]


@pytest.mark.parametrize("framework", FRAMEWORKS, indirect=True)
def test_adopted_worker_survives_idle_kill_and_restart_and_busy_tasks_cost_nothing(
    live: None, server: DBServer, framework: Framework, tmp_path: Path
) -> None:
    """Adopted, CONN_MAX_AGE=0: each task runs once through restart, KILL and idle; 1,000 busy tasks: 0 connects."""
    run = Run(framework, tmp_path, adopt=True, conn_max_age="0")
    with run.worker:
        warm_up(run)
        busy, cost = busy_phase(run)
        assert busy.ok, (busy, run.worker.output())
        assert cost["connects"] == 0, cost
        assert cost["pings"] == 0, cost
        assert cost["units"] >= BUSY, cost
        outcomes = scenario(run, server, stop_at_failure=False, waits=cost["reconnect_waits_so_far"])
        assert [o for o in outcomes if not o.ok] == [], run.worker.output()
        final = run.stats()
        assert not run.died()
        run.kill()
    events = read_events(run.events)
    assert sorted(events) == sorted(run.keys)
    assert [k for k, evs in events.items() if len(evs) != 1] == []  # each task ran exactly once
    assert len({e["pid"] for evs in events.values() for e in evs}) == 1  # in the same process throughout
    assert Order.objects.count() == len(run.keys)
    assert total(final, "reconnect_waits") >= 1  # it waited for the restarting server instead of failing
    assert total(final, "discarded_dead") >= 1  # the KILL and the restart were seen, and handled
    succeeded = framework.succeeded()
    assert succeeded in (None, len(run.keys))


@pytest.mark.parametrize("framework", FRAMEWORKS, indirect=True)
def test_without_adoption_the_same_worker_breaks(
    live: None, server: DBServer, framework: Framework, tmp_path: Path
) -> None:
    """Contrast: without the setting (persistent connections) the same scenario breaks: a task fails, a process dies."""
    run = Run(framework, tmp_path, adopt=False, conn_max_age="none")
    with run.worker:
        warm_up(run)
        outcomes = scenario(run, server, stop_at_failure=True, waits=total(run.stats(), "reconnect_waits"))
        run.kill()
    failed = [o for o in outcomes if not o.ok]
    assert failed, (outcomes, run.worker.output())
    print(f"{framework.name} without adoption broke at: {failed[0]}")  # shown with pytest -rP
    assert failed[0].errors or failed[0].died or failed[0].new_pids
