"""Reopening a connection while the server restarts or fails over, like psycopg_pool's reconnect_timeout."""

from __future__ import annotations

import logging
import random
import time

from django.db.backends.base.base import BaseDatabaseWrapper

from ._errors import is_disconnect

logger = logging.getLogger("freshconn")

#: First pause between connection attempts, and the longest one (seconds); each pause is jittered.
BACKOFF_FIRST = 0.1
BACKOFF_MAX = 2.0


def backoff(attempt: int, spread: float) -> float:
    """Pause before attempt ``attempt`` + 1: exponential, capped, with full jitter in [50 %, 100 %]."""
    ceiling = min(BACKOFF_MAX, BACKOFF_FIRST * float(2 ** max(0, attempt - 1)))
    return ceiling * (0.5 + 0.5 * spread)


def connect_patiently(conn: BaseDatabaseWrapper, timeout: float) -> None:
    """Open ``conn``, retrying server-unavailable errors with backoff for up to ``timeout`` seconds.

    Errors that are not about reaching the server (wrong password, unknown database) fail at once:
    waiting would not fix them. The last error is raised unchanged when time runs out.
    """
    deadline = time.monotonic() + timeout
    attempt = 0
    while True:
        attempt += 1
        try:
            conn.ensure_connection()
            if attempt > 1:
                logger.info(
                    "reconnected %r after %d attempts",
                    conn.alias,
                    attempt,
                    extra={"alias": conn.alias, "reason": "reconnected"},
                )
            return
        except Exception as exc:
            pause = backoff(attempt, random.random())
            if not is_disconnect(exc) or time.monotonic() + pause > deadline:
                raise
            logger.info(
                "cannot reach the server for %r yet (%s); retrying",
                conn.alias,
                type(exc).__name__,
                extra={"alias": conn.alias, "reason": "server_unavailable"},
            )
            time.sleep(pause)
