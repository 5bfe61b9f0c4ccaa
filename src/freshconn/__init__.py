"""freshconn: a request-like connection lifecycle for Django code that never serves a request."""

from __future__ import annotations

from ._async import AsyncUnitOfWork, aeach, aunit_of_work
from ._errors import AmbiguousCommitError, is_disconnect
from ._stats import reset_stats, stats
from ._threads import ThreadPoolExecutor
from ._unit import UnitOfWork, each, unit_of_work
from .command import WorkerCommand

__all__ = [
    "AmbiguousCommitError",
    "AsyncUnitOfWork",
    "ThreadPoolExecutor",
    "UnitOfWork",
    "WorkerCommand",
    "aeach",
    "aunit_of_work",
    "each",
    "is_disconnect",
    "reset_stats",
    "stats",
    "unit_of_work",
]

__version__ = "0.1.0"
