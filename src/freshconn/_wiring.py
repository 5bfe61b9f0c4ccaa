"""Connecting freshconn to Django: the connection_created receiver, the adoption step, settings changes."""

from __future__ import annotations

from django.core.signals import setting_changed
from django.db.backends.signals import connection_created

from . import _adopt, _aliases, _state, conf

__all__ = ["wire"]

_wired = False


def wire() -> None:
    """Connect freshconn's receivers (idempotent); AppConfig.ready() calls it, and so does the first unit."""
    global _wired
    if _wired:
        return
    _wired = True
    if _adopt.install not in _state.on_register:
        _state.on_register.append(_adopt.install)
    connection_created.connect(_state.on_connection_created, dispatch_uid="freshconn.connection_created")
    setting_changed.connect(conf.reset, dispatch_uid="freshconn.conf.reset")
    setting_changed.connect(_aliases.reset_caches, dispatch_uid="freshconn.aliases.reset")
    setting_changed.connect(_state.reconfigure, dispatch_uid="freshconn.state.reconfigure")
    setting_changed.connect(_adopt.rewire_requests, dispatch_uid="freshconn.adopt.rewire")
    _adopt.rewire_requests()
