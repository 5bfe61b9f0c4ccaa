"""The arq worker settings of the integration tests: ``arq tests.queue_tasks.arq_app.WorkerSettings``."""

from __future__ import annotations

from typing import Any

from arq.connections import RedisSettings
from asgiref.sync import sync_to_async

from tests.queue_tasks import integration_enabled, record, redis_url, setup_django

setup_django()

QUEUE = "freshconn-tests-arq"


async def record_job(ctx: dict[str, Any], ref: str) -> None:
    await sync_to_async(record, thread_sensitive=True)(ref)


class WorkerSettings:
    functions = [record_job]
    redis_settings = RedisSettings.from_dsn(redis_url())
    queue_name = QUEUE
    max_tries = 1
    keep_result = 0
    poll_delay = 0.05


if integration_enabled():
    from freshconn.contrib.arq import install

    install(WorkerSettings)
