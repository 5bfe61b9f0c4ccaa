"""The Celery app of the integration tests: ``celery -A tests.queue_tasks.celery_app worker``."""

from __future__ import annotations

import os
import time
from typing import Any

from celery import Celery

from tests.queue_tasks import integration_enabled, record, redis_url

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.settings")

app = Celery("freshconn_tests", broker=redis_url())
app.conf.update(
    task_ignore_result=True,
    worker_prefetch_multiplier=1,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)
if os.environ.get("FRESHCONN_TEST_CELERY_DB") == "1":
    # django-celery-results stores every state, django-celery-beat schedules (tests.celery_settings).
    app.conf.update(
        task_ignore_result=False,
        result_backend="django-db",
        beat_scheduler="tests.queue_tasks.celery_beat:OneTaskScheduler",  # a DatabaseScheduler
        beat_sync_every=1,  # save each entry's run at once
        beat_max_loop_interval=float(os.environ.get("FRESHCONN_TEST_BEAT_MAX_LOOP", "1")),
    )
if os.environ.get("FRESHCONN_TEST_PSYCOGREEN") == "1":
    from psycogreen.gevent import patch_psycopg

    patch_psycopg()
if os.environ.get("FRESHCONN_TEST_PARENT_QUERY") == "1":
    # Connected before install(): runs after the Django fix-up's worker_init (which closes the
    # parent's connections) and before the pool forks, so the children inherit an open session.
    from celery import signals

    from tests.queue_tasks import parent_session

    def _parent_connects(**kwargs: Any) -> None:
        parent_session("init")

    def _parent_checks(**kwargs: Any) -> None:
        parent_session("shutdown")

    signals.worker_init.connect(_parent_connects, weak=False)
    signals.worker_shutdown.connect(_parent_checks, weak=False)

if integration_enabled():
    from freshconn.contrib.celery import install

    install(app)


@app.task(name="freshconn_tests.record")  # type: ignore[untyped-decorator]  # celery has no type hints
def record_task(ref: str) -> dict[str, Any]:
    return record(ref)


@app.task(name="freshconn_tests.record_slowly")  # type: ignore[untyped-decorator]  # celery has no type hints
def record_slowly(ref: str, seconds: float) -> str:
    """Write a row, then work (without the database) for ``seconds``; the result is stored after."""
    record(ref)
    time.sleep(seconds)
    return ref
