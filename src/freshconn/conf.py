"""freshconn's settings: one ``FRESHCONN`` dict in Django settings, validated into a frozen Config.

Every error names the offending key and says how to fix it, so a typo fails at start-up
instead of silently falling back to a default.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured

__all__ = ["Config", "get", "load", "reset"]

DEFAULT_CHECK_AFTER_IDLE = 5.0
DEFAULT_PING_TIMEOUT = 5.0


@dataclass(frozen=True, slots=True)
class Config:
    #: A connection idle for less than this is reused with no round trip; idle longer, it is pinged.
    check_after_idle: float = DEFAULT_CHECK_AFTER_IDLE
    #: True when FRESHCONN["CONN_MAX_AGE"] is set, overriding Django's per-alias CONN_MAX_AGE in units.
    max_age_override: bool = False
    #: The override's value: seconds, or None for unlimited. Meaningless unless max_age_override.
    conn_max_age: float | None = None
    #: A liveness check on a connection whose packets vanish fails after this long instead of hanging.
    ping_timeout: float = DEFAULT_PING_TIMEOUT
    #: After an outage, keep trying to reconnect for up to this long at the start of a unit (0: one try).
    reconnect_timeout: float = 0.0

    def max_age_for(self, settings_dict: dict[str, Any]) -> float | None:
        """The lifetime of a connection used in units, for the alias with these Django settings."""
        if self.max_age_override:
            return self.conn_max_age
        value = settings_dict.get("CONN_MAX_AGE", 0)
        return None if value is None else float(value)


KNOWN_KEYS = ("CHECK_AFTER_IDLE", "CONN_MAX_AGE", "PING_TIMEOUT", "RECONNECT_TIMEOUT")


def _seconds(key: str, value: Any, *, allow_none: bool) -> float | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        kind = "a number of seconds" + (" or None" if allow_none else "")
        raise ImproperlyConfigured(
            f"FRESHCONN[{key!r}] must be {kind}, got {type(value).__name__} {value!r}. "
            f"Fix: set FRESHCONN = {{{key!r}: 5.0, ...}} in your settings."
        )
    if not math.isfinite(value) or value < 0:
        raise ImproperlyConfigured(
            f"FRESHCONN[{key!r}] must be a finite number of seconds >= 0, got {value!r}. "
            + ("Fix: use None for connections without a lifetime limit." if allow_none else "Fix: use e.g. 5.0.")
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
    max_age = _seconds("CONN_MAX_AGE", raw["CONN_MAX_AGE"], allow_none=True) if override else None
    ping = _seconds("PING_TIMEOUT", raw.get("PING_TIMEOUT", DEFAULT_PING_TIMEOUT), allow_none=False)
    if not ping:
        raise ImproperlyConfigured(
            "FRESHCONN['PING_TIMEOUT'] must be above 0: an unbounded liveness check can hang forever "
            "on a silently dropped connection. Fix: use e.g. 5.0."
        )
    reconnect = _seconds("RECONNECT_TIMEOUT", raw.get("RECONNECT_TIMEOUT", 0.0), allow_none=False)
    assert reconnect is not None
    return Config(
        check_after_idle=check,
        max_age_override=override,
        conn_max_age=max_age,
        ping_timeout=ping,
        reconnect_timeout=reconnect,
    )


_current: Config | None = None


def get() -> Config:
    """The validated configuration, cached until settings change."""
    global _current
    if _current is None:
        _current = load()
    return _current


def reset(**kwargs: Any) -> None:
    """Forget the cached configuration (connected to Django's ``setting_changed``)."""
    global _current
    if kwargs.get("setting") in (None, "FRESHCONN"):
        _current = None
