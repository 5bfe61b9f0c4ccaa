"""What an alias's Django settings say about connections, as a view that holds no credential (no I/O).

The system checks and the doctor judge an alias only through :class:`AliasSettings`: it keeps
the few settings they reason about (lifetime, network timeouts, the pool, option names) and a
location rebuilt without passwords. PASSWORD and every other OPTIONS value never enter it, so
nothing built from it can show them.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

from django.db import connections

from ._redact import safe_location

__all__ = [
    "NETWORK_VENDORS",
    "TIMEOUT_OPTIONS",
    "AliasSettings",
    "alias_settings",
    "driver_name",
    "driver_version",
    "invalid_timeouts",
    "suggested_timeouts",
    "timeout_problem",
    "vendor_of",
]

NETWORK_VENDORS = frozenset({"mysql", "postgresql"})

#: The OPTIONS keys that bound how long a driver waits on the network, per vendor.
TIMEOUT_OPTIONS: dict[str, tuple[str, ...]] = {
    # mysqlclient and PyMySQL take the same names, in seconds.
    "mysql": ("connect_timeout", "read_timeout", "write_timeout"),
    # libpq (psycopg 3 and psycopg2): connect_timeout in s, keepalives_* in s, tcp_user_timeout in ms.
    "postgresql": (
        "connect_timeout",
        "keepalives",
        "keepalives_idle",
        "keepalives_interval",
        "keepalives_count",
        "tcp_user_timeout",
    ),
}

_SUGGESTED: dict[str, str] = {
    "mysql": "'OPTIONS': {'connect_timeout': 5, 'read_timeout': 30, 'write_timeout': 30}",
    "postgresql": (
        "'OPTIONS': {'connect_timeout': 5, 'keepalives_idle': 30, 'keepalives_interval': 5, "
        "'keepalives_count': 3, 'tcp_user_timeout': 30000}"
    ),
}
_DEFAULT_PORTS = {"mysql": 3306, "postgresql": 5432}


def vendor_of(alias: str) -> str:
    """The alias's vendor ("mysql", "postgresql", "sqlite"...) without opening a connection."""
    try:
        return str(connections[alias].vendor)
    except Exception:  # noqa: BLE001 - a backend that fails to import is reported elsewhere
        return "unknown"


def driver_name(alias: str) -> str:
    """mysqlclient, pymysql, mysql-connector, psycopg, psycopg2, or the module's name, without connecting.

    The one name freshconn uses for a driver everywhere: its distribution's, never "MySQLdb".
    """
    try:
        module = type(connections[alias]).Database  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001 - a backend that fails to import is reported elsewhere
        return "unknown"
    name = str(getattr(module, "__name__", "unknown")).split(".")[0]
    # mysqlclient's module is MySQLdb; PyMySQL's install_as_MySQLdb() makes Database pymysql itself;
    # mysql-connector-python's Django engine uses the mysql.connector package.
    return {"MySQLdb": "mysqlclient", "mysql": "mysql-connector"}.get(name, name)


_DISTRIBUTIONS = {
    "mysqlclient": ("mysqlclient",),
    "pymysql": ("PyMySQL",),
    "mysql-connector": ("mysql-connector-python",),
    "psycopg": ("psycopg",),
    "psycopg2": ("psycopg2", "psycopg2-binary"),
}


def driver_version(alias: str) -> str | None:
    """The installed driver's version, from package metadata (PyMySQL as MySQLdb lies about it)."""
    return _version_of(driver_name(alias))


@functools.cache
def _version_of(driver: str) -> str | None:
    # Cached: every ``manage.py check`` builds the settings view of every alias.
    from importlib import metadata

    for dist in _DISTRIBUTIONS.get(driver, ()):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


def suggested_timeouts(vendor: str) -> str:
    return _SUGGESTED.get(vendor, "")


def timeout_problem(driver: str, key: str, value: Any) -> str | None:
    """Why a network-timeout option value will not work with ``driver``, or None when it will.

    Measured: mysqlclient and mysql-connector-python take only ints; PyMySQL ints or floats, not
    strings; libpq (psycopg, psycopg2) a whole number, as int or digit string (a float fails at
    connect), except psycopg 3's own connect_timeout, which also takes a float. Zero means "wait
    forever" to every driver.
    """
    if key == "keepalives":  # libpq's on/off switch, not a duration
        return None
    problem, number = _as_seconds(driver, key, value)
    if problem is None and (not math.isfinite(number) or number <= 0):
        problem = "is not above 0 (0 means: wait forever)"
    return problem


def _as_seconds(driver: str, key: str, value: Any) -> tuple[str | None, float]:
    kind = type(value).__name__
    libpq = driver in ("psycopg", "psycopg2")
    loose = driver == "psycopg" and key == "connect_timeout"  # psycopg 3 times its connect itself
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        why = f"is a {kind}, not a number"
    elif driver in ("mysqlclient", "mysql-connector") and not isinstance(value, int):
        why = f"is a {kind}; {driver} takes only a whole number of seconds (int)"
    elif isinstance(value, str) and not libpq:
        why = f"is a str; {driver} takes a number of seconds"
    elif isinstance(value, float) and libpq and not loose:
        why = "is a float; libpq takes only a whole number (int or digit string)"
    else:
        try:
            return None, float(value) if loose or not libpq else float(int(value))
        except ValueError:
            why = "is a str that is not a whole number; libpq takes e.g. 30 or '30'"
    return why, 0.0


def invalid_timeouts(driver: str, vendor: str, options: dict[str, Any]) -> dict[str, str]:
    """The network-timeout OPTIONS that will not work, each with the reason."""
    found = {}
    for key in TIMEOUT_OPTIONS.get(vendor, ()):
        if key in options:
            problem = timeout_problem(driver, key, options[key])
            if problem is not None:
                found[key] = problem
    return found


@dataclass(frozen=True)
class AliasSettings:
    """One alias's settings as the checks and the doctor may see them: no credential in here."""

    alias: str
    vendor: str
    engine: str
    driver: str
    driver_version: str | None
    #: HOST and NAME rebuilt without any password (see _redact.safe_location).
    host: str | None
    name: str | None
    port: str | None
    user: str | None
    #: Django's own CONN_MAX_AGE, as configured (not validated here).
    conn_max_age: Any
    health_checks: bool
    #: The network-timeout OPTIONS and their values; no other OPTIONS value is kept.
    timeouts: dict[str, Any]
    #: Why each invalid network-timeout option will not work.
    invalid_timeouts: dict[str, str]
    #: The names (never the values) of every key in OPTIONS.
    option_names: frozenset[str]
    pool: bool
    #: Whether OPTIONS["pool"] names a check of its own (Django refuses it); None without a pool.
    pool_check: bool | None
    #: The pool's max_idle in seconds (psycopg_pool's default when not set); None without a pool.
    pool_max_idle: float | None

    @property
    def networked(self) -> bool:
        return self.vendor in NETWORK_VENDORS

    @property
    def ssl_configured(self) -> bool:
        return any(name.startswith("ssl") for name in self.option_names)

    @property
    def configured_port(self) -> int | None:
        """The port this process connects to (None for a Unix socket or an unparsable PORT)."""
        if (self.host or "").startswith("/"):
            return None
        try:
            return int(self.port) if self.port else _DEFAULT_PORTS.get(self.vendor)
        except ValueError:
            return None


#: psycopg_pool.ConnectionPool's own default max_idle (seconds).
POOL_DEFAULT_MAX_IDLE = 600.0


def _pool_max_idle(pool: Any) -> float | None:
    if not pool:
        return None
    value = pool.get("max_idle", POOL_DEFAULT_MAX_IDLE) if isinstance(pool, dict) else POOL_DEFAULT_MAX_IDLE
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def alias_settings(alias: str) -> AliasSettings:
    """The credential-free view of ``alias``'s settings (no connection is opened)."""
    vendor, driver = vendor_of(alias), driver_name(alias)
    try:
        db: dict[str, Any] = connections[alias].settings_dict
    except Exception:  # noqa: BLE001 - a backend that fails to import: judge what settings say
        db = dict(connections.settings.get(alias) or {})
    options = db.get("OPTIONS") or {}
    pool = options.get("pool")
    timeouts = {key: options[key] for key in TIMEOUT_OPTIONS.get(vendor, ()) if key in options}
    return AliasSettings(
        alias=alias,
        vendor=vendor,
        engine=str(db.get("ENGINE") or ""),
        driver=driver,
        driver_version=driver_version(alias),
        host=safe_location(db.get("HOST") or None),
        name=safe_location(db.get("NAME") or None),
        port=str(db.get("PORT") or "") or None,
        user=str(db["USER"]) if db.get("USER") else None,
        conn_max_age=db.get("CONN_MAX_AGE", 0),
        health_checks=bool(db.get("CONN_HEALTH_CHECKS")),
        timeouts=timeouts,
        invalid_timeouts=invalid_timeouts(driver, vendor, options),
        option_names=frozenset(str(k) for k in options),
        pool=bool(pool),
        pool_check=None if not pool else isinstance(pool, dict) and "check" in pool,
        pool_max_idle=_pool_max_idle(pool),
    )
