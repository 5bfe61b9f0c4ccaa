"""Pure parts, no server: settings validation, error classification, policy decisions, SQL classification."""

from __future__ import annotations

import math

import pymysql
import pytest
from django.core.exceptions import ImproperlyConfigured
from django.core.management import call_command
from django.db import OperationalError
from django.test import override_settings

import freshconn
from freshconn import _policy, conf
from freshconn._sql import COMMIT, NEUTRAL, READ, WRITE, classify


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        ({"CHECK_AFTER_IDLE": "5"}, "CHECK_AFTER_IDLE"),
        ({"CHECK_AFTER_IDLE": -1}, "CHECK_AFTER_IDLE"),
        ({"CHECK_AFTER_IDLE": math.nan}, "CHECK_AFTER_IDLE"),
        ({"CHECK_AFTER_IDLE": True}, "CHECK_AFTER_IDLE"),
        ({"CONN_MAX_AGE": "forever"}, "CONN_MAX_AGE"),
        ({"CONN_MAX_AGE": -5}, "CONN_MAX_AGE"),
        ({"PING_TIMEOUT": 0}, "PING_TIMEOUT"),
        ({"RECONNECT_TIMEOUT": math.inf}, "RECONNECT_TIMEOUT"),
        ({"CHECK_AFTER_IDEL": 5}, "CHECK_AFTER_IDEL"),
        (["CHECK_AFTER_IDLE"], "must be a dict"),
    ],
)
def test_bad_settings_fail_loudly_naming_the_setting(raw: object, needle: str) -> None:
    """Every invalid FRESHCONN value is rejected with the offending key's name and a fix."""
    with pytest.raises(ImproperlyConfigured) as err:
        conf.load(raw)
    assert needle in str(err.value)
    assert "Fix" in str(err.value)


def test_good_settings_are_read_with_types_and_defaults() -> None:
    """Valid settings come back as floats; CONN_MAX_AGE None means an unlimited override."""
    cfg = conf.load({"CHECK_AFTER_IDLE": 2, "CONN_MAX_AGE": None, "RECONNECT_TIMEOUT": 30})
    assert cfg.check_after_idle == 2.0
    assert cfg.max_age_override
    assert cfg.conn_max_age is None
    assert cfg.max_age_for({"CONN_MAX_AGE": 0}) is None
    assert cfg.reconnect_timeout == 30.0
    assert cfg.ping_timeout == conf.DEFAULT_PING_TIMEOUT
    assert conf.load({}).max_age_for({"CONN_MAX_AGE": 60}) == 60.0


def test_start_up_fails_on_a_bad_setting() -> None:
    """The app's ready() validates FRESHCONN, so a bad value stops the process at start-up."""
    from django.apps import apps

    with override_settings(FRESHCONN={"CHECK_AFTER_IDLE": "soon"}), pytest.raises(ImproperlyConfigured):
        apps.get_app_config("freshconn").ready()


def test_settings_change_is_picked_up() -> None:
    """override_settings(FRESHCONN=...) takes effect at once (the cached config is reset)."""
    with override_settings(FRESHCONN={"CHECK_AFTER_IDLE": 0.5}):
        assert conf.get().check_after_idle == 0.5
    assert conf.get().check_after_idle == conf.DEFAULT_CHECK_AFTER_IDLE


def test_system_check_warns_when_check_after_idle_is_not_below_the_lifetime() -> None:
    """freshconn.W001 fires through manage.py check when CHECK_AFTER_IDLE >= the connection lifetime."""
    from django.core.management.base import SystemCheckError

    with override_settings(FRESHCONN={"CHECK_AFTER_IDLE": 60, "CONN_MAX_AGE": 30}):
        with pytest.raises(SystemCheckError) as err:
            call_command("check", "--fail-level", "WARNING")
        assert "freshconn.W001" in str(err.value)


@pytest.mark.parametrize("code", [2006, 2013, 2055, 4031, 1927, 1053, 2014, 2002, 2003])
def test_mysql_disconnect_codes_are_disconnects(code: int) -> None:
    """Every MySQL/MariaDB 'connection gone' code is a disconnect, raw or wrapped by Django."""
    raw = pymysql.err.OperationalError(code, "whatever the text says")
    assert freshconn.is_disconnect(raw)
    wrapped = OperationalError(*raw.args)
    wrapped.__cause__ = raw
    assert freshconn.is_disconnect(wrapped)


@pytest.mark.parametrize("code", [1062, 1205, 1213, 1064, 1146])
def test_mysql_application_errors_are_not_disconnects(code: int) -> None:
    """Duplicate key, lock wait timeout, deadlock, syntax error and missing table keep the connection."""
    assert not freshconn.is_disconnect(pymysql.err.OperationalError(code, "MySQL server has gone away"))


def test_mysql_interface_error_zero_is_a_disconnect() -> None:
    """PyMySQL's InterfaceError(0, '') on a dropped connection counts, but a bare OperationalError(0) does not."""
    assert freshconn.is_disconnect(pymysql.err.InterfaceError(0, ""))
    assert not freshconn.is_disconnect(pymysql.err.OperationalError(0, ""))


@pytest.mark.parametrize("sqlstate", ["08006", "08003", "08P01", "57P01", "57P02", "57P03", "57P05", "25P03"])
def test_postgres_sqlstates_are_disconnects(sqlstate: str) -> None:
    """psycopg 3 errors carrying a connection-class SQLSTATE are disconnects."""
    psycopg = pytest.importorskip("psycopg", reason="this process runs psycopg2 with psycopg 3 blocked")

    cls = psycopg.errors.lookup(sqlstate)
    assert freshconn.is_disconnect(cls("x"))


@pytest.mark.parametrize("sqlstate", ["23505", "40001", "40P01", "57014", "42601"])
def test_postgres_application_sqlstates_are_not_disconnects(sqlstate: str) -> None:
    """Unique violation, serialization failure, deadlock, statement timeout and syntax errors are not."""
    psycopg = pytest.importorskip("psycopg", reason="this process runs psycopg2 with psycopg 3 blocked")

    cls = psycopg.errors.lookup(sqlstate)
    assert not freshconn.is_disconnect(cls("server closed the connection unexpectedly"))


def test_libpq_client_side_messages_without_code_are_disconnects() -> None:
    """libpq's code-less client errors are recognised for both psycopg 3 and psycopg2."""
    import psycopg2

    assert freshconn.is_disconnect(psycopg2.InterfaceError("connection already closed"))
    assert freshconn.is_disconnect(psycopg2.OperationalError("server closed the connection unexpectedly"))
    assert not freshconn.is_disconnect(psycopg2.OperationalError("canceling statement due to user request"))


def test_psycopg3_socket_closed_in_its_wait_loop_is_a_disconnect() -> None:
    """psycopg 3's 'connection socket closed' (its wait loop saw the socket hang up) is a disconnect."""
    psycopg = pytest.importorskip("psycopg", reason="this process runs psycopg2 with psycopg 3 blocked")

    assert freshconn.is_disconnect(psycopg.OperationalError("connection socket closed"))
    assert not freshconn.is_disconnect(psycopg.OperationalError("socket timeout"))


def test_psycopg3_closed_connection_message_is_a_disconnect() -> None:
    """psycopg 3's code-less 'the connection is closed' is recognised."""
    psycopg = pytest.importorskip("psycopg", reason="this process runs psycopg2 with psycopg 3 blocked")
    assert freshconn.is_disconnect(psycopg.OperationalError("the connection is closed"))


def test_unrelated_errors_are_not_disconnects() -> None:
    """Python errors, and errors merely raised while handling a disconnect, are not disconnects."""
    assert not freshconn.is_disconnect(ValueError("server closed the connection unexpectedly"))
    assert not freshconn.is_disconnect(None)
    try:
        raise pymysql.err.OperationalError(2006, "gone")
    except pymysql.err.OperationalError as gone:
        unrelated = KeyError("unrelated")
        unrelated.__context__ = gone  # what "raise KeyError() while handling" produces
    assert not freshconn.is_disconnect(unrelated)


def test_ambiguous_commit_error_is_an_operational_disconnect() -> None:
    """AmbiguousCommitError is a Django OperationalError that is_disconnect() recognises."""
    exc = freshconn.AmbiguousCommitError("lost during COMMIT")
    assert isinstance(exc, OperationalError)
    assert freshconn.is_disconnect(exc)


def test_start_verdict_orders_reasons() -> None:
    """Lifetime first, then the server's idle limit, then the idle check; busy connections get nothing."""
    v = _policy.start_verdict
    assert v(10.0, 9.0, 9.9, None, 5.0, False) == "max_age"
    assert v(10.0, math.inf, 0.0, 8.0, 5.0, False) == "server_idle"
    assert v(10.0, math.inf, 4.0, 8.0, 5.0, False) == _policy.PING
    assert v(10.0, math.inf, 9.0, 8.0, 5.0, False) is None
    assert v(10.0, math.inf, 9.0, 8.0, 5.0, True) == _policy.PING


def test_deadline_jitter_only_shortens_lifetimes() -> None:
    """Jitter spreads lifetimes by at most 5 % and never past the configured maximum."""
    assert _policy.deadline_for(100.0, None, 0.5) == math.inf
    assert _policy.deadline_for(100.0, 0, 0.5) == 100.0
    assert _policy.deadline_for(100.0, 60, 0.0) == 160.0
    assert 157.0 <= _policy.deadline_for(100.0, 60, 0.999) < 160.0


def test_effective_idle_limit_keeps_a_margin() -> None:
    """A server idle limit is trusted minus a margin, and 0 means no limit."""
    assert _policy.effective_idle_limit(None) is None
    assert _policy.effective_idle_limit(0) is None
    assert _policy.effective_idle_limit(28800) == 28800 - 60
    assert _policy.effective_idle_limit(2) == 1.5
    assert _policy.effective_idle_limit(0.5) == 0.25


def test_retry_verdict_rules() -> None:
    """Only idempotent units, or units that applied nothing, are retried; COMMIT in flight never is."""
    rv = _policy.retry_verdict
    assert rv(idempotent=False, commit_in_flight=False, applied=False, write_in_flight=False)[0]
    assert not rv(idempotent=False, commit_in_flight=True, applied=False, write_in_flight=False)[0]
    assert not rv(idempotent=False, commit_in_flight=False, applied=True, write_in_flight=False)[0]
    assert not rv(idempotent=False, commit_in_flight=False, applied=False, write_in_flight=True)[0]
    assert rv(idempotent=True, commit_in_flight=True, applied=True, write_in_flight=True)[0]


@pytest.mark.parametrize(
    ("sql", "kind"),
    [
        ("SELECT 1", READ),
        ("  /* hint */ select * from t", READ),
        ("(SELECT 1) UNION (SELECT 2)", READ),
        ("SELECT * FROM t FOR UPDATE", READ),
        ("SELECT 1 INTO @x", WRITE),
        ("WITH a AS (SELECT 1) SELECT * FROM a", READ),
        ("WITH d AS (DELETE FROM t RETURNING *) SELECT * FROM d", WRITE),
        ("EXPLAIN SELECT 1", READ),
        ("EXPLAIN ANALYZE DELETE FROM t", WRITE),
        ("SHOW wait_timeout", READ),
        ("INSERT INTO t VALUES (1)", WRITE),
        ("update t set a = 1", WRITE),
        ("CALL proc()", WRITE),
        ("SAVEPOINT s1", NEUTRAL),
        ("SET SESSION wait_timeout = 5", NEUTRAL),
        ("COMMIT", COMMIT),
    ],
)
def test_sql_classification_is_conservative(sql: str, kind: str) -> None:
    """Reads are recognised narrowly; anything unknown counts as a write."""
    assert classify(sql) == kind


@pytest.mark.django_db(databases=["lite"])
def test_sqlite_alias_is_a_harmless_noop() -> None:
    """Units over a SQLite alias run, count nothing, and never close its connection."""
    from django.db import connections

    freshconn.reset_stats()
    with freshconn.unit_of_work(using="lite"), connections["lite"].cursor() as cursor:
        cursor.execute("SELECT 1")
    raw = connections["lite"].connection
    for _ in freshconn.each(range(3), using="lite"):
        with connections["lite"].cursor() as cursor:
            cursor.execute("SELECT 1")
    assert connections["lite"].connection is raw
    assert freshconn.stats().get("lite", {}).get("units", 0) == 0


def test_unit_of_work_rejects_a_positional_alias() -> None:
    """unit_of_work('default') is a mistake for using='default' and says so."""
    with pytest.raises(TypeError, match="using="):
        freshconn.unit_of_work("default")  # type: ignore[call-overload]


def test_unit_of_work_refuses_coroutine_functions() -> None:
    """Decorating an async function points the user to the right tool instead of silently misbehaving."""

    async def handler() -> None:
        pass

    with pytest.raises(TypeError):
        freshconn.unit_of_work(handler)  # type: ignore[deprecated]  # the misuse under test


def test_fast_path_and_start_rule_agree() -> None:
    """The start-of-unit fast path (one number, check_at) says "reuse" exactly when start_verdict says None."""
    import random

    rng = random.Random(20261202)
    for _ in range(20000):
        now = rng.uniform(0, 100)
        opened = now - rng.uniform(0, 50)
        last_used = now - rng.choice([0.0, rng.uniform(0, 0.001), rng.uniform(0, 20)])
        deadline = rng.choice([math.inf, opened + rng.uniform(0, 60)])
        idle_limit = rng.choice([None, rng.uniform(0.1, 30)])
        check_after = rng.choice([0.0, rng.uniform(0.1, 10)])
        window = _policy.idle_window(idle_limit, check_after)
        fast = now < _policy.check_at(deadline, last_used, window)
        verdict = _policy.start_verdict(now, deadline, last_used, idle_limit, check_after, False)
        assert fast == (verdict is None), (now, deadline, last_used, idle_limit, check_after, verdict)


def test_reconnect_pauses_grow_are_capped_and_jittered() -> None:
    """Pauses between attempts while a server is down double from 0.1 s up to 1 s, jittered down to half."""
    assert _policy.reconnect_pause(1, 1.0) == pytest.approx(0.1)
    assert _policy.reconnect_pause(2, 1.0) == pytest.approx(0.2)
    assert _policy.reconnect_pause(10, 1.0) == pytest.approx(_policy.RECONNECT_MAX_PAUSE)
    assert _policy.reconnect_pause(10, 0.0) == pytest.approx(_policy.RECONNECT_MAX_PAUSE / 2)


def test_a_hidden_idle_limit_below_a_pools_max_idle_names_max_idle_in_the_fix() -> None:
    """With a pool, the probe's hidden-idle-limit fix also names the max_idle to set below the measured limit."""
    from freshconn._audit import AliasSettings
    from freshconn._inspect import ServerFacts
    from freshconn._judge import probe_hits
    from freshconn._probe import ProbeResult

    def settings(pool_max_idle: float | None) -> AliasSettings:
        return AliasSettings(
            alias="db", vendor="postgresql", engine="django.db.backends.postgresql", driver="psycopg",
            driver_version="3", host="127.0.0.1", name="app", port="5432", user="app", conn_max_age=0,
            health_checks=False, timeouts={}, invalid_timeouts={}, option_names=frozenset({"pool"}),
            pool=pool_max_idle is not None, pool_check=False if pool_max_idle is not None else None,
            pool_max_idle=pool_max_idle,
        )  # fmt: skip

    facts = ServerFacts(product="PostgreSQL", version="15", port=5432, tls=False, connect_seconds=0.01, idle_limit=None)
    probe = ProbeResult(max_seconds=60, survived=20.0, died=30.0)
    [pooled] = probe_hits(settings(600.0), None, facts, probe)
    assert "DATABASES['db']['OPTIONS']['pool']['max_idle'] to at most 27 (the pool keeps idle" in pooled.fix
    [plain] = probe_hits(settings(None), None, facts, probe)
    assert "max_idle" not in plain.fix
