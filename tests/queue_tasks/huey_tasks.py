"""The Huey instance and task of the integration tests: ``huey_consumer tests.queue_tasks.huey_tasks.huey``."""

from __future__ import annotations

import os
from typing import Any

from huey import RedisHuey

from tests.queue_tasks import integration_enabled, parent_session, record, redis_url, setup_django


def build(url: str, *, integration: bool) -> tuple[Any, Any]:
    """A Huey instance and its ``record`` task; a producer builds the same pair to enqueue."""
    huey = RedisHuey("freshconn-tests", url=url, results=False)

    @huey.task(name="record", retries=0)  # type: ignore[untyped-decorator]  # huey has no type hints
    def record_task(ref: str) -> None:
        record(ref)

    if integration:
        from freshconn.contrib.huey import install

        install(huey)
    return huey, record_task


setup_django()
huey, record_task = build(redis_url(), integration=integration_enabled())
if os.environ.get("FRESHCONN_TEST_PARENT_QUERY") == "1":
    # Imported by the consumer before it starts (and, with -k process, forks) its workers.
    parent_session("init")
