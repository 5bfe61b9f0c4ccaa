"""The one catalogue of findings, rendered both as Django system checks and as doctor verdicts.

Each finding is declared once here: its check id (``freshconn.W004``), its doctor id
(``lifetime-above-idle-limit``), its severity, what it needs to be decided (settings only, the
server, or the doctor's idle probe), the condition and the fix as docs/checks.md states them.
The rules that decide findings live in ``_judge``; they can only produce findings declared here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["CATALOGUE", "Finding", "Hit", "by_doctor_id", "hit"]

Severity = Literal["error", "warning", "note"]
#: settings: decided from settings alone (every ``manage.py check``); server: needs a connection
#: (``check --database``, the doctor); probe: only ``doctor --probe-idle`` can decide it.
Needs = Literal["settings", "server", "probe"]


@dataclass(frozen=True)
class Finding:
    check_id: str
    doctor_id: str
    severity: Severity
    needs: Needs
    #: When it fires, and the fix, in the words of the docs table.
    condition: str
    fix: str


@dataclass(frozen=True)
class Hit:
    """One finding about one alias (None: about FRESHCONN itself), with its message and fix."""

    finding: Finding
    alias: str | None
    message: str
    fix: str


def _f(check_id: str, doctor_id: str, severity: Severity, needs: Needs, condition: str, fix: str) -> Finding:
    return Finding(f"freshconn.{check_id}", doctor_id, severity, needs, condition, fix)


CATALOGUE: tuple[Finding, ...] = (
    _f("E001", "settings-invalid", "error", "settings",
       "`FRESHCONN` is not a dict, has an unknown key, or a value of the wrong type or range",
       "the message names the key and a valid value"),
    _f("E002", "conn-max-age-invalid", "error", "settings",
       "an alias's `CONN_MAX_AGE` is not `None` or a number of seconds >= 0 (e.g. the string `\"60\"`)",
       "`'CONN_MAX_AGE': 300`, `0` or `None`"),
    _f("E003", "timeout-invalid", "error", "settings",
       "a network timeout in `OPTIONS` is 0 (wait forever) or of a type the driver rejects (mysqlclient: int "
       "only; PyMySQL: no strings; libpq: whole numbers)",
       "a positive number of the right type, e.g. `'read_timeout': 30`"),
    _f("E004", "unreachable", "error", "server",
       "the doctor (or `check --database`) cannot connect: the driver's error is reduced to its code and kind "
       "(authentication failed, unknown database, connection refused, timeout...)",
       "the hint depends on the kind: USER/PASSWORD, NAME, HOST/PORT and the server, firewall"),
    _f("E005", "connect-settings-rejected", "error", "server",
       "the driver or Django rejected the alias's settings before sending anything (e.g. `sslmode: 'bogus'`, "
       "an unknown option, a NAME too long)",
       "correct the named setting; no network advice applies"),
    _f("E006", "connections-exhausted", "error", "server",
       ">= 95 % of the server's `max_connections` are in use",
       "raise `max_connections`, add a pooler, or run fewer workers"),
    _f("E007", "pool-check-option", "error", "settings",
       "`OPTIONS['pool']` holds a `check`: Django passes `check` to psycopg_pool itself, so the first connection "
       "fails with `TypeError`",
       "remove it: with freshconn installed the pool gets freshconn's idle-aware check (no round trip when busy)"),
    _f("W001", "check-after-idle-not-below-lifetime", "warning", "settings",
       "`CHECK_AFTER_IDLE` is not below the lifetime of connections in units (`FRESHCONN['CONN_MAX_AGE']`, else a "
       "positive `CONN_MAX_AGE`, else 1800 s): idle connections are replaced, never checked",
       "lower `CHECK_AFTER_IDLE` or raise the lifetime"),
    _f("W002", "no-read-timeout", "warning", "settings",
       "MySQL/MariaDB: no `read_timeout`; PostgreSQL: neither `tcp_user_timeout` nor `keepalives_idle`: a query "
       "on a silently dropped connection hangs for hours",
       "the driver's timeout options (see the hint)"),
    _f("W004", "lifetime-above-idle-limit", "warning", "server",
       "outside units, Django's own `CONN_MAX_AGE` (`None` = forever) is above the server's idle limit for this "
       "session (`wait_timeout` / `idle_session_timeout`); units handle that limit themselves",
       "`CONN_MAX_AGE` at most the suggested value (limit minus 10 %, at least 1 s), or raise the server's limit"),
    _f("W005", "pymysql-tls-per-connect", "warning", "server",
       "PyMySQL without any `ssl*` option against a server that has no TLS: a TLS context (~16 ms) is built on "
       "every connect for nothing",
       "`'OPTIONS': {'ssl_disabled': True}`"),
    _f("W006", "new-connection-per-unit", "warning", "settings",
       "`FRESHCONN['CONN_MAX_AGE']` is explicitly 0: every unit opens and closes its own connection",
       "remove it (units keep a connection up to 1800 s) or set e.g. 1800"),
    _f("W007", "connections-nearly-exhausted", "warning", "server",
       ">= 80 % of the server's `max_connections` are in use",
       "raise `max_connections`, add a pooler, or run fewer workers"),
    _f("W008", "hidden-idle-limit", "warning", "probe",
       "`--probe-idle` saw connections dropped well before the server's own idle limit (a proxy, NAT or firewall)",
       "`CHECK_AFTER_IDLE` and `CONN_MAX_AGE` below the measured limit, keepalives, or raise the proxy's timeout"),
    _f("W009", "probe-failed", "warning", "probe",
       "`--probe-idle` could not open or use its connections (the error is reduced to its code and kind)",
       "allow a few more connections, run again"),
    _f("W010", "concurrency-above-max-connections", "warning", "server",
       "a gevent, eventlet or threads pool of N greenlets or threads needs up to N connections per alias: N x the "
       "aliases on one server exceeds its `max_connections` (`doctor --concurrency N`, `freshconn.checks."
       "check_concurrency(N)`, Celery workers at start)",
       "lower the concurrency, raise `max_connections`, or put a pooler (PgBouncer, ProxySQL) in front"),
    _f("W011", "server-read-only", "warning", "server",
       "the server refuses writes from this alias's sessions: MySQL/MariaDB `read_only` (users without SUPER / READ "
       "ONLY ADMIN), `super_read_only` or a read-only session; PostgreSQL a standby (`pg_is_in_recovery()`) or "
       "`default_transaction_read_only`",
       "point the alias at the primary (the writer endpoint); PostgreSQL with several hosts: "
       "`OPTIONS['target_session_attrs'] = 'read-write'`"),
    _f("W012", "multi-host-without-target-session-attrs", "warning", "settings",
       "PostgreSQL `HOST` lists several hosts (`'db1,db2'`) without `target_session_attrs`: libpq's default `any` "
       "settles on the first host that answers, a standby after a failover, and every write then fails",
       "`OPTIONS['target_session_attrs'] = 'read-write'` (a reader alias: `'prefer-standby'` or `'read-only'`)"),
    _f("I001", "no-connect-timeout", "note", "settings",
       "no `connect_timeout` (PyMySQL defaults to 10 s, so not for it): a connect to an unreachable server waits "
       "about two minutes",
       "`OPTIONS['connect_timeout'] = 5`"),
    _f("I002", "proxy-in-path", "note", "server",
       "the server listens on another port than the one you connect to (HAProxy, PgBouncer, a port forward); "
       "not reported when `--probe-idle` ran",
       "run `doctor --probe-idle`"),
    _f("I003", "idle-in-transaction-limit", "note", "server",
       "PostgreSQL `idle_in_transaction_session_timeout` / MariaDB `idle_transaction_timeout` is set",
       "keep transactions short; never wait inside `atomic()`"),
    _f("I004", "small-max-allowed-packet", "note", "server",
       "`max_allowed_packet` < 16 MiB: a bigger statement or row drops the connection (2006)",
       "raise it, or send smaller batches"),
    _f("I006", "pool-max-idle-above-idle-limit", "note", "server",
       "a Django pool's `max_idle` (psycopg_pool's default: 600 s) is above the server's idle limit: pooled "
       "connections die in the pool; freshconn's check replaces each at checkout without a round trip, at the "
       "cost of a connect",
       "`'pool': {'max_idle': ...}` below the limit (the hint names a value), so the pool closes them itself"),
    _f("I005", "idle-limit-measured", "note", "probe",
       "`--probe-idle` found no idle limit up to its `MAX_SECONDS`",
       "nothing"),
)  # fmt: skip

_BY_DOCTOR_ID = {f.doctor_id: f for f in CATALOGUE}


def by_doctor_id(doctor_id: str) -> Finding:
    return _BY_DOCTOR_ID[doctor_id]


def hit(doctor_id: str, alias: str | None, message: str, fix: str) -> Hit:
    """A finding about ``alias``: raises KeyError for an id missing from the catalogue."""
    return Hit(_BY_DOCTOR_ID[doctor_id], alias, message, fix)
