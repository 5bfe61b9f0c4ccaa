"""``manage.py freshconn doctor`` against real servers and proxies configured to trigger each verdict."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from io import StringIO
from typing import Any

import django
import pytest
from django.core.management import call_command
from django.test import override_settings
from testbed.proxies import HAProxy, PgBouncer
from testbed.servers import DBServer, free_port

from freshconn import _inspect

from .conftest import DRIVER, DRIVER_NAME, VENDOR, short_server_timeout_options
from .tempalias import temp_alias

pytestmark = pytest.mark.server

TIMEOUTS: dict[str, Any] = (
    {"connect_timeout": 5, "read_timeout": 30, "write_timeout": 30}
    if VENDOR == "mysql"
    else {"connect_timeout": 5, "keepalives_idle": 30, "tcp_user_timeout": 30000}
)
if DRIVER == "pymysql":
    TIMEOUTS["ssl_disabled"] = True


def doctor(*args: str, stderr: Any = None) -> tuple[int, str, str]:
    """Run the command in-process: (exit code, stdout, stderr)."""
    out, err = StringIO(), stderr or StringIO()
    try:
        call_command("freshconn", "doctor", *args, stdout=out, stderr=err)
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    return code, out.getvalue(), err.getvalue() if isinstance(err, StringIO) else ""


def doctor_json(*args: str) -> tuple[int, dict[str, Any]]:
    code, out, _ = doctor("--format", "json", *args)
    return code, json.loads(out)


def database(data: dict[str, Any], alias: str = "doc") -> dict[str, Any]:
    return next(d for d in data["databases"] if d["alias"] == alias)


def verdict_ids(data: dict[str, Any], alias: str = "doc") -> dict[str, str]:
    return {v["id"]: v["severity"] for v in database(data, alias)["verdicts"]}


def verdict(data: dict[str, Any], doctor_id: str, alias: str = "doc") -> dict[str, Any]:
    return next(v for v in database(data, alias)["verdicts"] if v["id"] == doctor_id)


@contextmanager
def alias(server: DBServer, name: str = "doc", **extra: Any) -> Iterator[str]:
    """A database alias on ``server`` with sane timeouts, overridable per test."""
    settings = server.django_settings(**{"CONN_MAX_AGE": 60, "OPTIONS": dict(TIMEOUTS), **extra})
    with temp_alias(name, settings):
        yield name


def test_healthy_alias_exits_zero(server: DBServer) -> None:
    """Timeouts set and a lifetime below every limit: nothing to fix, status ok, exit code 0."""
    with alias(server):
        code, out, _ = doctor("--database", "doc")
        _, data = doctor_json("--database", "doc")
    assert verdict_ids(data) == {}
    assert "  ok       nothing to fix" in out
    assert "connection lifetime 60s (CONN_MAX_AGE)" in out
    assert (code, data["status"], data["exit_code"]) == (0, "ok", 0)


def test_notes_alone_exit_zero(server: DBServer) -> None:
    """A server that kills sessions idle inside a transaction gets a note only, and exit code 0."""
    setting = (
        {"init_command": "SET SESSION idle_transaction_timeout = 60"}
        if VENDOR == "mysql"
        else {"options": "-c idle_in_transaction_session_timeout=60000"}
    )
    with alias(server, OPTIONS={**TIMEOUTS, **setting}):
        code, data = doctor_json("--database", "doc")
    assert verdict_ids(data) == {"idle-in-transaction-limit": "note"}
    assert verdict(data, "idle-in-transaction-limit")["check_id"] == "freshconn.I003"
    assert code == 0


def test_lifetime_above_server_idle_limit(server: DBServer) -> None:
    """Django's CONN_MAX_AGE=None against a server dropping sessions idle 20 s: W004, a fix below 20 s, exit 1."""
    with alias(server, CONN_MAX_AGE=None, OPTIONS={**TIMEOUTS, **short_server_timeout_options(20)}):
        code, data = doctor_json("--database", "doc")
    found = verdict(data, "lifetime-above-idle-limit")
    assert verdict_ids(data) == {"lifetime-above-idle-limit": "warning"}
    assert found["check_id"] == "freshconn.W004"
    assert database(data)["server"]["idle_limit"] == 20
    assert "DATABASES['doc']['CONN_MAX_AGE'] to at most 18" in found["fix"]
    assert code == 1


def test_idle_limit_finding_judges_djangos_own_conn_max_age(server: DBServer) -> None:
    """W004 is about code outside units: FRESHCONN's lifetime cannot fix it, Django's CONN_MAX_AGE can."""
    options = {**TIMEOUTS, **short_server_timeout_options(20)}
    with override_settings(FRESHCONN={"CONN_MAX_AGE": 15}), alias(server, CONN_MAX_AGE=None, OPTIONS=options):
        _, data = doctor_json("--database", "doc")
    assert "lifetime-above-idle-limit" in verdict_ids(data)
    assert database(data)["lifetime"] == 15
    for outside in (0, 15):  # closed at every request, or retired before the server's limit
        with alias(server, CONN_MAX_AGE=outside, OPTIONS=options):
            _, data = doctor_json("--database", "doc")
        assert "lifetime-above-idle-limit" not in verdict_ids(data)


def test_three_second_server_limit_gets_concrete_advice(server: DBServer) -> None:
    """A 3 s server limit gets 'at most 2', and a lifetime of 0 in units the advice 1800, never 'a few minutes'."""
    options = {**TIMEOUTS, **short_server_timeout_options(3)}
    with override_settings(FRESHCONN={"CONN_MAX_AGE": 0}), alias(server, CONN_MAX_AGE=600, OPTIONS=options):
        code, out, _ = doctor("--database", "doc")
        _, data = doctor_json("--database", "doc")
    assert "at most 2," in verdict(data, "lifetime-above-idle-limit")["fix"]
    per_unit = data["freshconn"]["verdicts"]
    assert [(v["id"], v["check_id"], v["severity"]) for v in per_unit] == [
        ("new-connection-per-unit", "freshconn.W006", "warning")
    ]
    assert "Remove FRESHCONN['CONN_MAX_AGE']" in per_unit[0]["fix"]
    assert "1800" in per_unit[0]["fix"]
    assert "few minutes" not in out
    assert code == 1


def test_no_read_timeout(server: DBServer) -> None:
    """No driver timeouts in OPTIONS: the no-read-timeout warning (W002) names the options to set."""
    with alias(server, OPTIONS={"ssl_disabled": True} if DRIVER == "pymysql" else {}):
        _, data = doctor_json("--database", "doc")
    found = verdict(data, "no-read-timeout")
    assert found["check_id"] == "freshconn.W002"
    assert ("read_timeout" if VENDOR == "mysql" else "tcp_user_timeout") in found["fix"]
    assert "no-connect-timeout" in verdict_ids(data) or DRIVER == "pymysql"


@pytest.mark.skipif(DRIVER != "pymysql", reason="PyMySQL only")
def test_pymysql_tls_cost_against_a_server_without_tls(server: DBServer) -> None:
    """PyMySQL with no ssl option against a server without TLS is warned about; ssl_disabled fixes it."""
    bare = {k: v for k, v in TIMEOUTS.items() if k != "ssl_disabled"}
    with alias(server, OPTIONS=bare):
        _, data = doctor_json("--database", "doc")
    assert verdict_ids(data) == {"pymysql-tls-per-connect": "warning"}
    assert database(data)["server"]["tls"] is False


@pytest.mark.skipif(DRIVER != "psycopg" or django.VERSION < (5, 1), reason="Django >= 5.1 pool on psycopg 3")
def test_pool_is_judged_against_the_servers_idle_limit(server: DBServer) -> None:
    """A pool max_idle above the server's idle limit is a note naming a shorter max_idle; a shorter one gets none."""
    limit = short_server_timeout_options(20)
    with alias(server, CONN_MAX_AGE=0, OPTIONS={**TIMEOUTS, **limit, "pool": {"min_size": 1}}):
        _, data = doctor_json("--database", "doc")
    assert verdict_ids(data) == {"pool-max-idle-above-idle-limit": "note"}
    verdict = next(v for v in database(data)["verdicts"] if v["id"] == "pool-max-idle-above-idle-limit")
    assert "600s (max_idle)" in verdict["message"]
    assert "['max_idle'] to at most 18" in verdict["fix"]
    assert database(data)["django"] | {"timeouts": None} == {
        "CONN_MAX_AGE": 0,
        "CONN_HEALTH_CHECKS": False,
        "pool": True,
        "pool_check": False,
        "pool_max_idle": 600.0,
        "timeouts": None,
    }
    with alias(server, CONN_MAX_AGE=0, OPTIONS={**TIMEOUTS, **limit, "pool": {"min_size": 1, "max_idle": 15}}):
        _, data = doctor_json("--database", "doc")
    assert verdict_ids(data) == {}


@pytest.mark.skipif(VENDOR != "mysql", reason="max_connections can change at run time on MariaDB only")
def test_connections_nearly_exhausted(server: DBServer) -> None:
    """With 8 of max_connections=10 in use, the doctor warns before reconnects start being refused."""
    before = server.admin_sql("SELECT @@GLOBAL.max_connections").strip()
    held: list[Any] = []
    with alias(server):
        try:
            server.admin_sql("SET GLOBAL max_connections = 10")
            while int(server.admin_sql("SHOW STATUS LIKE 'Threads_connected'").split()[1]) < 8:
                held.append(_inspect.open_raw("doc"))
            _, data = doctor_json("--database", "doc")
        finally:
            for raw in held:
                raw.close()
            server.admin_sql(f"SET GLOBAL max_connections = {before}")
    assert verdict_ids(data) == {"connections-nearly-exhausted": "warning"}


@pytest.mark.skipif(VENDOR != "postgresql", reason="PgBouncer fronts PostgreSQL")
def test_pgbouncer_in_path(server: DBServer) -> None:
    """Through PgBouncer the server listens on another port: a proxy-in-path note suggests --probe-idle."""
    with PgBouncer(server.port) as bouncer, alias(server, PORT=str(bouncer.port)):
        _, data = doctor_json("--database", "doc")
    db = database(data)
    assert verdict_ids(data) == {"proxy-in-path": "note"}
    assert db["target"]["port"] == bouncer.port
    assert db["server"]["port"] == server.port


@pytest.mark.slow
def test_probe_finds_a_proxy_limit_the_server_does_not_know(server: DBServer) -> None:
    """Through HAProxy (idle 2 s) to a server with hours of idle limit, the probe brackets 2 s and warns."""
    with HAProxy(server.port, idle_timeout=2) as proxy, alias(server, PORT=str(proxy.port)):
        code, data = doctor_json("--database", "doc", "--probe-idle", "8")
    db = database(data)
    probe = db["probe"]
    assert db["server"]["idle_limit"] is None or db["server"]["idle_limit"] >= 3600
    assert probe["limit_found"] is True
    assert 1.0 <= probe["survived"] < 2.5
    assert 1.9 <= probe["died"] <= 3.5
    assert verdict_ids(data)["hidden-idle-limit"] == "warning"
    assert code == 1


def test_json_shape(server: DBServer) -> None:
    """The JSON report has the documented keys and types (schema freshconn.doctor/1)."""
    with alias(server, CONN_MAX_AGE=None, OPTIONS={**TIMEOUTS, **short_server_timeout_options(20)}):
        _, data = doctor_json("--database", "doc", "--database", "lite")
    assert data["schema"] == "freshconn.doctor/1"
    assert set(data) == {"schema", "status", "exit_code", "summary", "freshconn", "databases"}
    assert data["summary"] == {"errors": 0, "warnings": 1, "notes": 0}
    assert set(data["freshconn"]) == {"version", "settings", "error", "verdicts"}
    settings = "CHECK_AFTER_IDLE CONN_MAX_AGE CONN_MAX_AGE_set PING_TIMEOUT RECONNECT_TIMEOUT"
    assert set(data["freshconn"]["settings"]) == {
        *settings.split(),
        "ADOPT_CLOSE_OLD_CONNECTIONS",
        "STATS_LOG_INTERVAL",
    }
    doc, lite = data["databases"]
    keys = "alias vendor engine driver target reachable error error_kind error_code server django lifetime"
    assert set(doc) == {*keys.split(), "lifetime_source", "probe", "verdicts"}
    assert doc["driver"]["name"] == DRIVER_NAME
    assert (doc["lifetime"], doc["lifetime_source"]) == (1800, "default")
    server_keys = "product version port tls connect_ms idle_limit max_connections connections_used limits"
    server_keys += " read_only read_only_because"
    assert set(doc["server"]) == set(server_keys.split())
    limits = {"mysql": {"wait_timeout", "net_read_timeout", "max_allowed_packet"}, "postgresql": {"tcp_user_timeout"}}
    assert limits[VENDOR] <= set(doc["server"]["limits"])
    assert all(set(v) == {"id", "check_id", "severity", "message", "fix"} for v in doc["verdicts"])
    assert (lite["vendor"], lite["reachable"], lite["server"], lite["verdicts"]) == ("sqlite", None, None, [])


def test_unreachable_is_exit_two_with_network_advice(server: DBServer) -> None:
    """A database nobody listens for is E004 'unreachable', reduced to its kind, with HOST/PORT advice; exit 2."""
    with alias(server, PORT=str(free_port())):
        code, data = doctor_json("--database", "doc")
    found = verdict(data, "unreachable")
    db = database(data)
    assert verdict_ids(data) == {"unreachable": "error"}
    assert (db["reachable"], db["error_kind"]) in ((False, "connection_refused"), (False, "cannot_connect"))
    assert "['HOST'] and ['PORT']" in found["fix"]
    assert code == 2


def test_wrong_password_gets_credentials_advice(server: DBServer) -> None:
    """A rejected password is 'authentication_failed' with its code, and the fix names USER and PASSWORD."""
    with alias(server, PASSWORD="not-the-password"):
        code, data = doctor_json("--database", "doc")
    db = database(data)
    assert db["error_kind"] == "authentication_failed"
    assert db["error_code"] == ("1045" if VENDOR == "mysql" else None)
    fix = verdict(data, "unreachable")["fix"]
    assert "['USER']" in fix
    assert "['PASSWORD']" in fix
    assert "firewall" not in fix
    assert code == 2


def test_invalid_freshconn_settings_is_exit_two(server: DBServer) -> None:
    """A broken FRESHCONN setting is E001 'settings-invalid', naming the key; exit code 2."""
    with override_settings(FRESHCONN={"CHECK_AFTER_IDLE": -1}), alias(server):
        code, out, _ = doctor("--database", "doc")
        _, data = doctor_json("--database", "doc")
    assert "error[settings-invalid] (freshconn.E001) FRESHCONN['CHECK_AFTER_IDLE']" in out
    assert "CHECK_AFTER_IDLE" in data["freshconn"]["error"]
    assert data["freshconn"]["verdicts"][0]["id"] == "settings-invalid"
    assert database(data)["lifetime_source"] is None
    assert code == 2


def test_one_name_per_driver_in_every_output(server: DBServer) -> None:
    """The doctor, the checks and WorkerCommand's start-up line name the driver the same way."""
    from freshconn.command import policy_summary

    with alias(server, OPTIONS={}):
        _, data = doctor_json("--database", "doc")
        line = policy_summary("doc")
    assert database(data)["driver"]["name"] == DRIVER_NAME
    assert f"via {DRIVER_NAME} " in line
    assert "MySQLdb" not in line + json.dumps(data)
