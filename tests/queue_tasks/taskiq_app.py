"""The taskiq broker and tasks of the integration tests: ``taskiq worker tests.queue_tasks.taskiq_app:broker``."""

from __future__ import annotations

from asgiref.sync import sync_to_async
from taskiq_redis import ListQueueBroker

from tests.queue_tasks import integration_enabled, record, redis_url, setup_django

setup_django()

# redis-py >= 8 gives every socket a 5 s read timeout, which the broker's blocking BRPOP (no timeout
# of its own) hits whenever the queue stays empty that long: the worker process dies and taskiq
# starts a new one (with new connections). Without a socket timeout, an idle worker just waits.
broker = ListQueueBroker(redis_url(), queue_name="freshconn-tests-taskiq", socket_timeout=None)
if integration_enabled():
    from freshconn.contrib.taskiq import FreshconnMiddleware

    broker = broker.with_middlewares(FreshconnMiddleware())


@broker.task(task_name="record_async")
async def record_async(ref: str) -> None:
    await sync_to_async(record, thread_sensitive=True)(ref)


@broker.task(task_name="record_sync")
def record_sync(ref: str) -> None:
    record(ref)
