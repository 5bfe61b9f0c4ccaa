"""Retrying a whole unit of work after a disconnect, only when no write can be applied twice.

While an attempt runs, a Django execute wrapper on every alias in scope watches each statement:
a write completed in autocommit is applied; a write inside a transaction is applied only once that
transaction commits (seen through a robust ``on_commit`` callback, Django's own signal that the
COMMIT succeeded); a write in autocommit that fails without proof it was never sent may have been
applied. Statements sent through raw driver cursors bypass Django's wrappers and are not seen.
"""

from __future__ import annotations

import contextlib
import logging
import random
import re
import time
from collections.abc import Callable, Mapping
from typing import Any

from django.db import connections

from . import _lifecycle, _policy, _reconnect, _stats
from ._errors import AmbiguousCommitError, commit_in_flight, failed_alias, is_disconnect, is_unsent
from .signals import unit_retried

logger = logging.getLogger("freshconn")

READ, WRITE, COMMIT, NEUTRAL = "read", "write", "commit", "neutral"

_FIRST_WORD = re.compile(r"\s*(?:/\*.*?\*/\s*|--[^\n]*\n\s*|\(\s*)*([A-Za-z]+)", re.S)
_DML = re.compile(r"\b(INSERT|UPDATE|DELETE|MERGE|REPLACE)\b", re.I)
_INTO = re.compile(r"\bINTO\b", re.I)
_ANALYZE = re.compile(r"\bANALY[SZ]E\b", re.I)
_READ_WORDS = frozenset({"SELECT", "SHOW", "EXPLAIN", "DESCRIBE", "DESC", "VALUES", "TABLE"})
_NEUTRAL_WORDS = frozenset({"BEGIN", "START", "SAVEPOINT", "RELEASE", "ROLLBACK", "SET", "USE"})


def classify(sql: str) -> str:
    """READ, WRITE, COMMIT or NEUTRAL for one SQL statement; anything unrecognised is a WRITE."""
    m = _FIRST_WORD.match(sql)
    word = m.group(1).upper() if m else ""
    if word in ("SELECT", "VALUES", "TABLE"):
        # SELECT ... INTO creates a table (PostgreSQL) or writes a file or variables (MySQL).
        kind = WRITE if _INTO.search(sql) else READ
    elif word in ("WITH", "EXPLAIN"):
        # A PostgreSQL CTE may hide data-modifying statements; EXPLAIN ANALYZE runs its statement.
        kind = WRITE if _DML.search(sql) and (word == "WITH" or _ANALYZE.search(sql)) else READ
    elif word in _READ_WORDS:
        kind = READ
    elif word in ("COMMIT", "END"):
        kind = COMMIT
    elif word in _NEUTRAL_WORDS:
        kind = NEUTRAL
    else:
        kind = WRITE
    return kind


class Tracker:
    """What one attempt of a unit did, across all its aliases (one tracker per attempt)."""

    def __init__(self) -> None:
        self.applied = False
        self.write_in_flight = False
        self.commit_in_flight = False

    def _committed(self) -> None:
        self.applied = True

    def __call__(
        self, execute: Callable[..., Any], sql: str, params: Any, many: bool, context: Mapping[str, Any]
    ) -> Any:
        conn = context["connection"]
        kind = classify(sql)
        in_tx = conn.in_atomic_block or not conn.get_autocommit()
        try:
            result = execute(sql, params, many, context)
        except BaseException as exc:
            if is_disconnect(exc):
                if kind == COMMIT:
                    self.commit_in_flight = True
                elif kind == WRITE and not in_tx and not is_unsent(exc):
                    self.write_in_flight = True
            raise
        if kind == WRITE:
            if conn.in_atomic_block:
                # Registered per write: a callback registered inside a savepoint that is later
                # rolled back is dropped by Django, and later writes must still be seen.
                conn.on_commit(self._committed, robust=True)
            elif in_tx:
                pass  # manual transaction (AUTOCOMMIT=False): applied only by an explicit COMMIT
            else:
                self.applied = True
        elif kind == COMMIT:
            self.applied = True
        return result


def run(
    func: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    *,
    unit: Any,
    retries: int,
    idempotent: bool,
) -> Any:
    """Run ``func`` as a unit, retrying after a disconnect when the verdict says it is safe."""
    if _lifecycle.in_unit() or _lifecycle.in_transaction(unit.scope):
        # Nested inside another unit or the caller's transaction: only an outermost unit outside
        # any transaction can discard its connections and start afresh, so this call runs once.
        with unit:
            return func(*args, **kwargs)
    attempt = 0
    while True:
        tracker = Tracker()
        try:
            with contextlib.ExitStack() as stack:
                for alias in unit.scope or connections:
                    stack.enter_context(connections[alias].execute_wrapper(tracker))
                with unit:
                    return func(*args, **kwargs)
        except BaseException as exc:
            if not is_disconnect(exc) or not isinstance(exc, Exception):
                raise
            alias = commit_in_flight(exc) or failed_alias(exc) or _first_alias(unit.scope)
            ok, why = _policy.retry_verdict(
                idempotent=idempotent,
                commit_in_flight=tracker.commit_in_flight or isinstance(exc, AmbiguousCommitError),
                applied=tracker.applied,
                write_in_flight=tracker.write_in_flight,
            )
            if not ok:
                _stats.bump(alias, "not_retried_unsafe")
                logger.warning(
                    "not retrying %s after a disconnect on %r: %s",
                    _name(func),
                    alias,
                    why,
                    extra={"alias": alias, "reason": why},
                )
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
                why,
                extra={"alias": alias, "reason": why},
            )
            unit_retried.send(sender=func, alias=alias, attempt=attempt, error=exc, reason=why)
            time.sleep(_reconnect.backoff(attempt, random.random()))


def _first_alias(scope: frozenset[str] | None) -> str:
    return sorted(scope)[0] if scope else next(iter(connections), "default")


def _name(func: Callable[..., Any]) -> str:
    return getattr(func, "__qualname__", repr(func))
