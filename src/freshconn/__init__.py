"""freshconn: a request-like connection lifecycle for Django code that never serves a request."""

from __future__ import annotations

from ._errors import AmbiguousCommitError, is_disconnect
from ._stats import reset_stats, stats
from ._unit import UnitOfWork, each, unit_of_work

__all__ = [
    "AmbiguousCommitError",
    "UnitOfWork",
    "each",
    "is_disconnect",
    "reset_stats",
    "stats",
    "unit_of_work",
]

__version__ = "0.1.0"
