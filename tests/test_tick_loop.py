"""The tick shape (docs/adoption.md): a ``manage.py`` loop that polls what is due every 2 s and hands it to a pool.

``fc_tick_loop`` is shaped like a monitoring service's alert sender: its own SIGTERM flag,
``freshconn.ThreadPoolExecutor`` for the sends, ``with freshconn.unit_of_work():`` around each tick,
on Django's default ``CONN_MAX_AGE=0`` and a server that drops sessions idle for 4 s: longer than a
tick, as every real idle limit is, so the loop's own connection stays warm while the pool's idle out.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from typing import Any

import pytest
from django.db import connections
from testbed.servers import DBServer

from tests.app.models import Alert, Notification
from tests.conftest import VENDOR, short_server_timeout_options, subprocess_env
from tests.test_adopt_real import PATIENCE, kill_every_app_session, restart_server
from tests.test_command import Worker

pytestmark = [pytest.mark.server, pytest.mark.slow]

SERVER_IDLE_LIMIT = 4


@pytest.fixture
def tick_loop(live: None) -> Iterator[Worker]:
    """The tick loop as a real subprocess, with Django's default CONN_MAX_AGE=0 and a 2 s server idle limit."""
    env = subprocess_env(FRESHCONN_TEST_DB_OPTIONS=json.dumps(short_server_timeout_options(SERVER_IDLE_LIMIT)))
    env["DJANGO_SETTINGS_MODULE"] = "tests.realworkers.settings"  # CONN_MAX_AGE=0, no FRESHCONN setting
    w = Worker("fc_tick_loop", "--workers", "2", env=env)
    try:
        w.wait_for("TICK-LOOP-STARTED")
        yield w
    finally:
        w.close()


def make_due(prefix: str, n: int = 3) -> list[str]:
    names = [f"{prefix}-{i}" for i in range(n)]
    Alert.objects.bulk_create([Alert(name=name) for name in names])
    return names


def wait_line(w: Worker, marker: str) -> None:
    """Wait for a stdout line containing ``marker``, unless one was already read."""
    if not any(marker in line for line in w.out):
        w.wait_for(marker, timeout=PATIENCE)


def wait_sent(w: Worker, names: list[str]) -> None:
    for name in names:  # the pool sends them in any order
        wait_line(w, f"SENT {name}")


def stats_of(w: Worker) -> dict[str, Any]:
    line = next(line for line in w.out if line.startswith("STATS "))
    return dict(json.loads(line.removeprefix("STATS ")))


def test_tick_loop_sends_every_due_alert_once_through_idle_kill_and_restart(
    tick_loop: Worker, server: DBServer
) -> None:
    """Every due alert is sent exactly once through idle past the server limit, a KILL, a restart; SIGTERM: exit 0."""
    w = tick_loop
    sent = make_due("warm")
    wait_sent(w, sent)
    time.sleep(SERVER_IDLE_LIMIT + 1.2)  # the pool threads' connections idle past the server's limit
    sent += make_due("idle")
    wait_sent(w, sent[-3:])
    assert kill_every_app_session(server) >= 2  # the tick's session and at least one pool thread's
    sent += make_due("kill")
    wait_sent(w, sent[-3:])

    def while_down() -> None:
        wait_line(w, "is unreachable")  # the next tick found the server gone and waits for it

    restart_server(server, while_down)
    wait_line(w, "reachable again")
    sent += make_due("restart")
    wait_sent(w, sent[-3:])
    assert w.proc.poll() is None  # the same process throughout
    w.proc.send_signal(signal.SIGTERM)
    assert w.finish(timeout=PATIENCE) == 0, w.stderr()
    assert "TICK-LOOP-STOPPED" in w.out
    assert not [line for line in w.out if line.startswith("SEND-FAILED")]
    assert Notification.objects.count() == len(sent)
    assert sorted(Notification.objects.values_list("alert__name", flat=True)) == sorted(sent)
    assert not Alert.objects.filter(due=True).exists()
    c = stats_of(w)
    assert c["reconnect_waits"] >= 1
    assert c["discarded_dead"] >= 1


def test_sigterm_stops_the_tick_loop_while_it_waits_for_a_down_server(tick_loop: Worker, server: DBServer) -> None:
    """A SIGTERM while a tick waits for a server that is down ends the wait and the loop: exit 0, nothing lost."""
    w = tick_loop
    sent = make_due("before")
    wait_sent(w, sent)
    connections["default"].close()
    if VENDOR == "postgresql":
        server.admin_sql("CHECKPOINT")  # the test bed's immediate stop would lose the last acknowledged COMMITs
    server.down()
    try:
        wait_line(w, "is unreachable")
        w.proc.send_signal(signal.SIGTERM)
        # Well before RECONNECT_TIMEOUT (60 s) ran out: the signal ended the wait.
        assert w.finish(timeout=30) == 0, w.stderr()
    finally:
        server.up()
    assert "STOPPED-WHILE-WAITING" in w.out
    assert "TICK-LOOP-STOPPED" in w.out
    assert stats_of(w)["reconnect_waits"] >= 1
    assert Notification.objects.count() == len(sent)
