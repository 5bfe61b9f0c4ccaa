"""freshconn.contrib.kafka with a real Kafka-protocol broker (Tansu) and a real database, three clients."""

from __future__ import annotations

import asyncio
import threading
import uuid
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from django.db import connections, transaction
from testbed.servers import Tansu

from freshconn.contrib import kafka as fc_kafka
from freshconn.testing import kill_connection
from tests.app.models import Order
from tests.conftest import IDLE_PAST_TIMEOUT, counters

confluent_kafka = pytest.importorskip("confluent_kafka")
with warnings.catch_warnings():
    # kafka-python 3.0 loads its protocol schemas through a deprecated importlib.resources API.
    warnings.simplefilter("ignore", DeprecationWarning)
    kafka_python = pytest.importorskip("kafka")
aiokafka = pytest.importorskip("aiokafka")

pytestmark = [pytest.mark.server, pytest.mark.kafka]

# A new group's first assignment waits about half the session timeout on Tansu.
SESSION_TIMEOUT_MS = 3000
CLIENTS = ["confluent-kafka", "kafka-python", "aiokafka"]


@pytest.fixture(scope="module")
def broker() -> Iterator[Tansu]:
    with Tansu() as srv:
        yield srv


@pytest.fixture
def topic(broker: Tansu) -> str:
    """A fresh one-partition topic (so offsets and rows can be compared one to one)."""
    # confluent-kafka's admin module re-exports NewTopic (from cimpl) without marking it as exported.
    from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

    name = f"t-{uuid.uuid4().hex[:10]}"
    admin = AdminClient({"bootstrap.servers": broker.bootstrap})
    for future in admin.create_topics([NewTopic(name, 1, 1)]).values():
        future.result(10)
    return name


def produce(broker: Tansu, topic: str, values: list[str]) -> None:
    producer = confluent_kafka.Producer({"bootstrap.servers": broker.bootstrap})
    for value in values:
        producer.produce(topic, value=value.encode())
    assert producer.flush(10) == 0


def committed(broker: Tansu, group: str, topic: str) -> int:
    """The group's committed offset for partition 0, read by a separate client (0 when none)."""
    side = confluent_kafka.Consumer({"bootstrap.servers": broker.bootstrap, "group.id": group})
    try:
        (tp,) = side.committed([confluent_kafka.TopicPartition(topic, 0)], timeout=10)
    finally:
        side.close()
    return max(int(tp.offset), 0)


def info(msg: Any) -> tuple[int, str]:
    """(offset, value) of any of the three clients' message objects."""
    if callable(msg.offset):
        return msg.offset(), msg.value().decode()
    return msg.offset, msg.value.decode()


class Runner:
    """One consumer of one client kind; ``run(handler, ...)`` calls the freshconn loop on it.

    ``handler`` is a plain function taking (offset, value). For aiokafka it is wrapped in an
    ``async def`` handler that calls it through sync_to_async (what the async ORM itself does),
    unless ``sync_handler`` is set, in which case aconsume gets the plain function.
    """

    def __init__(self, client: str, broker: Tansu, topic: str, group: str, *, sync_handler: bool = False) -> None:
        self.client = client
        self.group = group
        self.sync_handler = sync_handler
        if client == "confluent-kafka":
            self.consumer = confluent_kafka.Consumer(
                {
                    "bootstrap.servers": broker.bootstrap,
                    "group.id": group,
                    "enable.auto.commit": False,
                    "auto.offset.reset": "earliest",
                    "session.timeout.ms": SESSION_TIMEOUT_MS,
                }
            )
            self.consumer.subscribe([topic])
        elif client == "kafka-python":
            self.consumer = kafka_python.KafkaConsumer(
                topic,
                bootstrap_servers=broker.bootstrap,
                group_id=group,
                enable_auto_commit=False,
                auto_offset_reset="earliest",
                session_timeout_ms=SESSION_TIMEOUT_MS,
                heartbeat_interval_ms=1000,
            )
        else:
            self.loop = asyncio.new_event_loop()

            async def start() -> Any:
                consumer = aiokafka.AIOKafkaConsumer(
                    topic,
                    bootstrap_servers=broker.bootstrap,
                    group_id=group,
                    enable_auto_commit=False,
                    auto_offset_reset="earliest",
                    session_timeout_ms=SESSION_TIMEOUT_MS,
                    heartbeat_interval_ms=1000,
                )
                await consumer.start()
                return consumer

            self.consumer = self.loop.run_until_complete(start())

    def run(self, handler: Callable[[int, str], None], **kwargs: Any) -> int:
        kwargs.setdefault("poll_timeout", 0.2)
        if self.client != "aiokafka":
            return fc_kafka.consume(self.consumer, lambda msg: handler(*info(msg)), **kwargs)
        if self.sync_handler:
            return self.loop.run_until_complete(
                fc_kafka.aconsume(self.consumer, lambda msg: handler(*info(msg)), **kwargs)
            )
        call = sync_to_async(handler, thread_sensitive=True)

        async def ahandler(msg: Any) -> None:
            await call(*info(msg))

        return self.loop.run_until_complete(fc_kafka.aconsume(self.consumer, ahandler, **kwargs))

    def close(self) -> None:
        if self.client != "aiokafka":
            self.consumer.close()
            return
        try:
            self.loop.run_until_complete(self.consumer.stop())
            # The async ORM's connections live in asgiref's thread-sensitive thread: close them there.
            self.loop.run_until_complete(sync_to_async(connections.close_all, thread_sensitive=True)())
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
        finally:
            self.loop.close()


@pytest.fixture
def runner(broker: Tansu, topic: str) -> Iterator[Callable[..., Runner]]:
    made: list[Runner] = []

    def make(client: str, **kwargs: Any) -> Runner:
        made.append(Runner(client, broker, topic, f"g-{uuid.uuid4().hex[:10]}", **kwargs))
        return made[-1]

    yield make
    for r in made:
        r.close()


@pytest.mark.slow
@pytest.mark.parametrize("client", CLIENTS)
def test_consumer_idles_past_db_timeout_then_handles_the_next_messages(
    client: str, short_timeout: int, broker: Tansu, topic: str, runner: Callable[..., Runner]
) -> None:
    """After the consumer sat idle past the database's own timeout, the next messages are handled with no error."""
    r = runner(client)
    produce(broker, topic, ["0", "1"])
    later = threading.Timer(IDLE_PAST_TIMEOUT, produce, (broker, topic, ["2", "3"]))

    def handler(offset: int, value: str) -> None:
        Order.objects.create(ref=f"m{offset}", qty=int(value))
        if offset == 1:
            later.start()  # the next messages arrive only after the connection sat idle too long

    try:
        assert r.run(handler, max_messages=4) == 4
    finally:
        later.cancel()
        if later.is_alive():
            later.join()
    c = counters()
    assert sorted(Order.objects.values_list("qty", flat=True)) == [0, 1, 2, 3]
    assert c["discarded_server_idle"] + c["discarded_dead"] >= 1
    assert c["discarded_error"] == 0


@pytest.mark.parametrize(("client", "sync_handler"), [(c, False) for c in CLIENTS] + [("aiokafka", True)])
def test_db_kill_mid_message_redelivers_it_and_it_is_applied_once(
    client: str, sync_handler: bool, live: None, broker: Tansu, topic: str, runner: Callable[..., Runner]
) -> None:
    """A connection killed mid-message: that message is delivered again, applied once; commits never pass the rows."""
    r = runner(client, sync_handler=sync_handler)
    produce(broker, topic, ["0", "1", "2"])
    attempts: dict[int, int] = {}
    checks: list[tuple[int, int]] = []

    def handler(offset: int, value: str) -> None:
        attempts[offset] = attempts.get(offset, 0) + 1
        checks.append((committed(broker, r.group, topic), Order.objects.count()))
        with transaction.atomic():
            Order.objects.get_or_create(ref=f"m{offset}")
            if offset == 1 and attempts[offset] == 1:
                kill_connection()
                Order.objects.count()  # the connection is gone: this raises a disconnect error

    assert r.run(handler, max_messages=3) == 3
    assert attempts == {0: 1, 1: 2, 2: 1}
    assert sorted(Order.objects.values_list("ref", flat=True)) == ["m0", "m1", "m2"]
    assert all(offset <= rows for offset, rows in checks), checks
    assert checks[2] == (1, 1)  # the redelivery of offset 1: only offset 0 committed, only its row applied
    assert committed(broker, r.group, topic) == 3
    # The killed session was dropped (by Django's atomic exit or by freshconn), never reused.
    assert counters()["connects"] >= 2


@pytest.mark.parametrize("client", CLIENTS)
def test_handler_error_propagates_uncommitted_and_the_message_comes_back(
    client: str, live: None, broker: Tansu, topic: str, runner: Callable[..., Runner]
) -> None:
    """A non-database handler error reaches the caller with nothing committed; the next run starts at that message."""
    r = runner(client)
    produce(broker, topic, ["0", "1"])
    attempts: dict[int, int] = {}

    def handler(offset: int, value: str) -> None:
        attempts[offset] = attempts.get(offset, 0) + 1
        Order.objects.get_or_create(ref=f"m{offset}")
        if offset == 1 and attempts[offset] == 1:
            raise ValueError("poison?")

    with pytest.raises(ValueError, match="poison"):
        r.run(handler, max_messages=2)
    assert committed(broker, r.group, topic) == 1
    assert r.run(handler, max_messages=1) == 1
    assert attempts == {0: 1, 1: 2}
    assert Order.objects.count() == 2
    assert committed(broker, r.group, topic) == 2


def test_consume_refuses_other_objects_and_the_async_client(broker: Tansu) -> None:
    """consume() names what it accepts, an aiokafka consumer is pointed at aconsume(), and retries are >= 0."""
    with pytest.raises(TypeError, match=r"confluent_kafka\.Consumer"):
        fc_kafka.consume(object(), print)

    async def with_aiokafka() -> None:
        consumer = aiokafka.AIOKafkaConsumer(bootstrap_servers=broker.bootstrap)
        try:
            with pytest.raises(TypeError, match="aconsume"):
                fc_kafka.consume(consumer, print)
        finally:
            await consumer.stop()
        with pytest.raises(TypeError, match="aiokafka"):
            await fc_kafka.aconsume(object(), print)

    asyncio.run(with_aiokafka())
    consumer = confluent_kafka.Consumer({"bootstrap.servers": broker.bootstrap, "group.id": "unused"})
    try:
        with pytest.raises(ValueError, match="disconnect_retries"):
            fc_kafka.consume(consumer, print, disconnect_retries=-1)
    finally:
        consumer.close()
