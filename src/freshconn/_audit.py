"""What an alias's Django settings say about connection lifetimes and network timeouts (no I/O).

Shared by the system checks and ``manage.py freshconn doctor``, so both give the same advice,
and by the doctor's scrubber, which must know every secret the settings hold.
"""

from __future__ import annotations

import re
from typing import Any

from django.db import connections

__all__ = [
    "NETWORK_VENDORS",
    "TIMEOUT_OPTIONS",
    "driver_name",
    "driver_version",
    "pool_options",
    "scrub",
    "secrets_of",
    "suggested_timeouts",
    "timeout_options",
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


def vendor_of(alias: str) -> str:
    """The alias's vendor ("mysql", "postgresql", "sqlite"...) without opening a connection."""
    try:
        return str(connections[alias].vendor)
    except Exception:  # noqa: BLE001 - a backend that fails to import is reported elsewhere
        return "unknown"


def driver_name(alias: str) -> str:
    """mysqlclient, pymysql, psycopg, psycopg2, or the backend module's name, without connecting."""
    try:
        module = type(connections[alias]).Database  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001 - a backend that fails to import is reported elsewhere
        return "unknown"
    name = str(getattr(module, "__name__", "unknown"))
    # PyMySQL's install_as_MySQLdb() puts the pymysql module itself under the name MySQLdb.
    return {"MySQLdb": "mysqlclient"}.get(name, name)


_DISTRIBUTIONS = {
    "mysqlclient": ("mysqlclient",),
    "pymysql": ("PyMySQL",),
    "psycopg": ("psycopg",),
    "psycopg2": ("psycopg2", "psycopg2-binary"),
}


def driver_version(alias: str) -> str | None:
    """The installed driver's version, from package metadata (PyMySQL as MySQLdb lies about it)."""
    from importlib import metadata

    for dist in _DISTRIBUTIONS.get(driver_name(alias), ()):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


def timeout_options(vendor: str, settings_dict: dict[str, Any]) -> dict[str, Any]:
    """The network-timeout options the alias sets in OPTIONS, by name."""
    options = settings_dict.get("OPTIONS") or {}
    return {key: options[key] for key in TIMEOUT_OPTIONS.get(vendor, ()) if key in options}


def suggested_timeouts(vendor: str) -> str:
    return _SUGGESTED.get(vendor, "")


def pool_options(settings_dict: dict[str, Any]) -> dict[str, Any] | None:
    """Django's (5.1+) PostgreSQL pool options: None without a pool, {} for ``"pool": True``."""
    pool = (settings_dict.get("OPTIONS") or {}).get("pool")
    if not pool:
        return None
    return dict(pool) if isinstance(pool, dict) else {}


_SECRET_KEY = re.compile(r"pass|secret|token|credential|sslkey|key_password|dsn|service", re.IGNORECASE)
_MIN_SECRET = 4


def secrets_of(settings_dict: dict[str, Any]) -> set[str]:
    """Every string in an alias's settings that could be a credential, for scrubbing output."""
    found: set[str] = set()

    def visit(key: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                visit(str(k), v)
        elif isinstance(value, str) and _SECRET_KEY.search(key) and len(value) >= _MIN_SECRET:
            found.add(value)

    visit("PASSWORD", settings_dict.get("PASSWORD"))
    visit("OPTIONS", settings_dict.get("OPTIONS") or {})
    return found


# Credentials that can appear in driver messages even when we do not know the value.
_PATTERNS = (
    (re.compile(r"(?i)(password|passwd|pwd|token|secret)(\s*[=:]\s*)('[^']*'|\"[^\"]*\"|\S+)"), r"\1\2********"),
    (re.compile(r"(?i)([a-z][a-z0-9+.-]*://)([^/\s:@]*):([^@\s/]*)@"), r"\1\2:********@"),
)


def scrub(text: str, secrets: set[str]) -> str:
    """``text`` with every known secret, ``password=...`` pair and URL password masked."""
    for secret in sorted(secrets, key=len, reverse=True):
        text = text.replace(secret, "********")
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    return text
