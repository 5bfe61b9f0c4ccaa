"""A tick loop shaped like a monitoring service's alert sender: poll what is due, hand it to a pool, sleep.

The shape (its own SIGTERM flag, a 2 s poll, a thread pool that sends the notifications) is what
real projects write instead of a message consumer; freshconn's adoption is the documented recipe
of docs/adoption.md: ``freshconn.ThreadPoolExecutor`` for the pool, ``with
freshconn.unit_of_work():`` around each tick, and ``freshconn.ReconnectStopped`` caught to stop
while the database is down.
"""

from __future__ import annotations

import functools
import json
import logging
import signal
import sys
import time
from concurrent.futures import Future
from types import FrameType
from typing import Any

from django.core.management.base import BaseCommand, CommandParser
from django.db import transaction

import freshconn
from tests.app.models import Alert, Notification


def send(pk: int) -> None:
    """Send one alert (here: record it), in the pool's unit of work; at most once, whatever was retried."""
    with transaction.atomic():
        alert = Alert.objects.select_for_update().get(pk=pk)
        if not alert.due:
            return  # sent by an earlier attempt whose outcome we did not see (a COMMIT lost in flight)
        Notification.objects.create(alert=alert)
        alert.due = False
        alert.save(update_fields=["due"])
    print(f"SENT {alert.name}", flush=True)


class Command(BaseCommand):
    help = "Test worker: every --every seconds, send every due Alert through a thread pool, until SIGTERM."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--every", type=float, default=2.0)
        parser.add_argument("--workers", type=int, default=2)

    def on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.stopping = True

    def handle(self, *args: Any, **options: Any) -> None:
        # freshconn's log lines (an outage, the server back) on stdout, where the test reads them.
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("LOG %(levelname)s %(message)s"))
        logging.getLogger("freshconn").addHandler(handler)
        logging.getLogger("freshconn").setLevel(logging.INFO)

        self.stopping = False
        signal.signal(signal.SIGTERM, self.on_signal)
        signal.signal(signal.SIGINT, self.on_signal)
        in_flight: set[int] = set()
        print("TICK-LOOP-STARTED", flush=True)
        with freshconn.ThreadPoolExecutor(max_workers=options["workers"]) as pool:
            while not self.stopping:
                try:
                    with freshconn.unit_of_work():
                        pending = Alert.objects.filter(due=True).exclude(pk__in=in_flight)
                        due = list(pending.values_list("pk", flat=True))
                except freshconn.ReconnectStopped:
                    # SIGTERM while the tick waited for a database that is down: nothing was claimed.
                    print("STOPPED-WHILE-WAITING", flush=True)
                    break
                for pk in due:
                    in_flight.add(pk)
                    pool.submit(send, pk).add_done_callback(functools.partial(self.done, pk=pk, in_flight=in_flight))
                self.sleep(options["every"])
        print("STATS " + json.dumps(freshconn.stats().get("default", {})), flush=True)
        print("TICK-LOOP-STOPPED", flush=True)

    def done(self, future: Future[None], pk: int, in_flight: set[int]) -> None:
        # A send that failed leaves its alert due: a later tick sends it again.
        if future.exception() is not None:
            print(f"SEND-FAILED {pk} {type(future.exception()).__name__}", flush=True)
        in_flight.discard(pk)

    def sleep(self, seconds: float) -> None:
        # Short steps, so that the flag set by SIGTERM ends the loop without waiting out the whole tick.
        deadline = time.monotonic() + seconds
        while not self.stopping and time.monotonic() < deadline:
            time.sleep(min(0.1, seconds))
