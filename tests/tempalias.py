"""A database alias added to Django's connections for one test (a proxy, a second server...)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from django.conf import settings
from django.db import connections
from django.db.backends.base.base import BaseDatabaseWrapper

from freshconn import _aliases


def _running_test_case() -> Any:
    """The Django TestCase class pytest-django set up for this test, if any.

    Django refuses connections to aliases missing from that class's ``databases`` (it patches
    ``ensure_connection`` with a closure over the class), so a new alias must be added there.
    """
    patched = BaseDatabaseWrapper.ensure_connection
    names = getattr(getattr(patched, "__code__", None), "co_freevars", ())
    cells = getattr(patched, "__closure__", None) or ()
    return dict(zip(names, (c.cell_contents for c in cells), strict=False)).get("cls")


@contextmanager
def temp_alias(alias: str, settings_dict: dict[str, Any]) -> Iterator[str]:
    """Make ``alias`` a configured database (defaults filled in as Django does) until the block ends."""
    if alias in connections.settings:
        raise ValueError(f"alias {alias!r} already exists")
    # Django insists on a "default" entry in whatever it configures; only ``alias`` is kept.
    full = connections.configure_settings({"default": dict(settings_dict), alias: dict(settings_dict)})[alias]
    connections.settings[alias] = full
    settings.DATABASES[alias] = full
    # freshconn caches the list of server aliases per settings; no setting_changed fires here.
    _aliases.reset_caches()
    case = _running_test_case()
    saved = case.databases if case is not None else None
    if case is not None and case.databases != "__all__":
        case.databases = frozenset(case.databases) | {alias}
    try:
        yield alias
    finally:
        try:
            # _connections (the asgiref Local of this thread's wrappers) is private: django-stubs omits it.
            if hasattr(connections._connections, alias):  # type: ignore[attr-defined]
                try:
                    connections[alias].close()
                except Exception:
                    connections[alias].connection = None
                del connections[alias]
        finally:
            if case is not None:
                case.databases = saved
            # connections.settings is usually settings.DATABASES itself: pop from both, tolerantly.
            connections.settings.pop(alias, None)
            settings.DATABASES.pop(alias, None)
            _aliases.reset_caches()
