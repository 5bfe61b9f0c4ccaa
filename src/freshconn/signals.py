"""Django signals freshconn sends, for logging, metrics or alerting."""

from __future__ import annotations

from django.dispatch import Signal

__all__ = ["connection_discarded"]

#: Sent after freshconn closed a connection. Arguments: ``alias`` (str), ``reason`` (str: one of
#: "max_age", "server_idle", "dead", "error", "autocommit"). ``sender`` is the wrapper's class.
connection_discarded = Signal()
