"""freshconn.ThreadPoolExecutor against a real server: tasks as units, no connection left after shutdown."""

from __future__ import annotations

import concurrent.futures
import threading
import time

import pytest
from django.db import connection, connections
from testbed.servers import DBServer

import freshconn
from freshconn import _threads
from tests.conftest import VENDOR, counters

pytestmark = pytest.mark.server

TASKS = 1000
THREADS = 8


def app_connections(server: DBServer) -> int:
    """How many sessions the server holds for the app user right now (read with the admin account)."""
    if VENDOR == "mysql":
        sql = "SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE USER = 'app'"
    else:
        sql = "SELECT count(*) FROM pg_stat_activity WHERE usename = 'app'"
    return int(server.admin_sql(sql).strip())


def settle(server: DBServer, expected: int, timeout: float = 10.0) -> int:
    """The app user's session count once it reached ``expected`` (a closed session leaves the list shortly after)."""
    deadline = time.monotonic() + timeout
    count = app_connections(server)
    while count != expected and time.monotonic() < deadline:
        time.sleep(0.05)
        count = app_connections(server)
    return count


def baseline(server: DBServer) -> int:
    """The app user's session count once it stopped moving (sessions closed just before may still be leaving)."""
    previous, count = -1, app_connections(server)
    deadline = time.monotonic() + 3
    while count != previous and time.monotonic() < deadline:
        time.sleep(0.1)
        previous, count = count, app_connections(server)
    return count


def query(i: int) -> tuple[int, int]:
    with connection.cursor() as cursor:
        cursor.execute("SELECT %s", [i])
        return threading.get_ident(), int(cursor.fetchone()[0])


def test_pool_tasks_are_units_and_shutdown_closes_every_thread_connection(live: None, server: DBServer) -> None:
    """1,000 busy tasks on 8 threads: one connection per thread, no ping, and none left open after shutdown."""
    before = baseline(server)
    with freshconn.ThreadPoolExecutor(max_workers=THREADS) as pool:
        results = list(pool.map(query, range(TASKS)))
        open_while_alive = app_connections(server)
    threads = {ident for ident, _ in results}
    assert [value for _, value in results] == list(range(TASKS))
    assert 1 <= len(threads) <= THREADS
    assert open_while_alive == before + len(threads)  # persistent: each thread keeps one connection
    assert settle(server, before) == before
    c = counters()
    assert c["units"] == TASKS
    assert c["connects"] == len(threads)
    assert c["pings"] == 0
    assert c["discarded"] == 0


def test_plain_pool_leaves_one_connection_per_thread_for_contrast(live: None, server: DBServer) -> None:
    """For contrast, a plain concurrent.futures pool leaves each worker thread's connection open after shutdown."""
    wrappers = {}

    def task(i: int) -> tuple[int, int]:
        # Kept only so the test can close the leaked connections afterwards, from this thread.
        wrappers[threading.get_ident()] = connections["default"]
        return query(i)

    before = baseline(server)
    with concurrent.futures.ThreadPoolExecutor(max_workers=THREADS) as pool:
        list(pool.map(task, range(TASKS)))
    try:
        assert settle(server, before + len(wrappers), timeout=2) == before + len(wrappers)
        assert len(wrappers) >= 2
    finally:
        for wrapper in wrappers.values():
            # The owning threads are gone: close the leaked driver connections from here.
            wrapper.connection.close()
            wrapper.connection = None
    assert settle(server, before) == before


def test_failing_task_still_ends_its_unit_and_the_pool_closes_its_connection(live: None, server: DBServer) -> None:
    """A task that raises reports the exception through its future; the thread's connection is still closed."""
    before = baseline(server)

    def fail() -> None:
        query(0)
        raise ValueError("boom")

    with freshconn.ThreadPoolExecutor(max_workers=2, thread_name_prefix="fc") as pool:
        future = pool.submit(fail)
        with pytest.raises(ValueError, match="boom"):
            future.result()
        assert pool.submit(query, 7).result()[1] == 7
    assert settle(server, before) == before
    assert counters()["units"] == 2


def test_connection_left_in_atomic_is_closed_when_the_thread_ends(live: None, server: DBServer) -> None:
    """A task that leaks an open transaction cannot keep its connection alive past the thread's end."""
    before = baseline(server)

    def leak_atomic() -> None:
        from django.db import transaction

        transaction.atomic().__enter__()
        query(1)

    pool = freshconn.ThreadPoolExecutor(max_workers=1)
    pool.submit(leak_atomic).result()
    assert app_connections(server) == before + 1
    pool.shutdown(wait=True)
    assert settle(server, before) == before


def test_close_thread_connections_closes_only_this_threads(live: None) -> None:
    """close_thread_connections() closes the calling thread's connections and leaves other threads' alone."""
    query(0)
    mine = connection.connection
    done = threading.Event()

    def other() -> None:
        query(0)
        _threads.close_thread_connections()
        done.set()

    t = threading.Thread(target=other)
    t.start()
    t.join()
    assert done.is_set()
    assert connection.connection is mine
