"""The Faust app of the integration tests: ``faust -A tests.queue_tasks.faust_app worker``."""

from __future__ import annotations

import os

import faust
from asgiref.sync import sync_to_async

from tests.queue_tasks import integration_enabled, record, setup_django

setup_django()

KAFKA_ENV = "FRESHCONN_TEST_KAFKA"
TOPIC = "freshconn-tests-faust"

app = faust.App(
    os.environ.get("FRESHCONN_TEST_FAUST_ID", "freshconn-tests-faust"),
    broker=f"kafka://{os.environ.get(KAFKA_ENV, '127.0.0.1:1')}",
    datadir=os.environ.get("FRESHCONN_TEST_FAUST_DATA", "/tmp/freshconn-tests-faust"),
    store="memory://",
    web_enabled=False,
    topic_partitions=1,
    topic_replication_factor=1,
    consumer_auto_offset_reset="earliest",
    # A new group's first assignment waits about half the session timeout on Tansu.
    broker_session_timeout=3.0,
    broker_heartbeat_interval=0.5,
    Agent="freshconn.contrib.faust:Agent" if integration_enabled() else "faust:Agent",
)
events = app.topic(os.environ.get("FRESHCONN_TEST_FAUST_TOPIC", TOPIC), value_type=bytes, value_serializer="raw")


def lose_connection() -> None:
    """The server kills this thread's session, then a query fails on it: the agent crashes."""
    from freshconn.testing import kill_connection
    from tests.app.models import Order

    kill_connection()
    Order.objects.count()


@app.agent(events)
async def record_event(stream: faust.StreamT[bytes]) -> None:
    async for value in stream:
        ref = value.decode()
        await sync_to_async(record, thread_sensitive=True)(ref)
        if ref.startswith("crash-"):
            await sync_to_async(lose_connection, thread_sensitive=True)()
