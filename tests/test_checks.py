"""freshconn's system checks: static ones always, server ones only with ``check --database``."""

from __future__ import annotations

from io import StringIO
from typing import Any

import pytest
from django.core.management import call_command
from django.core.management.base import SystemCheckError
from django.test import override_settings
from testbed.servers import Server, free_port

from freshconn import checks

from .conftest import DRIVER, VENDOR, short_server_timeout_options
from .tempalias import temp_alias

TIMEOUTS: dict[str, Any] = (
    {"connect_timeout": 5, "read_timeout": 30, "write_timeout": 30}
    if VENDOR == "mysql"
    else {"connect_timeout": 5, "keepalives_idle": 30, "tcp_user_timeout": 30000}
)


def ids(messages: list[Any], alias: str = "chk") -> list[str]:
    """The ids of the messages about ``alias`` (or global ones)."""
    return [m.id for m in messages if m.obj in (None, f"DATABASES[{alias!r}]")]


def settings_for(server: Server, **extra: Any) -> dict[str, Any]:
    return server.django_settings(**{"CONN_MAX_AGE": 60, "OPTIONS": dict(TIMEOUTS), **extra})


def test_e001_bad_freshconn_setting() -> None:
    """A FRESHCONN value of the wrong type is freshconn.E001, naming the key."""
    with override_settings(FRESHCONN={"CHECK_AFTER_IDLE": "5"}):
        messages = checks.check_settings()
    assert "freshconn.E001" in ids(messages)
    assert "CHECK_AFTER_IDLE" in next(m.msg for m in messages if m.id == "freshconn.E001")


def test_e002_bad_conn_max_age(server: Server) -> None:
    """A CONN_MAX_AGE that is a string is freshconn.E002 on that alias."""
    with temp_alias("chk", settings_for(server, CONN_MAX_AGE="60")):
        assert ids(checks.check_settings()) == ["freshconn.E002"]


def test_e003_zero_timeout(server: Server) -> None:
    """A driver timeout of 0 (wait forever) is freshconn.E003."""
    with temp_alias("chk", settings_for(server, OPTIONS={**TIMEOUTS, "connect_timeout": 0})):
        messages = checks.check_settings()
    assert ids(messages) == ["freshconn.E003"]
    assert "connect_timeout" in next(m.msg for m in messages if m.id == "freshconn.E003")


def test_w002_no_driver_timeouts_names_the_options(server: Server) -> None:
    """An alias with no network timeout in OPTIONS gets W002 with the driver's option names in the hint."""
    with temp_alias("chk", settings_for(server, OPTIONS={})):
        warning = next(m for m in checks.check_settings() if m.id == "freshconn.W002")
    expected = ("read_timeout", "write_timeout") if VENDOR == "mysql" else ("keepalives_idle", "tcp_user_timeout")
    assert all(name in warning.hint for name in (*expected, "connect_timeout"))


def test_clean_alias_has_no_messages(server: Server) -> None:
    """An alias with timeouts and a sane lifetime draws no static message at all."""
    with temp_alias("chk", settings_for(server)):
        assert ids(checks.check_settings()) == []


def test_w001_check_after_idle_not_below_lifetime(server: Server) -> None:
    """CHECK_AFTER_IDLE not below the lifetime is freshconn.W001."""
    with (
        override_settings(FRESHCONN={"CHECK_AFTER_IDLE": 10.0}),
        temp_alias("chk", settings_for(server, CONN_MAX_AGE=5)),
    ):
        assert ids(checks.check_settings()) == ["freshconn.W001"]


@pytest.mark.skipif(VENDOR != "postgresql", reason="Django's pool is PostgreSQL-only")
def test_w003_pool_without_check(server: Server) -> None:
    """A Django pool with no check is freshconn.W003; one with a check is not."""
    with temp_alias("chk", settings_for(server, CONN_MAX_AGE=0, OPTIONS={**TIMEOUTS, "pool": True})):
        assert ids(checks.check_settings()) == ["freshconn.W003"]
    with temp_alias("chk", settings_for(server, CONN_MAX_AGE=0, OPTIONS={**TIMEOUTS, "pool": {"check": print}})):
        assert ids(checks.check_settings()) == []


def test_server_checks_need_databases(server: Server) -> None:
    """Without ``databases`` the server checks do nothing (no connection is opened)."""
    with temp_alias("chk", settings_for(server, CONN_MAX_AGE=None, OPTIONS=short_server_timeout_options(2))):
        assert checks.check_servers(databases=None) == []


def test_w004_lifetime_above_server_idle_limit(server: Server) -> None:
    """A lifetime above the server's idle limit is W004, with a CONN_MAX_AGE below the limit in the hint."""
    options = {**TIMEOUTS, **short_server_timeout_options(20)}
    with temp_alias("chk", settings_for(server, CONN_MAX_AGE=None, OPTIONS=options)):
        messages = checks.check_servers(databases=["chk"])
    warning = next(m for m in messages if m.id == "freshconn.W004")
    assert "20s" in warning.msg
    assert "at most 18" in warning.hint


def test_no_w004_when_lifetime_is_below_the_limit(server: Server) -> None:
    """FRESHCONN's CONN_MAX_AGE override below the server's idle limit silences W004."""
    options = {**TIMEOUTS, **short_server_timeout_options(20), "ssl_disabled": True}
    if DRIVER != "pymysql":
        options.pop("ssl_disabled")
    with (
        override_settings(FRESHCONN={"CONN_MAX_AGE": 15}),
        temp_alias("chk", settings_for(server, CONN_MAX_AGE=None, OPTIONS=options)),
    ):
        assert ids(checks.check_servers(databases=["chk"])) == []


def test_e004_unreachable_without_password(server: Server) -> None:
    """An unreachable server is E004, and the message never shows the password."""
    with temp_alias("chk", settings_for(server, PORT=str(free_port()), PASSWORD="Quokka-Secret-4471")):
        messages = checks.check_servers(databases=["chk"])
    assert ids(messages) == ["freshconn.E004"]
    assert "Quokka-Secret-4471" not in messages[0].msg


@pytest.mark.skipif(DRIVER != "pymysql", reason="PyMySQL only")
def test_w005_pymysql_tls_without_server_tls(server: Server) -> None:
    """PyMySQL without ssl options against a server with no TLS is W005; ssl_disabled silences it."""
    with temp_alias("chk", settings_for(server)):
        assert "freshconn.W005" in ids(checks.check_servers(databases=["chk"]))
    with temp_alias("chk", settings_for(server, OPTIONS={**TIMEOUTS, "ssl_disabled": True})):
        assert "freshconn.W005" not in ids(checks.check_servers(databases=["chk"]))


def test_call_command_check_reports_static_and_database_checks(live: None, server: Server) -> None:
    """``manage.py check`` shows W002; only ``check --database`` adds the server's W004."""
    options = short_server_timeout_options(20)
    with temp_alias("chk", settings_for(server, CONN_MAX_AGE=None, OPTIONS=options)):
        plain = StringIO()
        call_command("check", stdout=StringIO(), stderr=plain)
        with_db = StringIO()
        call_command("check", "--database", "chk", stdout=StringIO(), stderr=with_db)
    assert "DATABASES['chk']: (freshconn.W002)" in plain.getvalue()
    assert "freshconn.W004" not in plain.getvalue()
    assert "DATABASES['chk']: (freshconn.W004)" in with_db.getvalue()


def test_call_command_check_fails_on_a_freshconn_error() -> None:
    """An E001 makes ``manage.py check`` fail with a SystemCheckError naming the id."""
    with override_settings(FRESHCONN={"NOPE": 1}), pytest.raises(SystemCheckError, match=r"freshconn\.E001"):
        call_command("check", stdout=StringIO(), stderr=StringIO())
