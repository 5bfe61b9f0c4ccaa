"""Worker kinds for ``consume_orders``: each one feeds order messages to the same handler.

Only Kafka exists today. Another kind (a Redis stream, a RabbitMQ queue...) is one more function
with the signature of ``kafka_worker`` and one more entry in ``WORKERS``; it reuses the handler,
the tally and both modes.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import freshconn

from .models import Order

logger = logging.getLogger("demo.worker")

#: plain: the loop as most workers are written (no connection cleanup at all);
#: freshconn: the same loop with each message inside its own freshconn unit of work.
MODES = ("plain", "freshconn")


@dataclass
class Tally:
    """What the worker did, printed as JSON when it exits."""

    seen: int = 0
    written: int = 0
    errors: int = 0
    first_error: str | None = None
    first_error_is_disconnect: bool | None = None
    error_texts: dict[str, int] = field(default_factory=dict)
    batches: dict[str, dict[str, int]] = field(default_factory=dict)

    def record(self, batch: str, exc: BaseException | None) -> None:
        self.seen += 1
        counts = self.batches.setdefault(batch, {"seen": 0, "written": 0, "errors": 0})
        counts["seen"] += 1
        if exc is None:
            self.written += 1
            counts["written"] += 1
            return
        self.errors += 1
        counts["errors"] += 1
        text = describe(exc)
        self.error_texts[text] = self.error_texts.get(text, 0) + 1
        if self.first_error is None:
            self.first_error = text
            self.first_error_is_disconnect = freshconn.is_disconnect(exc)


def describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def handle_order(payload: dict[str, Any]) -> None:
    """The business logic: one order message becomes one row."""
    Order.objects.create(ref=payload["ref"], batch=payload["batch"], qty=payload["qty"])


def process(raw: bytes | None, tally: Tally) -> None:
    """Handle one message as a typical worker does: log a failure and go on with the next message."""
    batch = "?"
    try:
        payload = json.loads(raw or b"null")
        batch = str(payload.get("batch", "?"))
        handle_order(payload)
    except Exception as exc:
        tally.record(batch, exc)
        logger.warning("order in batch %s failed: %s", batch, describe(exc))
    else:
        tally.record(batch, None)


def in_units(mode: str, messages: Iterable[Any]) -> Iterable[Any]:
    """The only difference between the modes: freshconn.each() wraps every message in a unit of work."""
    if mode == "freshconn":
        return freshconn.each(messages)
    return messages


# ---------------------------------------------------------------------------------------- Kafka


def poll_iter(consumer: Any, stop: threading.Event, timeout: float = 0.5) -> Iterator[Any]:
    """Yield each message from ``consumer.poll()`` until ``stop`` is set.

    Under freshconn.each() the time spent blocked here counts as idle time for the connection,
    which is what lets freshconn know, without a round trip, that the server has dropped it.
    """
    from confluent_kafka import KafkaException

    while not stop.is_set():
        msg = consumer.poll(timeout)
        if msg is None:
            continue
        err = msg.error()
        if err is not None:
            if err.fatal():
                raise KafkaException(err)
            logger.warning("kafka: %s", err)
            continue
        yield msg


def kafka_worker(options: dict[str, Any], stop: threading.Event, tally: Tally) -> None:
    """Consume a topic in a consumer group; commit each message's offset after handling it."""
    from confluent_kafka import Consumer

    kafka_log = logging.getLogger("demo.kafka")
    consumer = Consumer(
        {
            "bootstrap.servers": options["bootstrap"],
            "group.id": options["group"],
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            # A new group's first assignment waits about half of this: keep it short for the demo.
            "session.timeout.ms": 6000,
            "error_cb": lambda err: kafka_log.warning("kafka: %s", err),
        },
        logger=kafka_log,
    )
    consumer.subscribe([options["topic"]])
    try:
        for msg in in_units(options["mode"], poll_iter(consumer, stop)):
            process(msg.value(), tally)
            consumer.commit(message=msg, asynchronous=False)
    finally:
        # Leaves the group at once, so a restarted worker gets the partitions without a timeout.
        consumer.close()


Worker = Callable[[dict[str, Any], threading.Event, Tally], None]

WORKERS: dict[str, Worker] = {"kafka": kafka_worker}
