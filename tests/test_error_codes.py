"""Every disconnect code freshconn knows, triggered for real on this driver, and errors that must stay live.

Each test makes the server (or the client library) produce the error, then checks what the driver
reported (MySQL error number, SQLSTATE or its wording), ``is_disconnect`` on the raw driver error and
on Django's wrapper, and ``is_unsent`` where the difference matters (a statement refused before it
was sent may be retried; one lost during the query may have run). Codes that the test bed's servers
cannot produce (MySQL 8's 4031, MariaDB's 1927/1053 on this version) are skipped or noted with the
reason. Non-disconnects (a syntax error, a unique violation, a read-only refusal, KILL QUERY) must
stay False, or a worker would discard a healthy connection.
"""

from __future__ import annotations

import contextlib
import gc
import os
import resource
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from django.db import Error, connections
from django.test import override_settings
from testbed.servers import DBServer, MariaDB, PostgreSQL, free_port

import freshconn
from freshconn import _errors, _redact
from freshconn.testing import expire_idle, kill_connection
from tests.conftest import DRIVER, VENDOR, admin_connection, backend_id, wait_until_socket_shows_close
from tests.tempalias import temp_alias

pytestmark = pytest.mark.server

MYSQL = VENDOR == "mysql"
mysql_only = pytest.mark.skipif(not MYSQL, reason="MySQL/MariaDB error codes")
pg_only = pytest.mark.skipif(MYSQL, reason="PostgreSQL SQLSTATEs")


def code(exc: BaseException) -> Any:
    """What the driver reported: the MySQL error number, else the SQLSTATE (None when libpq gave none)."""
    if MYSQL:
        return exc.args[0] if exc.args else None
    return getattr(exc, "sqlstate", None) or getattr(exc, "pgcode", None)


def failure(action: Callable[[], Any]) -> tuple[Error, BaseException]:
    """Run ``action``; return Django's error and the driver's own one (its ``__cause__``)."""
    with pytest.raises(Error) as info:
        action()
    raw = info.value.__cause__
    assert raw is not None, f"Django did not chain the driver's error: {info.value!r}"
    assert type(raw).__module__.split(".")[0] in ("MySQLdb", "pymysql", "mysql", "psycopg", "psycopg2")
    return info.value, raw


def assert_gone(
    action: Callable[[], Any], expected: Any, *, unsent: bool | None = None, text: str = ""
) -> BaseException:
    """``action`` fails with a disconnect: raw and wrapped, with the ``expected`` code(s) and wording."""
    wrapped, raw = failure(action)
    seen = code(raw)
    assert seen in (expected if isinstance(expected, (set, frozenset)) else {expected}), f"{seen!r}: {raw!r}"
    assert text.lower() in str(raw).lower(), raw
    assert freshconn.is_disconnect(raw), raw
    assert freshconn.is_disconnect(wrapped), wrapped
    assert not freshconn.is_read_only(wrapped)
    if unsent is not None:
        assert _errors.is_unsent(wrapped) is unsent, raw
    return raw


def assert_live(action: Callable[[], Any], expected: Any) -> BaseException:
    """``action`` fails with an error after which the session is still usable: never a disconnect."""
    wrapped, raw = failure(action)
    assert code(raw) == expected, raw
    assert not freshconn.is_disconnect(raw), raw
    assert not freshconn.is_disconnect(wrapped), wrapped
    return raw


def run(sql: str, alias: str = "default") -> Any:
    with connections[alias].cursor() as cursor:
        cursor.execute(sql)
        return cursor.fetchall() if cursor.description else None


def connect(alias: str) -> None:
    connections[alias].ensure_connection()


@contextlib.contextmanager
def other_alias(server: DBServer, **changes: Any) -> Iterator[str]:
    """Alias "codes" on the test server with the test's driver, short connect timeout, ``changes`` applied."""
    settings = server.django_settings(CONN_MAX_AGE=None, **changes)
    settings["ENGINE"] = connections["default"].settings_dict["ENGINE"]
    settings.setdefault("OPTIONS", {}).setdefault("connect_timeout", 3)
    with temp_alias("codes", settings):
        yield "codes"


def soon(sql_admin: Callable[[], Any], delay: float = 0.3) -> threading.Timer:
    timer = threading.Timer(delay, sql_admin)
    timer.start()
    return timer


def admin(server: DBServer, sql: str, params: list[Any] | None = None) -> None:
    raw = admin_connection(server)
    try:
        cursor = raw.cursor()
        cursor.execute(sql, params) if params else cursor.execute(sql)
        cursor.close()
    finally:
        raw.close()


# -- failed connects: nothing was sent, the server cannot be reached ---------------------------------


def test_closed_port(live: None, server: DBServer) -> None:
    """Nothing listens on the port: 2002 (libmariadb says 2002 for TCP too) / 2003, or libpq's wording."""
    expected = {"mysqlclient": 2002, "pymysql": 2003, "mysqlconnector": 2003}.get(DRIVER)
    with other_alias(server, PORT=str(free_port())) as alias:
        raw = assert_gone(lambda: connect(alias), expected, text="" if MYSQL else "connection refused")
    assert not _redact.refused_login(raw)  # worth waiting for (RECONNECT_TIMEOUT)
    assert _redact.describe_failure(raw).kind in ("connection_refused", "cannot_connect")


def test_missing_unix_socket(live: None, server: DBServer) -> None:
    """A socket path where no server listens: 2002 (PyMySQL: 2003, any OSError), libpq "No such file"."""
    if MYSQL:
        changes: dict[str, Any] = {"HOST": "localhost", "OPTIONS": {"unix_socket": os.path.join(server.tmp, "no.sock")}}
    else:
        changes = {"HOST": os.path.join(server.tmp, "no-such-dir")}
    expected = {"mysqlclient": 2002, "pymysql": 2003, "mysqlconnector": 2002}.get(DRIVER)
    # PyMySQL (1.2.4) never closes the unix socket whose connect() failed: let it go quietly here.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        with other_alias(server, **changes) as alias:
            raw = assert_gone(lambda: connect(alias), expected, text="" if MYSQL else "no such file")
        assert not _redact.refused_login(raw)
        del raw
        gc.collect()


@contextlib.contextmanager
def no_free_descriptors() -> Iterator[None]:
    """Every file descriptor number this process may use is taken (EMFILE) until the block ends."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    taken: list[int] = []
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))
        with contextlib.suppress(OSError):
            while len(taken) < 4096:
                taken.append(os.open(os.devnull, os.O_RDONLY))
        yield
    finally:
        for fd in taken:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@mysql_only
@pytest.mark.parametrize("via", ["tcp", "unix"])
def test_no_socket_can_be_created(live: None, server: MariaDB, via: str) -> None:
    """socket() fails (EMFILE): libmariadb 2004 (TCP) / 2001 (unix), PyMySQL 2003, mysql-connector 2003 / 2002."""
    expected = {
        "mysqlclient": {"tcp": 2004, "unix": 2001},
        "pymysql": {"tcp": 2003, "unix": 2003},
        "mysqlconnector": {"tcp": 2003, "unix": 2002},
    }[DRIVER][via]
    changes: dict[str, Any] = {"HOST": "localhost", "OPTIONS": {"unix_socket": server.socket}} if via == "unix" else {}
    with other_alias(server, **changes) as alias, no_free_descriptors(), pytest.raises(Error) as info:
        connect(alias)
    raw = info.value.__cause__
    assert raw is not None
    assert code(raw) == expected, raw
    assert "24" in str(raw)  # EMFILE, as each driver quotes the errno
    assert freshconn.is_disconnect(raw)
    assert freshconn.is_disconnect(info.value)
    assert not _redact.refused_login(raw)


def _tls_required() -> dict[str, Any]:
    ca = "/etc/ssl/certs/ca-certificates.crt"
    options: dict[str, dict[str, Any]] = {
        "mysqlclient": {"ssl_mode": "VERIFY_IDENTITY"},
        "pymysql": {"ssl": {"ca": ca}},
        "mysqlconnector": {"ssl_verify_cert": True, "ssl_ca": ca},
    }
    return options.get(DRIVER, {"sslmode": "require"})


def test_tls_required_but_not_offered_is_a_refusal_not_waited_on(live: None, server: DBServer) -> None:
    """TLS required against a server without TLS: 2026 / libpq's wording, kind "tls", a unit fails at once."""
    with other_alias(server, OPTIONS={"connect_timeout": 3, **_tls_required()}) as alias:
        wrapped, raw = failure(lambda: connect(alias))
        assert code(raw) == (2026 if MYSQL else None), raw
        assert "ssl" in str(raw).lower()
        assert not freshconn.is_disconnect(raw) or not MYSQL  # libpq marks the connection bad: a disconnect
        assert _redact.describe_failure(raw).kind == "tls"
        assert _redact.refused_login(wrapped)
        started = time.monotonic()
        with (
            override_settings(FRESHCONN={"RECONNECT_TIMEOUT": 30}),
            pytest.raises(Error),
            freshconn.unit_of_work(using=alias),
        ):
            run("SELECT 1", alias)
        assert time.monotonic() - started < 5, "a TLS refusal must not be waited on"


# -- an open session that the server ends -------------------------------------------------------------


def test_session_killed_while_idle(live: None) -> None:
    """KILL / pg_terminate_backend of an idle session: the next statement, then every later one."""
    run("SELECT 1")
    kill_connection()
    first, later = {
        "mysqlclient": ((2013, False), (2006, True)),
        "pymysql": ((2013, False), (0, True)),
        # mysql-connector-python pings in cursor() before sending anything: errno -1 "not available".
        "mysqlconnector": ((-1, True), (-1, True)),
        "psycopg": (("57P01", False), (None, True)),
        "psycopg2": ((None, False), (None, True)),
    }[DRIVER]
    text = {"psycopg": "administrator command", "psycopg2": "server closed the connection"}.get(DRIVER, "")
    assert_gone(lambda: run("SELECT 1"), first[0], unsent=first[1], text=text)
    text = {"psycopg": "the connection is closed", "psycopg2": "connection already closed"}.get(DRIVER, "")
    assert_gone(lambda: run("SELECT 1"), later[0], unsent=later[1], text=text)


def test_session_killed_during_a_query(live: None, server: DBServer) -> None:
    """KILL / pg_terminate_backend while the statement runs: 2013 (it may have run) / 57P01."""
    victim = backend_id()
    if MYSQL:
        timer = soon(lambda: admin(server, f"KILL {victim}"))
        sleep = "SELECT SLEEP(5)"
    else:
        timer = soon(lambda: admin(server, "SELECT pg_terminate_backend(%s)", [victim]))
        sleep = "SELECT pg_sleep(5)"
    expected = {"psycopg": "57P01", "psycopg2": None}.get(DRIVER, 2013)
    started = time.monotonic()
    assert_gone(lambda: run(sleep), expected, unsent=False)
    timer.join()
    assert time.monotonic() - started < 4


@pytest.mark.skipif(DRIVER != "mysqlconnector", reason="mysql-connector-python's own code for a send on a dead socket")
def test_send_on_a_dead_socket_is_2055(live: None) -> None:
    """A cursor kept across a KILL: 2013 when the EOF is read, then 2055 (EPIPE) when the next send fails."""
    with connections["default"].cursor() as cursor:
        cursor.execute("SELECT 1")
        cursor.fetchall()
        kill_connection()
        assert_gone(lambda: cursor.execute("SELECT 1"), 2013, unsent=False)
        raw = assert_gone(lambda: cursor.execute("SELECT 1"), 2055)
    assert "errno 32" in str(raw).lower()  # broken pipe


def test_idle_session_timeout(live: None) -> None:
    """The server's own idle limit (wait_timeout / idle_session_timeout): 2006 (never sent) / 57P05."""
    run("SELECT 1")
    expire_idle()
    expected = {"mysqlclient": 2006, "pymysql": 2006, "mysqlconnector": -1, "psycopg": "57P05", "psycopg2": None}
    text = {"psycopg": "idle-session timeout", "psycopg2": "server closed the connection"}.get(DRIVER, "")
    assert_gone(lambda: run("SELECT 1"), expected[DRIVER], unsent=MYSQL or None, text=text)


@pg_only
def test_idle_in_transaction_timeout(live: None, server: DBServer) -> None:
    """idle_in_transaction_session_timeout ends a session left idle in a transaction: 25P03."""
    from django.db import transaction

    with other_alias(server, OPTIONS={"options": "-c idle_in_transaction_session_timeout=300"}) as alias:

        def idle_in_transaction() -> None:
            with transaction.atomic(using=alias):
                run("SELECT 1", alias)
                time.sleep(0.8)
                run("SELECT 1", alias)

        expected = "25P03" if DRIVER == "psycopg" else None
        text = "idle-in-transaction timeout" if DRIVER == "psycopg" else "server closed the connection"
        assert_gone(idle_in_transaction, expected, text=text)


@pg_only
def test_another_backend_crashing(live: None, server: DBServer) -> None:
    """A backend killed by SIGKILL makes the postmaster end every session (57P02 in the server log; libpq's wording)."""
    run("SELECT 1")
    bystander = admin_connection(server)
    cursor = bystander.cursor()
    cursor.execute("SELECT pg_backend_pid()")
    os.kill(int(cursor.fetchone()[0]), signal.SIGKILL)
    try:
        wait_until_socket_shows_close()  # the postmaster has noticed and ended this session too
        raw = assert_gone(lambda: run("SELECT 1"), None, text="server closed the connection")
        assert not _errors.is_unsent(raw)  # the statement was sent to a backend that then died
    finally:
        with contextlib.suppress(Exception):
            bystander.close()
        deadline = time.monotonic() + 15
        while True:  # crash recovery: the server accepts connections again within a second or so
            try:
                admin_connection(server).close()
                break
            except Exception:
                assert time.monotonic() < deadline, "the server did not recover from the crash"
                time.sleep(0.05)


def test_server_shutdown_with_an_idle_session(live: None, server: DBServer) -> None:
    """A clean server shutdown (SIGTERM / pg_ctl -m fast): MariaDB closes idle sessions silently (2013, not 1053)."""
    run("SELECT 1")
    server.restart()
    expected = {
        "mysqlclient": 2013,
        "pymysql": 2013,
        "mysqlconnector": -1,
        "psycopg": "57P01",  # "terminating connection due to administrator command", sent before closing
        "psycopg2": None,
    }[DRIVER]
    assert_gone(lambda: run("SELECT 1"), expected)


@pg_only
def test_connect_while_the_server_shuts_down(live: None, server: PostgreSQL) -> None:
    """pg_ctl -m smart waits for open sessions; a new connect meanwhile gets FATAL 57P03 "shutting down"."""
    holder = admin_connection(server)
    stop = server._run_as([server._pg_ctl, "-D", server.datadir, "-m", "smart", "-W", "stop"])
    assert stop.returncode == 0
    try:
        with other_alias(server) as alias:
            raw = assert_gone(lambda: connect(alias), None, text="shutting down")
        assert _redact.describe_failure(raw).kind == "server_unavailable"
        assert not _redact.refused_login(raw)  # worth waiting for: a restart or failover follows
    finally:
        holder.close()
        pid_file = os.path.join(server.datadir, "postmaster.pid")
        deadline = time.monotonic() + 15
        while os.path.exists(pid_file) and time.monotonic() < deadline:
            time.sleep(0.05)
        server.up()


@mysql_only
def test_mysql8_idle_disconnect_4031(live: None) -> None:
    """MySQL >= 8.0.24 tells an idle client why it was dropped (4031); MariaDB never sends it."""
    version = str(run("SELECT VERSION()")[0][0])
    if "mariadb" in version.lower():
        pytest.skip(f"4031 ER_CLIENT_INTERACTION_TIMEOUT is MySQL >= 8.0.24 only; the test bed runs {version}")
    run("SELECT 1")
    expire_idle()
    assert_gone(lambda: run("SELECT 1"), {4031, 2013})


# -- errors after which the session lives on ----------------------------------------------------------


@mysql_only
def test_kill_query_cancels_the_statement_not_the_session(live: None, server: DBServer) -> None:
    """KILL QUERY: 1317 ER_QUERY_INTERRUPTED (not 1927 ER_CONNECTION_KILLED); the same connection keeps working."""
    victim = backend_id()
    raw_before = connections["default"].connection
    timer = soon(lambda: admin(server, f"KILL QUERY {victim}"))
    assert_live(lambda: run("SELECT SLEEP(5)"), 1317)
    timer.join()
    assert run("SELECT 1") == ((1,),) or run("SELECT 1") == [(1,)]
    assert connections["default"].connection is raw_before


@pg_only
def test_cancel_request_cancels_the_statement_not_the_session(live: None, server: DBServer) -> None:
    """pg_cancel_backend: 57014 query_canceled; the same connection keeps working."""
    victim = backend_id()
    raw_before = connections["default"].connection
    timer = soon(lambda: admin(server, "SELECT pg_cancel_backend(%s)", [victim]))
    assert_live(lambda: run("SELECT pg_sleep(5)"), "57014")
    timer.join()
    assert list(run("SELECT 1")) == [(1,)]
    assert connections["default"].connection is raw_before


def test_syntax_error_is_not_a_disconnect(live: None) -> None:
    assert_live(lambda: run("SELEC 1"), 1064 if MYSQL else "42601")
    assert list(run("SELECT 1")) == [(1,)]


def test_unique_violation_is_not_a_disconnect(live: None) -> None:
    run("CREATE TEMPORARY TABLE fc_codes (id INT PRIMARY KEY)")
    try:
        assert_live(lambda: run("INSERT INTO fc_codes VALUES (1), (1)"), 1062 if MYSQL else "23505")
    finally:
        run("DROP TABLE fc_codes")


def test_read_only_refusal_is_read_only_not_a_disconnect(live: None) -> None:
    """A write the session may not make: 1792 / 25006; is_read_only True, is_disconnect False."""
    run("SET SESSION TRANSACTION READ ONLY" if MYSQL else "SET default_transaction_read_only = on")
    try:
        wrapped, raw = failure(lambda: run("CREATE TABLE fc_ro (id INT)"))
        assert code(raw) == (1792 if MYSQL else "25006"), raw
        assert freshconn.is_read_only(raw)
        assert freshconn.is_read_only(wrapped)
        assert not freshconn.is_disconnect(raw)
        assert not freshconn.is_disconnect(wrapped)
    finally:
        run("SET SESSION TRANSACTION READ WRITE" if MYSQL else "RESET default_transaction_read_only")
