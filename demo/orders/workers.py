"""Worker kinds for ``consume_orders``: each one feeds order messages to the same handler.

Two kinds: ``kafka`` (a consumer loop over a topic) and ``rq`` (a real RQ worker running the job
``demo.orders.jobs.write_order``). Another kind (a Redis stream, a RabbitMQ queue...) is one more
function with the signature of ``kafka_worker`` and one more entry in ``WORKERS``; it reuses the
handler, the tally and both modes.
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


# ------------------------------------------------------------------------------------------- RQ

#: simple: rq.SimpleWorker (jobs run in the worker process, on its persistent connection);
#: fork: rq.Worker (each job runs in a work horse forked from the worker, which then exits).
RQ_CLASSES = ("simple", "fork")


def rq_worker_class(mode: str, rq_class: str) -> type[Any]:
    """The RQ worker class of a mode: RQ's own, or freshconn's for the same kind of worker."""
    from rq.worker import SimpleWorker
    from rq.worker import Worker as ForkingWorker

    from freshconn.contrib.rq import FreshconnSimpleWorker, FreshconnWorker

    if mode == "freshconn":
        return FreshconnSimpleWorker if rq_class == "simple" else FreshconnWorker
    return SimpleWorker if rq_class == "simple" else ForkingWorker


def rq_worker(options: dict[str, Any], stop: threading.Event, tally: Tally) -> None:
    """Run a real RQ worker on one queue until SIGTERM or SIGINT (RQ's warm shutdown).

    The tally is kept in the process that runs the jobs: the worker itself for ``simple``; for
    ``fork`` each job runs (and is tallied) in a work horse that exits after it, so the worker's
    own tally stays empty and the figures come from RQ (job results, failed job registry).
    """
    from redis import Redis

    base = rq_worker_class(options["mode"], options["rq_class"])

    class TalliedWorker(base):  # type: ignore[misc,valid-type]
        """Counts each job's outcome with its real exception; changes nothing else."""

        _tally_exc: BaseException | None = None

        def perform_job(self, job: Any, *args: Any, **kwargs: Any) -> bool:
            self._tally_exc = None
            ok: bool = super().perform_job(job, *args, **kwargs)
            exc = None if ok else self._tally_exc or RuntimeError("the job failed")
            tally.record(str(job.kwargs.get("batch", "?")), exc)
            return ok

        def handle_exception(self, job: Any, *exc_info: Any) -> Any:
            # RQ catches the job's exception and hands it here, in the process that ran the job.
            if len(exc_info) > 1 and isinstance(exc_info[1], BaseException):
                self._tally_exc = exc_info[1]
            return super().handle_exception(job, *exc_info)

    if stop.is_set():
        return
    connection = Redis.from_url(options["redis"])
    try:
        worker = TalliedWorker([options["queue"]], connection=connection)
        # RQ installs its own SIGTERM/SIGINT handlers here: a signal asks for a warm shutdown
        # (the job in progress finishes), and work() returns.
        worker.work(logging_level="INFO")
    finally:
        connection.close()


Worker = Callable[[dict[str, Any], threading.Event, Tally], None]

WORKERS: dict[str, Worker] = {"kafka": kafka_worker, "rq": rq_worker}
