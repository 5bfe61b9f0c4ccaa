"""Operational edges: bad settings, odd or unreachable aliases, pool, outage and retry corners, WorkerCommand."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import django
import pytest
from django.core.exceptions import ImproperlyConfigured
from django.core.management import call_command
from django.db import Error, connection, connections, transaction
from django.db.backends.signals import connection_created
from django.test import override_settings
from testbed.servers import DBServer, free_port

import freshconn
from freshconn import _audit, _inspect, _judge, _outage, _pool, _probe, _retry, _state, checks, conf
from freshconn.command import WorkerCommand, policy_summary
from freshconn.testing import kill_connection
from tests.app.models import Order
from tests.conftest import DRIVER, SHORT_TIMEOUT, VENDOR, counters, short_server_timeout_options, subprocess_env
from tests.test_doctor import alias as doctor_alias
from tests.test_doctor import database, doctor_json, verdict_ids

from .tempalias import temp_alias

pytestmark = pytest.mark.server
pytest_plugins = ("pytester",)


# --- FRESHCONN settings -------------------------------------------------------------------------


def test_adopt_close_old_connections_must_be_a_bool() -> None:
    """ADOPT_CLOSE_OLD_CONNECTIONS = "yes" is refused, naming the setting, the value and the fix."""
    with pytest.raises(ImproperlyConfigured) as err:
        conf.load({"ADOPT_CLOSE_OLD_CONNECTIONS": "yes"})
    message = str(err.value)
    assert "FRESHCONN['ADOPT_CLOSE_OLD_CONNECTIONS'] must be True or False, got str 'yes'" in message
    assert "Fix: FRESHCONN = {'ADOPT_CLOSE_OLD_CONNECTIONS': True" in message


def test_stats_log_interval_zero_is_refused_with_the_fix() -> None:
    """STATS_LOG_INTERVAL = 0 (a line per unit) is refused, naming the setting and the two fixes."""
    with pytest.raises(ImproperlyConfigured) as err:
        conf.load({"STATS_LOG_INTERVAL": 0})
    message = str(err.value)
    assert "FRESHCONN['STATS_LOG_INTERVAL'] must be above 0" in message
    assert "Fix: use None (no periodic line) or e.g. 300." in message


@pytest.mark.parametrize(
    ("override", "shown"),
    [(None, "CONN_MAX_AGE=None (no lifetime limit)"), (0, "CONN_MAX_AGE=0 (closed after every unit)")],
    ids=["none", "zero"],
)
def test_policy_summary_spells_out_an_unlimited_or_zero_lifetime(override: float | None, shown: str) -> None:
    """FRESHCONN['CONN_MAX_AGE'] None or 0 is shown in words in the start-up line, not as a bare number."""
    with override_settings(FRESHCONN={"CONN_MAX_AGE": override}):
        line = policy_summary("default")
    assert f"default: {VENDOR} via " in line
    assert shown in line


# --- settings views of odd aliases -------------------------------------------------------------


def test_an_alias_whose_backend_cannot_load_is_described_without_raising() -> None:
    """An alias whose ENGINE does not import is judged from its settings: vendor and driver 'unknown', no crash."""
    with temp_alias("broken", {"ENGINE": "no_such_backend.anywhere", "NAME": "x", "HOST": "db.example", "PORT": "5"}):
        assert _audit.vendor_of("broken") == "unknown"
        assert _audit.driver_name("broken") == "unknown"
        view = _audit.alias_settings("broken")
        assert view.vendor == "unknown"
        assert view.host == "db.example"
        assert view.configured_port == 5


@pytest.mark.parametrize(
    ("host", "port", "expected"),
    [("/var/run/db", "", None), ("127.0.0.1", "not-a-port", None), ("127.0.0.1", "", "default")],
    ids=["unix-socket", "unparsable", "vendor-default"],
)
def test_configured_port_of_a_socket_or_unparsable_port(
    server: DBServer, host: str, port: str, expected: str | None
) -> None:
    """The port compared with the server's is None for a Unix socket or a bad PORT, else the vendor's default."""
    with temp_alias("ports", server.django_settings(HOST=host, PORT=port)):
        got = _audit.alias_settings("ports").configured_port
    assert got == ({"mysql": 3306, "postgresql": 5432}[VENDOR] if expected == "default" else None)


def test_libpq_keepalives_switch_is_not_judged_as_a_duration() -> None:
    """keepalives=0 is libpq's on/off switch: never reported as a timeout that waits forever."""
    assert _audit.timeout_problem("psycopg", "keepalives", 0) is None
    assert _audit.timeout_problem("psycopg", "keepalives_idle", 0) is not None


def test_server_flags_and_numbers_as_drivers_return_them() -> None:
    """Server flags given as bytes are read like strings, and a missing variable stays None."""
    assert _inspect._on(b"ON") is True
    assert _inspect._on(b"OFF") is False
    assert _inspect._number(None) is None
    assert _inspect._number("1.5") == 1.5


def test_inspecting_a_sqlite_alias_is_refused_naming_it() -> None:
    """Only server aliases are inspected: asking for SQLite's limits says which alias and why."""
    with pytest.raises(ValueError, match=r"alias 'lite' is 'sqlite': only MySQL/MariaDB and PostgreSQL"):
        _inspect.inspect("lite")


# --- system checks -----------------------------------------------------------------------------


def test_server_checks_skip_a_serverless_alias() -> None:
    """check --database lite finds nothing to ask: SQLite has no server limits, and no connection is tried."""
    assert checks.check_servers(databases=["lite"]) == []


def test_concurrency_check_skips_an_unreachable_server(server: DBServer) -> None:
    """check_concurrency() leaves an unreachable server to the server checks: no W010 and no error."""
    dead = server.django_settings(PORT=str(free_port()), OPTIONS={"connect_timeout": 2})
    with temp_alias("dead1", dead), temp_alias("dead2", dead):
        started = time.monotonic()
        assert checks.check_concurrency(100_000, databases=["dead1", "dead2", "lite"]) == []
        assert time.monotonic() - started < 5


# --- the pool ----------------------------------------------------------------------------------


def test_pool_check_hands_out_a_connection_it_knows_nothing_about(live: None) -> None:
    """A raw connection freshconn has no state for is handed out by the pool check as is, still open."""
    with _inspect.raw_connection("default") as raw:
        assert getattr(raw, _pool.RAW_STATE_ATTR, None) is None
        _pool.check(raw)  # returns: the pool hands it out (a refusal raises)
        cursor = raw.cursor()
        cursor.execute("SELECT 1")
        assert cursor.fetchone()[0] == 1
        cursor.close()


def test_install_pools_ignores_a_pooled_alias_whose_backend_cannot_load() -> None:
    """An alias with OPTIONS['pool'] but a backend that does not import is left to Django's own error."""
    settings_dict = {"ENGINE": "no_such_backend.anywhere", "NAME": "x", "CONN_MAX_AGE": 0, "OPTIONS": {"pool": True}}
    with temp_alias("brokenpool", settings_dict):
        _pool.install_pools(_state.raw_state)
        assert _pool.forget_inherited_pools([], _state.raw_state) == 0
        with pytest.raises(ImproperlyConfigured):
            connections["brokenpool"]


def _default_pools() -> dict[str, Any] | None:
    return _pool.pools_of(type(connections["default"]))


@pytest.fixture
def pool_options(dbconf: Callable[..., None]) -> Iterator[Callable[[dict[str, Any]], None]]:
    """Put the default alias on OPTIONS['pool'] (CONN_MAX_AGE 0); any pool built for it is closed after."""

    def use(pool: dict[str, Any]) -> None:
        dbconf(CONN_MAX_AGE=0, OPTIONS={"pool": pool})

    yield use
    connections["default"].close()
    pools = _default_pools()
    if pools is not None:
        made = pools.pop("default", None)
        if made is not None:
            made.close()


@pytest.mark.skipif(
    DRIVER == "psycopg" and django.VERSION >= (5, 1), reason="here the pool can be built (tests/test_pool.py)"
)
def test_install_pools_builds_nothing_where_django_has_no_pool(
    pool_options: Callable[[dict[str, Any]], None],
) -> None:
    """Without psycopg 3 or Django 5.1+, freshconn builds no pool for OPTIONS['pool']: Django reports it."""
    pool_options({"min_size": 1})
    _pool.install_pools(_state.raw_state)
    pools = _default_pools()
    assert pools is None or "default" not in pools
    assert _pool.forget_inherited_pools([], _state.raw_state) == 0


psycopg_pool_only = pytest.mark.skipif(
    DRIVER != "psycopg" or django.VERSION < (5, 1), reason="Django's pool needs psycopg 3, Django 5.1+"
)


@psycopg_pool_only
def test_install_pools_never_overrides_a_check_of_the_users_own(
    pool_options: Callable[[dict[str, Any]], None],
) -> None:
    """OPTIONS['pool'] with its own check: freshconn builds no pool rather than replace the user's check."""

    def own_check(raw: Any) -> None:
        return None

    pool_options({"min_size": 1, "check": own_check})
    _pool.install_pools(_state.raw_state)
    pools = _default_pools()
    assert pools is not None
    assert "default" not in pools


@psycopg_pool_only
def test_install_pools_keeps_a_pool_already_built(pool_options: Callable[[dict[str, Any]], None]) -> None:
    """A second install_pools() (settings reloaded) keeps the pool in use instead of building another."""
    pool_options({"min_size": 1, "max_size": 2, "timeout": 10})
    _pool.install_pools(_state.raw_state)
    pools = _default_pools()
    assert pools is not None
    first = pools["default"]
    _pool.install_pools(_state.raw_state)
    assert pools["default"] is first


@psycopg_pool_only
def test_a_pooled_connection_idle_past_check_after_idle_is_pinged_and_reused(
    pool_options: Callable[[dict[str, Any]], None],
) -> None:
    """A pooled connection idle past CHECK_AFTER_IDLE is pinged once at checkout and handed out again."""
    pool_options({"min_size": 1, "max_size": 1, "timeout": 10})
    _pool.install_pools(_state.raw_state)
    with override_settings(FRESHCONN={"CHECK_AFTER_IDLE": 0.1}):
        with freshconn.unit_of_work():
            Order.objects.count()
        freshconn.reset_stats()
        time.sleep(0.3)
        with freshconn.unit_of_work():
            assert Order.objects.count() == 0
    c = counters()
    assert c["pings"] == 1
    assert c.get("discarded", 0) == 0
    assert c.get("connects", 0) == 0


# --- outages -----------------------------------------------------------------------------------


def test_a_reconnect_that_meets_a_settings_error_fails_at_once(dbconf: Callable[..., None]) -> None:
    """After a lost connection, a reconnect refused for a reason waiting cannot fix fails at once, not after a wait."""
    dbconf()
    with pytest.raises(Error), freshconn.unit_of_work():
        Order.objects.count()
        kill_connection()
        Order.objects.count()
    name = connections["default"].settings_dict["NAME"]
    dbconf(NAME="freshconn_no_such_db")
    started = time.monotonic()
    with pytest.raises(Error) as err, freshconn.unit_of_work():
        Order.objects.count()
    assert time.monotonic() - started < 5  # RECONNECT_TIMEOUT is 60 s
    assert "freshconn_no_such_db" in str(err.value)
    assert counters().get("reconnect_waits", 0) == 0
    # The gate was handed back: with good settings again, the next unit connects at once.
    dbconf(NAME=name)
    with freshconn.unit_of_work():
        assert Order.objects.count() == 0


class _Deadline(BaseException):
    """A BaseException that is not about the database (a gevent.Timeout, a task's hard time limit)."""


def test_an_interruption_while_reconnecting_lets_the_next_unit_try_at_once(live: None) -> None:
    """A BaseException during a patient reconnect propagates as is, and the next unit reconnects without a wait."""
    with pytest.raises(Error), freshconn.unit_of_work():
        Order.objects.count()
        kill_connection()
        Order.objects.count()
    fired: list[int] = []

    def interrupt(sender: Any, connection: Any, **kwargs: Any) -> None:
        if not fired:
            fired.append(1)
            raise _Deadline

    connection_created.connect(interrupt)
    try:
        with pytest.raises(_Deadline), freshconn.unit_of_work():
            pass
    finally:
        connection_created.disconnect(interrupt)
    assert fired == [1]
    connection.close()  # Django had opened it before the signal that interrupted the unit
    started = time.monotonic()
    with freshconn.unit_of_work():
        assert Order.objects.count() == 0
    assert time.monotonic() - started < 2
    assert counters().get("reconnect_waits", 0) == 0


def test_a_settings_error_right_after_a_recovery_fails_at_once(dbconf: Callable[..., None]) -> None:
    """Within the moments after a reconnect succeeded, a reconnect that meets a settings error still fails at once."""
    dbconf()
    for _ in range(2):
        with pytest.raises(Error), freshconn.unit_of_work():
            Order.objects.count()
            kill_connection()
            Order.objects.count()
        if _ == 0:
            with freshconn.unit_of_work():  # reconnects: the gate is open for the next couple of seconds
                Order.objects.count()
    name = connections["default"].settings_dict["NAME"]
    dbconf(NAME="freshconn_no_such_db")
    started = time.monotonic()
    with pytest.raises(Error, match="freshconn_no_such_db"), freshconn.unit_of_work():
        pass
    assert time.monotonic() - started < 2
    dbconf(NAME=name)
    with freshconn.unit_of_work():
        assert Order.objects.count() == 0


def test_a_stop_signal_ends_the_wait_even_while_another_thread_holds_the_outage_lock(
    dbconf: Callable[..., None],
) -> None:
    """A SIGTERM while another thread holds the outage lock still ends the main thread's wait for a server."""
    dbconf(PORT=str(free_port()), OPTIONS={"connect_timeout": 2})
    stops: list[int] = []
    held: list[bool] = []

    def hold_the_lock_and_signal() -> None:
        deadline = time.monotonic() + 10
        while counters().get("reconnect_waits", 0) < 1 and time.monotonic() < deadline:
            time.sleep(0.005)
        with _outage._cond:
            held.append(True)
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.3)  # the handler runs meanwhile and must not block on the lock

    previous = signal.signal(signal.SIGTERM, lambda signum, frame: stops.append(signum))
    helper = threading.Thread(target=hold_the_lock_and_signal)
    try:
        with override_settings(FRESHCONN={"RECONNECT_TIMEOUT": 30.0}):
            helper.start()
            started = time.monotonic()
            with pytest.raises(freshconn.ReconnectStopped), freshconn.unit_of_work():
                Order.objects.count()
            assert time.monotonic() - started < 5
    finally:
        helper.join()
        signal.signal(signal.SIGTERM, previous)
        _outage.reset()
    assert held == [True]
    assert stops == [signal.SIGTERM]


def test_probing_for_zero_seconds_is_refused() -> None:
    """probe_idle() needs a positive span: 0 or infinity is refused, naming max_seconds."""
    for bad in (0.0, float("inf")):
        with pytest.raises(ValueError, match="max_seconds must be a positive number of seconds"):
            _probe.probe_idle("default", bad)


def _app_sessions(server: DBServer) -> int:
    if VENDOR == "mysql":
        return int(server.admin_sql("SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE USER = 'app'").strip())
    return int(server.admin_sql("SELECT count(*) FROM pg_stat_activity WHERE usename = 'app'").strip())


def _limit_app_sessions(server: DBServer, limit: int) -> None:
    if VENDOR == "mysql":
        server.admin_sql(f"ALTER USER 'app'@'%' WITH MAX_USER_CONNECTIONS {limit}")
    else:
        server.admin_sql(f"ALTER ROLE app CONNECTION LIMIT {limit}")


def test_doctor_reports_a_probe_that_cannot_open_its_connections(server: DBServer) -> None:
    """With room for one more session only, the doctor still reads the server and says why the probe could not run."""
    with doctor_alias(server):
        try:
            _limit_app_sessions(server, _app_sessions(server) + 1)
            code, data = doctor_json("--database", "doc", "--probe-idle", "5")
        finally:
            _limit_app_sessions(server, 0 if VENDOR == "mysql" else -1)
    verdicts = verdict_ids(data)
    assert verdicts.get("probe-failed") is not None, verdicts
    assert "unreachable" not in verdicts
    failed = next(v for v in database(data)["verdicts"] if v["id"] == "probe-failed")
    assert "The idle probe could not run" in failed["message"]
    assert "the probe opens six at once" in failed["fix"]
    assert code != 0


@pytest.mark.skipif(VENDOR != "mysql", reason="max_allowed_packet is MySQL's")
def test_doctor_warns_about_a_small_max_allowed_packet(server: DBServer) -> None:
    """A server whose max_allowed_packet is 4 MiB gets a finding: larger rows look like disconnects."""
    before = server.admin_sql("SELECT @@GLOBAL.max_allowed_packet").strip()
    with doctor_alias(server):
        try:
            server.admin_sql(f"SET GLOBAL max_allowed_packet = {4 * 1024 * 1024}")
            _, data = doctor_json("--database", "doc")
        finally:
            server.admin_sql(f"SET GLOBAL max_allowed_packet = {before}")
    assert "small-max-allowed-packet" in verdict_ids(data)
    found = next(v for v in database(data)["verdicts"] if v["id"] == "small-max-allowed-packet")
    assert "max_allowed_packet is 4 MiB" in found["message"]


def test_a_probe_that_finds_the_servers_own_idle_limit_adds_no_finding(server: DBServer) -> None:
    """A probe whose connections died at the server's own idle limit adds nothing; one dying well before it warns."""
    with doctor_alias(server, OPTIONS=short_server_timeout_options()):
        view = _audit.alias_settings("doc")
        facts = _inspect.inspect("doc")
    assert facts.idle_limit == SHORT_TIMEOUT
    at_the_limit = _probe.ProbeResult(max_seconds=4, survived=SHORT_TIMEOUT - 0.1, died=SHORT_TIMEOUT + 0.1)
    assert _judge.probe_hits(view, conf.get(), facts, at_the_limit) == []
    early = _probe.ProbeResult(max_seconds=4, survived=0.5, died=0.8)
    assert [h.finding.doctor_id for h in _judge.probe_hits(view, conf.get(), facts, early)] == ["hidden-idle-limit"]


# --- retries -----------------------------------------------------------------------------------


def test_a_retrying_function_in_the_callers_transaction_warns_once(
    live: None, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each disconnect in the caller's transaction is counted, but the explanation is logged only once."""
    monkeypatch.setattr(_retry, "_warned_in_transaction", False)

    @freshconn.unit_of_work(retries=3)
    def inner() -> None:
        Order.objects.count()
        kill_connection()
        Order.objects.count()

    for _ in range(2):
        with pytest.raises(Error), freshconn.unit_of_work(), transaction.atomic():
            inner()
    assert counters()["not_retried_in_transaction"] == 2
    assert caplog.text.count("inside the caller's transaction") == 1


def test_a_retrying_function_in_the_callers_transaction_returns_or_raises_as_is(live: None) -> None:
    """In the caller's transaction a retrying function returns its value, and a non-database error passes through."""

    @freshconn.unit_of_work(retries=3)
    def create(ref: str) -> int:
        return int(Order.objects.create(ref=ref).pk)

    @freshconn.unit_of_work(retries=3)
    def fail() -> None:
        raise KeyError("not a database error")

    with freshconn.unit_of_work(), transaction.atomic():
        pk = create("in-tx")
        with pytest.raises(KeyError):
            fail()
    assert Order.objects.get(pk=pk).ref == "in-tx"
    assert counters().get("not_retried_in_transaction", 0) == 0


def test_a_stop_while_waiting_for_the_database_is_never_retried(
    dbconf: Callable[..., None], caplog: pytest.LogCaptureFixture
) -> None:
    """A unit stopped while it waited for its server raises ReconnectStopped once, with no retry."""
    calls: list[int] = []

    @freshconn.unit_of_work(retries=3)
    def work() -> int:
        calls.append(1)
        return int(Order.objects.count())

    dbconf(PORT=str(free_port()), OPTIONS={"connect_timeout": 2})
    _outage.request_stop()
    try:
        with pytest.raises(freshconn.ReconnectStopped):
            work()
    finally:
        _outage.reset()
    assert calls == [1]
    assert counters()["not_retried_unsafe"] == 1
    assert "a stop signal arrived while waiting for the database" in caplog.text


# --- WorkerCommand ------------------------------------------------------------------------------


class _Bare(WorkerCommand):
    pass


def test_a_worker_command_without_its_methods_says_which_to_implement() -> None:
    """A WorkerCommand subclass that implements neither method fails naming messages() and handle_message()."""
    cmd = _Bare()
    with pytest.raises(NotImplementedError, match=r"implement messages\(\)"):
        cmd.messages()
    with pytest.raises(NotImplementedError, match=r"implement handle_message\(message\)"):
        cmd.handle_message("m")


class _ListWorker(WorkerCommand):
    """Consumes a plain list (an iterator with no close()), writing one Order per message."""

    def messages(self) -> Iterable[Any]:
        return ["a", "b"]

    def handle_message(self, message: Any) -> None:
        Order.objects.create(ref=message)


def test_a_worker_command_consumes_a_source_without_close(live: None) -> None:
    """A list as the message source: each message is one unit, and the command ends when the list does."""
    _ListWorker().run_from_argv(["manage.py", "worker", "--verbosity", "0"])
    assert sorted(Order.objects.values_list("ref", flat=True)) == ["a", "b"]
    assert counters()["units"] == 2


class _StoppedWhileWaiting(WorkerCommand):
    """Its first message finds the server gone and a SIGTERM arrives during the wait."""

    def __init__(self, port: str) -> None:
        super().__init__()
        self.port = port
        self.handled: list[Any] = []

    def messages(self) -> Iterable[Any]:
        return iter(["first", "second"])

    def handle_message(self, message: Any) -> None:
        self.handled.append(message)
        connection.close()
        connection.settings_dict["PORT"] = self.port
        threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGTERM)).start()
        Order.objects.count()


@pytest.mark.skipif(
    threading.current_thread() is not threading.main_thread(), reason="signals reach only the main thread"
)
def test_a_stop_while_a_message_waits_for_the_database_hands_the_message_back(
    dbconf: Callable[..., None], caplog: pytest.LogCaptureFixture
) -> None:
    """SIGTERM while a message waits for its database: the wait ends, the message is handed back, the loop stops."""
    dbconf(OPTIONS={"connect_timeout": 2})
    cmd = _StoppedWhileWaiting(str(free_port()))
    started = time.monotonic()
    with caplog.at_level(logging.INFO, logger="freshconn"):
        call_command(cmd, verbosity=0)
    assert time.monotonic() - started < 10
    assert cmd.handled == ["first"]
    assert cmd.should_stop()
    assert "a message fetched after it was not started" in caplog.text


# --- pytest --freshconn-chaos -------------------------------------------------------------------

CHAOS_WORKER = '''
"""Code under test that only libraries call, and a naive loop."""
from concurrent.futures import ThreadPoolExecutor

import freshconn
from django.db import connections

from tests.app.models import Order


def handle_naively(ref):
    Order.objects.filter(ref=ref).exists()
    Order.objects.create(ref=ref)


def from_library_threads():
    """Statements and units whose whole call stack is library code (a thread pool's worker)."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        pool.submit(Order.objects.get_or_create, ref="lib").result()
        pool.submit(list, freshconn.each(["a", "b"])).result()
        pool.submit(connections.close_all).result()


def units_on_other_aliases():
    """A unit on the SQLite alias only, then one on default while its connection is closed: nothing to strike."""
    with freshconn.unit_of_work(using="lite"):
        with connections["lite"].cursor() as cursor:
            cursor.execute("SELECT 1")
    connections["default"].close()
    with freshconn.unit_of_work():
        pass
'''

CHAOS_TESTS = """
import pytest

import worker
from tests.app.models import Order


@pytest.mark.django_db(transaction=True)
def test_naive():
    for i in range(4):
        worker.handle_naively(f"n-{i}")


@pytest.mark.django_db(transaction=True)
def test_library_threads():
    worker.from_library_threads()
    assert Order.objects.filter(ref="lib").count() == 1
    pytest.fail("this test's own failure, after the strike")


@pytest.fixture
def unit_in_setup():
    import freshconn

    with freshconn.unit_of_work():  # outside the test's body: never struck
        pass


@pytest.mark.django_db(transaction=True, databases=["default", "lite"])
def test_other_aliases(unit_in_setup):
    worker.units_on_other_aliases()
"""


def test_chaos_summary_when_no_struck_test_survived(
    pytester: pytest.Pytester, live: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run whose struck tests all failed lists each with its strikes ('?' where no user code ran), no survivor."""
    for key, value in subprocess_env().items():
        monkeypatch.setenv(key, value)
    pytester.makepyfile(worker=CHAOS_WORKER, test_user=CHAOS_TESTS)
    result = pytester.runpytest_subprocess(
        "-p", "no:randomly", "-p", "no:cacheprovider", "--reuse-db", "--freshconn-chaos",
        "--freshconn-chaos-seed=3", "--freshconn-chaos-rate=1", "--freshconn-chaos-max=1",
    )  # fmt: skip
    out = result.stdout.str()
    summary = out[out.index("freshconn chaos ==") :]
    lost = summary[summary.index("did not survive:") :]
    assert "test_user.py::test_naive" in lost
    assert "kill at outside units on 'default' (worker.py:" in lost
    assert "test_user.py::test_library_threads" in lost
    assert "at unit start on 'default' (?)" in lost
    assert "survived:\n" not in summary.replace("did not survive:\n", "")
    assert "; 0 survived, 2 did not" in summary
    assert "reproduce: pytest --freshconn-chaos --freshconn-chaos-seed=3" in summary
    result.assert_outcomes(passed=1, failed=2)
