"""Kafka consumer loops with at-least-once delivery: each message in its own unit of work.

``consume(consumer, handler)`` drives a confluent-kafka ``Consumer`` (``poll()``) or a kafka-python
``KafkaConsumer``; ``await aconsume(consumer, handler)`` drives an aiokafka ``AIOKafkaConsumer``.

For every message: the handler runs inside a unit of work; when it returns, that message's offset
+ 1 is committed synchronously, so the committed offset never runs ahead of work the database
holds. When the handler raises, nothing is committed and the consumer is rewound (``seek``) to the
failed message, so it is the next one delivered. A database disconnect (``freshconn.is_disconnect``)
is then retried through that redelivery, up to ``disconnect_retries`` times in a row for one
message (the unit has already discarded the dead connection, and the retry gets a fresh one);
any other exception, or a disconnect past its retries, propagates to the caller with the
consumer rewound, so calling the loop again (or restarting the process) delivers the message
again. Handlers must be idempotent: at-least-once means a message can be applied and then
delivered again (e.g. when the commit itself fails).

The consumer must be created with auto-commit disabled (``enable.auto.commit=False`` /
``enable_auto_commit=False``), or the client commits offsets of messages not yet handled.
"""

from __future__ import annotations

import functools
import inspect
import logging
import sys
from collections.abc import Awaitable, Callable
from typing import Any

from asgiref.sync import sync_to_async

from freshconn import AsyncUnitOfWork, UnitOfWork, Using, is_disconnect

__all__ = ["aconsume", "consume"]

logger = logging.getLogger("freshconn")

Stop = Callable[[], bool] | None


_CLIENTS = (("confluent_kafka", "Consumer"), ("kafka", "KafkaConsumer"), ("aiokafka", "AIOKafkaConsumer"))


def _client_of(consumer: Any) -> str:
    # A consumer object exists only if its client module was imported: no import needed here.
    for module_name, class_name in _CLIENTS:
        module = sys.modules.get(module_name)
        klass = getattr(module, class_name, None)
        if isinstance(klass, type) and isinstance(consumer, klass):
            return module_name
    raise TypeError(
        "consume() needs a confluent_kafka.Consumer or a kafka.KafkaConsumer, and aconsume() an "
        f"aiokafka.AIOKafkaConsumer; got {type(consumer).__name__}"
    )


class _Retries:
    """Counts consecutive disconnect failures of one message (topic, partition, offset)."""

    def __init__(self, limit: int) -> None:
        if limit < 0:
            raise ValueError(f"disconnect_retries must be >= 0, got {limit!r}")
        self.limit = limit
        self.key: tuple[str, int, int] | None = None
        self.count = 0

    def may_retry(self, key: tuple[str, int, int], exc: BaseException) -> bool:
        if not is_disconnect(exc):
            return False
        if key != self.key:
            self.key, self.count = key, 0
        self.count += 1
        if self.count > self.limit:
            return False
        logger.warning(
            "database disconnect while handling %s[%d]@%d (%s); redelivering it (retry %d of %d)",
            *key,
            type(exc).__name__,
            self.count,
            self.limit,
            extra={"alias": None, "reason": "redeliver", "topic": key[0], "partition": key[1], "offset": key[2]},
        )
        return True

    def succeeded(self) -> None:
        self.key, self.count = None, 0


def _rewind(seek: Callable[[], object], key: tuple[str, int, int]) -> None:
    try:
        seek()
    except Exception as exc:  # noqa: BLE001 - e.g. the partition was revoked meanwhile
        # Nothing was committed for this message, so whoever owns the partition now starts at it.
        logger.warning("could not rewind to %s[%d]@%d: %s", *key, exc, extra={"alias": None, "reason": "rewind_failed"})


def consume(
    consumer: Any,
    handler: Callable[[Any], object],
    *,
    using: Using = None,
    poll_timeout: float = 1.0,
    stop: Stop = None,
    max_messages: int | None = None,
    disconnect_retries: int = 3,
) -> int:
    """Handle messages from a confluent-kafka or kafka-python consumer, one unit of work each.

    The consumer is already subscribed (or assigned), with auto-commit disabled. Runs until
    ``stop()`` returns true (checked at least every ``poll_timeout`` seconds) or
    ``max_messages`` messages were handled and committed; returns how many were. ``handler``
    receives the client's own message object.
    """
    client = _client_of(consumer)
    if client == "aiokafka":
        raise TypeError("an aiokafka consumer is async: use `await freshconn.contrib.kafka.aconsume(...)`")
    unit = UnitOfWork(using)
    retries = _Retries(disconnect_retries)
    poll = _confluent_poll if client == "confluent_kafka" else _kafka_python_poll
    commit = _confluent_commit if client == "confluent_kafka" else _kafka_python_commit
    seek = _confluent_seek if client == "confluent_kafka" else _kafka_python_seek
    done = 0
    while not (stop is not None and stop()) and (max_messages is None or done < max_messages):
        msg = poll(consumer, poll_timeout)
        if msg is None:
            continue
        key = _key(client, msg)
        try:
            with unit:
                handler(msg)
        except BaseException as exc:
            # Rewound even on KeyboardInterrupt/cancellation: the caller may go on consuming.
            _rewind(functools.partial(seek, consumer, key), key)
            if isinstance(exc, Exception) and retries.may_retry(key, exc):
                continue
            raise
        retries.succeeded()
        commit(consumer, key)
        done += 1
    return done


async def aconsume(
    consumer: Any,
    handler: Callable[[Any], Awaitable[object]] | Callable[[Any], object],
    *,
    using: Using = None,
    poll_timeout: float = 1.0,
    stop: Stop = None,
    max_messages: int | None = None,
    disconnect_retries: int = 3,
) -> int:
    """``consume()`` for a started aiokafka ``AIOKafkaConsumer``.

    An ``async def`` handler runs inside ``aunit_of_work`` (use the async ORM there); a plain
    function runs inside ``unit_of_work`` in the thread that owns the async ORM's connections.
    """
    if _client_of(consumer) != "aiokafka":
        raise TypeError(f"aconsume() needs an aiokafka.AIOKafkaConsumer, got {type(consumer).__name__}")
    from aiokafka import TopicPartition

    aunit = AsyncUnitOfWork(using)
    sync_unit = UnitOfWork(using)
    is_async = _is_async_callable(handler)
    retries = _Retries(disconnect_retries)
    timeout_ms = max(int(poll_timeout * 1000), 1)
    done = 0
    while not (stop is not None and stop()) and (max_messages is None or done < max_messages):
        batch = await consumer.getmany(timeout_ms=timeout_ms, max_records=1)
        msg = next((m for msgs in batch.values() for m in msgs), None)
        if msg is None:
            continue
        key = (msg.topic, msg.partition, msg.offset)
        tp = TopicPartition(msg.topic, msg.partition)
        try:
            if is_async:
                async with aunit:
                    await handler(msg)  # type: ignore[misc]
            else:
                await sync_to_async(_in_unit, thread_sensitive=True)(sync_unit, handler, msg)
        except BaseException as exc:
            # Rewound even on KeyboardInterrupt/cancellation: the caller may go on consuming.
            _rewind(functools.partial(consumer.seek, tp, key[2]), key)
            if isinstance(exc, Exception) and retries.may_retry(key, exc):
                continue
            raise
        retries.succeeded()
        await consumer.commit({tp: key[2] + 1})
        done += 1
    return done


def _in_unit(unit: UnitOfWork, handler: Callable[[Any], object], msg: Any) -> None:
    with unit:
        handler(msg)


def _is_async_callable(func: Any) -> bool:
    return inspect.iscoroutinefunction(func) or inspect.iscoroutinefunction(getattr(func, "__call__", None))  # noqa: B004


def _key(client: str, msg: Any) -> tuple[str, int, int]:
    if client == "confluent_kafka":
        return (msg.topic(), msg.partition(), msg.offset())
    return (msg.topic, msg.partition, msg.offset)


# confluent-kafka ------------------------------------------------------------------------------


def _confluent_poll(consumer: Any, timeout: float) -> Any:
    from confluent_kafka import KafkaError, KafkaException

    msg = consumer.poll(timeout)
    if msg is None:
        return None
    err = msg.error()
    if err is not None:
        if err.fatal():
            raise KafkaException(err)
        # End-of-partition events and transient broker errors: librdkafka recovers by itself.
        level = logging.DEBUG if err.code() == KafkaError._PARTITION_EOF else logging.WARNING
        logger.log(level, "kafka consumer event: %s", err, extra={"alias": None, "reason": "kafka_event"})
        return None
    return msg


def _confluent_commit(consumer: Any, key: tuple[str, int, int]) -> None:
    from confluent_kafka import TopicPartition

    consumer.commit(offsets=[TopicPartition(key[0], key[1], key[2] + 1)], asynchronous=False)


def _confluent_seek(consumer: Any, key: tuple[str, int, int]) -> None:
    from confluent_kafka import TopicPartition

    consumer.seek(TopicPartition(*key))


# kafka-python ---------------------------------------------------------------------------------


def _kafka_python_poll(consumer: Any, timeout: float) -> Any:
    # One record per poll: the client buffers fetched batches, and a rewind never has to undo
    # records handed out but not handled.
    batch = consumer.poll(timeout_ms=max(int(timeout * 1000), 1), max_records=1)
    return next((m for msgs in batch.values() for m in msgs), None)


def _kafka_python_commit(consumer: Any, key: tuple[str, int, int]) -> None:
    from kafka import TopicPartition
    from kafka.structs import OffsetAndMetadata

    # OffsetAndMetadata grew a leader_epoch field in kafka-python 2.1.
    fields = (key[2] + 1, "", -1)[: len(OffsetAndMetadata._fields)]
    consumer.commit({TopicPartition(key[0], key[1]): OffsetAndMetadata(*fields)})


def _kafka_python_seek(consumer: Any, key: tuple[str, int, int]) -> None:
    from kafka import TopicPartition

    consumer.seek(TopicPartition(key[0], key[1]), key[2])
