from __future__ import annotations

from django.apps import AppConfig


class FreshconnConfig(AppConfig):
    name = "freshconn"
    verbose_name = "freshconn"

    def ready(self) -> None:
        from django.core.exceptions import ImproperlyConfigured

        from . import _state, checks, conf

        # Validate now, so a bad FRESHCONN setting stops the process at start-up with its name.
        conf.reset()
        try:
            conf.get()
        except ImproperlyConfigured:
            from ._doctor import running_doctor

            if not running_doctor():  # the doctor reports it itself (freshconn.E001, exit 2)
                raise
        _state.wire()
        checks.register()
