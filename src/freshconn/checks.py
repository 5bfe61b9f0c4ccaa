"""Django system checks for freshconn: the catalogue of findings (``_findings``) as check messages.

``check_settings`` reads settings only and runs with every ``manage.py check`` (and at every
``runserver``/``migrate``). ``check_servers`` asks the database servers and runs only when Django
passes ``databases`` (``manage.py check --database ALIAS``, ``migrate``), as Django's own
database checks do. ``manage.py freshconn doctor`` decides the very same findings with the very
same rules (``_judge``), so a check id and a doctor id always mean the same thing.

``check_concurrency(N)`` is not registered (Django cannot know a worker's concurrency): call it
where the concurrency is known, as ``freshconn.contrib.celery`` does at worker start.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from django.core import checks
from django.db import connections

from . import _inspect, _judge
from ._audit import alias_settings
from ._findings import Hit
from ._judge import suggested_max_age
from ._redact import describe_failure

__all__ = ["check_concurrency", "check_servers", "check_settings", "register", "suggested_max_age", "to_message"]

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


def check_concurrency(concurrency: int, *, databases: Iterable[str] | None = None) -> list[checks.CheckMessage]:
    """``freshconn.W010`` for each server where ``concurrency`` threads or greenlets would exceed max_connections.

    For a gevent, eventlet or threads pool (Celery ``-P gevent -c 100``, a ``ThreadPoolExecutor``):
    each thread or greenlet keeps its own connection per alias, so a worker needs up to
    ``concurrency`` x (aliases on one server) connections there. ``databases``: the aliases the
    workers use (default: all). Asks each server once, on a short-lived connection of its own (no
    Django connection is opened or changed); a server it cannot reach is skipped (``check
    --database`` and the doctor report that).
    """
    if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
        raise TypeError(f"check_concurrency() takes an int >= 1, got {type(concurrency).__name__} {concurrency!r}")
    views = [alias_settings(alias) for alias in (connections if databases is None else databases)]
    inspected: list[tuple[Any, _inspect.ServerFacts]] = []
    asked: dict[tuple[str | None, int | None], _inspect.ServerFacts | None] = {}
    for view in views:
        if not view.networked:
            continue
        key = (view.host, view.configured_port)
        if key not in asked:
            try:
                asked[key] = _inspect.inspect(view.alias)
            except Exception:  # noqa: BLE001 - unreachable: reported by the server checks, not here
                asked[key] = None
        facts = asked[key]
        if facts is not None:
            inspected.append((view, facts))
    return [to_message(h) for h in _judge.concurrency_hits(inspected, concurrency)]


def register() -> None:
    checks.register(check_settings, "freshconn")
    checks.register(check_servers, "freshconn", checks.Tags.database)
