"""Retrying a whole unit of work after a disconnect, only when no write can be applied twice.

While an attempt runs, freshconn's statement hook (a Django execute wrapper on every managed
connection) watches each statement: a write completed in autocommit is applied; a write inside a
transaction is applied only once that transaction commits (seen through a robust ``on_commit``
callback, Django's own signal that the COMMIT succeeded); a write in autocommit that fails without
proof it was never sent may have been applied; a COMMIT lost in flight (seen in the error's chain,
or recorded by the hook) is ambiguous and never retried. Statements sent through raw driver
cursors bypass Django's wrappers and are not seen.

Before each retry the unit's start steps reopen, patiently, the connection the failure took: a
retry waits for a restarting server (up to RECONNECT_TIMEOUT) instead of burning its attempts.
A retrying function called inside another unit (``each()``) retries too, as its own attempt,
unless the caller has a transaction open, which it cannot restart: it then runs once, with a
warning and the ``not_retried_in_transaction`` counter.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from typing import Any, TypeVar

from . import _policy, _stats, conf
from ._aliases import Scope
from ._errors import AmbiguousCommitError, ReconnectStopped, failed_alias, is_disconnect, is_read_only
from ._state import notify
from ._units import _open, close, in_transaction, in_unit
from .signals import unit_retried

logger = logging.getLogger("freshconn")

R = TypeVar("R")
_warned_in_transaction = False


def _name(func: Callable[..., Any]) -> str:
    return getattr(func, "__qualname__", repr(func))


def _first_alias(scope: Scope) -> str:
    return sorted(scope)[0] if scope else "default"


def _once_in_transaction(func: Callable[..., Any], scope: Scope, exc: BaseException) -> None:
    global _warned_in_transaction
    alias = failed_alias(exc) or _first_alias(scope)
    _stats.bump(alias, "not_retried_in_transaction")
    if not _warned_in_transaction:
        _warned_in_transaction = True
        logger.warning(
            "not retrying %s after a disconnect on %r: it ran inside the caller's transaction, which cannot "
            "be restarted from here. Call it outside transaction.atomic() for its retries to apply.",
            _name(func),
            alias,
            extra={"alias": alias, "reason": "in_transaction"},
        )


def _run_once(func: Callable[..., R], args: Any, kwargs: Any, scope: Scope) -> R:
    handle = _open(scope)
    try:
        result = func(*args, **kwargs)
    except BaseException as exc:
        close(handle, exc)
        if isinstance(exc, Exception) and is_disconnect(exc):
            _once_in_transaction(func, scope, exc)
        raise
    close(handle, None)
    return result


def run(
    func: Callable[..., R],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    *,
    scope: Scope,
    retries: int,
    idempotent: bool,
) -> R:
    """Run ``func`` as a unit, retrying after a disconnect when the verdict says it is safe."""
    nested = in_unit()
    if nested and in_transaction(scope):
        return _run_once(func, args, kwargs, scope)
    attempt = 0
    while True:
        # Nested in another unit, each attempt acts on its own (the caller has no transaction open);
        # the first one skips the start checks the enclosing unit has just run.
        handle = _open(scope, tracking=True, acting=nested, checks=not (nested and attempt == 0))
        tracker = handle.record()
        try:
            result = func(*args, **kwargs)
        except BaseException as exc:
            try:
                close(handle, exc)
            except AmbiguousCommitError as lost:
                _refuse(func, lost.alias, _policy.UNSAFE_COMMIT)
                raise
            wrong_node = isinstance(exc, Exception) and is_read_only(exc)
            if not isinstance(exc, Exception) or not (wrong_node or is_disconnect(exc)):
                raise
            alias = failed_alias(exc) or _first_alias(scope)
            if isinstance(exc, ReconnectStopped):
                _refuse(func, alias, _policy.UNSAFE_STOPPING)
                raise
            ok, why = _policy.retry_verdict(
                idempotent=idempotent,
                commit_in_flight=tracker.commit_in_flight is not None,
                applied=tracker.applied,
                write_in_flight=tracker.write_in_flight,
            )
            if not ok:
                _refuse(func, alias, why)
                raise
            if attempt >= retries:
                _stats.bump(alias, "retries_exhausted")
                raise
            attempt += 1
            _stats.bump(alias, "retries")
            logger.warning(
                "retrying %s (attempt %d of %d) after a disconnect on %r: %s",
                _name(func),
                attempt,
                retries,
                alias,
                _policy.VERDICT_TEXT[why],
                extra={"alias": alias, "reason": why},
            )
            notify(unit_retried, sender=func, alias=alias, attempt=attempt, error=exc, reason=why)
            if wrong_node or (conf._current or conf.get()).reconnect_timeout <= 0:
                # A failover in progress (DNS or the proxy may still point at the old primary for a
                # moment), or no patient reconnect configured: do not hammer, wait a little.
                time.sleep(_policy.reconnect_pause(attempt, random.random()))
            continue
        close(handle, None)
        return result


def _refuse(func: Callable[..., Any], alias: str, why: str) -> None:
    _stats.bump(alias, "not_retried_unsafe")
    logger.warning(
        "not retrying %s after a disconnect on %r: %s",
        _name(func),
        alias,
        _policy.VERDICT_TEXT[why],
        extra={"alias": alias, "reason": why},
    )
