"""When a unit polls its connection's socket (no round trip): after a pause, never between busy units.

The rule is ``_policy.SOCKET_CHECK_AFTER`` (how soon after the previous unit's end the skip holds)
and ``_policy.SOCKET_CHECK_IDLE`` (how long before its end the previous unit must have used the
connection for it to count as busy). The polls are counted on the real socket's poller.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from django.db import connection

import freshconn
from freshconn import _policy, _state
from freshconn.testing import kill_connection
from tests.conftest import counters

pytestmark = pytest.mark.server


class CountingPoller:
    """The connection's own poller, counting its calls (the real poll(0) still runs)."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.calls = 0

    def poll(self, timeout: float = 0) -> Any:
        self.calls += 1
        return self.real.poll(timeout)


def select_one() -> int:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
        return int(cursor.fetchone()[0])


@pytest.fixture
def polls(live: None) -> Iterator[CountingPoller]:
    """This thread's default connection, open, with its socket poller counted."""
    connection.ensure_connection()
    state = _state.state_of(connection)
    assert state.poller is not None
    counter = CountingPoller(state.poller)
    state.poller = counter
    try:
        yield counter
    finally:
        state.poller = counter.real


def spin(seconds: float) -> None:
    """Wait without releasing the CPU (a sleep's wake-up can last milliseconds on a loaded machine)."""
    until = time.perf_counter() + seconds
    while time.perf_counter() < until:
        pass


def test_back_to_back_units_that_query_do_not_poll(polls: CountingPoller) -> None:
    """Units that follow one another at once, each using the connection, never poll its socket."""
    for _ in freshconn.each(range(300)):
        select_one()
        # The unit's own work after its statement (rows read, objects built) is not a pause.
        spin(min(5 * _policy.SOCKET_CHECK_AFTER, _policy.SOCKET_CHECK_IDLE / 4))
    # The first unit polls (the fixture opened the connection, no unit used it). A loaded machine
    # preempts this thread now and then: inside a unit's tail for longer than SOCKET_CHECK_IDLE, or
    # between two units (a real pause), and that unit polls (12 of 300 once in CI). Without the
    # skip, every one of the 300 units would poll.
    assert 1 <= polls.calls < 150
    assert counters()["pings"] == 0


def test_a_pause_between_units_polls_once_per_unit(polls: CountingPoller) -> None:
    """A pause longer than SOCKET_CHECK_AFTER before a unit makes that unit poll the socket, once."""

    def paused() -> Iterator[int]:
        for i in range(20):
            spin(max(20 * _policy.SOCKET_CHECK_AFTER, 5e-4))
            yield i

    for _ in freshconn.each(paused()):
        select_one()
    assert polls.calls == 20
    assert counters()["pings"] == 0


def test_a_connection_the_units_do_not_use_is_polled_however_busy_they_are(polls: CountingPoller) -> None:
    """Back-to-back units that never touch the connection leave it idle: each one polls it."""
    select_one()
    spin(2 * _policy.SOCKET_CHECK_IDLE)
    for _ in freshconn.each(range(50)):
        pass
    assert polls.calls == 50


def test_a_long_tail_after_the_last_statement_leaves_the_connection_idle(polls: CountingPoller) -> None:
    """A unit whose last statement is longer than SOCKET_CHECK_IDLE before its end makes the next unit poll."""
    for i in freshconn.each(range(10)):
        select_one()
        if i % 2 == 0:
            spin(2 * _policy.SOCKET_CHECK_IDLE)
    # Unit 0 (no unit used the connection before it) and units 1, 3, 5, 7, 9 (after a long tail)
    # poll; units 2, 4, 6, 8 follow a busy unit and skip it, unless a preemption made a pause (the
    # skip itself is the first test's).
    assert polls.calls >= 6


def test_a_kill_during_a_long_tail_is_found_by_the_next_unit_before_its_query(live: None) -> None:
    """A KILL inside a unit after its last statement, then the next unit at once: the poll finds it, no unit fails."""
    for i in freshconn.each(range(2)):
        select_one()
        if i == 0:
            first = connection.connection
            kill_connection()
            # The KILL's side session is usually longer than SOCKET_CHECK_IDLE, but not always
            # (0.95 ms in one CI run): the spin makes the tail long enough to count as idle.
            spin(2 * _policy.SOCKET_CHECK_IDLE)
    assert connection.connection is not first
    assert counters()["discarded_dead"] == 1
    assert counters()["discarded_error"] == 0


def test_a_statement_that_failed_between_back_to_back_units_makes_the_next_unit_check(
    live: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failed statement that the loop's own code swallowed between two units voids the back-to-back skip."""
    from django.db import DatabaseError

    # However long the failing statement's round trip: the skip would hold without the failure.
    monkeypatch.setattr(_policy, "SOCKET_CHECK_AFTER", 60.0)

    def items() -> Iterator[int]:
        yield 1
        yield 2
        try:
            with connection.cursor() as cursor:
                cursor.execute("SELECT no_such_column FROM no_such_table")
        except DatabaseError:
            pass
        assert connection.errors_occurred
        yield 3

    for _ in freshconn.each(items()):
        select_one()
    # Unit 3 saw Django's error flag and checked the connection with a round trip before its
    # query; trusting unit 2's clean end, it would not have (and unit 3's end, last, neither).
    assert counters()["pings"] == 1
    assert counters()["units"] == 3
