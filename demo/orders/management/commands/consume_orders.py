"""``manage.py consume_orders``: a long-running worker that writes each order message to the database.

    python demo/manage.py consume_orders --worker kafka --mode freshconn --topic orders --group writers
    python demo/manage.py consume_orders --worker rq --mode freshconn --rq-class simple --queue orders

It runs until SIGTERM or SIGINT, then closes the Kafka consumer and the database connections
and prints one JSON line on stdout: what it saw, wrote and failed, and ``freshconn.stats()``.
"""

from __future__ import annotations

import json
import signal
import threading
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandParser
from django.db import connections

import freshconn

from ...workers import MODES, RQ_CLASSES, WORKERS, Tally


class Command(BaseCommand):
    help = "Consume order messages and write each one to the database, until SIGTERM or SIGINT."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--worker", choices=sorted(WORKERS), default="kafka", help="where orders come from")
        parser.add_argument("--mode", choices=MODES, default="freshconn", help="connection handling")
        parser.add_argument("--bootstrap", default=settings.KAFKA_BOOTSTRAP, help="Kafka bootstrap servers")
        parser.add_argument("--topic", default="orders")
        parser.add_argument("--group", default="order-writers", help="consumer group id")
        parser.add_argument("--redis", default=settings.REDIS_URL, help="RQ: the Redis URL")
        parser.add_argument("--queue", default="orders", help="RQ: the queue to work on")
        parser.add_argument(
            "--rq-class", choices=RQ_CLASSES, default="simple", help="RQ: SimpleWorker or the forking Worker"
        )

    def handle(self, *args: Any, **options: Any) -> None:
        stop = threading.Event()

        def request_stop(signum: int, frame: Any) -> None:
            stop.set()

        signal.signal(signal.SIGTERM, request_stop)
        signal.signal(signal.SIGINT, request_stop)
        freshconn.reset_stats()
        tally = Tally()
        try:
            WORKERS[options["worker"]](options, stop, tally)
        finally:
            for conn in connections.all(initialized_only=True):
                try:
                    conn.close()
                except Exception:
                    # A connection the server already dropped may fail to close: it is gone either way.
                    conn.connection = None
            summary = {
                "worker": options["worker"],
                "mode": options["mode"],
                "seen": tally.seen,
                "written": tally.written,
                "errors": tally.errors,
                "first_error": tally.first_error,
                "first_error_is_disconnect": tally.first_error_is_disconnect,
                "error_texts": tally.error_texts,
                "batches": tally.batches,
                "freshconn": freshconn.stats().get("default", {}),
            }
            self.stdout.write(json.dumps(summary))
