"""The Dramatiq broker and actor of the integration tests: ``dramatiq tests.queue_tasks.dramatiq_actors``."""

from __future__ import annotations

import dramatiq
from dramatiq.brokers.redis import RedisBroker

from tests.queue_tasks import integration_enabled, record, redis_url, setup_django

setup_django()

broker = RedisBroker(url=redis_url())  # type: ignore[no-untyped-call]  # dramatiq leaves its __init__ unannotated
if integration_enabled():
    from freshconn.contrib.dramatiq import FreshconnMiddleware

    broker.add_middleware(FreshconnMiddleware())
dramatiq.set_broker(broker)


@dramatiq.actor(actor_name="record", max_retries=0)
def record_actor(ref: str) -> None:
    record(ref)
