"""freshconn's settings: one ``FRESHCONN`` dict in Django settings, validated into a frozen Config.

Every error names the offending key and says how to fix it, so a typo fails at start-up
instead of silently falling back to a default.

The defaults are worker-grade: inside units connections persist (``CONN_MAX_AGE`` 30 min, whatever
``DATABASES`` says for the web tier) and a unit that meets a server restarting or failing over
waits up to ``RECONNECT_TIMEOUT`` for it instead of failing.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured

__all__ = ["DEFAULTS", "KNOWN_KEYS", "Config", "get", "load", "reset"]

DEFAULT_CHECK_AFTER_IDLE = 5.0
DEFAULT_PING_TIMEOUT = 5.0
#: The lifetime of a connection used in units when neither FRESHCONN nor DATABASES sets a positive one:
#: of the order of HikariCP's maxLifetime (30 min) and psycopg_pool's max_lifetime (1 h).
DEFAULT_CONN_MAX_AGE = 1800.0
#: Long enough for a server restart, a PostgreSQL/Patroni or Aurora failover, or a proxy reload.
DEFAULT_RECONNECT_TIMEOUT = 60.0

#: Every key of FRESHCONN and its default, as documented in docs/settings.md.
DEFAULTS: dict[str, Any] = {
    "CHECK_AFTER_IDLE": DEFAULT_CHECK_AFTER_IDLE,
    "CONN_MAX_AGE": DEFAULT_CONN_MAX_AGE,
    "PING_TIMEOUT": DEFAULT_PING_TIMEOUT,
    "RECONNECT_TIMEOUT": DEFAULT_RECONNECT_TIMEOUT,
    "ADOPT_CLOSE_OLD_CONNECTIONS": False,
    "STATS_LOG_INTERVAL": None,
}
KNOWN_KEYS = tuple(DEFAULTS)


@dataclass(frozen=True, slots=True)
class Config:
    #: A connection idle for less than this is reused with no round trip; idle longer, it is pinged.
    check_after_idle: float = DEFAULT_CHECK_AFTER_IDLE
    #: True when FRESHCONN["CONN_MAX_AGE"] is set: it then decides the lifetime in units alone.
    max_age_override: bool = False
    #: FRESHCONN["CONN_MAX_AGE"]: seconds, or None for unlimited. Meaningless unless max_age_override.
    conn_max_age: float | None = DEFAULT_CONN_MAX_AGE
    #: A liveness check on a connection whose packets vanish fails after this long instead of hanging.
    ping_timeout: float = DEFAULT_PING_TIMEOUT
    #: After an outage, keep trying to reconnect for up to this long before a unit fails (0: one try).
    reconnect_timeout: float = DEFAULT_RECONNECT_TIMEOUT
    #: Every django.db.close_old_connections() call outside a unit acts as a unit boundary.
    adopt_close_old_connections: bool = False
    #: Log one line of counters at most this often (seconds), from unit boundaries; None: never.
    stats_log_interval: float | None = None

    def max_age_for(self, settings_dict: dict[str, Any]) -> float | None:
        """The lifetime (seconds, None: unlimited) of a connection used in units, for this alias.

        FRESHCONN["CONN_MAX_AGE"] when set; otherwise the alias's own CONN_MAX_AGE when it is a
        positive number (a limit the user chose, e.g. below a proxy's); otherwise the 30 min
        default, so that Django's CONN_MAX_AGE=0 (a connection per request) or None does not
        apply to workers. Code outside units keeps Django's own behaviour either way.
        """
        if self.max_age_override:
            return self.conn_max_age
        value = settings_dict.get("CONN_MAX_AGE", 0)
        if _is_number(value) and math.isfinite(value) and value > 0:
            return float(value)
        return DEFAULT_CONN_MAX_AGE


def _is_number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float))


def _seconds(key: str, value: Any, *, allow_none: bool, example: str = "5.0") -> float | None:
    if value is None and allow_none:
        return None
    if not _is_number(value):
        kind = "a number of seconds" + (" or None" if allow_none else "")
        raise ImproperlyConfigured(
            f"FRESHCONN[{key!r}] must be {kind}, got {type(value).__name__} {value!r}. "
            f"Fix: set FRESHCONN = {{{key!r}: {example}, ...}} in your settings."
        )
    if not math.isfinite(value) or value < 0:
        raise ImproperlyConfigured(
            f"FRESHCONN[{key!r}] must be a finite number of seconds >= 0, got {value!r}. "
            + (f"Fix: use None for no limit, or e.g. {example}." if allow_none else f"Fix: use e.g. {example}.")
        )
    return float(value)


def load(raw: Any = None) -> Config:
    """Validate the FRESHCONN setting (or ``raw``) and return it as a Config; raise ImproperlyConfigured."""
    if raw is None:
        raw = getattr(settings, "FRESHCONN", None)
    if raw is None:
        return Config()
    if not isinstance(raw, dict):
        raise ImproperlyConfigured(
            f"FRESHCONN must be a dict, got {type(raw).__name__}. Fix: FRESHCONN = {{'CHECK_AFTER_IDLE': 5.0}}."
        )
    unknown = sorted(str(k) for k in raw if k not in KNOWN_KEYS)
    if unknown:
        raise ImproperlyConfigured(
            f"FRESHCONN has unknown key(s) {', '.join(map(repr, unknown))}. "
            f"Fix: use only {', '.join(KNOWN_KEYS)} (names are upper case)."
        )
    check = _seconds("CHECK_AFTER_IDLE", raw.get("CHECK_AFTER_IDLE", DEFAULT_CHECK_AFTER_IDLE), allow_none=False)
    assert check is not None
    override = "CONN_MAX_AGE" in raw
    max_age = (
        _seconds("CONN_MAX_AGE", raw["CONN_MAX_AGE"], allow_none=True, example="1800")
        if override
        else DEFAULT_CONN_MAX_AGE
    )
    ping = _seconds("PING_TIMEOUT", raw.get("PING_TIMEOUT", DEFAULT_PING_TIMEOUT), allow_none=False)
    if not ping:
        raise ImproperlyConfigured(
            "FRESHCONN['PING_TIMEOUT'] must be above 0: an unbounded liveness check can hang forever "
            "on a silently dropped connection. Fix: use e.g. 5.0."
        )
    reconnect = _seconds(
        "RECONNECT_TIMEOUT", raw.get("RECONNECT_TIMEOUT", DEFAULT_RECONNECT_TIMEOUT), allow_none=False, example="60"
    )
    assert reconnect is not None
    adopt = raw.get("ADOPT_CLOSE_OLD_CONNECTIONS", False)
    if not isinstance(adopt, bool):
        raise ImproperlyConfigured(
            f"FRESHCONN['ADOPT_CLOSE_OLD_CONNECTIONS'] must be True or False, got {type(adopt).__name__} {adopt!r}. "
            "Fix: FRESHCONN = {'ADOPT_CLOSE_OLD_CONNECTIONS': True, ...}."
        )
    interval = _seconds("STATS_LOG_INTERVAL", raw.get("STATS_LOG_INTERVAL"), allow_none=True, example="300")
    if interval == 0:
        raise ImproperlyConfigured(
            "FRESHCONN['STATS_LOG_INTERVAL'] must be above 0 (a line per unit would flood the log). "
            "Fix: use None (no periodic line) or e.g. 300."
        )
    return Config(
        check_after_idle=check,
        max_age_override=override,
        conn_max_age=max_age,
        ping_timeout=ping,
        reconnect_timeout=reconnect,
        adopt_close_old_connections=adopt,
        stats_log_interval=interval,
    )


_current: Config | None = None


def get() -> Config:
    """The validated configuration, cached until settings change."""
    global _current
    if _current is None:
        _current = load()
    return _current


#: Called after the cached configuration is dropped (freshconn._lifecycle: the busy path reads no
#: setting, so it is told to look again).
on_reset: list[Callable[[], None]] = []


def reset(**kwargs: Any) -> None:
    """Forget the cached configuration (connected to Django's ``setting_changed``)."""
    global _current
    if kwargs.get("setting") in (None, "FRESHCONN"):
        _current = None
        for listener in on_reset:
            listener()
