"""A WorkerCommand whose source blocks in next() until the stop signal, then returns one more message."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import freshconn
from tests.app.models import Order


class Command(freshconn.WorkerCommand):
    help = "Test worker: handle 'first', then block in the source until SIGTERM, then return 'late'."

    def messages(self) -> Iterator[str]:
        yield "first"
        print("SOURCE-BLOCKING", flush=True)
        # A broker client's blocking poll: it returns what it fetched, even after the signal arrived.
        while not self.should_stop():
            time.sleep(0.02)
        yield "late"

    def handle_message(self, message: str) -> None:
        Order.objects.create(ref=message)
        print(f"HANDLED {message}", flush=True)

    def message_not_started(self, message: Any) -> None:
        print(f"NOT-STARTED {message}", flush=True)
