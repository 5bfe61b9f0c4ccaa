"""Django >= 5.1's PostgreSQL connection pool (``OPTIONS["pool"]``, psycopg 3) in workers.

Django builds one ``psycopg_pool.ConnectionPool`` per alias per process and gives it a ``check``
only with ``CONN_HEALTH_CHECKS`` (a round trip per checkout); psycopg_pool enforces ``max_lifetime``
only when a connection is returned, so an idle pool hands out connections the server (or a proxy)
already dropped. freshconn builds that pool itself, before Django does, exactly as Django would
but with freshconn's own ``check``: at checkout a connection used recently is handed out with no
round trip, one idle past the server's limit or past its lifetime is dropped with none, and only a
suspect one is pinged. Units return their pooled connection at their end, so threads never hold
one between units.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from typing import Any

from django.db import connections

from . import _policy, _stats, conf
from ._sockets import bounded

__all__ = ["RAW_STATE_ATTR", "check", "install_pools", "is_pooled", "pools_of"]

logger = logging.getLogger("freshconn")

#: A pooled raw connection carries its freshconn state across checkouts (psycopg connections take attributes).
RAW_STATE_ATTR = "_freshconn_state"


def is_pooled(settings_dict: dict[str, Any]) -> bool:
    options = settings_dict.get("OPTIONS") or {}
    return bool(isinstance(options, dict) and options.get("pool"))


def pools_of(wrapper_class: type) -> dict[str, Any] | None:
    """Django's class-level ``{alias: ConnectionPool}`` of the PostgreSQL backend (None elsewhere)."""
    pools = getattr(wrapper_class, "_connection_pools", None)
    return pools if isinstance(pools, dict) else None


class _Refused(Exception):
    """Raised by ``check`` to make psycopg_pool hand out another connection (never escapes the pool)."""


def check(raw: Any) -> None:
    """psycopg_pool's ``check`` hook: return to hand ``raw`` out, raise to have the pool replace it.

    The same rule as at the start of a unit: lifetime, the server's idle limit, a socket with news,
    CHECK_AFTER_IDLE. A connection freshconn has not seen yet (just made by the pool) is handed out.
    """
    state = getattr(raw, RAW_STATE_ATTR, None)
    if state is None:
        return  # opened before freshconn's pool existed: nothing known about it
    cfg = conf._current or conf.get()
    now = time.monotonic()
    suspect = state.doomed is not None or state.socket_has_news()
    verdict = _policy.start_verdict(
        now, state.deadline, state.last_used, state.idle_limit, cfg.check_after_idle, suspect
    )
    if verdict is None:
        return
    if verdict == _policy.PING and not state.doomed:
        _stats.bump(state.alias, "pings")
        try:
            with bounded(state.driver.fileno(raw), cfg.ping_timeout):
                state.driver.ping(raw)
        except Exception:  # noqa: BLE001 - any failure of a liveness check means "do not reuse"
            verdict = "dead"
        else:
            state.last_used = time.monotonic()
            state.check_at = _policy.check_at(state.deadline, state.last_used, state.window)
            return
    reason = state.doomed or ("dead" if verdict == _policy.PING else verdict)
    _stats.bump(state.alias, "discarded")
    _stats.bump(state.alias, "discarded_" + reason)
    logger.log(
        logging.DEBUG if reason == "max_age" else logging.INFO,
        "discarded pooled connection %r: %s",
        state.alias,
        reason,
        extra={"alias": state.alias, "reason": reason},
    )
    # psycopg_pool puts back a connection that failed its check if it still looks usable to psycopg:
    # closing it first makes the pool drop it and open a replacement.
    raw.close()
    raise _Refused(reason)


def _configure(alias: str, django_configure: Any, make_state: Callable[..., Any], raw: Any) -> None:
    """The pool opened ``raw`` (in one of its threads): Django's session setup, then freshconn's state for it.

    Made now, not at its first checkout, so that a connection that waits in the pool unused is still
    known: when it was made, and the server's idle limit (read once, here, not at every checkout).
    """
    django_configure(raw)
    state = make_state(alias, raw, connections.settings[alias], read_limit=True, autocommit=True)
    state.pooled = True
    setattr(raw, RAW_STATE_ATTR, state)
    _stats.bump(alias, "connects")


def install_pools(make_state: Callable[..., Any]) -> None:
    """For every alias with ``OPTIONS["pool"]`` whose pool Django has not built yet, build it with freshconn's check.

    The construction is Django's own (its ``pool`` property, Django 5.1-6.x), with ``check`` set to
    freshconn's; Django then finds it in its class-level dict and uses it as its own.
    """
    for alias in list(connections.settings):
        db = connections.settings[alias]
        if not is_pooled(db) or db.get("CONN_MAX_AGE", 0) != 0:
            continue  # Django itself refuses a pool with persistent connections: let it say so
        try:
            wrapper = connections[alias]
        except Exception:  # noqa: BLE001 - a backend that cannot load is reported by Django
            continue
        pools = pools_of(type(wrapper))
        if pools is None or alias in pools:
            continue
        try:
            from psycopg_pool import ConnectionPool
        except ImportError:
            continue  # Django raises its own clear error at the first connection
        options = db["OPTIONS"]["pool"]
        options = {} if options is True else dict(options)
        if "check" in options:
            continue  # not possible with Django (it passes check= itself), but never override a user's
        kwargs = wrapper.get_connection_params()
        kwargs.pop("pool", None)
        kwargs["autocommit"] = True  # as Django does: it sets autocommit itself later
        pool = ConnectionPool(
            kwargs=kwargs,
            open=False,
            configure=functools.partial(_configure, alias, wrapper._configure_connection, make_state),  # type: ignore[attr-defined]
            check=check,
            **options,
        )
        pools.setdefault(alias, pool)


def forget_inherited_pools(keep: list[Any], make_state: Callable[..., Any]) -> int:
    """In a forked child: drop the parent's pools (kept referenced in ``keep``, so nothing closes them)."""
    dropped = 0
    for alias in list(connections.settings):
        if not is_pooled(connections.settings[alias]):
            continue
        try:
            pools = pools_of(type(connections[alias]))
        except Exception:  # noqa: BLE001 - a backend that cannot load has no pool
            continue
        if pools is not None and alias in pools:
            # Its connections are the parent's sessions and its worker threads do not exist here:
            # closing it would talk to the parent's sessions. Keep it, inert, for good.
            keep.append(pools.pop(alias))
            dropped += 1
    if dropped:
        install_pools(make_state)
    return dropped
