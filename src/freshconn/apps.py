from __future__ import annotations

from django.apps import AppConfig


class FreshconnConfig(AppConfig):
    name = "freshconn"
    verbose_name = "freshconn"

    def ready(self) -> None:
        from . import _state, checks, conf

        # Validate now, so a bad FRESHCONN setting stops the process at start-up with its name.
        conf.reset()
        conf.get()
        _state.wire()
        checks.register()
