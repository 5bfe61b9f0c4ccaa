"""freshconn's system checks: static ones always, server ones only with ``check --database``."""

from __future__ import annotations

from io import StringIO
from typing import Any

import pytest
from django.core import checks as django_checks
from django.core.management import call_command
from django.core.management.base import SystemCheckError
from django.test import override_settings
from testbed.servers import DBServer, free_port

from freshconn import checks

from .conftest import DRIVER, VENDOR, short_server_timeout_options
from .tempalias import temp_alias

TIMEOUTS: dict[str, Any] = (
    {"connect_timeout": 5, "read_timeout": 30, "write_timeout": 30}
    if VENDOR == "mysql"
    else {"connect_timeout": 5, "keepalives_idle": 30, "tcp_user_timeout": 30000}
)
if DRIVER == "pymysql":
    TIMEOUTS["ssl_disabled"] = True


def ids(messages: list[Any], alias: str = "chk") -> list[str]:
    """The ids of the messages about ``alias`` (or global ones)."""
    return [m.id for m in messages if m.obj in (None, f"DATABASES[{alias!r}]")]


def message(messages: list[Any], check_id: str) -> Any:
    return next(m for m in messages if m.id == check_id)


def settings_for(server: DBServer, **extra: Any) -> dict[str, Any]:
    return server.django_settings(**{"CONN_MAX_AGE": 60, "OPTIONS": dict(TIMEOUTS), **extra})


def test_e001_bad_freshconn_setting() -> None:
    """A FRESHCONN value of the wrong type is freshconn.E001, naming the key."""
    with override_settings(FRESHCONN={"CHECK_AFTER_IDLE": "5"}):
        messages = checks.check_settings()
    assert "freshconn.E001" in ids(messages)
    assert "CHECK_AFTER_IDLE" in message(messages, "freshconn.E001").msg


def test_e002_bad_conn_max_age(server: DBServer) -> None:
    """A CONN_MAX_AGE that is a string is freshconn.E002 on that alias."""
    with temp_alias("chk", settings_for(server, CONN_MAX_AGE="60")):
        assert ids(checks.check_settings()) == ["freshconn.E002"]


def test_e003_zero_timeout(server: DBServer) -> None:
    """A driver timeout of 0 (wait forever) is freshconn.E003."""
    with temp_alias("chk", settings_for(server, OPTIONS={**TIMEOUTS, "connect_timeout": 0})):
        messages = checks.check_settings()
    assert ids(messages) == ["freshconn.E003"]
    assert "connect_timeout is not above 0" in message(messages, "freshconn.E003").msg


# (option, value, rejected by this driver at connect): measured on each driver.
E003_CASES: list[tuple[str, Any, bool]] = {
    "mysql": [
        ("read_timeout", "30", True),  # a string fails in both MySQL drivers
        ("read_timeout", 2.5, DRIVER in ("mysqlclient", "mysqlconnector")),  # ints only; PyMySQL floats too
        ("connect_timeout", True, True),
    ],
    "postgresql": [
        ("tcp_user_timeout", "30000", False),  # libpq parses digit strings
        ("keepalives_idle", 2.5, True),  # ...but no floats
        ("connect_timeout", True, True),
    ],
}[VENDOR]


@pytest.mark.parametrize(("key", "value", "invalid"), E003_CASES)
def test_e003_types_the_driver_rejects(server: DBServer, key: str, value: Any, invalid: bool) -> None:
    """A timeout of a type this driver rejects at connect is E003, one it accepts is not."""
    with temp_alias("chk", settings_for(server, OPTIONS={**TIMEOUTS, key: value})):
        assert ("freshconn.E003" in ids(checks.check_settings())) is invalid


def test_w002_no_read_timeout_names_the_options(server: DBServer) -> None:
    """Only a connect_timeout (no read guard) is W002, with the driver's option names in the hint."""
    with temp_alias("chk", settings_for(server, OPTIONS={"connect_timeout": 5})):
        warning = message(checks.check_settings(), "freshconn.W002")
    expected = ("read_timeout", "write_timeout") if VENDOR == "mysql" else ("keepalives_idle", "tcp_user_timeout")
    assert all(name in warning.hint for name in (*expected, "connect_timeout"))


def test_clean_alias_has_no_messages(server: DBServer) -> None:
    """An alias with timeouts and a sane lifetime draws no static message at all."""
    with temp_alias("chk", settings_for(server)):
        assert ids(checks.check_settings()) == []


def test_w001_check_after_idle_not_below_lifetime(server: DBServer) -> None:
    """CHECK_AFTER_IDLE not below the lifetime in units is freshconn.W001."""
    with (
        override_settings(FRESHCONN={"CHECK_AFTER_IDLE": 10.0}),
        temp_alias("chk", settings_for(server, CONN_MAX_AGE=5)),
    ):
        assert ids(checks.check_settings()) == ["freshconn.W001"]


def test_w006_new_connection_per_unit_is_about_freshconn_itself(server: DBServer) -> None:
    """FRESHCONN['CONN_MAX_AGE'] = 0 is one W006 (no alias), whose hint says to remove it or use 1800."""
    with override_settings(FRESHCONN={"CONN_MAX_AGE": 0}), temp_alias("chk", settings_for(server)):
        messages = checks.check_settings()
    warning = message(messages, "freshconn.W006")
    assert ids(messages) == ["freshconn.W006"]
    assert warning.obj is None
    assert "Remove FRESHCONN['CONN_MAX_AGE']" in warning.hint
    assert "1800" in warning.hint


def test_i001_no_connect_timeout_is_an_info(server: DBServer) -> None:
    """No connect_timeout is an Info (freshconn.I001), except for PyMySQL, whose default is 10 s."""
    options = {k: v for k, v in TIMEOUTS.items() if k != "connect_timeout"}
    with temp_alias("chk", settings_for(server, OPTIONS=options)):
        messages = checks.check_settings()
    if DRIVER == "pymysql":
        assert ids(messages) == []
    else:
        assert ids(messages) == ["freshconn.I001"]
        assert message(messages, "freshconn.I001").level == django_checks.INFO


@pytest.mark.skipif(VENDOR != "postgresql", reason="Django's pool is PostgreSQL-only")
def test_e007_check_in_the_pools_options(server: DBServer) -> None:
    """A pool without a check of its own is fine (freshconn gives it one); a 'check' in OPTIONS['pool'] is E007."""
    with temp_alias("chk", settings_for(server, CONN_MAX_AGE=0, OPTIONS={**TIMEOUTS, "pool": True})):
        assert ids(checks.check_settings()) == []
    with temp_alias("chk", settings_for(server, CONN_MAX_AGE=0, OPTIONS={**TIMEOUTS, "pool": {"check": print}})):
        assert ids(checks.check_settings()) == ["freshconn.E007"]


def test_server_checks_need_databases(server: DBServer) -> None:
    """Without ``databases`` the server checks do nothing (no connection is opened)."""
    with temp_alias("chk", settings_for(server, CONN_MAX_AGE=None, OPTIONS=short_server_timeout_options(2))):
        assert checks.check_servers(databases=None) == []


def test_w004_lifetime_above_server_idle_limit(server: DBServer) -> None:
    """Django's CONN_MAX_AGE above the server's idle limit is W004, with a value below the limit in the hint."""
    options = {**TIMEOUTS, **short_server_timeout_options(20)}
    with temp_alias("chk", settings_for(server, CONN_MAX_AGE=None, OPTIONS=options)):
        warning = message(checks.check_servers(databases=["chk"]), "freshconn.W004")
    assert "20s" in warning.msg
    assert "DATABASES['chk']['CONN_MAX_AGE'] to at most 18" in warning.hint


def test_w004_follows_djangos_conn_max_age_not_freshconns(server: DBServer) -> None:
    """FRESHCONN's lifetime does not silence W004 (it is about code outside units); Django's own does."""
    options = {**TIMEOUTS, **short_server_timeout_options(20)}
    with (
        override_settings(FRESHCONN={"CONN_MAX_AGE": 15}),
        temp_alias("chk", settings_for(server, CONN_MAX_AGE=None, OPTIONS=options)),
    ):
        assert ids(checks.check_servers(databases=["chk"])) == ["freshconn.W004"]
    with temp_alias("chk", settings_for(server, CONN_MAX_AGE=15, OPTIONS=options)):
        assert ids(checks.check_servers(databases=["chk"])) == []


def test_e004_unreachable_reduced_to_its_kind(server: DBServer) -> None:
    """An unreachable server is E004 with our own summary; the message never shows the password."""
    with temp_alias("chk", settings_for(server, PORT=str(free_port()), PASSWORD="Quokka-Secret-4471")):
        messages = checks.check_servers(databases=["chk"])
    assert ids(messages) == ["freshconn.E004"]
    assert "nothing" in messages[0].msg  # "nothing accepts/answered at that host and port"
    assert messages[0].hint is not None
    assert "Quokka-Secret-4471" not in messages[0].msg + messages[0].hint


@pytest.mark.skipif(VENDOR != "postgresql", reason="a libpq option")
def test_e005_bad_libpq_option_is_a_settings_error(server: DBServer) -> None:
    """``sslmode: 'bogus'`` is E005 naming OPTIONS['sslmode'], with no network advice."""
    with temp_alias("chk", settings_for(server, OPTIONS={**TIMEOUTS, "sslmode": "bogus"})):
        error = message(checks.check_servers(databases=["chk"]), "freshconn.E005")
    assert "DATABASES['chk']['OPTIONS']['sslmode']" in error.hint
    assert "firewall" not in error.hint


@pytest.mark.skipif(DRIVER != "pymysql", reason="PyMySQL only")
def test_w005_pymysql_tls_without_server_tls(server: DBServer) -> None:
    """PyMySQL without ssl options against a server with no TLS is W005; ssl_disabled silences it."""
    bare = {k: v for k, v in TIMEOUTS.items() if k != "ssl_disabled"}
    with temp_alias("chk", settings_for(server, OPTIONS=bare)):
        assert "freshconn.W005" in ids(checks.check_servers(databases=["chk"]))
    with temp_alias("chk", settings_for(server)):
        assert "freshconn.W005" not in ids(checks.check_servers(databases=["chk"]))


def test_call_command_check_reports_static_and_database_checks(live: None, server: DBServer) -> None:
    """``manage.py check`` shows W002; only ``check --database`` adds the server's W004."""
    options = {**short_server_timeout_options(20), "connect_timeout": 5, "ssl_disabled": True}
    if DRIVER != "pymysql":
        options.pop("ssl_disabled")
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
