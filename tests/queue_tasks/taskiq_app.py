"""The taskiq broker and tasks of the integration tests: ``taskiq worker tests.queue_tasks.taskiq_app:broker``."""

from __future__ import annotations

from asgiref.sync import sync_to_async
from taskiq_redis import ListQueueBroker

from tests.queue_tasks import integration_enabled, record, redis_url, setup_django

setup_django()

broker = ListQueueBroker(redis_url(), queue_name="freshconn-tests-taskiq")
if integration_enabled():
    from freshconn.contrib.taskiq import FreshconnMiddleware

    broker = broker.with_middlewares(FreshconnMiddleware())


@broker.task(task_name="record_async")
async def record_async(ref: str) -> None:
    await sync_to_async(record, thread_sensitive=True)(ref)


@broker.task(task_name="record_sync")
def record_sync(ref: str) -> None:
    record(ref)
