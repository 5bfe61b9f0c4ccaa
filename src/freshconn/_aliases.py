"""Aliases: which ones a unit covers, which ones talk to a server. The one place that decides both.

A unit's ``using`` is validated where it is given, so a typo fails loudly instead of switching the
protection off. Whether an alias has a server is decided by its backend's ``vendor`` (not by the
ENGINE string), so SpatiaLite and SQLite wrappers of any name are left alone alike.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from django.conf import settings
from django.db import connections
from django.utils.connection import ConnectionDoesNotExist

__all__ = ["NO_SERVER_VENDORS", "Scope", "Using", "is_server_vendor", "reset_caches", "scope_of", "server_aliases"]

#: Backends with no server: nothing can drop their connections, so units leave them alone.
NO_SERVER_VENDORS = frozenset({"sqlite"})

#: What ``using=`` accepts: one alias, several aliases, or None (every alias in DATABASES).
Using = str | Iterable[str] | None
#: A validated ``using``: None (every alias) or a frozenset of configured aliases.
Scope = frozenset[str] | None


def is_server_vendor(vendor: str) -> bool:
    return vendor not in NO_SERVER_VENDORS


def _configured() -> list[str]:
    return list(connections.settings)


def _check_known(aliases: frozenset[str], what: str) -> None:
    if not settings.configured:
        return  # validated again when the unit first runs
    known = _configured()
    unknown = sorted(a for a in aliases if a not in known)
    if unknown:
        raise ConnectionDoesNotExist(
            f"{what}: no database alias {', '.join(map(repr, unknown))} in DATABASES; "
            f"the configured aliases are {', '.join(map(repr, known))}."
        )


validated: set[frozenset[str]] = set()


def scope_of(using: Any, what: str = "unit_of_work(using=...)") -> Scope:
    """Validate ``using`` and return it as a Scope; raise TypeError, ValueError or ConnectionDoesNotExist."""
    if using is None:
        return None
    if isinstance(using, str):
        aliases = frozenset((using,))
    elif isinstance(using, (bytes, bytearray)) or not isinstance(using, Iterable):
        raise TypeError(
            f"{what} takes a database alias (str) or a list of aliases, got {type(using).__name__} {using!r}."
        )
    else:
        items = list(using)
        bad = [a for a in items if not isinstance(a, str)]
        if bad:
            raise TypeError(f"{what} takes aliases as strings, got {type(bad[0]).__name__} {bad[0]!r} in {items!r}.")
        if not items:
            raise ValueError(f"{what} got an empty list: a unit must cover at least one alias (None: all of them).")
        aliases = frozenset(items)
    _check_known(aliases, what)
    if settings.configured:
        validated.add(aliases)
    return aliases


def ensure_known(scope: Scope, what: str = "unit_of_work(using=...)") -> None:
    """At a unit's first run: the aliases of a scope built before settings were configured exist."""
    if scope is not None and scope not in validated:
        _check_known(scope, what)
        validated.add(scope)


_server_cache: dict[Scope, tuple[str, ...]] = {}
#: What a unit leaves alone: the backends with no server, and (``_vendor()``) one that cannot load.
_UNMANAGED = NO_SERVER_VENDORS | {"unknown"}


def server_aliases(scope: Scope) -> tuple[str, ...]:
    """The aliases in scope whose backend talks to a server (the ones a unit counts and manages)."""
    aliases = _server_cache.get(scope)
    if aliases is None:
        # An alias whose backend cannot load has no connection to manage: leaving it out keeps the
        # units on every other alias working (Django raises for it where it is used, and its checks say so).
        aliases = tuple(
            a for a in connections.settings if (scope is None or a in scope) and _vendor(a) not in _UNMANAGED
        )
        _server_cache[scope] = aliases
    return aliases


def _vendor(alias: str) -> str:
    try:
        return str(connections[alias].vendor)
    except Exception:  # noqa: BLE001 - a backend that cannot load is reported by Django itself
        return "unknown"


#: Bumped whenever DATABASES changes; a thread whose seed is older hooks its wrappers again.
generation = 0


def reset_caches(**kwargs: Any) -> None:
    """Forget per-settings caches (connected to Django's ``setting_changed``)."""
    global generation
    if kwargs.get("setting") in (None, "DATABASES"):
        _server_cache.clear()
        validated.clear()
        # Threads hook their wrappers again at their next unit: an alias added since (or a
        # wrapper Django rebuilt) must get the patient first connect too.
        generation += 1
