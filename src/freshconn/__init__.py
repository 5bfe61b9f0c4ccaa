"""freshconn: a request-like connection lifecycle for Django code that never serves a request."""

from __future__ import annotations

from . import _adopt  # noqa: F401 - registers the close_old_connections() step before any connection
from ._aliases import Using
from ._async import AsyncUnitOfWork, aeach, aunit_of_work
from ._errors import AmbiguousCommitError, ReconnectStopped, is_disconnect, is_read_only
from ._fork import forget_inherited_connections
from ._stats import COUNTERS, reset_stats, stats
from ._threads import ThreadPoolExecutor, close_thread_connections
from ._unit import UnitOfWork, each, unit_of_work
from ._units import UnitHandle, open_unit
from .command import WorkerCommand

__all__ = [
    "COUNTERS",
    "AmbiguousCommitError",
    "AsyncUnitOfWork",
    "ReconnectStopped",
    "ThreadPoolExecutor",
    "UnitHandle",
    "UnitOfWork",
    "Using",
    "WorkerCommand",
    "aeach",
    "aunit_of_work",
    "close_thread_connections",
    "each",
    "forget_inherited_connections",
    "is_disconnect",
    "is_read_only",
    "open_unit",
    "reset_stats",
    "stats",
    "unit_of_work",
]

__version__ = "0.2.0"
