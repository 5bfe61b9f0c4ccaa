"""Making every ``django.db.close_old_connections()`` call a unit boundary, and harmless inside units.

Many loops freshconn's users do not own already call ``close_old_connections()`` as their request
boundary: django-tasks-db's ``db_worker``, Django-Q2, django_dramatiq's middleware, huey's
``db_task``, Procrastinate, countless commands. That function calls ``close_if_unusable_or_obsolete()``
on each initialized wrapper of the thread; freshconn shadows that method on the instances it
manages (never on the class, never at import) with ``step()``:

- inside a unit: nothing (Django's step would close a connection the unit is using, or one inside
  ``atomic()``, breaking the transaction);
- outside units, with FRESHCONN['ADOPT_CLOSE_OLD_CONNECTIONS']: a unit boundary for that
  connection (end steps, then start steps: idle-aware checks, server idle limit, discard of a
  broken connection, lifetime, patient reconnect), and never inside ``atomic()``;
- otherwise: Django's own method, exactly.

The web tier keeps Django's lifecycle: with adoption on, the request signals are pointed at
``request_boundary()``, which runs Django's own per-connection step, so requests behave exactly as
without freshconn.
"""

from __future__ import annotations

import types
from typing import Any

from django.core.signals import request_finished, request_started, setting_changed
from django.db import close_old_connections
from django.db.backends.base.base import BaseDatabaseWrapper

from . import _django, _lifecycle, _state, conf
from ._aliases import is_server_vendor
from ._units import in_unit

__all__ = ["install", "request_boundary", "rewire_requests", "step"]


def step(conn: BaseDatabaseWrapper) -> None:
    """freshconn's ``close_if_unusable_or_obsolete()`` for a managed wrapper (see the module docstring)."""
    if in_unit():
        return
    cfg = conf._current or conf.get()
    if not cfg.adopt_close_old_connections or not is_server_vendor(conn.vendor):
        type(conn).close_if_unusable_or_obsolete(conn)
        return
    _lifecycle.boundary(conn)


def install(conn: BaseDatabaseWrapper) -> None:
    """Shadow Django's per-connection step on this wrapper instance."""
    setattr(conn, _django.PER_CONNECTION_STEP, types.MethodType(step, conn))


def request_boundary(**kwargs: Any) -> None:
    """Django's ``close_old_connections`` for the request signals, bypassing the adoption."""
    for conn in _django.initialized_wrappers():
        type(conn).close_if_unusable_or_obsolete(conn)


def rewire_requests(**kwargs: Any) -> None:
    """Point the request signals at Django's own lifecycle while adoption is on (and back when off)."""
    if kwargs.get("setting") not in (None, "FRESHCONN"):
        return
    try:
        adopt = conf.get().adopt_close_old_connections
    except Exception:  # noqa: BLE001 - an invalid setting is reported by the system checks
        adopt = False
    for signal in (request_started, request_finished):
        if adopt:
            signal.disconnect(close_old_connections)
            signal.connect(request_boundary, dispatch_uid="freshconn.request_boundary")
        elif signal.disconnect(dispatch_uid="freshconn.request_boundary"):
            signal.connect(close_old_connections)


def _on_wire() -> None:
    setting_changed.connect(rewire_requests, dispatch_uid="freshconn.adopt.rewire")
    rewire_requests()


# Registered at import (the package imports this module), before any connection is managed.
_state.on_register.append(install)
_state.on_wire.append(_on_wire)
