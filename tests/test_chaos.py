"""Chaos: a worker drains a real Redis queue while another thread keeps killing its connections."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from django.db import Error
from testbed.redis import Redis
from testbed.servers import DBServer

import freshconn
from tests.app.models import Order
from tests.conftest import VENDOR, admin_connection, counters

pytestmark = [pytest.mark.server, pytest.mark.slow]

MESSAGES = 2000


@pytest.fixture
def queue() -> Iterator[Redis]:
    with Redis() as srv:
        yield srv


class Killer(threading.Thread):
    """Kills every session of the app user from a superuser session, at random short intervals."""

    def __init__(self, server: DBServer, max_kills: int = 60) -> None:
        super().__init__(daemon=True)
        self.admin = admin_connection(server)
        self.stop = threading.Event()
        self.kills = 0
        self.max_kills = max_kills

    def _sessions(self, cursor: Any) -> list[int]:
        cursor.execute(
            "SELECT ID FROM information_schema.PROCESSLIST WHERE USER = 'app'"
            if VENDOR == "mysql"
            else "SELECT pid FROM pg_stat_activity WHERE usename = 'app'"
        )
        return [int(row[0]) for row in cursor.fetchall()]

    def run(self) -> None:
        cursor = self.admin.cursor()
        try:
            while self.kills < self.max_kills and not self.stop.wait(random.uniform(0.02, 0.15)):
                for session in self._sessions(cursor):
                    try:
                        cursor.execute(
                            f"KILL {session}" if VENDOR == "mysql" else f"SELECT pg_terminate_backend({session})"
                        )
                        if VENDOR == "postgresql":
                            cursor.fetchall()
                        self.kills += 1
                    except Exception:
                        pass  # the session ended on its own meanwhile
        finally:
            cursor.close()
            self.admin.close()


def test_chaos_every_message_applied_exactly_once_without_restart(
    live: None, server: DBServer, queue: Redis, capsys: pytest.CaptureFixture[str]
) -> None:
    """Thousands of messages, random kills: every message is applied exactly once and the loop never dies."""
    client = queue.client()
    client.rpush("jobs", *[f"m-{i}" for i in range(MESSAGES)])

    @freshconn.unit_of_work(retries=8, idempotent=True)
    def apply(ref: str) -> None:
        Order.objects.get_or_create(ref=ref, defaults={"qty": 1})

    killer = Killer(server)
    killer.start()
    surfaced = 0
    handled = 0
    try:
        while True:
            # Reliable queue: the message stays in "processing" until the unit succeeded.
            raw = client.lmove("jobs", "processing", "LEFT", "RIGHT")
            if raw is None:
                break
            ref = raw.decode()
            try:
                apply(ref)
            except Error as exc:  # OperationalError, or InterfaceError from mysql-connector-python
                if not freshconn.is_disconnect(exc):
                    raise
                surfaced += 1
                client.lmove("processing", "jobs", "RIGHT", "RIGHT")  # back to the queue, nothing lost
                continue
            client.lrem("processing", 1, raw)
            handled += 1
    finally:
        killer.stop.set()
        killer.join()
        client.close()
    time.sleep(0.3)  # let the last kill's FIN arrive: pg_terminate_backend returns before the backend exits
    c = counters()
    with capsys.disabled():
        print(
            f"\n[chaos {VENDOR}] messages={MESSAGES} handled={handled} kills={killer.kills} "
            f"retries={c['retries']} errors_surfaced={surfaced} discarded={c['discarded']} connects={c['connects']}"
        )
    with freshconn.unit_of_work():  # the killer may have hit the connection after the last message
        refs = list(Order.objects.values_list("ref", flat=True))
    assert len(refs) == MESSAGES
    assert set(refs) == {f"m-{i}" for i in range(MESSAGES)}
    assert killer.kills > 0
    assert c["discarded"] > 0
