"""Django system checks for freshconn's settings (ids freshconn.E001..., freshconn.W001...)."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core import checks
from django.core.exceptions import ImproperlyConfigured

from . import conf


def check_settings(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    try:
        cfg = conf.load()
    except ImproperlyConfigured as exc:
        return [checks.Error(str(exc), hint="Correct the FRESHCONN setting.", id="freshconn.E001")]
    messages: list[checks.CheckMessage] = []
    databases: dict[str, dict[str, Any]] = getattr(settings, "DATABASES", {})
    for alias, db in databases.items():
        if "sqlite" in db.get("ENGINE", ""):
            continue
        max_age = cfg.max_age_for(db)
        if max_age is not None and 0 < max_age <= cfg.check_after_idle:
            messages.append(
                checks.Warning(
                    f"CHECK_AFTER_IDLE ({cfg.check_after_idle:g}s) is not below the connection lifetime "
                    f"of {alias!r} ({max_age:g}s): idle connections will be replaced, never checked.",
                    hint="Lower FRESHCONN['CHECK_AFTER_IDLE'] or raise FRESHCONN['CONN_MAX_AGE'].",
                    id="freshconn.W001",
                )
            )
    return messages


def register() -> None:
    checks.register(check_settings, "freshconn")
