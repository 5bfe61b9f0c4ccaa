"""The doctor on a server that refuses writes (a demoted primary, a standby, a read-only session), and on
a multi-host PostgreSQL HOST without ``target_session_attrs``."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from testbed.servers import DB_NAME, DBServer

from .conftest import DRIVER, VENDOR
from .test_doctor import TIMEOUTS, alias, database, doctor, doctor_json, verdict, verdict_ids

pytestmark = pytest.mark.server

MYSQL = VENDOR == "mysql"
#: MariaDB's read_only does not bind users with SUPER (the test bed's app user has it).
USER, PASSWORD = "ro_doc", "ro-doc-secret-pw"


def _pg_default_read_only(srv: DBServer, change: str, expected: str) -> None:
    srv.admin_sql(f"ALTER SYSTEM {change}")
    srv.admin_sql("SELECT pg_reload_conf()")
    deadline = time.monotonic() + 10  # a new session showing the value: the reload reached the backends
    while srv.admin_sql("SHOW default_transaction_read_only").strip() != expected:
        assert time.monotonic() < deadline, f"default_transaction_read_only never became {expected}"
        time.sleep(0.02)


@pytest.fixture
def demoted(server: DBServer) -> Iterator[dict[str, Any]]:
    """The session's server made read-only for the alias's user; writable again afterwards."""
    if MYSQL:
        server.admin_sql(
            f"CREATE USER IF NOT EXISTS '{USER}'@'%' IDENTIFIED BY '{PASSWORD}';"
            f"GRANT ALL ON {DB_NAME}.* TO '{USER}'@'%'; SET GLOBAL read_only = 1;"
        )
        creds = {"USER": USER, "PASSWORD": PASSWORD}
    else:
        _pg_default_read_only(server, "SET default_transaction_read_only = on", "on")
        creds = {}
    try:
        yield creds
    finally:
        if MYSQL:
            server.admin_sql("SET GLOBAL read_only = 0")
        else:
            _pg_default_read_only(server, "RESET default_transaction_read_only", "off")


def test_a_demoted_server_is_reported_read_only(server: DBServer, demoted: dict[str, Any]) -> None:
    """read_only (MariaDB, a user without SUPER) / default_transaction_read_only: W011, exit 1, in JSON and text."""
    with alias(server, **demoted):
        code, data = doctor_json("--database", "doc")
        _, out, _ = doctor("--database", "doc")
    found = verdict(data, "server-read-only")
    assert verdict_ids(data) == {"server-read-only": "warning"}
    assert found["check_id"] == "freshconn.W011"
    assert "the primary" in found["fix"]
    facts = database(data)["server"]
    because = ["read_only"] if MYSQL else ["default_transaction_read_only"]
    assert (facts["read_only"], facts["read_only_because"]) == (True, because)
    assert f"writes refused ({because[0]})" in out
    assert code == 1


def test_a_writable_server_is_not(server: DBServer) -> None:
    with alias(server):
        code, data = doctor_json("--database", "doc")
    assert (database(data)["server"]["read_only"], database(data)["server"]["read_only_because"]) == (False, [])
    assert "server-read-only" not in verdict_ids(data)
    assert code == 0


def test_a_read_only_session_is_reported(server: DBServer) -> None:
    """A session made read-only by the alias's own settings (a reader endpoint's effect, in miniature)."""
    ro = (
        {"init_command": "SET SESSION TRANSACTION READ ONLY"}
        if MYSQL
        else {"options": "-c default_transaction_read_only=on"}
    )
    with alias(server, OPTIONS={**TIMEOUTS, **ro}):
        _, data = doctor_json("--database", "doc")
    facts = database(data)["server"]
    assert facts["read_only"] is True
    assert facts["read_only_because"] == (
        ["transaction_read_only" if "transaction_read_only" in str(facts) else "tx_read_only"]
        if MYSQL
        else ["default_transaction_read_only"]
    )
    assert verdict_ids(data) == {"server-read-only": "warning"}


MULTI = "127.0.0.1,127.0.0.2"


@pytest.mark.skipif(MYSQL, reason="libpq multi-host HOST")
def test_multi_host_without_target_session_attrs(server: DBServer) -> None:
    """HOST with two hosts and no target_session_attrs: W012 (settings only); libpq reaches the first host."""
    with alias(server, HOST=MULTI):
        code, data = doctor_json("--database", "doc")
    found = verdict(data, "multi-host-without-target-session-attrs")
    assert found["check_id"] == "freshconn.W012"
    assert "'target_session_attrs'] = 'read-write'" in found["fix"]
    assert database(data)["reachable"] is True
    assert verdict_ids(data) == {"multi-host-without-target-session-attrs": "warning"}
    assert code == 1
    with alias(server, HOST=MULTI, OPTIONS={**TIMEOUTS, "target_session_attrs": "read-write"}):
        code, data = doctor_json("--database", "doc")
    assert verdict_ids(data) == {}
    assert code == 0


@pytest.mark.skipif(MYSQL, reason="libpq multi-host HOST")
def test_multi_host_on_a_read_only_server(server: DBServer, demoted: dict[str, Any]) -> None:
    """Without target_session_attrs libpq settles on the read-only host: both findings, the fix names the option.

    With ``target_session_attrs = 'read-write'`` libpq refuses every read-only host: unreachable, kind
    ``no_writable_host`` (worth waiting for: a failover may promote one).
    """
    with alias(server, HOST=MULTI):
        _, data = doctor_json("--database", "doc")
    assert verdict_ids(data) == {
        "server-read-only": "warning",
        "multi-host-without-target-session-attrs": "warning",
    }
    assert "target_session_attrs'] = 'read-write'" in verdict(data, "server-read-only")["fix"]
    with alias(server, HOST=MULTI, OPTIONS={**TIMEOUTS, "target_session_attrs": "read-write"}):
        code, data = doctor_json("--database", "doc")
    db = database(data)
    assert (db["reachable"], db["error_kind"]) == (False, "no_writable_host")
    assert verdict(data, "unreachable")["severity"] == "error"
    assert "primary" in verdict(data, "unreachable")["fix"]
    assert code == 2
    assert DRIVER in ("psycopg", "psycopg2")
