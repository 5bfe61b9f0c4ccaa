"""The Procrastinate tasks of the integration tests (``manage.py procrastinate worker``)."""

from __future__ import annotations

import os

from asgiref.sync import sync_to_async
from procrastinate.contrib.django import app

from tests.queue_tasks import record


@app.task(name="record_sync")
def record_sync(ref: str) -> None:
    record(ref)


@app.task(name="record_async")
async def record_async(ref: str) -> None:
    await sync_to_async(record, thread_sensitive=True)(ref)


def _short_idle_limit(sender: object, connection: object, **kwargs: object) -> None:
    # The server drops *Django's* sessions after 2 s idle; Procrastinate's own pool, built from the
    # same settings, must keep its LISTEN connection, so the limit is not in OPTIONS here.
    with connection.cursor() as cursor:  # type: ignore[attr-defined]
        cursor.execute("SET idle_session_timeout = 2000")


if os.environ.get("FRESHCONN_TEST_DJANGO_IDLE_LIMIT") == "1":
    from django.db.backends.signals import connection_created

    connection_created.connect(_short_idle_limit, weak=False)
