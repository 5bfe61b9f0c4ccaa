"""Ask a database server what it will do to connections: idle limits, timeouts, TLS, capacity.

Uses its own short-lived raw connections (never the thread's Django connection, never
``connection_created``), so inspecting a server changes neither a worker's state nor the stats.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from django.db import connections

from . import _audit
from ._drivers import set_autocommit
from ._redact import ParamsError

__all__ = ["ServerFacts", "inspect", "open_raw", "raw_connection"]

# The doctor's own connections must never hang on a dead network, whatever the alias sets.
_DEFAULT_GUARDS: dict[str, dict[str, Any]] = {
    "mysql": {"connect_timeout": 5, "read_timeout": 10, "write_timeout": 10},
    "postgresql": {"connect_timeout": 5, "tcp_user_timeout": 10000},
}

_MYSQL_SESSION = (
    "wait_timeout",
    "interactive_timeout",
    "net_read_timeout",
    "net_write_timeout",
    "max_allowed_packet",
    "idle_transaction_timeout",
    "have_ssl",
    "port",
    # A session made read-only (init_command, a proxy's reader endpoint): MariaDB < 11.1 names it
    # tx_read_only, MySQL 8 and MariaDB >= 11.1 transaction_read_only.
    "tx_read_only",
    "transaction_read_only",
)
# read_only binds users without SUPER (MariaDB: READ ONLY ADMIN); super_read_only (MySQL) binds all.
_MYSQL_GLOBAL = ("wait_timeout", "interactive_timeout", "max_connections", "read_only", "super_read_only")
_PG_SETTINGS = (
    "idle_session_timeout",
    "idle_in_transaction_session_timeout",
    "statement_timeout",
    "tcp_keepalives_idle",
    "tcp_keepalives_interval",
    "tcp_keepalives_count",
    "tcp_user_timeout",
    "max_connections",
    "superuser_reserved_connections",
    "ssl",
)


@dataclass
class ServerFacts:
    """What the server told us. Timeouts are in seconds (0: disabled), sizes in bytes."""

    product: str
    version: str
    #: The port the server itself listens on; differs from the alias's PORT behind a proxy or pooler.
    port: int | None
    tls: bool | None
    connect_seconds: float
    #: The idle limit this alias's sessions get (MySQL session wait_timeout, PostgreSQL
    #: idle_session_timeout), None when the server never drops an idle session.
    idle_limit: float | None
    max_connections: int | None = None
    connections_used: int | None = None
    limits: dict[str, float | int | str | None] = field(default_factory=dict)
    #: The server refuses writes from this alias's sessions (None: not known), and the settings
    #: that say so, e.g. ["read_only"], ["pg_is_in_recovery()"] (a hot standby).
    read_only: bool | None = None
    read_only_because: list[str] = field(default_factory=list)


def _on(value: Any) -> bool:
    """A server flag's value as MySQL or PostgreSQL shows it (ON, 1, on, true, NO_LOCK...) is set."""
    if isinstance(value, (bytes, bytearray)):
        value = value.decode(errors="replace")
    return value is not None and str(value).strip().lower() not in ("", "0", "off", "false", "no")


def open_raw(alias: str, extra_options: dict[str, Any] | None = None) -> Any:
    """A new raw autocommit connection with the alias's settings (no pool), guarded by short timeouts.

    Raises ``ParamsError`` (from Django's error) when the settings cannot even be turned into driver
    parameters, else the driver's own error.
    """
    base = connections[alias]
    settings_dict = dict(base.settings_dict)
    options = {k: v for k, v in (settings_dict.get("OPTIONS") or {}).items() if k != "pool"}
    # An invalid timeout (freshconn.E003) is reported as such: the doctor's own connection must neither
    # fail on it (that would read as "unreachable") nor wait forever because of a 0.
    for key in _audit.invalid_timeouts(_audit.driver_name(alias), base.vendor, options):
        del options[key]
    for key, value in _DEFAULT_GUARDS.get(base.vendor, {}).items():
        options.setdefault(key, value)
    options.update(extra_options or {})
    settings_dict["OPTIONS"] = options
    wrapper = type(base)(settings_dict, alias)
    try:
        params = wrapper.get_connection_params()
    except Exception as exc:
        raise ParamsError() from exc
    raw = wrapper.get_new_connection(params)
    # Autocommit: an idle session must be plain idle, not "idle in transaction" (another limit).
    try:
        set_autocommit(raw)
    except BaseException:
        with contextlib.suppress(Exception):
            raw.close()
        raise
    return raw


@contextlib.contextmanager
def raw_connection(alias: str, extra_options: dict[str, Any] | None = None) -> Iterator[Any]:
    raw = open_raw(alias, extra_options)
    try:
        yield raw
    finally:
        with contextlib.suppress(Exception):
            raw.close()


def _rows(raw: Any, sql: str) -> list[Any]:
    cursor = raw.cursor()
    try:
        cursor.execute(sql)
        return list(cursor.fetchall())
    finally:
        cursor.close()


def _number(value: Any) -> float | int | str | None:
    if value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value)
    return int(number) if number.is_integer() else number


def _in_list(names: tuple[str, ...]) -> str:
    return ", ".join(f"'{name}'" for name in names)


def _mysql(raw: Any, connect_seconds: float) -> ServerFacts:
    version = str(_rows(raw, "SELECT VERSION()")[0][0])
    session = {
        str(n): v for n, v in _rows(raw, f"SHOW SESSION VARIABLES WHERE Variable_name IN ({_in_list(_MYSQL_SESSION)})")
    }
    glob = {
        str(n): v for n, v in _rows(raw, f"SHOW GLOBAL VARIABLES WHERE Variable_name IN ({_in_list(_MYSQL_GLOBAL)})")
    }
    status = {str(n): v for n, v in _rows(raw, "SHOW GLOBAL STATUS WHERE Variable_name = 'Threads_connected'")}
    limits: dict[str, float | int | str | None] = {
        "wait_timeout": _number(session.get("wait_timeout")),
        "wait_timeout_global": _number(glob.get("wait_timeout")),
        "interactive_timeout": _number(glob.get("interactive_timeout")),
        "net_read_timeout": _number(session.get("net_read_timeout")),
        "net_write_timeout": _number(session.get("net_write_timeout")),
        "max_allowed_packet": _number(session.get("max_allowed_packet")),
    }
    if "idle_transaction_timeout" in session:  # MariaDB only
        limits["idle_transaction_timeout"] = _number(session["idle_transaction_timeout"])
    wait = limits["wait_timeout"]
    # super_read_only implies read_only; tx_read_only and transaction_read_only are one setting.
    because = [
        next(n for n in names if _on(source.get(n)))
        for source, names in (
            (glob, ("super_read_only", "read_only")),
            (session, ("transaction_read_only", "tx_read_only")),
        )
        if any(_on(source.get(n)) for n in names)
    ]
    port = _number(session.get("port"))
    max_conn = _number(glob.get("max_connections"))
    used = _number(status.get("Threads_connected"))
    return ServerFacts(
        product="MariaDB" if "mariadb" in version.lower() else "MySQL",
        version=version.split("-", maxsplit=1)[0],
        port=port if isinstance(port, int) else None,
        tls=None if "have_ssl" not in session else str(session["have_ssl"]).upper() == "YES",
        connect_seconds=connect_seconds,
        idle_limit=float(wait) if isinstance(wait, (int, float)) and wait > 0 else None,
        max_connections=max_conn if isinstance(max_conn, int) else None,
        connections_used=used if isinstance(used, int) else None,
        limits=limits,
        read_only=bool(because) if "read_only" in glob else None,
        read_only_because=because,
    )


_PG_UNITS: dict[str, Callable[[float], float]] = {
    "ms": lambda v: v / 1000.0,
    "s": lambda v: v,
    "min": lambda v: v * 60.0,
}


def _postgresql(raw: Any, connect_seconds: float) -> ServerFacts:
    settings: dict[str, float | int | str | None] = {}
    for name, setting, unit in _rows(
        raw, f"SELECT name, setting, unit FROM pg_settings WHERE name IN ({_in_list(_PG_SETTINGS)})"
    ):
        value = _number(setting)
        convert = _PG_UNITS.get(unit or "")
        if convert is not None and isinstance(value, (int, float)):
            value = _number(convert(float(value)))
        settings[str(name)] = value
    settings = {name: settings[name] for name in _PG_SETTINGS if name in settings}
    version, port, used, recovery, default_ro, tx_ro = _rows(
        raw,
        "SELECT current_setting('server_version'), inet_server_port(), "
        "(SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'), "
        "pg_is_in_recovery(), current_setting('default_transaction_read_only'), "
        "current_setting('transaction_read_only')",
    )[0]
    because = [
        name
        for name, value in (
            ("pg_is_in_recovery()", recovery),
            ("default_transaction_read_only", default_ro),
            ("transaction_read_only", tx_ro),
        )
        if _on(value)
    ]
    if len(because) > 1:
        because.remove("transaction_read_only")  # it only follows from the others
    idle = settings.get("idle_session_timeout")
    max_conn = settings.pop("max_connections", None)
    tls = settings.pop("ssl", None)
    settings.pop("superuser_reserved_connections", None)
    return ServerFacts(
        product="PostgreSQL",
        version=str(version).split()[0],
        port=int(port) if port is not None else None,
        tls=None if tls is None else tls == "on",
        connect_seconds=connect_seconds,
        idle_limit=float(idle) if isinstance(idle, (int, float)) and idle > 0 else None,
        max_connections=max_conn if isinstance(max_conn, int) else None,
        connections_used=int(used) if used is not None else None,
        limits=settings,
        read_only=bool(because),
        read_only_because=because,
    )


def inspect(alias: str) -> ServerFacts:
    """Connect once (timed) and read the server's limits; raises the driver's error if it cannot."""
    vendor = connections[alias].vendor
    if vendor not in ("mysql", "postgresql"):
        raise ValueError(f"alias {alias!r} is {vendor!r}: only MySQL/MariaDB and PostgreSQL servers are inspected")
    started = time.monotonic()
    with raw_connection(alias) as raw:
        connect_seconds = time.monotonic() - started
        return _mysql(raw, connect_seconds) if vendor == "mysql" else _postgresql(raw, connect_seconds)
