"""A slow WorkerCommand: each message writes two rows in one transaction, with a pause between them."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator

from django.core.management.base import CommandParser
from django.db import transaction

import freshconn
from tests.app.models import Order


class Command(freshconn.WorkerCommand):
    help = "Test worker: for each ref, write <ref>-start, pause, write <ref>-end, in one transaction."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("refs", nargs="+")
        parser.add_argument("--pause", type=float, default=2.0)

    def messages(self) -> Iterator[str]:
        yield from self.options["refs"]

    def handle_message(self, message: str) -> None:
        with transaction.atomic():
            Order.objects.create(ref=f"{message}-start")
            print(f"UNIT-STARTED {message}", flush=True)
            deadline = time.monotonic() + self.options["pause"]
            seen = False
            while time.monotonic() < deadline:
                if self.should_stop() and not seen:
                    seen = True  # proves the signal arrived while this unit was running
                    print(f"STOP-SEEN {message}", flush=True)
                time.sleep(0.02)
            Order.objects.create(ref=f"{message}-end")
        print(f"UNIT-DONE {message}", file=sys.stderr, flush=True)
