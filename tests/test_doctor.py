"""``manage.py freshconn doctor`` against real servers and proxies configured to trigger each verdict."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from io import StringIO
from typing import Any

import django
import pytest
from django.core.management import call_command
from django.test import override_settings
from testbed.proxies import HAProxy, PgBouncer
from testbed.servers import MariaDB, PostgreSQL, Server, free_port

from freshconn import _audit, _inspect

from .conftest import DRIVER, ROOT, VENDOR, short_server_timeout_options, subprocess_env
from .tempalias import temp_alias

pytestmark = pytest.mark.server

TIMEOUTS: dict[str, Any] = (
    {"connect_timeout": 5, "read_timeout": 30, "write_timeout": 30}
    if VENDOR == "mysql"
    else {"connect_timeout": 5, "keepalives_idle": 30, "tcp_user_timeout": 30000}
)
if DRIVER == "pymysql":
    TIMEOUTS["ssl_disabled"] = True


def doctor(*args: str) -> tuple[int, str, str]:
    """Run the command in-process: (exit code, stdout, stderr)."""
    out, err = StringIO(), StringIO()
    try:
        call_command("freshconn", "doctor", *args, stdout=out, stderr=err)
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    return code, out.getvalue(), err.getvalue()


def doctor_json(*args: str) -> tuple[int, dict[str, Any]]:
    code, out, _ = doctor("--format", "json", *args)
    return code, json.loads(out)


def verdict_ids(data: dict[str, Any], alias: str = "doc") -> dict[str, str]:
    db = next(d for d in data["databases"] if d["alias"] == alias)
    return {v["id"]: v["severity"] for v in db["verdicts"]}


@contextmanager
def alias(server: Server, name: str = "doc", **extra: Any) -> Iterator[str]:
    """A database alias on ``server`` with sane timeouts, overridable per test."""
    settings = server.django_settings(**{"CONN_MAX_AGE": 60, "OPTIONS": dict(TIMEOUTS), **extra})
    with temp_alias(name, settings):
        yield name


def test_healthy_alias_exits_zero_even_with_notes(server: Server) -> None:
    """Timeouts set and CONN_MAX_AGE=0: only a note (connect cost per unit), exit code 0."""
    with alias(server, CONN_MAX_AGE=0):
        code, data = doctor_json("--database", "doc")
    assert verdict_ids(data) == {"new-connection-per-unit": "note"}
    assert code == 0
    assert data["status"] == "ok"


def test_lifetime_above_server_idle_limit(server: Server) -> None:
    """CONN_MAX_AGE=None against a server dropping sessions idle 20 s: warning, a fix below 20 s, exit 1."""
    with alias(server, CONN_MAX_AGE=None, OPTIONS={**TIMEOUTS, **short_server_timeout_options(20)}):
        code, data = doctor_json("--database", "doc")
    db = data["databases"][0]
    assert verdict_ids(data) == {"lifetime-above-idle-limit": "warning"}
    assert db["server"]["idle_limit"] == 20
    assert "at most 18" in db["verdicts"][0]["fix"]
    assert code == 1


def test_no_read_timeout(server: Server) -> None:
    """No driver timeouts in OPTIONS: the no-read-timeout warning names the options to set."""
    with alias(server, OPTIONS={"ssl_disabled": True} if DRIVER == "pymysql" else {}):
        _, data = doctor_json("--database", "doc")
    fix = next(v["fix"] for v in data["databases"][0]["verdicts"] if v["id"] == "no-read-timeout")
    assert ("read_timeout" if VENDOR == "mysql" else "tcp_user_timeout") in fix
    assert "no-connect-timeout" in verdict_ids(data) or DRIVER == "pymysql"


@pytest.mark.skipif(DRIVER != "pymysql", reason="PyMySQL only")
def test_pymysql_tls_cost_against_a_server_without_tls(server: Server) -> None:
    """PyMySQL with no ssl option against a server without TLS is warned about; ssl_disabled fixes it."""
    bare = {k: v for k, v in TIMEOUTS.items() if k != "ssl_disabled"}
    with alias(server, OPTIONS=bare):
        _, data = doctor_json("--database", "doc")
    assert verdict_ids(data) == {"pymysql-tls-per-connect": "warning"}
    assert data["databases"][0]["server"]["tls"] is False


@pytest.mark.skipif(DRIVER != "psycopg" or django.VERSION < (5, 1), reason="Django >= 5.1 pool on psycopg 3")
def test_pool_without_check(server: Server) -> None:
    """A Django pool with no check is a warning; with ConnectionPool.check_connection it is not."""
    from psycopg_pool import ConnectionPool

    with alias(server, CONN_MAX_AGE=0, OPTIONS={**TIMEOUTS, "pool": {"min_size": 1}}):
        _, data = doctor_json("--database", "doc")
    assert verdict_ids(data)["pool-without-check"] == "warning"
    assert data["databases"][0]["django"] | {"timeouts": None} == {
        "CONN_MAX_AGE": 0,
        "CONN_HEALTH_CHECKS": False,
        "pool": True,
        "pool_check": False,
        "timeouts": None,
    }
    checked = {"pool": {"check": ConnectionPool.check_connection}}
    with alias(server, CONN_MAX_AGE=0, OPTIONS={**TIMEOUTS, **checked}):
        _, data = doctor_json("--database", "doc")
    assert "pool-without-check" not in verdict_ids(data)


@pytest.mark.skipif(VENDOR != "mysql", reason="max_connections can change at run time on MariaDB only")
def test_connections_nearly_exhausted(server: Server) -> None:
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


def test_idle_in_transaction_limit_note(server: Server) -> None:
    """A server that kills sessions idle inside a transaction gets a note telling to keep transactions short."""
    setting = (
        {"init_command": "SET SESSION idle_transaction_timeout = 60"}
        if VENDOR == "mysql"
        else {"options": "-c idle_in_transaction_session_timeout=60000"}
    )
    with alias(server, OPTIONS={**TIMEOUTS, **setting}):
        code, data = doctor_json("--database", "doc")
    assert verdict_ids(data) == {"idle-in-transaction-limit": "note"}
    assert code == 0


@pytest.mark.skipif(VENDOR != "postgresql", reason="PgBouncer fronts PostgreSQL")
def test_pgbouncer_in_path(server: Server) -> None:
    """Through PgBouncer the server listens on another port: a proxy-in-path note suggests --probe-idle."""
    with PgBouncer(server.port) as bouncer, alias(server, PORT=str(bouncer.port)):
        _, data = doctor_json("--database", "doc")
    db = data["databases"][0]
    assert verdict_ids(data) == {"proxy-in-path": "note"}
    assert db["target"]["port"] == bouncer.port
    assert db["server"]["port"] == server.port


@pytest.mark.slow
def test_probe_finds_a_proxy_limit_the_server_does_not_know(server: Server) -> None:
    """Through HAProxy (idle 2 s) to a server with hours of idle limit, the probe brackets 2 s and warns."""
    with HAProxy(server.port, idle_timeout=2) as proxy, alias(server, PORT=str(proxy.port)):
        code, data = doctor_json("--database", "doc", "--probe-idle", "8")
    db = data["databases"][0]
    probe = db["probe"]
    assert db["server"]["idle_limit"] is None or db["server"]["idle_limit"] >= 3600
    assert probe["limit_found"] is True
    assert 1.0 <= probe["survived"] < 2.5
    assert 1.9 <= probe["died"] <= 3.5
    assert verdict_ids(data)["hidden-idle-limit"] == "warning"
    assert code == 1


def test_probe_progress_bar_on_stderr_for_text(server: Server) -> None:
    """``--probe-idle`` in text format draws a progress bar on stderr and reports what survived."""
    with alias(server):
        code, out, err = doctor("--database", "doc", "--probe-idle", "1")
    assert "probing idle limit [" in err
    assert "100%" in err
    assert "all survived up to 1s" in out
    assert "note[idle-limit-measured]" in out
    assert code == 0


def test_json_shape(server: Server) -> None:
    """The JSON report has the documented keys and types (schema freshconn.doctor/1)."""
    with alias(server, CONN_MAX_AGE=None, OPTIONS={**TIMEOUTS, **short_server_timeout_options(20)}):
        _, data = doctor_json("--database", "doc", "--database", "lite")
    assert data["schema"] == "freshconn.doctor/1"
    assert set(data) == {"schema", "status", "exit_code", "summary", "freshconn", "databases"}
    assert data["summary"] == {"errors": 0, "warnings": 1, "notes": 0}
    assert set(data["freshconn"]["settings"]) == {
        "CHECK_AFTER_IDLE",
        "CONN_MAX_AGE",
        "CONN_MAX_AGE_set",
        "PING_TIMEOUT",
        "RECONNECT_TIMEOUT",
    }
    doc, lite = data["databases"]
    assert set(doc) == {
        "alias",
        "vendor",
        "engine",
        "driver",
        "target",
        "reachable",
        "error",
        "server",
        "django",
        "lifetime",
        "probe",
        "verdicts",
    }
    assert doc["driver"]["name"] == DRIVER
    assert set(doc["server"]) == {
        "product",
        "version",
        "port",
        "tls",
        "connect_ms",
        "idle_limit",
        "max_connections",
        "connections_used",
        "limits",
    }
    limits = {"mysql": {"wait_timeout", "net_read_timeout", "max_allowed_packet"}, "postgresql": {"tcp_user_timeout"}}
    assert limits[VENDOR] <= set(doc["server"]["limits"])
    assert all(set(v) == {"id", "severity", "message", "fix"} for v in doc["verdicts"])
    assert (lite["vendor"], lite["reachable"], lite["server"], lite["verdicts"]) == ("sqlite", None, None, [])


def test_unreachable_is_exit_two(server: Server) -> None:
    """A database nobody listens for is an 'unreachable' error and exit code 2."""
    with alias(server, PORT=str(free_port())):
        code, data = doctor_json("--database", "doc")
    assert verdict_ids(data) == {"unreachable": "error"}
    assert data["databases"][0]["reachable"] is False
    assert code == 2


def test_invalid_freshconn_settings_is_exit_two(server: Server) -> None:
    """A broken FRESHCONN setting is reported as settings-invalid and exit code 2."""
    with override_settings(FRESHCONN={"CHECK_AFTER_IDLE": -1}), alias(server):
        code, out, _ = doctor("--database", "doc")
    assert "error[settings-invalid]" in out
    assert code == 2


def test_exit_codes_of_the_real_command(server: Server) -> None:
    """As a real process: 0 for a healthy alias, 1 with warnings, 2 when the server is unreachable."""

    def run(*args: str, **env: str) -> int:
        cmd = [sys.executable, "-m", "django", "freshconn", "doctor", *args]
        full = subprocess_env()
        full.update({"FRESHCONN_TEST_DB_PORT": str(server.port), "FRESHCONN_TEST_DB_NAME": "freshconn", **env})
        return subprocess.run(cmd, check=False, env=full, cwd=ROOT, capture_output=True, timeout=60).returncode

    assert run("--database", "lite") == 0
    assert run("--database", "default") == 1  # the test settings set no driver timeouts
    assert run("--database", "default", FRESHCONN_TEST_DB_PORT=str(free_port())) == 2


@pytest.fixture
def secret_user(server: Server) -> Iterator[tuple[str, str]]:
    """A server account whose password is distinctive enough to search for in output."""
    user, password = "zebra", "Zebra-Pw-5f3a91c"
    if isinstance(server, MariaDB):
        server.admin_sql(f"CREATE USER '{user}'@'%' IDENTIFIED BY '{password}'; GRANT ALL ON *.* TO '{user}'@'%';")
        yield user, password
        server.admin_sql(f"DROP USER '{user}'@'%'")
    else:
        assert isinstance(server, PostgreSQL)
        server.admin_sql(f"CREATE ROLE {user} LOGIN PASSWORD '{password}'")
        yield user, password
        server.admin_sql(f"DROP ROLE {user}")


def test_no_credential_in_any_output(server: Server, secret_user: tuple[str, str]) -> None:
    """Passwords in settings and OPTIONS appear in no output: text, JSON, errors, progress bar."""
    user, password = secret_user
    option_secret, wrong = "Okapi-Opt-7b2e4d", "Wrong-Pw-19d2ee"
    with (
        alias(server, "ok", USER=user, PASSWORD=password),
        alias(server, "bad", PASSWORD=wrong, OPTIONS={**TIMEOUTS, "password": wrong}),
        alias(
            server, "gone", PORT=str(free_port()), PASSWORD=password, OPTIONS={**TIMEOUTS, "passfile": option_secret}
        ),
    ):
        outputs = [
            *doctor("--database", "ok", "--database", "bad", "--database", "gone")[1:],
            *doctor("--format", "json", "--database", "ok", "--database", "bad", "--database", "gone")[1:],
            *doctor("--database", "ok", "--probe-idle", "1")[1:],
        ]
    text = "\n".join(outputs)
    assert "error[unreachable]" in text  # the failures were really reported...
    assert f"\nok  {'MariaDB' if VENDOR == 'mysql' else 'PostgreSQL'} " in text
    for secret in (password, option_secret, wrong):  # ...without a single credential
        assert secret not in text


def test_scrub_masks_dsn_and_key_value_passwords() -> None:
    """Driver messages with an unknown password (DSN or key=value) are masked too."""
    text = "failed: postgresql://app:hunter2@db/x password=hunter3 pwd='hunter 4'"
    scrubbed = _audit.scrub(text, set())
    assert "hunter" not in scrubbed
    assert "postgresql://app:********@db/x" in scrubbed


def test_secrets_of_collects_every_credential_in_settings() -> None:
    """PASSWORD and password-like OPTIONS (nested too) are the secrets scrubbed from every output."""
    settings = {
        "PASSWORD": "pw-one",
        "OPTIONS": {"password": "pw-two", "ssl": {"key_password": "pw-three"}, "read_timeout": 30, "sslmode": "off"},
    }
    secrets = _audit.secrets_of(settings)
    assert secrets == {"pw-one", "pw-two", "pw-three"}
    assert _audit.scrub("auth pw-two failed for pw-one", secrets) == "auth ******** failed for ********"
