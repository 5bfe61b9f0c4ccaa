"""Beat's scheduler for the integration tests: django-celery-beat's DatabaseScheduler, limited to one entry.

Two beats run side by side on one database (with freshconn and without, for contrast): each keeps to
the periodic task named in ``FRESHCONN_TEST_BEAT_TASK``, so neither sends nor saves the other's.
"""

from __future__ import annotations

import os
from typing import Any

from django_celery_beat.schedulers import DatabaseScheduler


class OneTaskScheduler(DatabaseScheduler):  # type: ignore[misc]  # django-celery-beat has no type hints: Any
    def enabled_models_qs(self) -> Any:
        return super().enabled_models_qs().filter(name=os.environ["FRESHCONN_TEST_BEAT_TASK"])
