"""Outages around a unit: server restarts, a server that is down, proxies that drop idle clients, black holes."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from django.db import Error, connection
from django.test import override_settings
from testbed.netns import BlackHoleNet
from testbed.proxies import HAProxy, PgBouncer
from testbed.servers import DBServer, MariaDB, PostgreSQL, Server

import freshconn
from tests.conftest import VENDOR, counters, driver_module

pytestmark = [pytest.mark.server, pytest.mark.slow]


def select_one() -> int:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
        return int(cursor.fetchone()[0])


def unit_select() -> int:
    with freshconn.unit_of_work():
        return select_one()


def test_server_restart_while_idle_next_unit_succeeds(live: None, server: DBServer) -> None:
    """A server restart between units costs the worker nothing: the next unit reconnects."""
    unit_select()
    server.restart()
    assert unit_select() == 1
    assert counters()["discarded_dead"] == 1
    assert counters()["connects"] == 2


def test_server_down_past_reconnect_timeout_fails_then_worker_resumes(
    dbconf: Callable[..., None], server: DBServer
) -> None:
    """A server down longer than RECONNECT_TIMEOUT fails the unit with a disconnect error; once back, units succeed."""
    dbconf(OPTIONS={"connect_timeout": 3})
    unit_select()
    server.down()
    try:
        with override_settings(FRESHCONN={"RECONNECT_TIMEOUT": 1.0}):
            for _ in range(2):
                with pytest.raises(Error) as err:
                    unit_select()
                assert freshconn.is_disconnect(err.value)
                assert "app-secret-pw" not in str(err.value)
    finally:
        server.up()
    assert unit_select() == 1


def test_default_settings_ride_through_a_short_restart(dbconf: Callable[..., None], server: DBServer) -> None:
    """With default settings, a unit that starts while the server restarts waits for it and succeeds."""
    dbconf(OPTIONS={"connect_timeout": 3})
    unit_select()
    server.down()
    timer = threading.Timer(1.5, server.up)
    timer.start()
    try:
        assert unit_select() == 1
    finally:
        timer.join()
    assert counters()["discarded_dead"] == 1
    assert counters()["reconnect_waits"] == 1


def test_with_reconnect_timeout_zero_a_unit_during_a_restart_fails(
    dbconf: Callable[..., None], server: DBServer
) -> None:
    """For contrast: with RECONNECT_TIMEOUT = 0, the same unit fails while the server is down."""
    dbconf(OPTIONS={"connect_timeout": 3})
    unit_select()
    server.down()
    try:
        with override_settings(FRESHCONN={"RECONNECT_TIMEOUT": 0}), pytest.raises(Error):
            unit_select()
    finally:
        server.up()


@pytest.fixture(scope="module")
def proxy(server: DBServer) -> Iterator[Server]:
    """HAProxy (MariaDB) or PgBouncer (PostgreSQL) that drops a client idle for 2 s; the server never does."""
    srv: Server = (
        HAProxy(server.port, idle_timeout=2) if VENDOR == "mysql" else PgBouncer(server.port, client_idle_timeout=2)
    )
    srv.start()
    yield srv
    srv.stop()


def test_proxy_dropping_idle_clients_next_unit_succeeds(dbconf: Callable[..., None], proxy: Server) -> None:
    """A proxy that drops idle clients (the server's own limit says hours) never breaks the next unit."""
    options: dict[str, Any] = {"prepare_threshold": None} if VENDOR == "postgresql" and _psycopg3() else {}
    dbconf(PORT=str(proxy.port), OPTIONS=options)
    unit_select()
    time.sleep(3.0)
    assert unit_select() == 1
    c = counters()
    assert c["discarded"] == 1
    assert c["connects"] == 2


def test_proxy_drop_without_freshconn_breaks_the_query(dbconf: Callable[..., None], proxy: Server) -> None:
    """For contrast: without freshconn the first query after the proxy's idle drop fails."""
    options: dict[str, Any] = {"prepare_threshold": None} if VENDOR == "postgresql" and _psycopg3() else {}
    dbconf(PORT=str(proxy.port), OPTIONS=options)
    select_one()
    time.sleep(3.0)
    with pytest.raises(Exception) as err:
        select_one()
    assert freshconn.is_disconnect(err.value)


def _psycopg3() -> bool:
    return type(connection).__module__.startswith("django.db.backends.postgresql") and (
        driver_module().__name__ == "psycopg"
    )


@pytest.fixture(scope="module")
def black_hole() -> Iterator[tuple[BlackHoleNet, DBServer]]:
    """A server inside a network namespace whose port can silently drop every packet."""
    net = BlackHoleNet()
    net.start()
    srv: DBServer = (MariaDB if VENDOR == "mysql" else PostgreSQL)(host=net.ns_ip, prefix=net.prefix())
    try:
        srv.start()
        yield net, srv
    finally:
        srv.stop()
        net.stop()


class Worker(threading.Thread):
    """A worker thread running units on demand: it owns its connection, as a real worker does."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.go = threading.Event()
        self.done = threading.Event()
        self.outcome: Any = None
        self.stop = False

    def run(self) -> None:
        from django.db import connections

        try:
            while True:
                self.go.wait()
                self.go.clear()
                if self.stop:
                    return
                try:
                    self.outcome = unit_select()
                except BaseException as exc:
                    self.outcome = exc
                self.done.set()
        finally:
            connections.close_all()

    def unit(self, limit: float) -> tuple[bool, Any]:
        """Run one unit in the worker; (finished within ``limit``, result or exception)."""
        self.done.clear()
        self.go.set()
        return self.done.wait(limit), self.outcome

    def finish(self) -> None:
        self.stop = True
        self.go.set()
        self.join(10)


def test_black_hole_while_idle_fails_within_bound_then_recovers(
    dbconf: Callable[..., None], black_hole: tuple[BlackHoleNet, DBServer]
) -> None:
    """When the path silently drops packets, the next unit neither hangs nor keeps the dead connection."""
    net, srv = black_hole
    dbconf(HOST=srv.host, PORT=str(srv.port), NAME="freshconn", OPTIONS={"connect_timeout": 2})
    worker = Worker()
    worker.start()
    try:
        settings = {"CHECK_AFTER_IDLE": 0.3, "PING_TIMEOUT": 1.0, "RECONNECT_TIMEOUT": 3.0}
        with override_settings(FRESHCONN=settings):
            assert worker.unit(10.0) == (True, 1)
            time.sleep(0.5)
            net.drop(srv.port)
            try:
                # Ping bounded by PING_TIMEOUT (~1 s), then reconnects (each bounded by connect_timeout,
                # 2 s) for RECONNECT_TIMEOUT (3 s): the unit fails within about 7 s, never hangs.
                finished, outcome = worker.unit(15.0)
            finally:
                net.restore()
            assert finished, "the unit hung on a black-holed connection"
            assert isinstance(outcome, Error)  # mysql-connector-python raises InterfaceError
            assert freshconn.is_disconnect(outcome)
            assert counters()["pings"] == 1
            assert counters()["discarded_dead"] == 1
            assert worker.unit(10.0) == (True, 1)
    finally:
        worker.finish()


def test_black_hole_shorter_than_reconnect_timeout_is_ridden_through(
    dbconf: Callable[..., None], black_hole: tuple[BlackHoleNet, DBServer]
) -> None:
    """With default settings, a unit that meets a black hole waits for the path to come back and succeeds."""
    net, srv = black_hole
    dbconf(HOST=srv.host, PORT=str(srv.port), NAME="freshconn", OPTIONS={"connect_timeout": 2})
    worker = Worker()
    worker.start()
    try:
        with override_settings(FRESHCONN={"CHECK_AFTER_IDLE": 0.3, "PING_TIMEOUT": 1.0}):
            assert worker.unit(10.0) == (True, 1)
            time.sleep(0.5)
            net.drop(srv.port)
            timer = threading.Timer(4.0, net.restore)
            timer.start()
            try:
                finished, outcome = worker.unit(30.0)
            finally:
                timer.join()
            assert finished, "the unit hung on a black-holed connection"
            assert outcome == 1
            c = counters()
            assert c["pings"] == 1
            assert c["discarded_dead"] == 1
            assert c["reconnect_attempts"] >= 2
    finally:
        worker.finish()


def _stop_while_waiting(dbconf: Callable[..., None], sig: int, expected: type[BaseException], rounds: int) -> None:
    """Run ``rounds`` units against a closed port in the main thread; another thread signals each wait."""
    from testbed.servers import free_port

    from freshconn import _outage

    dbconf(PORT=str(free_port()), OPTIONS={"connect_timeout": 3})
    failures: list[str] = []

    def signal_when_waiting(round_no: int) -> None:
        deadline = time.monotonic() + 10
        while counters().get("reconnect_waits", 0) <= round_no and time.monotonic() < deadline:
            time.sleep(0.002)
        # Land the signals at different points of the wait (its sleep, its checks, a notify).
        time.sleep((round_no % 7) * 0.003)
        if _outage._cond._waiters:  # type: ignore[attr-defined]
            failures.append("the main thread sleeps inside the shared condition")
        os.kill(os.getpid(), sig)

    def lock_is_free(round_no: int) -> None:
        if _outage._cond.acquire(timeout=2):
            _outage._cond.release()
        else:
            failures.append(f"round {round_no}: the lock stayed held")

    with override_settings(FRESHCONN={"RECONNECT_TIMEOUT": 30.0}):
        for round_no in range(rounds):
            _outage.reset()
            signaller = threading.Thread(target=signal_when_waiting, args=(round_no,))
            signaller.start()
            try:
                with pytest.raises(expected):
                    unit_select()
            finally:
                signaller.join()
            # The lock is free for every other thread, whatever the signal interrupted.
            probe = threading.Thread(target=lock_is_free, args=(round_no,))
            probe.start()
            probe.join()
            connection.close()
    _outage.reset()
    assert failures == []


def test_sigterm_ends_the_main_threads_wait_every_time(dbconf: Callable[..., None]) -> None:
    """A SIGTERM, whenever it lands in the main thread's wait for a server, ends it with ReconnectStopped."""
    stops: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: stops.append(signum))
    try:
        _stop_while_waiting(dbconf, signal.SIGTERM, freshconn.ReconnectStopped, rounds=12)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert len(stops) == 12  # the program's own handler ran for each


def test_a_raising_sigint_handler_leaves_the_wait_clean(dbconf: Callable[..., None]) -> None:
    """The default SIGINT handler's KeyboardInterrupt leaves the wait cleanly, lock free, however often it lands."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        _stop_while_waiting(dbconf, signal.SIGINT, KeyboardInterrupt, rounds=12)
    finally:
        signal.signal(signal.SIGINT, previous)
