"""Django system checks for freshconn: the catalogue of findings (``_findings``) as check messages.

``check_settings`` reads settings only and runs with every ``manage.py check`` (and at every
``runserver``/``migrate``). ``check_servers`` asks the database servers and runs only when Django
passes ``databases`` (``manage.py check --database ALIAS``, ``migrate``), as Django's own
database checks do. ``manage.py freshconn doctor`` decides the very same findings with the very
same rules (``_judge``), so a check id and a doctor id always mean the same thing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from django.core import checks
from django.db import connections

from . import _inspect, _judge
from ._audit import alias_settings
from ._findings import Hit
from ._judge import suggested_max_age
from ._redact import describe_failure

__all__ = ["check_servers", "check_settings", "register", "suggested_max_age", "to_message"]

_LEVELS: dict[str, Callable[..., checks.CheckMessage]] = {
    "error": checks.Error,
    "warning": checks.Warning,
    "note": checks.Info,
}


def to_message(found: Hit) -> checks.CheckMessage:
    """A finding as a Django check message: the fix becomes the hint, the alias the object."""
    return _LEVELS[found.finding.severity](
        found.message,
        hint=found.fix,
        obj=None if found.alias is None else f"DATABASES[{found.alias!r}]",
        id=found.finding.check_id,
    )


def check_settings(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    """Static checks of FRESHCONN and of each database alias's settings (no I/O)."""
    cfg, error = _judge.load_config()
    found = _judge.config_hits(cfg, error)
    for alias in connections:
        found += _judge.settings_hits(alias_settings(alias), cfg)
    return [to_message(h) for h in found]


def check_servers(app_configs: Any = None, databases: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    """Checks that ask each server in ``databases`` for its limits (``check --database ALIAS``)."""
    if not databases:
        return []
    found: list[Hit] = []
    for alias in databases:
        view = alias_settings(alias)
        if not view.networked:
            continue
        try:
            facts = _inspect.inspect(alias)
        except Exception as exc:  # noqa: BLE001 - any failure to connect is the finding itself
            found.append(_judge.failure_hit(view, describe_failure(exc, view.option_names)))
            continue
        found += _judge.server_hits(view, facts)
    return [to_message(h) for h in found]


def register() -> None:
    checks.register(check_settings, "freshconn")
    checks.register(check_servers, "freshconn", checks.Tags.database)
