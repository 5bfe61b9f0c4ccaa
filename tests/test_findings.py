"""One catalogue of findings: both ids, a docs row each, and system checks that agree with the doctor."""

from __future__ import annotations

import json
import re
from io import StringIO
from typing import Any

import pytest
from django.core.management import call_command
from django.test import override_settings
from testbed.servers import DBServer, free_port

from freshconn import _inspect, checks
from freshconn._findings import CATALOGUE, Finding

from .conftest import DRIVER, ROOT, VENDOR, short_server_timeout_options
from .tempalias import temp_alias

TIMEOUTS: dict[str, Any] = (
    {"connect_timeout": 5, "read_timeout": 30, "write_timeout": 30}
    if VENDOR == "mysql"
    else {"connect_timeout": 5, "keepalives_idle": 30, "tcp_user_timeout": 30000}
)
if DRIVER == "pymysql":
    TIMEOUTS["ssl_disabled"] = True

#: The ids that existed before the catalogue: a check id keeps its meaning.
LEGACY = {
    "freshconn.E001": "settings-invalid",
    "freshconn.E002": "conn-max-age-invalid",
    "freshconn.E003": "timeout-invalid",
    "freshconn.E004": "unreachable",
    "freshconn.W001": "check-after-idle-not-below-lifetime",
    "freshconn.W002": "no-read-timeout",
    "freshconn.W004": "lifetime-above-idle-limit",
    "freshconn.W005": "pymysql-tls-per-connect",
}


def _docs_rows() -> dict[str, list[str]]:
    rows = {}
    for line in (ROOT / "docs" / "checks.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells and re.fullmatch(r"`freshconn\.[EWI]\d{3}`", cells[0]):
            rows[cells[0].strip("`")] = cells
    return rows


def _expected_row(f: Finding) -> list[str]:
    return [f"`{f.check_id}`", f"`{f.doctor_id}`", f.severity, f.needs, f.condition, f.fix]


def test_every_finding_has_both_ids_a_severity_and_its_docs_row() -> None:
    """Each finding has a check id, a doctor id, a severity and exactly its row in docs/checks.md."""
    rows = _docs_rows()
    for f in CATALOGUE:
        assert re.fullmatch(r"freshconn\.[EWI]\d{3}", f.check_id)
        assert re.fullmatch(r"[a-z]+(-[a-z]+)*", f.doctor_id)
        assert f.check_id[10] == {"error": "E", "warning": "W", "note": "I"}[f.severity]
        assert f.condition
        assert f.fix
        expected = "| " + " | ".join(_expected_row(f)) + " |"
        assert rows.get(f.check_id) == _expected_row(f), f"docs/checks.md needs the row:\n{expected}"
    assert set(rows) == {f.check_id for f in CATALOGUE}, "docs/checks.md lists a finding the catalogue lacks"


def test_ids_are_unique_and_the_old_ones_keep_their_meaning() -> None:
    """No id is used twice, and E001-E004, W001-W005 still name the findings they named."""
    assert len({f.check_id for f in CATALOGUE}) == len({f.doctor_id for f in CATALOGUE}) == len(CATALOGUE)
    by_check = {f.check_id: f.doctor_id for f in CATALOGUE}
    assert {check_id: by_check[check_id] for check_id in LEGACY} == LEGACY


def _bad_option() -> dict[str, Any]:
    return {"sslmode": "bogus"} if VENDOR == "postgresql" else {"no_such_option": 1}


def _bad_timeout() -> dict[str, Any]:
    return {"read_timeout": "30"} if VENDOR == "mysql" else {"tcp_user_timeout": "abc"}


def _in_transaction_limit() -> dict[str, Any]:
    if VENDOR == "mysql":
        return {"init_command": "SET SESSION idle_transaction_timeout = 60"}
    return {"options": "-c idle_in_transaction_session_timeout=60000"}


NO_TIMEOUTS = {"ssl_disabled": True} if DRIVER == "pymysql" else {}
# name: (FRESHCONN, changes to the alias's settings, the findings both must report)
CASES: dict[str, tuple[dict[str, Any], dict[str, Any], set[str]]] = {
    "clean": ({}, {}, set()),
    "CONN_MAX_AGE as a string": ({}, {"CONN_MAX_AGE": "60"}, {"conn-max-age-invalid"}),
    "timeout of the wrong type": ({}, {"OPTIONS": {**TIMEOUTS, **_bad_timeout()}}, {"timeout-invalid"}),
    "timeout 0": ({}, {"OPTIONS": {**TIMEOUTS, "connect_timeout": 0}}, {"timeout-invalid"}),
    "option the driver rejects": ({}, {"OPTIONS": {**TIMEOUTS, **_bad_option()}}, {"connect-settings-rejected"}),
    "CHECK_AFTER_IDLE above the lifetime": (
        {"CHECK_AFTER_IDLE": 10},
        {"CONN_MAX_AGE": 5},
        {"check-after-idle-not-below-lifetime"},
    ),
    "lifetime 0 in units": ({"CONN_MAX_AGE": 0}, {}, {"new-connection-per-unit"}),
    "invalid FRESHCONN": ({"NOPE": 1}, {}, {"settings-invalid"}),
    "no timeouts": (
        {},
        {"OPTIONS": NO_TIMEOUTS},
        {"no-read-timeout"} | (set() if DRIVER == "pymysql" else {"no-connect-timeout"}),
    ),
    "server idle limit": (
        {},
        {"CONN_MAX_AGE": None, "OPTIONS": {**TIMEOUTS, **short_server_timeout_options(20)}},
        {"lifetime-above-idle-limit"},
    ),
    "idle-in-transaction limit": (
        {},
        {"OPTIONS": {**TIMEOUTS, **_in_transaction_limit()}},
        {"idle-in-transaction-limit"},
    ),
    "unreachable": ({}, {"PORT": "dead"}, {"unreachable"}),
    "wrong password": ({}, {"PASSWORD": "not-the-password"}, {"unreachable"}),
}
if VENDOR == "postgresql":
    CASES["check in the pool's options"] = (
        {},
        {"CONN_MAX_AGE": 0, "OPTIONS": {**TIMEOUTS, "pool": {"check": print}}},
        {"pool-check-option"},
    )
if DRIVER == "pymysql":
    bare = {k: v for k, v in TIMEOUTS.items() if k != "ssl_disabled"}
    CASES["PyMySQL TLS per connect"] = ({}, {"OPTIONS": bare}, {"pymysql-tls-per-connect"})


def _from_checks(alias: str) -> dict[str, tuple[str, str | None]]:
    by_check: dict[str | None, str] = {f.check_id: f.doctor_id for f in CATALOGUE}
    messages = [*checks.check_settings(), *checks.check_servers(databases=[alias])]
    mine = [m for m in messages if m.obj in (None, f"DATABASES[{alias!r}]")]
    return {by_check[m.id]: (m.msg, m.hint) for m in mine}


def _doctor_json(alias: str) -> tuple[int, dict[str, Any]]:
    out = StringIO()
    try:
        call_command("freshconn", "doctor", "--format", "json", "--database", alias, stdout=out)
    except SystemExit as exc:  # exit 1 or 2: the report is on stdout all the same
        return int(exc.code or 0), json.loads(out.getvalue())
    return 0, json.loads(out.getvalue())


def _from_doctor(alias: str) -> dict[str, tuple[str, str]]:
    _, data = _doctor_json(alias)
    verdicts = [*data["freshconn"]["verdicts"], *data["databases"][0]["verdicts"]]
    by_doctor = {f.doctor_id: f.check_id for f in CATALOGUE}
    assert all(by_doctor[v["id"]] == v["check_id"] for v in verdicts)
    return {v["id"]: (v["message"], v["fix"]) for v in verdicts}


@pytest.mark.parametrize("case", list(CASES))
def test_checks_and_doctor_agree(server: DBServer, case: str) -> None:
    """``check --database`` and the doctor report the same findings, with the same message and fix."""
    freshconn, changes, expected = CASES[case]
    if changes.get("PORT") == "dead":
        changes = {**changes, "PORT": str(free_port())}
    settings = server.django_settings(**{"CONN_MAX_AGE": 60, "OPTIONS": dict(TIMEOUTS), **changes})
    with override_settings(FRESHCONN=freshconn), temp_alias("agree", settings):
        from_checks, from_doctor = _from_checks("agree"), _from_doctor("agree")
    assert set(from_doctor) == expected
    assert from_checks == from_doctor


def _verdict(data: dict[str, Any], doctor_id: str) -> dict[str, Any]:
    return next(v for v in data["databases"][0]["verdicts"] if v["id"] == doctor_id)


def test_bad_driver_option_gets_no_network_advice(server: DBServer) -> None:
    """An option the driver rejects before connecting (libpq sslmode 'bogus', an unknown MySQL option) names it."""
    bad = _bad_option()
    with temp_alias("doc", server.django_settings(CONN_MAX_AGE=60, OPTIONS={**TIMEOUTS, **bad})):
        code, data = _doctor_json("doc")
    fix = _verdict(data, "connect-settings-rejected")["fix"]
    assert f"DATABASES['doc']['OPTIONS'][{next(iter(bad))!r}]" in fix
    assert data["databases"][0]["error_kind"] == "options_rejected"
    for network_word in ("firewall", "HOST", "PORT", "server runs"):
        assert network_word not in fix
    assert code == 2


def test_wrongly_typed_timeout_still_lets_the_doctor_read_the_server(server: DBServer) -> None:
    """A timeout the driver would reject is E003, and the doctor's own guarded connection still reads the server."""
    bad = _bad_timeout()
    with temp_alias("doc", server.django_settings(CONN_MAX_AGE=60, OPTIONS={**TIMEOUTS, **bad})):
        code, data = _doctor_json("doc")
    assert next(iter(bad)) in _verdict(data, "timeout-invalid")["message"]
    assert data["databases"][0]["reachable"] is True
    assert code == 2


def test_string_conn_max_age_is_not_a_lifetime(server: DBServer) -> None:
    """CONN_MAX_AGE='60' is E002, and units fall back to the default lifetime rather than reading 60 s."""
    with temp_alias("doc", server.django_settings(CONN_MAX_AGE="60", OPTIONS=dict(TIMEOUTS))):
        code, data = _doctor_json("doc")
    assert (data["databases"][0]["lifetime"], data["databases"][0]["lifetime_source"]) == (1800, "default")
    assert code == 2


def test_concurrency_above_max_connections_from_the_check_and_the_doctor(server: DBServer) -> None:
    """Two aliases on one server: a pool of max_connections/2 + 1 is W010, from check_concurrency() and the doctor."""
    settings = server.django_settings(CONN_MAX_AGE=60, OPTIONS=dict(TIMEOUTS))
    with temp_alias("agree", settings), temp_alias("agree2", settings):
        limit = _inspect.inspect("agree").max_connections
        assert limit
        over, fits = limit // 2 + 1, limit // 2
        messages = checks.check_concurrency(over, databases=["agree", "agree2", "lite"])
        out = StringIO()
        with pytest.raises(SystemExit) as exited:
            call_command(
                "freshconn", "doctor", "--format", "json", "--database", "agree", "--database", "agree2",
                "--concurrency", str(over), stdout=out,
            )  # fmt: skip
        data = json.loads(out.getvalue())
        assert checks.check_concurrency(fits, databases=["agree", "agree2"]) == []
    assert [(m.id, m.obj) for m in messages] == [("freshconn.W010", "DATABASES['agree']")]
    assert f"that is {over * 2}, but the server allows max_connections={limit}" in messages[0].msg
    assert messages[0].hint is not None
    assert f"Run at most {limit // 2} threads or greenlets" in messages[0].hint
    first, second = data["databases"]
    verdict = next(v for v in first["verdicts"] if v["id"] == "concurrency-above-max-connections")
    assert (verdict["check_id"], verdict["message"], verdict["fix"]) == (
        "freshconn.W010",
        messages[0].msg,
        messages[0].hint,
    )
    assert "concurrency-above-max-connections" not in {v["id"] for v in second["verdicts"]}
    assert exited.value.code == 1


@pytest.mark.parametrize("value", [0, -1, True, "8"])
def test_check_concurrency_takes_a_positive_int(value: Any) -> None:
    """check_concurrency() refuses a concurrency that is not an int >= 1, naming what it got."""
    with pytest.raises(TypeError, match="int >= 1"):
        checks.check_concurrency(value)
