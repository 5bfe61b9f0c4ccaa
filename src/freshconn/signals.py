"""Django signals freshconn sends, for logging, metrics or alerting."""

from __future__ import annotations

from django.dispatch import Signal

__all__ = ["connection_discarded", "unit_retried"]

#: Sent after freshconn closed a connection. Arguments: ``alias`` (str), ``reason`` (str: one of
#: "max_age", "server_idle", "dead", "error", "autocommit"). ``sender`` is the wrapper's class.
connection_discarded = Signal()

#: Sent before a unit of work is run again after a disconnect. Arguments: ``alias`` (str, the
#: alias whose connection failed), ``attempt`` (int, 1 for the first retry), ``error`` (the
#: exception), ``reason`` (str: why the retry is safe). ``sender`` is the decorated function.
unit_retried = Signal()
