"""A unit's first connect waits for a down server too; freshconn's locks survive a fork.

Found while proving issue 8 with real workers:

1. A unit (or an adopted close_old_connections() boundary) must wait for a server that is down
whatever closed its previous connection (idle past the server's limit, its lifetime) and when it
has none yet (a worker starting during an outage): its first query's connect is patient.

2. freshconn's locks must be fork-safe: a child forked while another thread of the parent holds one
(inside ``freshconn.stats()``: a Prometheus scrape, a STATS_LOG_INTERVAL line; a thread starting its
first unit, or ending) must not inherit it held by a thread that does not exist in the child.
Forking parents with such a thread: RQ's forking worker, Celery's prefork pool, gunicorn.
"""

from __future__ import annotations

import os
import posix
import signal
import threading
import time
import warnings
from collections.abc import Callable

import pytest
from django.db import Error, connection, connections
from django.test import override_settings
from testbed.servers import DBServer, free_port

import freshconn
from freshconn import _state
from tests.app.models import Order
from tests.conftest import IDLE_PAST_TIMEOUT, counters, short_server_timeout_options
from tests.tempalias import temp_alias


@pytest.fixture(autouse=True)
def no_pending_reconnect() -> None:
    """Forget a reconnect an earlier test's failed unit left pending in this thread (the live fixture keeps it)."""
    _state.local().needs_reconnect.clear()


def run_unit_while_server_restarts(server: DBServer) -> int:
    server.down()
    timer = threading.Timer(2.0, server.up)
    timer.start()
    try:
        with freshconn.unit_of_work():
            rows: int = Order.objects.count()
            return rows
    finally:
        timer.join()


@pytest.mark.server
@pytest.mark.slow
def test_unit_waits_for_a_down_server_after_expiring_an_idle_connection(
    dbconf: Callable[..., None], server: DBServer
) -> None:
    """A connection idle past the server's limit is closed at the unit's start; a down server is then waited for."""
    dbconf(CONN_MAX_AGE=0, OPTIONS=short_server_timeout_options())
    with freshconn.unit_of_work():
        Order.objects.count()
    time.sleep(IDLE_PAST_TIMEOUT)
    assert run_unit_while_server_restarts(server) == 0
    assert counters()["reconnect_waits"] == 1


@pytest.mark.server
@pytest.mark.slow
def test_first_unit_without_a_connection_waits_for_a_down_server(dbconf: Callable[..., None], server: DBServer) -> None:
    """A unit that has no connection yet (a worker starting during an outage) waits for the server."""
    dbconf(CONN_MAX_AGE=0, OPTIONS={})
    connection.close()
    assert run_unit_while_server_restarts(server) == 0
    assert counters()["reconnect_waits"] == 1


@pytest.mark.server
def test_alias_added_after_the_threads_first_unit_gets_a_patient_first_connect(live: None, server: DBServer) -> None:
    """An alias configured after this thread's first unit is hooked at the next unit: its first connect waits too."""
    with freshconn.unit_of_work():
        Order.objects.count()
    with (
        override_settings(FRESHCONN={"RECONNECT_TIMEOUT": 0.3}),
        temp_alias("late", server.django_settings(PORT=str(free_port()))),
    ):
        with pytest.raises(Error), freshconn.unit_of_work(using="late"):
            connections["late"].ensure_connection()
        late = counters("late")
    assert late["reconnect_waits"] == 1
    assert late["reconnect_attempts"] >= 2


@pytest.mark.server
def test_a_rejected_password_fails_at_once_with_the_default_reconnect_timeout(live: None, server: DBServer) -> None:
    """A wrong password is not an outage: the unit fails at its first attempt instead of waiting 60 s."""
    with temp_alias("badpw", server.django_settings(PASSWORD="not-the-password")):
        with pytest.raises(Error), freshconn.unit_of_work(using="badpw"):
            connections["badpw"].ensure_connection()
        bad = counters("badpw")
    assert (bad["reconnect_waits"], bad["reconnect_attempts"]) == (0, 0)


def test_stats_in_a_child_forked_while_another_thread_reads_them() -> None:
    """A child forked while another thread is inside freshconn.stats() can read its own counters."""
    stop = threading.Event()

    def reader() -> None:  # a Prometheus scrape or a stats line, as often as possible
        while not stop.is_set():
            freshconn.stats()

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    hung = 0
    try:
        for _ in range(3):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # Python >= 3.12: fork with threads
                pid = os.fork()
            if pid == 0:  # the child: never returns into pytest
                code = 1
                try:
                    # Whatever handler an earlier test left for SIGALRM, a hang here ends the child.
                    signal.signal(signal.SIGALRM, signal.SIG_DFL)
                    signal.alarm(1)
                    freshconn.stats()
                    code = 0
                finally:
                    # posix._exit, not os._exit: under coverage (scripts/test) os._exit saves the
                    # child's data first, and that can hang on a lock the parent's reader thread
                    # held at fork time. Only freshconn's own code is under test here.
                    posix._exit(code)
            hung += not _exited_cleanly(pid)
    finally:
        stop.set()
        thread.join(5)
    assert hung == 0


def _exited_cleanly(pid: int) -> bool:
    """Reap the child; one still running after 2 s is killed and counts as hung (a healthy one takes ms)."""
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return False
