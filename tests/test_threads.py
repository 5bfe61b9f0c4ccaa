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


def test_garbage_collected_pool_closes_its_threads_connections(live: None, server: DBServer) -> None:
    """A pool dropped without shutdown(): its threads stop when it is collected and close their connections."""
    import gc

    before = baseline(server)
    pool = freshconn.ThreadPoolExecutor(max_workers=3)
    idents = {ident for ident, _ in pool.map(query, range(30))}
    threads = [t for t in threading.enumerate() if t.ident in idents]
    assert app_connections(server) == before + len(idents)
    del pool
    gc.collect()
    for t in threads:
        t.join(10)
        assert not t.is_alive()
    assert settle(server, before) == before


def test_failing_initializer_closes_the_connection_it_opened(live: None, server: DBServer) -> None:
    """An initializer that queries then raises breaks the pool (as the stdlib does) and leaves no connection open."""
    before = baseline(server)
    started = []

    def init(tag: str) -> None:
        started.append(tag)
        query(0)
        raise RuntimeError("init failed")

    pool = freshconn.ThreadPoolExecutor(max_workers=1, initializer=init, initargs=("x",))
    with pytest.raises(concurrent.futures.BrokenExecutor):
        pool.submit(query, 1).result(timeout=10)
    pool.shutdown(wait=True)
    assert started == ["x"]
    assert settle(server, before) == before
    assert counters()["units"] == 0


def test_non_callable_initializer_is_refused_like_the_stdlib() -> None:
    """initializer= must be callable: the same TypeError as concurrent.futures, before any thread starts."""
    with pytest.raises(TypeError, match="initializer must be a callable"):
        freshconn.ThreadPoolExecutor(initializer="setup")  # type: ignore[arg-type]


def test_shutdown_from_inside_a_task_with_cancel_futures_keeps_that_task_s_connection(
    live: None, server: DBServer
) -> None:
    """A task that cancels its own pool's pending work keeps its connection until its unit ends; then all are closed."""
    before = baseline(server)
    gate = threading.Event()
    pool = freshconn.ThreadPoolExecutor(max_workers=1)
    seen: list[int] = []

    def stopper() -> int:
        query(0)
        mine = connection.connection
        gate.wait(10)
        pool.shutdown(wait=False, cancel_futures=True)
        # The queue was drained in this thread, sentinel included: that did not close this connection.
        assert connection.connection is mine
        return query(5)[1]

    first = pool.submit(stopper)
    pending = [pool.submit(seen.append, i) for i in range(5)]
    pool.shutdown(wait=False)  # its stop sentinel now waits behind the pending tasks, for stopper() to drain
    gate.set()
    assert first.result(timeout=10) == 5
    assert all(f.cancelled() for f in pending)
    assert seen == []
    pool.shutdown(wait=True)
    assert settle(server, before) == before


def test_shutdown_without_waiting_still_closes_every_thread_connection(live: None, server: DBServer) -> None:
    """shutdown(wait=False) returns at once; each thread closes its connection after its last task."""
    before = baseline(server)
    release = threading.Event()
    pool = freshconn.ThreadPoolExecutor(max_workers=2)

    def slow(i: int) -> int:
        release.wait(10)
        return query(i)[1]

    futures = [pool.submit(slow, i) for i in range(4)]
    pool.shutdown(wait=False)
    release.set()
    assert [f.result(timeout=10) for f in futures] == [0, 1, 2, 3]
    assert settle(server, before) == before
