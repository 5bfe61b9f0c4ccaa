"""Edge paths of the worker adapters, driven the way each framework drives them, in-process, on the real server.

Failed and skipped jobs, COMMITs lost in flight, hooks that run once, install() called twice,
agents that end or crash: the paths a worker meets rarely, and must get right when it does.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import re
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from django.db import connection, connections, transaction
from testbed.servers import DBServer

import freshconn
from freshconn._units import in_unit
from freshconn.contrib import tasks as fc_tasks
from freshconn.testing import kill_connection
from tests.app.models import Order
from tests.conftest import VENDOR, admin_connection, backend_id, counters
from tests.queue_tasks.harness import redis_client, redis_server

try:
    from django.tasks import TaskResultStatus, task
except ImportError:  # Django < 6.0: the backport
    pytest.importorskip("django_tasks")
    # mypy reads both imports (django-stubs has django.tasks); only one runs.
    from django_tasks import TaskResultStatus, task  # type: ignore[no-redef]

__all__ = ["redis_client", "redis_server"]  # fixtures used by the tests below

pytest_plugins = ("pytester",)
pytestmark = [pytest.mark.server]


# -- a COMMIT lost in flight, for real ------------------------------------------------------------

LOST_TABLE = "fc_edges_lost"


class LostCommit:
    """Makes the COMMIT of a transaction that wrote to ``fc_edges_lost`` die in flight on the server.

    PostgreSQL: a deferred constraint trigger terminates the committing session itself, inside its
    COMMIT. MySQL/MariaDB: another session's global read lock holds the COMMIT, and the session is
    killed while it waits there. Either way the client sent COMMIT and got a disconnect back.
    """

    def __init__(self, server: DBServer) -> None:
        self.server = server
        self.watchers: list[threading.Thread] = []
        self.killed = threading.Event()

    def prepare(self) -> None:
        with connection.cursor() as cursor:
            if VENDOR == "mysql":
                cursor.execute(
                    f"CREATE TABLE IF NOT EXISTS {LOST_TABLE} (id INT AUTO_INCREMENT PRIMARY KEY, ref VARCHAR(40))"
                    " ENGINE=InnoDB"
                )
                return
            cursor.execute(f"CREATE TABLE IF NOT EXISTS {LOST_TABLE} (id SERIAL PRIMARY KEY, ref TEXT)")
            cursor.execute(
                "CREATE OR REPLACE FUNCTION fc_edges_die() RETURNS trigger LANGUAGE plpgsql AS "
                "$$ BEGIN PERFORM pg_terminate_backend(pg_backend_pid()); RETURN NULL; END $$"
            )
            cursor.execute(f"DROP TRIGGER IF EXISTS fc_edges_die ON {LOST_TABLE}")
            cursor.execute(
                f"CREATE CONSTRAINT TRIGGER fc_edges_die AFTER INSERT ON {LOST_TABLE} DEFERRABLE INITIALLY DEFERRED "
                "FOR EACH ROW EXECUTE FUNCTION fc_edges_die()"
            )
        connection.close()

    def write(self, ref: str) -> None:
        """A transaction (in this thread, on the default alias) whose COMMIT is lost: raises the driver's error."""
        with transaction.atomic():
            with connection.cursor() as cursor:
                cursor.execute(f"INSERT INTO {LOST_TABLE} (ref) VALUES (%s)", [ref])
            if VENDOR == "mysql":
                self._hold_then_kill(backend_id())

    def _hold_then_kill(self, victim: int) -> None:
        admin = admin_connection(self.server)
        admin.cursor().execute("FLUSH TABLES WITH READ LOCK")

        def watch() -> None:
            cursor = admin.cursor()
            try:
                deadline = time.monotonic() + 10
                while time.monotonic() < deadline:
                    # INFO is the statement the session waits in (its STATE names the lock).
                    cursor.execute(
                        "SELECT COALESCE(INFO, '') FROM information_schema.PROCESSLIST WHERE ID = %s", [victim]
                    )
                    row = cursor.fetchone()
                    if row is not None and str(row[0]).strip().lower() == "commit":
                        cursor.execute(f"KILL {int(victim)}")
                        self.killed.set()
                        return
                    time.sleep(0.01)
            finally:
                cursor.execute("UNLOCK TABLES")
                cursor.close()
                admin.close()

        watcher = threading.Thread(target=watch, daemon=True)
        self.watchers.append(watcher)
        watcher.start()

    def join(self) -> None:
        for watcher in self.watchers:
            watcher.join()


_lost: LostCommit | None = None


def lose_commit(ref: str) -> None:
    """A job body: one transaction whose COMMIT the server loses in flight."""
    assert _lost is not None
    _lost.write(ref)


@pytest.fixture
def lost_commit(live: None, server: DBServer) -> Iterator[LostCommit]:
    global _lost
    _lost = LostCommit(server)
    _lost.prepare()
    try:
        yield _lost
    finally:
        _lost.join()
        _lost = None


def ambiguous_logged(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "freshconn" and getattr(r, "reason", None) == "ambiguous_commit"]


def record_order(ref: str) -> int:
    """A job body: one Order row."""
    pk: int = Order.objects.create(ref=ref).pk
    return pk


def kill_then_query(ref: str) -> None:
    """A job body: a row, then the server kills the session and the next query fails with a disconnect."""
    Order.objects.create(ref=ref)
    kill_connection()
    Order.objects.count()


# -- RQ -------------------------------------------------------------------------------------------


@contextlib.contextmanager
def kept_signal_handlers() -> Iterator[None]:
    """RQ's work() installs its own SIGINT/SIGTERM handlers in this process: put the test run's back."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def rq_work(client: Any, *jobs: tuple[Callable[..., Any], str], **worker_kwargs: Any) -> Any:
    """Enqueue ``jobs`` and run them with a FreshconnSimpleWorker in burst mode, in this thread."""
    from rq import Queue

    from freshconn.contrib.rq import FreshconnSimpleWorker

    queue = Queue("edges", connection=client)
    enqueued = [queue.enqueue(func, ref) for func, ref in jobs]
    worker = FreshconnSimpleWorker([queue], connection=client, **worker_kwargs)
    with kept_signal_handlers():
        worker.work(burst=True)
    return enqueued


@pytest.mark.broker
def test_rq_a_job_whose_commit_was_lost_is_reported_ambiguous(
    lost_commit: LostCommit, redis_client: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """RQ: a failed job's exception reaches its unit's end: a lost COMMIT is logged as ambiguous; the next job runs."""
    caplog.set_level(logging.ERROR, logger="freshconn")
    lost, after = rq_work(redis_client, (lose_commit, "rq-lost"), (record_order, "rq-after"))
    assert lost.get_status() == "failed"
    assert after.get_status() == "finished"
    (record,) = ambiguous_logged(caplog)
    assert record.levelno == logging.ERROR
    assert vars(record)["alias"] == "default"
    assert counters()["ambiguous_commits"] == 1
    assert list(Order.objects.values_list("ref", flat=True)) == ["rq-after"]


@pytest.mark.broker
def test_rq_a_job_escaping_perform_job_still_ends_its_unit(live: None, redis_client: Any) -> None:
    """RQ: when failure handling raises out of perform_job (a crashing exception handler), the unit still ends."""
    handled: list[BaseException] = []

    def crashing_handler(job: Any, exc_type: Any, exc: BaseException, tb: Any) -> bool:
        handled.append(exc)
        raise RuntimeError("the exception handler crashed")

    rq_work(redis_client, (kill_then_query, "rq-escape"), exception_handlers=[crashing_handler])
    assert len(handled) == 1
    assert freshconn.is_disconnect(handled[0])
    # The worker quit on the unhandled error; this thread is not left inside the job's unit.
    assert not in_unit()
    with freshconn.unit_of_work():
        assert Order.objects.filter(ref="rq-escape").count() == 1
    assert counters()["units"] == 2


# -- Dramatiq -------------------------------------------------------------------------------------


@contextlib.contextmanager
def dramatiq_worker(middleware_first: bool) -> Iterator[tuple[Any, Any]]:
    """A StubBroker with FreshconnMiddleware after Dramatiq's defaults (or first), and one worker thread."""
    import dramatiq
    from dramatiq.brokers.stub import StubBroker
    from dramatiq.middleware import AgeLimit

    from freshconn.contrib.dramatiq import FreshconnMiddleware

    broker = StubBroker()
    if middleware_first:
        broker.add_middleware(FreshconnMiddleware(), before=AgeLimit)
    else:
        broker.add_middleware(FreshconnMiddleware())
    broker.emit_after("process_boot")
    worker = dramatiq.Worker(broker, worker_threads=1, worker_timeout=50)
    worker.start()
    try:
        yield broker, worker
    finally:
        worker.stop()
        broker.close()


def dramatiq_actor(broker: Any, func: Callable[..., Any]) -> Any:
    import dramatiq

    return dramatiq.actor(broker=broker, actor_name=f"edges_{func.__name__}", max_retries=0)(func)


def expired(actor: Any, ref: str) -> Any:
    """A message of ``actor`` that was enqueued a minute ago with a 1 s age limit."""
    msg = actor.message_with_options(args=(ref,), max_age=1000)
    return msg.copy(message_timestamp=int(time.time() * 1000) - 60_000)


@pytest.mark.parametrize("middleware_first", [False, True], ids=["after-age-limit", "before-age-limit"])
def test_dramatiq_skipped_messages_leave_no_unit_open(
    live: None, middleware_first: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """Dramatiq: messages AgeLimit skips, before or after freshconn's hook opened a unit, leave no unit open."""
    inside: list[bool] = []

    def probe(ref: str) -> None:
        inside.append(in_unit())
        record_order(ref)

    with dramatiq_worker(middleware_first) as (broker, worker):
        actor = dramatiq_actor(broker, probe)
        broker.enqueue(expired(actor, "old-0"))
        broker.enqueue(expired(actor, "old-1"))
        actor.send("fresh")
        broker.join(actor.queue_name, fail_fast=False)
        worker.join()
    assert inside == [True]
    assert list(Order.objects.values_list("ref", flat=True)) == ["fresh"]
    # Each unit opened was a unit of its own: none left open made the next one a nested no-op.
    assert counters()["units"] == (3 if middleware_first else 1)
    assert not [r for r in caplog.records if r.levelno >= logging.CRITICAL], caplog.text


def test_dramatiq_a_message_whose_commit_was_lost_is_reported_ambiguous(
    lost_commit: LostCommit, caplog: pytest.LogCaptureFixture
) -> None:
    """Dramatiq: the actor's lost COMMIT reaches the unit's end and is logged as ambiguous; the next message runs."""
    caplog.set_level(logging.ERROR, logger="freshconn")
    with dramatiq_worker(False) as (broker, worker):
        lost, record = dramatiq_actor(broker, lose_commit), dramatiq_actor(broker, record_order)
        lost.send("dq-lost")
        record.send("dq-after")
        broker.join(lost.queue_name, fail_fast=False)
        worker.join()
    (logged,) = ambiguous_logged(caplog)
    assert vars(logged)["alias"] == "default"
    assert counters()["ambiguous_commits"] == 1
    assert list(Order.objects.values_list("ref", flat=True)) == ["dq-after"]


# -- Huey -----------------------------------------------------------------------------------------


def test_huey_install_twice_wraps_execute_once(live: None) -> None:
    """Huey: a second install() leaves the first wrapper in place; a consumer-run task is one unit."""
    from huey import MemoryHuey

    from freshconn.contrib.huey import install

    huey = MemoryHuey("edges", immediate=False)
    install(huey)
    wrapped = huey.execute
    install(huey, using="nope-not-an-alias")  # ignored: no second wrapper, not even its check
    assert huey.execute is wrapped
    record_task = huey.task()(record_order)
    record_task("huey-queued")
    task = huey.dequeue()
    assert task is not None
    huey.execute(task)  # what a consumer's worker does with each task
    assert counters()["units"] == 1
    assert Order.objects.filter(ref="huey-queued").count() == 1


def test_huey_immediate_mode_runs_tasks_in_the_callers_lifecycle(live: None) -> None:
    """Huey: in immediate mode a task runs inside its caller, with no unit of its own."""
    from huey import MemoryHuey

    from freshconn.contrib.huey import install

    huey = MemoryHuey("edges", immediate=True)
    install(huey)
    seen: list[bool] = []

    def probe_body(ref: str) -> None:
        seen.append(in_unit())
        record_order(ref)

    probe = huey.task()(probe_body)

    probe("outside")
    with freshconn.unit_of_work():
        probe("inside")
    assert seen == [False, True]
    assert counters()["units"] == 1  # the caller's own unit only


# -- Django tasks -----------------------------------------------------------------------------------


@task()
def lose_commit_task(ref: str) -> None:
    lose_commit(ref)


@task()
def record_task(ref: str) -> int:
    return record_order(ref)


@task()
def installing_task(ref: str) -> int:
    """A task that runs install() itself: its task_started came before freshconn's receivers."""
    fc_tasks.install()
    return record_order(ref)


@pytest.fixture
def tasks_installed() -> Iterator[None]:
    fc_tasks.install()
    try:
        yield
    finally:
        fc_tasks.uninstall()


def test_tasks_a_task_whose_commit_was_lost_is_reported_ambiguous(
    lost_commit: LostCommit, tasks_installed: None, caplog: pytest.LogCaptureFixture
) -> None:
    """Django tasks: a failed task's lost COMMIT reaches its unit's end, logged as ambiguous; the next task runs."""
    caplog.set_level(logging.ERROR, logger="freshconn")
    assert lose_commit_task.enqueue("tk-lost").status == TaskResultStatus.FAILED
    assert record_task.enqueue("tk-after").status == TaskResultStatus.SUCCESSFUL
    (logged,) = ambiguous_logged(caplog)
    assert vars(logged)["alias"] == "default"
    assert counters()["ambiguous_commits"] == 1
    assert list(Order.objects.values_list("ref", flat=True)) == ["tk-after"]


def test_tasks_a_task_finished_without_its_start_is_ignored(live: None) -> None:
    """Django tasks: install() from inside a running task; its task_finished, with no unit open, is ignored."""
    try:
        assert installing_task.enqueue("tk-first").status == TaskResultStatus.SUCCESSFUL
        assert counters().get("units", 0) == 0
        assert record_task.enqueue("tk-next").status == TaskResultStatus.SUCCESSFUL
        assert counters()["units"] == 1
    finally:
        fc_tasks.uninstall()
    assert Order.objects.count() == 2


def test_tasks_install_without_a_tasks_framework_says_what_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Django tasks: with neither django.tasks nor the django-tasks backport importable, install() names both."""
    monkeypatch.setitem(sys.modules, "django.tasks.signals", None)
    monkeypatch.setitem(sys.modules, "django_tasks.signals", None)
    with pytest.raises(ImportError, match=r"needs Django >= 6\.0 \(django\.tasks\) or the django-tasks backport"):
        fc_tasks.install()


# -- Procrastinate --------------------------------------------------------------------------------


def test_procrastinate_units_scoped_to_an_alias(live: None) -> None:
    """Procrastinate: with_units(using=...) runs sync tasks with the query log cleared after, async ones in a unit."""
    procrastinate = pytest.importorskip("procrastinate")
    from procrastinate.testing import InMemoryConnector

    from freshconn.contrib.asyncio import close_orm_connections
    from freshconn.contrib.procrastinate import with_units

    app = procrastinate.App(connector=InMemoryConnector(), worker_defaults=with_units(using="default"))
    wrappers: list[Any] = []
    async_in_unit: list[bool] = []

    def sync_body(ref: str) -> None:
        wrapper = connections["default"]
        wrapper.force_debug_cursor = True  # Django logs this thread's queries, as with DEBUG = True
        record_order(ref)
        assert len(wrapper.queries_log) >= 1
        wrappers.append(wrapper)

    async def async_body(ref: str) -> None:
        async_in_unit.append(await sync_to_async(in_unit, thread_sensitive=True)())
        await Order.objects.acreate(ref=ref)

    sync_task = app.task(name="edges_sync")(sync_body)
    async_task = app.task(name="edges_async")(async_body)

    sync_task.defer(ref="pc-sync")
    async_task.defer(ref="pc-async")
    try:
        app.run_worker(wait=False, install_signal_handlers=False, listen_notify=False)
    finally:
        asyncio.run(close_orm_connections())
    assert async_in_unit == [True]
    (wrapper,) = wrappers
    assert len(wrapper.queries_log) == 0  # cleared after the task, as Procrastinate's DjangoApp does
    assert sorted(Order.objects.values_list("ref", flat=True)) == ["pc-async", "pc-sync"]
    assert counters()["units"] == 2


# -- asyncio ----------------------------------------------------------------------------------------


def test_asyncio_run_closes_main_when_install_fails(live: None) -> None:
    """contrib.asyncio.run(): a bad ``using`` fails before main starts, and main is closed (never left un-awaited)."""
    from freshconn.contrib import asyncio as fc_asyncio

    started: list[bool] = []

    async def main() -> None:
        started.append(True)

    coro = main()
    with pytest.raises(Exception, match="nope-not-an-alias"):
        fc_asyncio.run(coro, using="nope-not-an-alias")
    assert inspect.getcoroutinestate(coro) == inspect.CORO_CLOSED
    assert started == []


# -- freshconn.testing --------------------------------------------------------------------------------


def test_kill_connection_needs_an_open_connection(live: None) -> None:
    """kill_connection() on an alias with no open connection in this thread says to run a query first."""
    assert connections["default"].connection is None
    with pytest.raises(ValueError, match="has no open connection in this thread: run a query first"):
        kill_connection()


@pytest.mark.django_db(transaction=True, databases=["default", "lite"])
def test_kill_connection_refuses_a_sqlite_alias() -> None:
    """kill_connection() on a SQLite alias refuses: only MySQL/MariaDB and PostgreSQL sessions can be killed."""
    lite = connections["lite"]
    lite.ensure_connection()
    try:
        with pytest.raises(ValueError, match="uses 'sqlite': only MySQL/MariaDB and PostgreSQL"):
            kill_connection("lite")
    finally:
        lite.close()


def test_expire_idle_times_out_while_the_server_keeps_the_session(live: None) -> None:
    """expire_idle(timeout=...) raises TimeoutError when the server has not dropped the session in time."""
    from freshconn.testing import expire_idle

    session = backend_id()
    with pytest.raises(TimeoutError, match=f"still shows session {session} after 0.05s"):
        expire_idle(timeout=0.05)
    connections["default"].close()


def test_expire_idle_inside_a_transaction_on_postgresql(live: None) -> None:
    """expire_idle() on a PostgreSQL connection inside a transaction commits so that the idle limit applies."""
    if VENDOR != "postgresql":
        pytest.skip("only PostgreSQL's idle_session_timeout ignores a session inside a transaction")
    from freshconn.testing import expire_idle

    session = backend_id()
    transaction.set_autocommit(False)
    try:
        assert expire_idle(timeout=5.0) == session
    finally:
        connections["default"].close()
        connections["default"].autocommit = True


# -- the pytest plugin ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ("--freshconn-chaos-rate=2", "--freshconn-chaos-rate must be between 0 and 1, got 2.0"),
        ("--freshconn-chaos-max=0", "--freshconn-chaos-max must be at least 1, got 0"),
    ],
)
def test_chaos_options_out_of_range_are_usage_errors(pytester: pytest.Pytester, option: str, message: str) -> None:
    """pytest --freshconn-chaos with a rate outside [0, 1] or a max below 1 stops with a usage error."""
    pytester.makepyfile(test_nothing="def test_nothing():\n    pass\n")
    result = pytester.runpytest_inprocess("-p", "no:django", "-p", "no:randomly", "--freshconn-chaos", option)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert message in result.stderr.str()


def test_chaos_without_a_seed_picks_one_and_prints_it(pytester: pytest.Pytester) -> None:
    """pytest --freshconn-chaos with no seed draws one and shows it in the header, to reproduce the run."""
    pytester.makepyfile(test_nothing="def test_nothing():\n    pass\n")
    result = pytester.runpytest_inprocess("-p", "no:django", "-p", "no:randomly", "--freshconn-chaos", "--collect-only")
    assert result.ret == pytest.ExitCode.OK
    match = re.search(r"freshconn chaos: seed (\d+), rate 0\.25, at most 3 strikes per test", result.stdout.str())
    assert match is not None, result.stdout.str()
    assert 1 <= int(match.group(1)) < 1_000_000
    assert f"--freshconn-chaos-seed={match.group(1)}" in result.stdout.str()


# -- Faust ------------------------------------------------------------------------------------------


@pytest.fixture
def faust_app() -> Iterator[Any]:
    """A Faust app whose agents are freshconn's, on its own event loop; the agents here read in-memory channels."""
    faust = pytest.importorskip("faust")
    from freshconn.contrib import faust as fc_faust

    loop = asyncio.new_event_loop()
    app = faust.App(
        f"edges-{uuid.uuid4().hex[:8]}",
        broker="kafka://127.0.0.1:1",
        store="memory://",
        web_enabled=False,
        loop=loop,
        Agent=fc_faust.Agent,
    )
    try:
        yield app
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
        # Faust's stream iterator made the app's (never started) consumer, whose thread has a loop of its own.
        if app._consumer is not None:
            app._consumer._thread.thread_loop.close()


async def orm(func: Callable[..., Any], *args: Any) -> Any:
    """``func(*args)`` in the async ORM's thread (``sync_to_async(thread_sensitive=True)``)."""
    return await sync_to_async(func, thread_sensitive=True)(*args)


async def orm_in_unit() -> bool:
    """Whether a unit is open in the async ORM's thread (where async units keep their connections)."""
    result: bool = await orm(in_unit)
    return result


async def eventually(check: Callable[[], Any], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{check.__name__} still false after {timeout} s")
        await asyncio.sleep(0.01)


def run_agent(app: Any, agent: Any, values: list[str], until: Callable[[], Any]) -> None:
    """Start ``agent`` (Faust's own service start), send it ``values`` through its channel, wait, stop it."""

    async def main() -> None:
        app.flow_control.resume()  # as Faust's worker does once it has its assignment
        await agent.start()
        try:
            for value in values:
                await agent.send(value=value)
            await eventually(until)
        finally:
            await asyncio.wait_for(agent.stop(), 10)  # a stop that hangs fails the test instead

    app.loop.run_until_complete(main())


@pytest.mark.parametrize("kind", ["returns", "yields"])
def test_faust_an_agent_that_ends_closes_the_unit_of_its_last_event(live: None, faust_app: Any, kind: str) -> None:
    """Faust: an agent that leaves its loop and ends (returning or as an async generator) ends its last event's unit."""
    app = faust_app
    handled: list[str] = []

    async def handle(value: str) -> None:
        handled.append(value)
        await Order.objects.acreate(ref=value)

    async def returning(stream: Any) -> None:
        async for value in stream:
            await handle(value)
            if value.startswith("last"):
                break

    async def yielding(stream: Any) -> Any:
        async for value in stream:
            await handle(value)
            yield value
            if value.startswith("last"):
                break

    agent = app.agent(app.channel())(returning if kind == "returns" else yielding)

    async def ended() -> bool:
        return handled == ["one", "last"] and not await orm_in_unit()

    run_agent(app, agent, ["one", "last"], ended)
    assert counters()["units"] == 2
    assert Order.objects.count() == 2


def test_faust_a_yielding_agent_that_crashes_ends_the_unit_with_its_error(live: None, faust_app: Any) -> None:
    """Faust: an async-generator agent whose event loses its connection ends that unit with the error, at once."""
    app = faust_app
    crashed: list[str] = []
    from mode import CrashingSupervisor

    # The agent's crash is final here (Faust's default supervisor would restart its actor).
    async def crashing(stream: Any) -> Any:
        async for value in stream:
            if value == "crash":
                crashed.append(value)
                await orm(kill_then_query, value)  # raises the disconnect out of the agent
            yield value

    agent = app.agent(app.channel(), supervisor_strategy=CrashingSupervisor)(crashing)

    async def discarded() -> bool:
        return bool(crashed) and not await orm_in_unit()

    run_agent(app, agent, ["crash"], discarded)
    assert counters()["discarded_error"] == 1
    assert Order.objects.filter(ref="crash").count() == 1


def test_faust_a_stream_iterated_inside_an_event_joins_that_events_unit(live: None, faust_app: Any) -> None:
    """Faust: an agent that reads the next event while handling one (nested iteration) handles both in one unit."""
    app = faust_app
    pairs: list[tuple[str, str, bool]] = []

    async def pairing(stream: Any) -> None:
        async for first in stream:
            async for second in stream:
                pairs.append((first, second, await orm_in_unit()))
                break

    agent = app.agent(app.channel())(pairing)

    async def paired() -> bool:
        return len(pairs) == 2

    run_agent(app, agent, ["a", "b", "c", "d"], paired)
    assert pairs == [("a", "b", True), ("c", "d", True)]
    assert counters()["units"] == 2  # one per outer event, the inner ones inside it


def test_faust_every_stream_of_an_agent_class_shares_one_stream_class(faust_app: Any) -> None:
    """Faust: the streams an agent makes (one per actor, one per restart) reuse one generated stream class."""
    app = faust_app

    async def draining(stream: Any) -> None:
        async for _ in stream:
            pass

    agent = app.agent(app.channel())(draining)

    first, second = agent.stream(), agent.stream()
    assert type(first) is type(second)
    assert isinstance(first, app.conf.Stream)
    assert type(first) is not app.conf.Stream


# -- Kafka ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tansu() -> Iterator[Any]:
    """A Kafka-protocol broker (Tansu) for this module's Kafka tests."""
    from testbed.servers import Tansu

    with Tansu() as srv:
        yield srv


@pytest.fixture
def kafka_consumer(tansu: Any, live: None) -> Iterator[tuple[Any, Callable[..., None]]]:
    """A confluent-kafka consumer assigned partition 0 of a fresh topic, and a function producing to that topic."""
    confluent_kafka = pytest.importorskip("confluent_kafka")
    # confluent-kafka's admin module re-exports NewTopic (from cimpl) without marking it as exported.
    from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

    topic = f"edges-{uuid.uuid4().hex[:10]}"
    admin = AdminClient({"bootstrap.servers": tansu.bootstrap})
    for future in admin.create_topics([NewTopic(topic, 1, 1)]).values():
        future.result(10)
    consumer = confluent_kafka.Consumer(
        {
            "bootstrap.servers": tansu.bootstrap,
            "group.id": f"g-{topic}",
            "enable.auto.commit": False,
            "enable.partition.eof": True,
        }
    )
    consumer.assign([confluent_kafka.TopicPartition(topic, 0, confluent_kafka.OFFSET_BEGINNING)])

    def produce(*values: str) -> None:
        producer = confluent_kafka.Producer({"bootstrap.servers": tansu.bootstrap})
        for value in values:
            producer.produce(topic, value=value.encode())
        assert producer.flush(10) == 0

    try:
        yield consumer, produce
    finally:
        consumer.close()


def committed_offset(consumer: Any) -> int:
    (tp,) = consumer.committed(consumer.assignment() or [], timeout=10) or [None]
    return max(int(tp.offset), 0) if tp is not None else 0


@pytest.mark.kafka
def test_kafka_a_disconnect_past_its_retries_propagates_with_nothing_committed(
    kafka_consumer: tuple[Any, Callable[..., None]],
) -> None:
    """Kafka: the same message failing on a disconnect again past disconnect_retries propagates; its offset stays."""
    from django.db.utils import OperationalError

    from freshconn.contrib import kafka as fc_kafka

    consumer, produce = kafka_consumer
    produce("k-0")
    attempts: list[int] = []

    def handler(msg: Any) -> None:
        attempts.append(msg.offset())
        Order.objects.count()
        kill_connection()
        Order.objects.count()  # a disconnect, on every delivery

    with pytest.raises(OperationalError):
        fc_kafka.consume(consumer, handler, poll_timeout=0.2, disconnect_retries=1)
    assert attempts == [0, 0]  # redelivered once, then given up
    assert committed_offset(consumer) == 0
    assert counters()["discarded_error"] == 2


@pytest.mark.kafka
def test_kafka_a_failed_rewind_is_logged_and_the_error_propagates(
    kafka_consumer: tuple[Any, Callable[..., None]], caplog: pytest.LogCaptureFixture
) -> None:
    """Kafka: when the partition is gone before the rewind (revoked meanwhile), that failure is logged, not raised."""
    from freshconn.contrib import kafka as fc_kafka

    consumer, produce = kafka_consumer
    produce("k-0")
    caplog.set_level(logging.WARNING, logger="freshconn")

    def handler(msg: Any) -> None:
        consumer.unassign()  # what a rebalance does to a partition while its message is being handled
        raise ValueError("the handler failed")

    with pytest.raises(ValueError, match="the handler failed"):
        fc_kafka.consume(consumer, handler, poll_timeout=0.2)
    (record,) = [r for r in caplog.records if getattr(r, "reason", None) == "rewind_failed"]
    assert record.getMessage().startswith(f"could not rewind to {consumer_topic(consumer, record)}")


def consumer_topic(consumer: Any, record: logging.LogRecord) -> str:
    assert isinstance(record.args, tuple)
    topic, partition, offset = record.args[:3]
    return f"{topic}[{partition}]@{offset}"


@pytest.mark.kafka
def test_kafka_end_of_partition_events_are_not_messages(
    kafka_consumer: tuple[Any, Callable[..., None]], caplog: pytest.LogCaptureFixture
) -> None:
    """Kafka: confluent-kafka's end-of-partition events are logged at DEBUG and never reach the handler."""
    from freshconn.contrib import kafka as fc_kafka

    consumer, produce = kafka_consumer
    produce("k-0")
    caplog.set_level(logging.DEBUG, logger="freshconn")
    handled: list[str] = []

    def events() -> list[logging.LogRecord]:
        return [r for r in caplog.records if getattr(r, "reason", None) == "kafka_event"]

    done = fc_kafka.consume(
        consumer, lambda msg: handled.append(msg.value().decode()), poll_timeout=0.2, stop=lambda: bool(events())
    )
    assert (done, handled) == (1, ["k-0"])
    (event,) = events()
    assert event.levelno == logging.DEBUG
    assert committed_offset(consumer) == 1


@pytest.mark.kafka
def test_kafka_aconsume_refuses_a_sync_client(kafka_consumer: tuple[Any, Callable[..., None]]) -> None:
    """Kafka: aconsume() given a confluent-kafka consumer refuses it, naming the client it needs."""
    from freshconn.contrib import kafka as fc_kafka

    consumer, _ = kafka_consumer
    with pytest.raises(TypeError, match=r"aconsume\(\) needs an aiokafka.AIOKafkaConsumer, got Consumer"):
        asyncio.run(fc_kafka.aconsume(consumer, lambda msg: None))
