"""Process-wide counters, per alias. One lock: increments are rare compared with queries."""

from __future__ import annotations

import threading
from collections.abc import Iterable

__all__ = ["COUNTERS", "bump", "bump_units", "reset_stats", "stats"]

#: Counters every alias reports, even at zero.
COUNTERS = (
    "units",  # units that ran the lifecycle for this alias (nested no-op units do not count)
    "pings",  # liveness round trips sent before reusing a connection
    "connects",  # connections opened
    "discarded",  # connections closed by freshconn, whatever the reason (sum of the discarded_* below)
    "discarded_max_age",  # lifetime (CONN_MAX_AGE) reached
    "discarded_server_idle",  # idle past the limit the server enforces on the session
    "discarded_dead",  # found dead before use: driver flag, closed socket, or failed ping
    "discarded_error",  # a disconnect-class error during the unit
    "discarded_autocommit",  # the unit left autocommit in a state Django does not expect
    "skipped_atomic",  # unit began inside the caller's atomic block: connection left alone
    "retries",  # units run again after a disconnect, because that was provably safe
    "not_retried_unsafe",  # disconnects after which a retry was refused: it could apply a write twice
    "retries_exhausted",  # disconnects still failing after the last allowed retry
)

_lock = threading.Lock()
_counts: dict[str, dict[str, int]] = {}


def _row(alias: str) -> dict[str, int]:
    row = _counts.get(alias)
    if row is None:
        row = _counts[alias] = dict.fromkeys(COUNTERS, 0)
    return row


def bump(alias: str, counter: str, n: int = 1) -> None:
    with _lock:
        row = _row(alias)
        row[counter] = row.get(counter, 0) + n


def bump_units(aliases: Iterable[str]) -> None:
    with _lock:
        for alias in aliases:
            _row(alias)["units"] += 1


def stats() -> dict[str, dict[str, int]]:
    """A snapshot of the counters: ``{alias: {counter: int}}``, summed over all threads."""
    with _lock:
        return {alias: dict(row) for alias, row in _counts.items()}


def reset_stats() -> None:
    """Set every counter back to zero."""
    with _lock:
        _counts.clear()
