"""Django system checks for freshconn (ids freshconn.E001..., freshconn.W001...; see docs/checks.md).

``check_settings`` reads settings only and runs with every ``manage.py check`` (and at every
``runserver``/``migrate``). ``check_servers`` asks the database servers and runs only when Django
passes ``databases`` (``manage.py check --database ALIAS``, ``migrate``), as Django's own
database checks do.
"""

from __future__ import annotations

import math
from typing import Any

from django.conf import settings
from django.core import checks
from django.core.exceptions import ImproperlyConfigured

from . import _audit, conf

__all__ = ["check_servers", "check_settings", "register", "suggested_max_age"]


def _obj(alias: str) -> str:
    return f"DATABASES[{alias!r}]"


def _is_seconds(value: Any, *, allow_none: bool) -> bool:
    if value is None:
        return allow_none
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value) and value >= 0


def _positive_number(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return False
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def suggested_max_age(idle_limit: float) -> int:
    """A CONN_MAX_AGE safely below a server idle limit (10 % margin, at least a second)."""
    return max(0, math.floor(idle_limit - max(1.0, 0.1 * idle_limit)))


def _alias_messages(alias: str, db: dict[str, Any], cfg: conf.Config | None) -> list[checks.CheckMessage]:
    messages: list[checks.CheckMessage] = []
    max_age = db.get("CONN_MAX_AGE", 0)
    if not _is_seconds(max_age, allow_none=True):
        messages.append(
            checks.Error(
                f"CONN_MAX_AGE must be None or a number of seconds >= 0, got {type(max_age).__name__} {max_age!r}.",
                hint="Set e.g. 'CONN_MAX_AGE': 300 (seconds), 0 (close after every unit) or None (unlimited).",
                obj=_obj(alias),
                id="freshconn.E002",
            )
        )
        return messages
    vendor = _audit.vendor_of(alias)
    if vendor not in _audit.NETWORK_VENDORS:
        return messages
    timeouts = _audit.timeout_options(vendor, db)
    bad = sorted(k for k, v in timeouts.items() if k != "keepalives" and not _positive_number(v))
    if bad:
        messages.append(
            checks.Error(
                f"OPTIONS {', '.join(bad)} must be positive numbers (0 or a non-number means: wait forever).",
                hint=f"Use e.g. {_audit.suggested_timeouts(vendor)}.",
                obj=_obj(alias),
                id="freshconn.E003",
            )
        )
    if not timeouts:
        messages.append(
            checks.Warning(
                f"No network timeout in OPTIONS ({_audit.driver_name(alias)}): a query (or Django's health-check "
                "ping) on a connection whose packets a NAT, firewall or failover silently dropped hangs for as "
                "long as the kernel keeps the socket (hours).",
                hint=f"Set {_audit.suggested_timeouts(vendor)} (keep "
                + ("read_timeout" if vendor == "mysql" else "tcp_user_timeout")
                + " above your slowest query).",
                obj=_obj(alias),
                id="freshconn.W002",
            )
        )
    pool = _audit.pool_options(db)
    if vendor == "postgresql" and pool is not None and "check" not in pool:
        messages.append(
            checks.Warning(
                "A connection pool with no check: a connection the server or a proxy dropped while it sat in "
                "the pool is handed out as if alive, and the first query on it fails.",
                hint="Set 'OPTIONS': {'pool': {'check': psycopg_pool.ConnectionPool.check_connection, ...}} "
                "(psycopg_pool >= 3.2).",
                obj=_obj(alias),
                id="freshconn.W003",
            )
        )
    if cfg is not None:
        lifetime = cfg.max_age_for(db)
        if lifetime is not None and 0 < lifetime <= cfg.check_after_idle:
            messages.append(
                checks.Warning(
                    f"CHECK_AFTER_IDLE ({cfg.check_after_idle:g}s) is not below the connection lifetime "
                    f"of {alias!r} ({lifetime:g}s): idle connections will be replaced, never checked.",
                    hint="Lower FRESHCONN['CHECK_AFTER_IDLE'] or raise FRESHCONN['CONN_MAX_AGE'].",
                    obj=_obj(alias),
                    id="freshconn.W001",
                )
            )
    return messages


def check_settings(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    """Static checks of FRESHCONN and of each database alias's settings (no I/O)."""
    messages: list[checks.CheckMessage] = []
    cfg: conf.Config | None
    try:
        cfg = conf.load()
    except ImproperlyConfigured as exc:
        messages.append(checks.Error(str(exc), hint="Correct the FRESHCONN setting.", id="freshconn.E001"))
        cfg = None
    databases: dict[str, dict[str, Any]] = getattr(settings, "DATABASES", {})
    for alias, db in databases.items():
        messages.extend(_alias_messages(alias, db, cfg))
    return messages


def check_servers(app_configs: Any = None, databases: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    """Checks that ask each server in ``databases`` for its limits (``check --database ALIAS``)."""
    if not databases:
        return []
    from . import _inspect

    try:
        cfg = conf.load()
    except ImproperlyConfigured:
        return []  # freshconn.E001 already says so
    messages: list[checks.CheckMessage] = []
    for alias in databases:
        if _audit.vendor_of(alias) not in _audit.NETWORK_VENDORS:
            continue
        db: dict[str, Any] = settings.DATABASES[alias]
        try:
            facts = _inspect.inspect(alias)
        except Exception as exc:  # noqa: BLE001 - any failure to connect is the finding itself
            messages.append(
                checks.Error(
                    "Could not connect to read the server's limits: "
                    + _audit.scrub(f"{type(exc).__name__}: {exc}", _audit.secrets_of(db)).strip(),
                    hint="Check HOST, PORT, NAME, USER and PASSWORD, and that the server accepts connections "
                    "from here; `manage.py freshconn doctor` shows more.",
                    obj=_obj(alias),
                    id="freshconn.E004",
                )
            )
            continue
        lifetime = cfg.max_age_for(db)
        limit = facts.idle_limit
        if limit is not None and (lifetime is None or lifetime > limit):
            name = "wait_timeout" if facts.product != "PostgreSQL" else "idle_session_timeout"
            shown = "forever (CONN_MAX_AGE=None)" if lifetime is None else f"up to {lifetime:g}s"
            messages.append(
                checks.Warning(
                    f"Connections may live {shown} but the server drops a session idle for {limit:g}s "
                    f"({name}): code outside freshconn.unit_of_work() fails on its first query after such a pause.",
                    hint=f"Set CONN_MAX_AGE (or FRESHCONN['CONN_MAX_AGE']) to at most "
                    f"{suggested_max_age(limit)}, or raise the server's {name}.",
                    obj=_obj(alias),
                    id="freshconn.W004",
                )
            )
        options = db.get("OPTIONS") or {}
        ssl_set = any(str(k).startswith("ssl") for k in options)
        if _audit.driver_name(alias) == "pymysql" and facts.tls is False and not ssl_set:
            messages.append(
                checks.Warning(
                    "PyMySQL builds a TLS context on every connect (about 16 ms) although this server offers "
                    "no TLS: every new connection pays it for nothing.",
                    hint="Set 'OPTIONS': {'ssl_disabled': True} (or enable TLS on the server and pass a prebuilt "
                    "ssl.SSLContext as OPTIONS['ssl']).",
                    obj=_obj(alias),
                    id="freshconn.W005",
                )
            )
    return messages


def register() -> None:
    checks.register(check_settings, "freshconn")
    checks.register(check_servers, "freshconn", checks.Tags.database)
