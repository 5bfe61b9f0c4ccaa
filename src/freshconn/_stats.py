"""Process-wide counters, per alias. One lock: increments are rare compared with queries."""

from __future__ import annotations

import os
import threading
import weakref
from typing import Any

from ._aliases import server_aliases

__all__ = ["COUNTERS", "bump", "count_unit", "reset_stats", "stats"]

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
    "discarded_interrupted",  # an exception (time limit, signal, cancellation) struck while a query was in flight
    "discarded_read_only",  # the server refused a write as read-only: a failover left it on the wrong node
    "skipped_atomic",  # unit began inside the caller's atomic block: connection left alone
    "reconnect_waits",  # times a unit waited for its server to come back (restart, failover, outage)
    "reconnect_attempts",  # connection attempts made while waiting (spread and shared across threads)
    "retries",  # units run again after a disconnect, because that was provably safe
    "not_retried_unsafe",  # disconnects after which a retry was refused: it could apply a write twice
    "not_retried_in_transaction",  # a retrying function ran inside the caller's transaction: it ran once
    "retries_exhausted",  # disconnects still failing after the last allowed retry
    "ambiguous_commits",  # COMMITs lost in flight (AmbiguousCommitError raised)
    "abandoned_units",  # units closed from another thread or left open: ended by their own thread later
)

# Reentrant: dropping the last reference to an ended thread's counters inside stats() runs their
# __del__, which takes the lock again in the same thread.
_lock = threading.RLock()
# Fork-safe: held across fork() by the forking thread, so that no other thread of the parent holds it
# in the child (where that thread no longer exists); Python's after-fork clean-up of the other
# threads' thread-locals runs __del__ above, which then re-enters it instead of blocking forever.
os.register_at_fork(before=_lock.acquire, after_in_parent=_lock.release, after_in_child=_lock.release)
#: Counts of threads that have ended, folded in when their per-thread counters are collected.
_retired: dict[str, dict[str, int]] = {}


class _ThreadCounts:
    """One thread's counters. Only that thread writes them, so counting needs no lock.

    Units are counted per scope (a frozenset of aliases) with one dict increment, and units of
    every alias (scope None, the commonest) in an int slot of the thread's ThreadState (``owner``,
    see ``thread_units()``), the cheapest thing the per-unit path can do; stats() spreads them over
    the scope's aliases.
    """

    __slots__ = ("__weakref__", "owner", "rows", "units")

    def __init__(self) -> None:
        self.rows: dict[str, dict[str, int]] = {}
        self.units: dict[frozenset[str] | None, int] = {}
        #: The thread's freshconn._state.ThreadState (its ``unscoped_units``), once it has one.
        self.owner: Any = None

    def add_to(self, total: dict[str, dict[str, int]]) -> None:
        """Add this thread's counts to ``total``, without writing to them (their thread may be counting)."""
        _add(total, self.rows)
        scoped = list(self.units.items())
        if self.owner is not None and self.owner.unscoped_units:
            scoped.append((None, self.owner.unscoped_units))
        for scope, n in scoped:
            for alias in server_aliases(scope):
                row = total.get(alias)
                if row is None:
                    row = total[alias] = dict.fromkeys(COUNTERS, 0)
                row["units"] += n

    def __del__(self) -> None:
        # The thread ended (its thread-local storage went away): keep what it counted.
        try:
            with _lock:
                self.add_to(_retired)
        except Exception:  # noqa: BLE001  # pragma: no cover - only at interpreter shutdown, when modules are torn down
            pass


_live: weakref.WeakSet[_ThreadCounts] = weakref.WeakSet()


class _Local(threading.local):
    def __init__(self) -> None:
        self.counts = _ThreadCounts()
        with _lock:
            _live.add(self.counts)


_local = _Local()


def _add(into: dict[str, dict[str, int]], rows: dict[str, dict[str, int]]) -> None:
    for alias, row in list(rows.items()):
        target = into.get(alias)
        if target is None:
            target = into[alias] = dict.fromkeys(COUNTERS, 0)
        for counter, n in list(row.items()):
            target[counter] = target.get(counter, 0) + n


def _row(alias: str) -> dict[str, int]:
    rows = _local.counts.rows
    row = rows.get(alias)
    if row is None:
        row = rows[alias] = dict.fromkeys(COUNTERS, 0)
    return row


def bump(alias: str, counter: str, n: int = 1) -> None:
    row = _row(alias)
    row[counter] = row.get(counter, 0) + n


def count_unit(scope: frozenset[str] | None) -> None:
    units = _local.counts.units
    units[scope] = units.get(scope, 0) + 1


def thread_units(owner: Any) -> dict[frozenset[str] | None, int]:
    """The current thread's units-per-scope counts, for ``owner``, its freshconn._state.ThreadState.

    ``owner.unscoped_units`` holds the thread's units of every alias; the dict, the others.
    """
    counts = _local.counts
    counts.owner = owner
    return counts.units


def stats() -> dict[str, dict[str, int]]:
    """A snapshot of the counters: ``{alias: {counter: int}}``, summed over all threads."""
    with _lock:
        total: dict[str, dict[str, int]] = {}
        _add(total, _retired)
        for counts in list(_live):
            counts.add_to(total)
    return total


def reset_stats() -> None:
    """Set every counter back to zero, in every thread."""
    with _lock:
        _retired.clear()
        for counts in list(_live):
            counts.rows.clear()
            counts.units.clear()
            if counts.owner is not None:
                counts.owner.unscoped_units = 0
