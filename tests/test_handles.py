"""Unit handles in every usage shape: other threads, double closes, stray wrappers, failing receivers, interruptions."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from django.db import OperationalError, connection, connections

import freshconn
from freshconn import _state, _units
from freshconn.signals import connection_discarded, unit_retried
from freshconn.testing import kill_connection
from tests.app.models import Order
from tests.conftest import DRIVER, VENDOR, counters, run_async

pytestmark = [pytest.mark.server]


def select_one() -> int:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
        return int(cursor.fetchone()[0])


class Owner(threading.Thread):
    """A thread that runs the callables it is handed, one at a time, and keeps its own connections."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.jobs: list[Any] = []
        self.cv = threading.Condition()
        self.results: list[Any] = []

    def call(self, fn: Any) -> Any:
        with self.cv:
            self.jobs.append(fn)
            self.cv.notify_all()
            while not self.results:
                self.cv.wait()
            outcome = self.results.pop()
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    def run(self) -> None:
        try:
            while True:
                with self.cv:
                    while not self.jobs:
                        self.cv.wait()
                    fn = self.jobs.pop()
                if fn is None:
                    return
                try:
                    outcome = fn()
                except BaseException as exc:
                    outcome = exc
                with self.cv:
                    self.results.append(outcome)
                    self.cv.notify_all()
        finally:
            connections.close_all()

    def stop(self) -> None:
        with self.cv:
            self.jobs.append(None)
            self.cv.notify_all()
        self.join(10)


@pytest.fixture
def owner(live: None) -> Iterator[Owner]:
    thread = Owner()
    thread.start()
    yield thread
    thread.stop()


def _stack_depth() -> int:
    return len(_state.local().stack)


def test_each_closed_from_another_thread_corrupts_neither_thread(
    owner: Owner, caplog: pytest.LogCaptureFixture
) -> None:
    """A generator from each() advanced in thread A and closed in thread B: refused, logged, both threads stay sound."""
    gen = owner.call(lambda: freshconn.each([1, 2, 3]))
    assert owner.call(lambda: (next(gen), select_one())) == (1, 1)
    gen.close()  # from this thread: refused and logged, never applied to either thread's state
    assert "closed from thread" in caplog.text
    assert _stack_depth() == 0
    assert not freshconn._units.in_unit()
    # Thread A ends the abandoned unit itself at its next unit, which then acts (checks, discards).
    owner.call(kill_connection)

    def next_unit_in_a() -> tuple[int, int]:
        with freshconn.unit_of_work():
            value = select_one()
        return value, _stack_depth()

    assert owner.call(next_unit_in_a) == (1, 0)
    assert counters()["discarded_dead"] == 1
    assert counters()["abandoned_units"] == 1
    # And this thread's own units act too.
    with freshconn.unit_of_work():
        assert select_one() == 1
        assert _stack_depth() == 1


def test_unit_handle_refuses_a_second_close_and_another_thread(owner: Owner) -> None:
    """A handle closed twice, or from another thread, raises a clear RuntimeError and changes nothing."""
    handle = freshconn.open_unit()
    select_one()
    with pytest.raises(RuntimeError, match="closed from thread"):
        owner.call(handle.close)
    handle.close()
    with pytest.raises(RuntimeError, match="already closed"):
        handle.close()
    assert _stack_depth() == 0


def test_open_unit_handle_discards_a_connection_broken_in_the_unit(live: None) -> None:
    """The adapter API: open_unit() checks at once, and close(exc) discards what the disconnect broke."""
    handle = freshconn.open_unit(using="default")
    select_one()
    kill_connection()
    with pytest.raises(OperationalError) as err:
        select_one()
    handle.close(err.value)
    assert connection.connection is None
    assert counters()["discarded_error"] == 1
    with freshconn.unit_of_work():
        assert select_one() == 1


def test_nested_handles_close_out_of_order_leave_a_clean_stack(live: None) -> None:
    """A nested unit left open (an each() generator never resumed) is ended with its outer unit."""
    outer = freshconn.open_unit()
    gen = freshconn.each([1, 2])
    next(gen)
    assert _stack_depth() == 2
    outer.close()
    assert _stack_depth() == 0
    # each() is declared to return an Iterator, which has no close(); what it returns is a generator.
    gen.close()  # its handle is already closed: logged, harmless
    with freshconn.unit_of_work():
        assert _stack_depth() == 1


def test_a_stray_wrapper_does_not_hide_the_threads_connection(live: None) -> None:
    """A second wrapper for the same alias (create_connection(), Django's _nodb_cursor) never replaces the thread's."""
    with freshconn.unit_of_work():
        select_one()
    stray = connections.create_connection("default")
    stray.ensure_connection()
    stray.close()
    kill_connection()
    with freshconn.unit_of_work():
        assert select_one() == 1
    assert counters()["discarded_dead"] == 1


def _raise(**kwargs: Any) -> None:
    raise RuntimeError("a broken metrics receiver")


@pytest.fixture
def broken_receivers() -> Iterator[None]:
    connection_discarded.connect(_raise, dispatch_uid="test.broken")
    unit_retried.connect(_raise, dispatch_uid="test.broken")
    try:
        yield
    finally:
        connection_discarded.disconnect(dispatch_uid="test.broken")
        unit_retried.disconnect(dispatch_uid="test.broken")


def test_a_failing_receiver_never_changes_a_units_outcome(
    live: None, broken_receivers: None, caplog: pytest.LogCaptureFixture
) -> None:
    """Receivers of connection_discarded and unit_retried that raise are logged; discards and retries still happen."""
    with freshconn.unit_of_work():
        select_one()
    kill_connection()
    with freshconn.unit_of_work():
        assert select_one() == 1
    calls: list[int] = []

    @freshconn.unit_of_work(retries=1)
    def flaky() -> int:
        calls.append(1)
        select_one()
        if len(calls) == 1:
            kill_connection()
        return select_one()

    assert flaky() == 1
    assert len(calls) == 2
    assert "a receiver of a freshconn signal failed" in caplog.text
    assert counters()["discarded_dead"] == 1


class Interrupted(Exception):
    """What a time-limit handler raises (like Celery's SoftTimeLimitExceeded)."""


def _raise_interrupted(signum: int, frame: Any) -> None:
    raise Interrupted


@pytest.fixture
def alarm() -> Iterator[None]:
    previous = signal.signal(signal.SIGALRM, _raise_interrupted)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _slow_select() -> str:
    return "SELECT SLEEP(1.5), 7" if VENDOR == "mysql" else "SELECT pg_sleep(1.5), 7"


def _interrupted_query() -> None:
    signal.setitimer(signal.ITIMER_REAL, 0.3)
    with connection.cursor() as cursor:
        cursor.execute(_slow_select())
        cursor.fetchall()


def test_a_query_interrupted_by_a_signal_is_never_reused(live: None, alarm: None) -> None:
    """An exception raised by a signal handler while a query is in flight discards that connection at the unit's end."""
    with pytest.raises(Interrupted), freshconn.unit_of_work():
        _interrupted_query()
    signal.setitimer(signal.ITIMER_REAL, 0)
    # C drivers may finish (or fail) the query before Python runs the handler; pure-Python ones are cut mid-reply.
    assert counters()["discarded"] == 1
    if DRIVER in ("pymysql", "psycopg"):
        assert counters()["discarded_interrupted"] == 1
    with freshconn.unit_of_work(), connection.cursor() as cursor:
        cursor.execute("SELECT 41 + 1")
        assert cursor.fetchone()[0] == 42


@pytest.mark.skipif(DRIVER not in ("pymysql", "psycopg"), reason="pure-Python protocol readers can be cut mid-reply")
def test_without_freshconn_an_interrupted_query_leaves_a_half_read_connection(live: None, alarm: None) -> None:
    """For contrast: on a driver whose reader a signal can cut mid-reply, the next plain query fails or misreads."""
    with pytest.raises(Interrupted):
        _interrupted_query()
    signal.setitimer(signal.ITIMER_REAL, 0)
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 41 + 1")
            value = cursor.fetchone()[0]
    except Exception:
        return  # the connection was unusable
    assert value != 42, "the connection survived the interruption: this control proves nothing here"


def test_a_cancelled_async_query_leaves_no_broken_connection(live: None) -> None:
    """A task cancelled while its ORM call runs: the next async unit reads correct results on a sound connection."""

    async def slow() -> None:
        async with freshconn.aunit_of_work():
            await sync_to_async(_sleep_query, thread_sensitive=True)()

    async def main() -> int:
        task = asyncio.ensure_future(slow())
        await asyncio.sleep(0.3)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        async with freshconn.aunit_of_work():
            return await sync_to_async(_answer, thread_sensitive=True)()

    assert run_async(main()) == 42


def _sleep_query() -> None:
    with connection.cursor() as cursor:
        cursor.execute(_slow_select())
        cursor.fetchall()


def _answer() -> int:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 41 + 1")
        return int(cursor.fetchone()[0])


def test_unused_alias_keeps_its_last_use(live: None) -> None:
    """A unit's end refreshes the last use of connections it used, not of every alias in scope."""
    with freshconn.unit_of_work():
        select_one()
    state = getattr(connection, _state.STATE_ATTR)
    before = state.last_used
    with freshconn.unit_of_work():
        pass  # the connection sits idle: its last use must not move
    assert state.last_used == before
    with freshconn.unit_of_work():
        Order.objects.count()
    assert state.last_used > before


def test_interleaved_and_nested_each_loops_keep_one_stack_and_count_every_outermost_unit(live: None) -> None:
    """Two each() loops advanced in turn, and one fed by another, leave the stack empty and count only acting units."""
    thread = _state.local()
    seen = []
    for a, b in zip(freshconn.each(range(5)), freshconn.each(range(5)), strict=True):
        assert _units.in_unit()
        Order.objects.count()
        seen.append((a, b))
    assert len(seen) == 5
    assert not thread.stack
    assert thread.active is None
    for _ in freshconn.each(freshconn.each(range(4))):
        Order.objects.count()
        assert len(_state.local().stack) == 2  # the inner loop's unit, and the outer one nested in it
    assert not thread.stack
    assert thread.active is None
    with freshconn.unit_of_work():
        pass  # the stack still works as a stack: an ordinary unit opens and closes
    assert not thread.stack


def test_a_unit_the_iterator_leaves_open_makes_each_units_nest_inside_it(live: None) -> None:
    """An iterator that yields from inside its own unit gets nested (no-op) units from each(), then acting ones."""
    thread = _state.local()

    def items() -> Iterator[int]:
        yield 0
        yield 1  # back to back: each()'s own fast path
        with freshconn.unit_of_work():
            yield 2  # each()'s unit nests inside this one
            yield 3
        yield 4

    nested = []
    for _ in freshconn.each(items()):
        Order.objects.count()
        nested.append(len(thread.stack))
    assert nested == [1, 1, 2, 2, 1]
    assert not thread.stack
    assert thread.active is None
    assert counters()["units"] == 4  # units 0, 1, 4, and the iterator's own (2 and 3 nest in it)


def test_a_nested_unit_each_opens_after_an_unusual_close_is_closed_as_nested(
    live: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After each() closed a unit the general way, a nested (no-op) unit it opens next never runs the end steps."""
    from freshconn import _lifecycle

    ends = []
    real_end = _lifecycle.end

    def counting_end(*args: Any) -> None:
        ends.append(args)
        real_end(*args)

    monkeypatch.setattr(_lifecycle, "end", counting_end)
    thread = _state.local()

    def items() -> Iterator[int]:
        yield 0
        yield 1  # opened by each()'s fast path
        # As an async unit open in this thread makes every sync unit nested (freshconn._units).
        thread.async_open += 1
        try:
            yield 2
        finally:
            thread.async_open -= 1

    for i in freshconn.each(items()):
        Order.objects.count()
        if i == 1:
            freshconn.open_unit()  # left open: each() closes its unit the general way
    assert len(ends) == 2  # units 0 and 1 acted; unit 2 was nested in the (simulated) async unit
    assert not thread.stack
    assert thread.active is None
