"""Redaction by construction: no password reaches the doctor, the checks, freshconn's logs or metrics.

The matrix runs every password twice against the real server: as itself and as a "twin" of the
same shape (each letter and digit shifted by one, punctuation kept). Everything the doctor, the
checks, the ``freshconn`` logger and the Prometheus collector produce must be identical for both
(after dropping measured numbers such as connect times): so the password has no influence on any
output, which proves it appears nowhere and that no other word (``postgresql``, ``true``,
``default``...) was masked, even for passwords that are also ordinary words.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Iterator
from io import StringIO
from typing import Any
from urllib.parse import quote

import pytest
from django.core.management import call_command
from django.core.management.base import SystemCheckError
from django.db import Error, connections
from django.test import override_settings
from prometheus_client import CollectorRegistry, generate_latest
from testbed.servers import DB_NAME, DBServer, free_port

import freshconn
from freshconn import _outage
from freshconn._redact import safe_location
from freshconn.contrib.prometheus import register
from freshconn.testing import kill_connection

from .conftest import DRIVER, VENDOR, admin_connection, wait_until_socket_shows_close
from .tempalias import temp_alias

SPECIAL = "Ünï;@:/%'\"#&=ß"
PASSWORDS = ["postgres", "mysql", "true", "1", "default", "user", DB_NAME, SPECIAL]
USER, BAD_USER, BAD_USER_PASSWORD = "fcpw", "fcbad", "Fcbad-Real-Pw-42"
MATRIX_ALIASES = ("ok", "bad", "gone", "dsn")


def twin(password: str) -> str:
    """The same shape with every letter and digit shifted by one (latin-1 stays latin-1)."""
    out = []
    for c in password:
        if c.isdigit():
            out.append(str((int(c) + 1) % 10))
        elif "a" <= c.lower() <= "z":
            base = ord("a") if c.islower() else ord("A")
            out.append(chr((ord(c) - base + 1) % 26 + base))
        elif c.isalpha():
            out.append(chr(ord(c) + 1))
        else:
            out.append(c)
    return "".join(out)


def _sql_literal(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "''") + "'"


class Accounts:
    """Server accounts for the matrix: ``fcpw`` (password changed per case) and ``fcbad``."""

    def __init__(self, server: DBServer) -> None:
        self.server = server
        self.raw = admin_connection(server)

    def _sql(self, sql: str) -> None:
        cursor = self.raw.cursor()
        try:
            cursor.execute(sql)
        finally:
            cursor.close()

    def _mysql_identified(self, password: str) -> str:
        # mysql_native_password over the bytes the driver sends: PyMySQL encodes latin-1, mysqlclient UTF-8.
        raw = password.encode("latin-1" if DRIVER == "pymysql" else "utf-8")
        return "IDENTIFIED BY PASSWORD '*" + hashlib.sha1(hashlib.sha1(raw).digest()).hexdigest().upper() + "'"

    def set_password(self, user: str, password: str, *, create: bool = False) -> None:
        if VENDOR == "mysql":
            self._sql(f"{'CREATE' if create else 'ALTER'} USER '{user}'@'%' {self._mysql_identified(password)}")
            if create:
                self._sql(f"GRANT ALL ON {DB_NAME}.* TO '{user}'@'%'")
        else:
            self._sql(f"{'CREATE' if create else 'ALTER'} ROLE {user} LOGIN PASSWORD {_sql_literal(password)}")

    def drop(self) -> None:
        for user in (USER, BAD_USER):
            self._sql(f"DROP USER '{user}'@'%'" if VENDOR == "mysql" else f"DROP ROLE {user}")
        self.raw.close()


@pytest.fixture(scope="module")
def accounts(server: DBServer) -> Iterator[Accounts]:
    """The two matrix accounts; on PostgreSQL they must authenticate by password (the test bed trusts others)."""
    acc = Accounts(server)
    hba_path, saved = "", ""
    if VENDOR == "postgresql":
        hba_path = f"{server.datadir}/pg_hba.conf"
        with open(hba_path) as f:
            saved = f.read()
        with open(hba_path, "w") as f:
            f.write(f"host all {USER},{BAD_USER} 127.0.0.1/32 scram-sha-256\n{saved}")
        server.admin_sql("SELECT pg_reload_conf()")
    acc.set_password(USER, "initial-Pw-1", create=True)
    acc.set_password(BAD_USER, BAD_USER_PASSWORD, create=True)
    try:
        yield acc
    finally:
        acc.drop()
        if hba_path:
            with open(hba_path, "w") as f:
                f.write(saved)
            server.admin_sql("SELECT pg_reload_conf()")


@pytest.fixture(scope="module")
def dead_port() -> int:
    return free_port()


def _matrix_aliases(server: DBServer, password: str, dead_port: int) -> dict[str, dict[str, Any]]:
    """Where the password sits: PASSWORD everywhere, plus OPTIONS, a DSN in OPTIONS and a DSN as NAME."""
    scheme = "mysql" if VENDOR == "mysql" else "postgresql"
    dsn = f"{scheme}://{USER}:{quote(password, safe='')}@127.0.0.1:{server.port}/{DB_NAME}"
    timeouts: dict[str, Any] = (
        {"connect_timeout": 5, "read_timeout": 30}
        if VENDOR == "mysql"
        else {"connect_timeout": 5, "keepalives_idle": 30}
    )
    if DRIVER == "pymysql":
        timeouts["ssl_disabled"] = True  # a TLS context per connect would double the matrix's time
    password_key = "passwd" if DRIVER == "mysqlclient" else "password"
    secret_option = {"conninfo" if DRIVER == "psycopg" else "dsn": dsn} if VENDOR == "postgresql" else {}
    base = server.django_settings(USER=USER, PASSWORD=password, CONN_MAX_AGE=60)
    return {
        "ok": {**base, "OPTIONS": {**timeouts, **secret_option}},
        "bad": {**base, "USER": BAD_USER, "OPTIONS": {**timeouts, password_key: password}},
        "gone": {**base, "PORT": str(dead_port), "OPTIONS": dict(timeouts)},
        "dsn": {**base, "NAME": dsn, "OPTIONS": dict(timeouts)},
    }


def _normalized_text(text: str) -> str:
    # Measured, not configured: they differ between any two runs.
    text = re.sub(r"connect \d+(\.\d+)? ms", "connect X ms", text)
    return re.sub(r"connections \d+/\d+", "connections X/Y", text)


def _normalized_json(text: str) -> str:
    data = json.loads(text)  # every JSON must parse
    for db in data["databases"]:
        if db["server"]:
            db["server"].pop("connect_ms")
            db["server"].pop("connections_used")
    return json.dumps(data, sort_keys=True)


def _doctor(*args: str) -> str:
    out, err = StringIO(), StringIO()
    with pytest.raises(SystemExit):  # the failing aliases make it exit 2
        call_command("freshconn", "doctor", *args, stdout=out, stderr=err)
    return out.getvalue() + err.getvalue()


def _check(aliases: tuple[str, ...]) -> str:
    out, err = StringIO(), StringIO()
    args = [a for alias in aliases for a in ("--database", alias)]
    with pytest.raises(SystemCheckError) as failed:  # E004 for the aliases that cannot connect
        call_command("check", "--tag", "freshconn", *args, stdout=out, stderr=err)
    return str(failed.value) + out.getvalue() + err.getvalue()


def _query(alias: str) -> None:
    with connections[alias].cursor() as cursor:
        cursor.execute("SELECT 1")
        cursor.fetchall()


def _units() -> None:
    """Units that make freshconn log: a dead connection discarded, a retry, a server it cannot reach."""
    with freshconn.unit_of_work(using="ok"):
        _query("ok")
    kill_connection("ok")
    wait_until_socket_shows_close("ok")
    with freshconn.unit_of_work(using="ok"):
        _query("ok")  # "discarded connection 'ok': dead"
    killed: list[int] = []

    @freshconn.unit_of_work(using="ok", retries=1)
    def killed_once() -> None:
        _query("ok")
        if not killed:
            killed.append(kill_connection("ok"))
            _query("ok")  # a disconnect in a read-only unit: "retrying ... after a disconnect on 'ok'"

    killed_once()
    for alias in ("bad", "gone"):
        # mysql-connector-python: ProgrammingError for access denied, InterfaceError for refused.
        with pytest.raises(Error), freshconn.unit_of_work(using=alias):
            _query(alias)


def _scrape() -> str:
    registry = CollectorRegistry()
    register(registry)
    text = generate_latest(registry).decode()
    # How many reconnect attempts fit in RECONNECT_TIMEOUT depends on timing, not on the password.
    return re.sub(r"^(freshconn_reconnect_attempts_total\{[^}]*\}) \S+$", r"\1 N", text, flags=re.M)


def run_everything(server: DBServer, accounts: Accounts, password: str, dead_port: int) -> dict[str, str]:
    """Every output of freshconn for aliases holding ``password``, normalized for comparison."""
    accounts.set_password(USER, password)
    records = StringIO()
    handler = logging.StreamHandler(records)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s %(message)s %(alias)s %(reason)s"))
    logger = logging.getLogger("freshconn")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    aliases = _matrix_aliases(server, password, dead_port)
    try:
        with (
            # Long enough for one "cannot reach the server ... retrying" line, short enough to cost nothing.
            override_settings(FRESHCONN={"RECONNECT_TIMEOUT": 0.12}),
            temp_alias("ok", aliases["ok"]),
            temp_alias("bad", aliases["bad"]),
            temp_alias("gone", aliases["gone"]),
            temp_alias("dsn", aliases["dsn"]),
        ):
            selection = [a for alias in ("default", *MATRIX_ALIASES) for a in ("--database", alias)]
            freshconn.reset_stats()
            _outage.reset()  # each run meets the dead port's outage afresh: one WARNING each
            outputs = {
                "doctor text": _normalized_text(_doctor(*selection)),
                "doctor json": _normalized_json(_doctor("--format", "json", *selection)),
                "checks": _check(MATRIX_ALIASES),
            }
            _units()
            outputs["metrics"] = _scrape()
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    # Each kind of line once: how many reconnect attempts fit in RECONNECT_TIMEOUT depends on timing.
    outputs["logs"] = "\n".join(sorted(set(records.getvalue().splitlines())))
    return outputs


@pytest.mark.parametrize("password", PASSWORDS, ids=lambda p: "special" if p == SPECIAL else p)
def test_password_changes_no_output(
    live: None, server: DBServer, accounts: Accounts, dead_port: int, password: str
) -> None:
    """With the password and with its twin, the doctor, checks, logs and metrics print exactly the same."""
    seen = run_everything(server, accounts, password, dead_port)
    other = run_everything(server, accounts, twin(password), dead_port)
    for name, text in seen.items():
        if text != other[name]:
            import difflib

            print("\n".join(difflib.unified_diff(text.splitlines(), other[name].splitlines(), lineterm="")))
        assert text == other[name], f"{name} depends on the password"
    report = json.loads(seen["doctor json"])
    by_alias = {db["alias"]: db for db in report["databases"]}
    # The runs really happened: a connected alias, a refused password, a dead port, a DSN as NAME...
    assert by_alias["ok"]["reachable"] is True
    assert by_alias["ok"]["vendor"] == VENDOR
    assert by_alias["bad"]["error_kind"] == "authentication_failed"
    assert by_alias["gone"]["error_kind"] in ("connection_refused", "cannot_connect")
    assert by_alias["dsn"]["target"]["name"].startswith(("mysql://fcpw@", "postgresql://fcpw@"))
    assert "freshconn.E004" in seen["checks"]
    assert 'alias="ok"' in seen["metrics"]
    assert 'freshconn_retries_total{alias="ok"} 1.0' in seen["metrics"]
    assert "discarded connection 'ok': dead" in seen["logs"]
    assert "retrying" in seen["logs"]
    if password == SPECIAL:  # the others are ordinary words, which the outputs rightly contain
        everything = "\n".join(seen.values())
        assert password not in everything
        assert quote(password, safe="") not in everything


def test_twins_differ_everywhere_but_in_punctuation() -> None:
    """A twin differs from its password at every letter and digit, so any leaked character shows."""
    for password in PASSWORDS:
        shifted = twin(password)
        assert len(shifted) == len(password)
        assert all((a == b) != (a.isalnum()) for a, b in zip(password, shifted, strict=True))
        shifted.encode("latin-1")  # PyMySQL sends passwords as latin-1


@pytest.mark.parametrize(
    ("location", "shown"),
    [
        ("db.example.com", "db.example.com"),
        ("postgresql://app:hunter2@db:5432/x", "postgresql://app@db:5432/x"),
        (f"postgresql://app:{SPECIAL}@db/x", "postgresql://app@db/x"),
        ("mysql://app:pa@ss/wo#rd@db/x?password=p2&sslmode=require", "mysql://app@db/x?sslmode=require"),
        ("postgresql://db/x?user=app&password=hunter3", "postgresql://db/x?user=app"),
        ("host=db dbname=x password=hunter4", "host=db dbname=x"),
        ("host=db password='hun ter\\'5' user=app", "host=db user=app"),
        ("host=db password='unterminated", "<connection string>"),
        ("password=hunter6", "<connection string>"),
    ],
)
def test_safe_location_rebuilds_without_credentials(location: str, shown: str) -> None:
    """A URI or conninfo string in HOST or NAME is rebuilt from its non-secret parts, never masked."""
    assert safe_location(location) == shown
