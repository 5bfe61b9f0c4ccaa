from __future__ import annotations

from django.apps import AppConfig
from django.core.signals import setting_changed


class FreshconnConfig(AppConfig):
    name = "freshconn"
    verbose_name = "freshconn"

    def ready(self) -> None:
        from . import _lifecycle, checks, conf

        # Validate now, so a bad FRESHCONN setting stops the process at start-up with its name.
        conf.reset()
        conf.get()
        setting_changed.connect(conf.reset, dispatch_uid="freshconn.conf.reset")
        setting_changed.connect(_lifecycle.reset_caches, dispatch_uid="freshconn.lifecycle.reset")
        _lifecycle.wire()
        checks.register()
