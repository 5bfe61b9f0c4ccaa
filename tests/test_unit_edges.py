"""Edges of units of work: nesting across sync and async, handles closed oddly, scopes outliving DATABASES."""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import subprocess
import sys
import threading
from typing import Any

import django
import pytest
from asgiref.sync import async_to_sync, sync_to_async
from django.core.exceptions import ImproperlyConfigured
from django.db import Error, ProgrammingError, close_old_connections, connection, connections, transaction
from django.test import override_settings
from django.utils.connection import ConnectionDoesNotExist
from testbed.servers import DBServer

import freshconn
from freshconn import _lifecycle, _state, _units
from freshconn.testing import kill_connection
from tests import test_retries
from tests.app.models import Order
from tests.conftest import VENDOR, backend_id, counters, driver_module, run_async, subprocess_env
from tests.tempalias import temp_alias
from tests.test_fork import run_in_child
from tests.test_retries import KillWhen, _block_commits

pytestmark = pytest.mark.server

#: The fixture that makes the next COMMIT wait on the server (shared with tests/test_retries.py).
commit_blocker = test_retries.commit_blocker

LITE = {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}


def select_one() -> int:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
        return int(cursor.fetchone()[0])


def _depth() -> int:
    return len(_state.local().stack)


def test_handles_and_units_describe_themselves(live: None) -> None:
    """The reprs of a handle, a unit and an async unit say what they are: kind, state, aliases."""
    outer = freshconn.open_unit(using="default")
    inner = freshconn.open_unit()
    assert repr(outer) == "<UnitHandle outermost open using=['default']>"
    assert repr(inner) == "<UnitHandle nested open using=all>"
    inner.close()
    outer.close()
    assert repr(outer) == "<UnitHandle outermost closed using=['default']>"
    assert repr(freshconn.unit_of_work(using="default")) == "unit_of_work(using='default', retries=0, idempotent=False)"
    assert repr(freshconn.aunit_of_work(using=["default"])) == "aunit_of_work(using=['default'])"


def test_exit_without_enter_is_refused(live: None) -> None:
    """Leaving a unit (sync or async) that this thread or task never entered raises a clear RuntimeError."""
    unit = freshconn.unit_of_work()
    with pytest.raises(RuntimeError, match="without a matching __enter__"):
        unit.__exit__(None, None, None)
    with pytest.raises(RuntimeError, match="without a matching __aenter__"):
        run_async(freshconn.aunit_of_work().__aexit__(None, None, None))
    assert _depth() == 0


def test_leaving_a_with_block_ends_the_handles_opened_inside_it(live: None) -> None:
    """A handle opened inside a with-unit and never closed is ended when the block exits; the stack is clean."""
    with freshconn.unit_of_work():
        stray = freshconn.open_unit()
        assert _depth() == 2
    assert stray.closed
    assert _depth() == 0
    with pytest.raises(RuntimeError, match="already closed"):
        stray.close()


def test_decorated_function_that_raises_discards_the_connection_it_broke(live: None) -> None:
    """A @unit_of_work function failing with a disconnect re-raises it and leaves no dead connection behind."""

    @freshconn.unit_of_work
    def work() -> int:
        select_one()
        kill_connection()
        return select_one()

    with pytest.raises(Error) as err:
        work()
    assert freshconn.is_disconnect(err.value)
    assert connection.connection is None
    assert counters()["discarded_error"] == 1
    assert work.__name__ == "work"


def test_each_resumed_after_its_outer_unit_closed_logs_and_carries_on(
    live: None, caplog: pytest.LogCaptureFixture
) -> None:
    """An each() whose unit an outer handle already ended logs the refused close, then runs the next item in a unit."""
    outer = freshconn.open_unit()
    gen = freshconn.each([1, 2])
    assert next(gen) == 1
    outer.close()
    assert _depth() == 0
    assert next(gen) == 2
    assert "already closed" in caplog.text
    assert _units.in_unit()
    assert _depth() == 1
    gen.close()
    assert _depth() == 0


def test_a_unit_built_before_its_alias_left_databases_fails_loudly(live: None) -> None:
    """A unit whose alias was removed from DATABASES after it was built raises ConnectionDoesNotExist when run."""
    with temp_alias("extra", LITE):
        block = freshconn.unit_of_work(using="extra")
        decorated = freshconn.unit_of_work(using="extra")(select_one)
    still_there = freshconn.unit_of_work(using="default")
    with pytest.raises(ConnectionDoesNotExist, match="'extra'"), block:
        pass
    with pytest.raises(ConnectionDoesNotExist, match="'extra'"):
        decorated()
    assert _depth() == 0
    # A unit whose aliases all still exist is validated again and runs.
    with temp_alias("extra", LITE):
        pass
    with still_there:
        assert select_one() == 1
    assert freshconn.unit_of_work(using="default")(select_one)() == 1


def test_a_with_block_left_open_inside_atomic_keeps_the_transaction(live: None) -> None:
    """A unit opened inside the caller's atomic() and failing leaves that transaction's connection alone."""
    with transaction.atomic():
        before = backend_id()
        with pytest.raises(ValueError), freshconn.unit_of_work():
            select_one()
            raise ValueError("the unit's own failure")
        assert backend_id() == before
        assert select_one() == 1
    assert counters().get("discarded", 0) == 0


def test_a_unit_that_leaves_autocommit_off_loses_its_connection(live: None) -> None:
    """Work that turned autocommit off and never restored it: the connection is discarded at the unit's end."""
    with freshconn.unit_of_work():
        select_one()
        transaction.set_autocommit(False)
    assert connection.connection is None
    assert counters()["discarded_autocommit"] == 1
    with freshconn.unit_of_work():
        assert connection.get_autocommit()
        assert select_one() == 1


def raw_select() -> None:
    """A query through the raw driver connection, which no Django wrapper sees (its cursor closed whatever happens)."""
    cursor = connection.connection.cursor()
    try:
        cursor.execute("SELECT 1")
        cursor.fetchall()
    finally:
        with contextlib.suppress(Exception):
            cursor.close()


def test_a_disconnect_seen_only_by_the_raw_driver_drops_every_connection_in_scope(live: None) -> None:
    """A raw driver cursor failing with a disconnect (no Django wrapper saw it) still discards the connection."""
    with pytest.raises(driver_module().Error) as err, freshconn.unit_of_work():
        select_one()
        killed = kill_connection()
        raw_select()
    assert freshconn.is_disconnect(err.value)
    assert connection.connection is None
    assert counters()["discarded_error"] == 1
    with freshconn.unit_of_work():
        assert select_one() == 1
        assert backend_id() != killed


def _read_only_sql() -> str:
    if VENDOR == "mysql":
        return "SET SESSION TRANSACTION READ ONLY"
    return "SET SESSION default_transaction_read_only = on"


def test_a_connection_refused_as_read_only_outside_units_is_dropped_at_the_next_unit(live: None) -> None:
    """A write refused as read-only between units dooms the connection; the next unit starts on a fresh one."""
    with freshconn.unit_of_work():
        select_one()
    first = backend_id()
    with connection.cursor() as cursor:
        cursor.execute(_read_only_sql())
    with pytest.raises(Error) as err:
        Order.objects.create(ref="ro-1")
    assert freshconn.is_read_only(err.value)
    with freshconn.unit_of_work():
        Order.objects.create(ref="ro-2")
        assert backend_id() != first
    assert counters()["discarded_read_only"] == 1


def test_stats_lines_are_rate_limited_across_units(live: None, caplog: pytest.LogCaptureFixture) -> None:
    """With STATS_LOG_INTERVAL, back-to-back units log one line of counters, not one per unit."""
    caplog.set_level(logging.INFO, logger="freshconn")
    saved = _lifecycle._next_stats_line
    _lifecycle._next_stats_line = 1.0  # a line is due (not the silent first one after start-up)
    try:
        with override_settings(FRESHCONN={"STATS_LOG_INTERVAL": 300}):
            for _ in range(3):
                with freshconn.unit_of_work():
                    select_one()
    finally:
        _lifecycle._next_stats_line = saved
    lines = [r.getMessage() for r in caplog.records if getattr(r, "reason", None) == "stats"]
    assert len(lines) == 1


def test_a_pending_reconnect_waits_for_a_unit_that_covers_its_alias(live: None) -> None:
    """A reconnect an outage left pending is not spent by a unit on another alias; the next unit on it reconnects."""
    with pytest.raises(Error), freshconn.unit_of_work():  # a disconnect: discarded at the end, reconnect pending
        select_one()
        kill_connection()
        select_one()
    assert "default" in _state.local().needs_reconnect
    with freshconn.unit_of_work(using="lite"):
        pass
    assert "default" in _state.local().needs_reconnect
    assert connection.connection is None
    with freshconn.unit_of_work(using="default"):
        assert connection.connection is not None
        assert select_one() == 1
    assert "default" not in _state.local().needs_reconnect


# Async units


async def _in_unit() -> bool:
    return await sync_to_async(_units.in_unit, thread_sensitive=True)()


def test_nested_async_units_of_one_task_are_one_unit(live: None) -> None:
    """An aunit_of_work inside another of the same task is a no-op: the outer one is still open after it."""

    async def main() -> tuple[bool, bool]:
        async with freshconn.aunit_of_work():
            async with freshconn.aunit_of_work(using="default"):
                await sync_to_async(select_one, thread_sensitive=True)()
            still = await _in_unit()
        return still, await _in_unit()

    # Under async_to_sync the thread-sensitive calls run in this test's thread, which nothing else
    # shares (asgiref's process-wide executor thread may still be busy with an earlier test's call).
    assert async_to_sync(main)() == (True, False)
    assert counters()["units"] == 1


def test_aeach_over_a_plain_list_runs_every_item_in_its_own_unit(live: None) -> None:
    """aeach() over a plain iterable yields every item, each in a unit, and ends the last one."""

    async def main() -> list[tuple[int, bool]]:
        seen = []
        async for item in freshconn.aeach([1, 2, 3]):
            seen.append((item, await _in_unit()))
        return seen

    assert run_async(main()) == [(1, True), (2, True), (3, True)]
    assert counters()["units"] == 3


def test_async_unit_inside_a_sync_unit_of_the_same_thread_is_a_no_op(live: None) -> None:
    """An async unit run through async_to_sync inside a sync unit joins it: one unit, which ends once."""

    async def inner() -> int:
        async with freshconn.aunit_of_work():
            return await sync_to_async(select_one, thread_sensitive=True)()

    with freshconn.unit_of_work():
        assert async_to_sync(inner)() == 1
        assert _depth() == 1
    assert _depth() == 0
    assert counters()["units"] == 1


def test_sync_unit_inside_an_async_unit_joins_it(live: None) -> None:
    """A sync unit run in the async ORM thread while an async unit is open there is nested: one unit counted."""

    def sync_work() -> tuple[int, int]:
        with freshconn.unit_of_work():
            return select_one(), _depth()

    async def main() -> tuple[int, int]:
        async with freshconn.aunit_of_work():
            return await sync_to_async(sync_work, thread_sensitive=True)()

    assert run_async(main()) == (1, 1)
    assert counters()["units"] == 1


def test_an_async_unit_that_fails_to_start_leaves_its_thread_outside_units(live: None) -> None:
    """A broken FRESHCONN setting fails the async unit at its start, and the ORM thread is left in no unit."""

    async def main() -> bool:
        with override_settings(FRESHCONN={"CHECK_AFTER_IDLE": "soon"}), pytest.raises(ImproperlyConfigured):
            async with freshconn.aunit_of_work():
                pass
        return await _in_unit()

    assert async_to_sync(main)() is False  # in this test's thread: see the nested-units test


def test_an_async_handle_closes_once_and_only_in_its_thread(live: None) -> None:
    """An async unit's handle refuses a second close and a close from another thread."""
    handle = _units.open_async(None)
    errors: list[BaseException] = []

    def elsewhere() -> None:
        try:
            _units.close_async(handle, None)
        except RuntimeError as exc:
            errors.append(exc)

    thread = threading.Thread(target=elsewhere)
    thread.start()
    thread.join()
    assert len(errors) == 1
    assert "moved threads" in str(errors[0])
    assert _units.in_unit()
    _units.close_async(handle, None)
    assert not _units.in_unit()
    with pytest.raises(RuntimeError, match="already closed"):
        _units.close_async(handle, None)


def test_an_alias_whose_backend_cannot_load_does_not_break_units_on_other_aliases(live: None) -> None:
    """A configured alias with a backend that cannot be imported leaves units on the other aliases working."""
    with temp_alias("broken", {"ENGINE": "no.such.backend"}), freshconn.unit_of_work(using="default"):
        assert select_one() == 1


def test_a_handle_closed_twice_from_another_thread_counts_one_abandoned_unit(live: None) -> None:
    """Every close from a foreign thread is refused; the unit counts as abandoned once and its thread ends it."""
    handle = freshconn.open_unit()
    select_one()
    errors: list[BaseException] = []

    def close_it() -> None:
        for _ in range(2):
            try:
                handle.close()
            except RuntimeError as exc:
                errors.append(exc)

    thread = threading.Thread(target=close_it)
    thread.start()
    thread.join()
    assert [("closed from thread" in str(e)) for e in errors] == [True, True]
    assert counters()["abandoned_units"] == 1
    assert _depth() == 1
    # Asking whether a unit is running ends the abandoned one, here in its own thread.
    assert not _units.in_unit()
    assert handle.closed
    assert _depth() == 0


def test_a_second_cancelling_shutdown_leaves_the_callers_connection_open(live: None) -> None:
    """A cancelling shutdown() from the main thread, after the pool stopped, never closes that thread's connection."""
    with freshconn.unit_of_work():
        select_one()
    mine = connection.connection
    pool = freshconn.ThreadPoolExecutor(max_workers=2)
    assert list(pool.map(lambda i: i * 2, range(4))) == [0, 2, 4, 6]
    pool.shutdown(wait=True)
    # The workers left their stop sentinels in the queue: this drain takes them in the main thread.
    pool.shutdown(wait=True, cancel_futures=True)
    assert connection.connection is mine
    with freshconn.unit_of_work():
        assert select_one() == 1
    assert counters().get("discarded", 0) == 0


def test_an_async_unit_whose_commit_was_lost_raises_ambiguous_commit(
    live: None, server: DBServer, commit_blocker: Any
) -> None:
    """An async unit whose ORM call lost its COMMIT in flight raises AmbiguousCommitError naming the lost session."""
    sessions: list[int] = []

    def body() -> None:
        with transaction.atomic():
            Order.objects.create(ref="amb-async")
            _block_commits(commit_blocker)
            sessions.append(backend_id())
            killer = KillWhen(server, sessions[0], "commit")
            killer.start()
        killer.join()

    async def main() -> None:
        async with freshconn.aunit_of_work():
            await sync_to_async(body, thread_sensitive=True)()

    with pytest.raises(freshconn.AmbiguousCommitError) as err:
        run_async(main())
    assert err.value.alias == "default"
    assert err.value.backend_id == sessions[0]
    assert freshconn.is_disconnect(err.value.__cause__)
    assert counters()["ambiguous_commits"] == 1


#: A program that uses freshconn without listing it in INSTALLED_APPS: no AppConfig.ready() wires it.
_UNWIRED_PROGRAM = """
import asyncio, sys
import django
from django.conf import settings
import freshconn
from freshconn import _state
from django.utils.connection import ConnectionDoesNotExist

typo = freshconn.unit_of_work(using="defualt")  # settings not configured yet: checked at its first run
import tests.settings as test_settings
config = {k: getattr(test_settings, k) for k in dir(test_settings) if k.isupper()}
config["INSTALLED_APPS"] = ["tests.app"]
settings.configure(**config)
django.setup()
from asgiref.sync import sync_to_async
from django.db import connection, connections
assert not _state.wired

def select_one():
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
        return cursor.fetchone()[0]

async def first_async_unit():
    async with freshconn.aunit_of_work():
        return await sync_to_async(select_one, thread_sensitive=True)()

if sys.argv[1] == "async":
    assert asyncio.run(first_async_unit()) == 1
else:
    with freshconn.unit_of_work():
        assert select_one() == 1
assert _state.wired
try:
    with typo:
        pass
except ConnectionDoesNotExist as exc:
    print("refused:", exc)
print("connects:", freshconn.stats()["default"]["connects"])
"""


@pytest.mark.parametrize("first", ["sync", "async"])
def test_the_first_unit_wires_freshconn_when_its_app_is_not_installed(live: None, first: str) -> None:
    """Without the app installed, the first unit (sync or async) wires freshconn; an alias typo fails at first run."""
    done = subprocess.run(
        [sys.executable, "-c", _UNWIRED_PROGRAM, first],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "refused: unit_of_work(using=...): no database alias 'defualt'" in done.stdout
    assert "connects: 1" in done.stdout


def test_a_unit_that_waited_on_another_threads_lost_commit_raises_ambiguous_commit(
    live: None, server: DBServer, commit_blocker: Any
) -> None:
    """A unit re-raising a helper thread's lost COMMIT raises AmbiguousCommitError, with no session id of its own."""
    sessions: list[int] = []

    def helper() -> None:
        try:
            with transaction.atomic():
                Order.objects.create(ref="amb-thread")
                _block_commits(commit_blocker)
                sessions.append(backend_id())
                killer = KillWhen(server, sessions[0], "commit")
                killer.start()
            killer.join()
        finally:
            connections.close_all()

    outcome: list[BaseException] = []

    def unit_thread() -> None:
        try:
            with freshconn.unit_of_work(), concurrent.futures.ThreadPoolExecutor(1) as pool:
                pool.submit(helper).result()
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=unit_thread)  # a thread that never opened a connection itself
    thread.start()
    thread.join(30)
    assert len(sessions) == 1
    [err] = outcome
    assert isinstance(err, freshconn.AmbiguousCommitError)
    assert err.alias == "default"
    assert err.backend_id is None
    assert freshconn.is_disconnect(err.__cause__)


def test_an_adopted_boundary_after_a_databases_change_forgets_removed_aliases(live: None) -> None:
    """With adoption, close_old_connections() after a DATABASES change forgets removed aliases and checks the rest."""
    with override_settings(FRESHCONN={"ADOPT_CLOSE_OLD_CONNECTIONS": True}):
        with temp_alias("second", dict(connections["default"].settings_dict)):
            with freshconn.unit_of_work(), connections["second"].cursor() as cursor:
                cursor.execute("SELECT 1")
            assert "second" in _state.local().wrappers
        select_one()
        kill_connection()
        close_old_connections()
        assert "second" not in _state.local().wrappers
        assert counters()["discarded_dead"] == 1
        assert select_one() == 1


def test_a_child_forked_inside_a_transaction_never_continues_it_on_a_new_session(live: None) -> None:
    """A child forked inside atomic() never runs that transaction's work on a new session nor commits it."""
    block = transaction.atomic()
    block.__enter__()
    try:
        Order.objects.create(ref="fork-atomic")
        parent_session = backend_id()

        def child() -> dict[str, object]:
            freshconn.forget_inherited_connections()
            try:
                Order.objects.count()
                refused = ""
            except ProgrammingError as exc:
                refused = str(exc)
            block.__exit__(None, None, None)
            return {
                "refused": refused,
                "connects": counters().get("connects", 0),
                "in_atomic": connection.in_atomic_block,
                "sees": Order.objects.filter(ref="fork-atomic").exists(),
            }

        out = run_in_child(child)
    except BaseException:
        block.__exit__(*sys.exc_info())
        raise
    block.__exit__(None, None, None)
    if django.VERSION >= (5, 2):
        # Django refuses a new connection inside an atomic block whose connection was closed.
        assert out["refused"] == "Cannot open a new connection in an atomic block."
        assert out["connects"] == 0
    else:
        # Django 4.2 opens one, and forgets it when the block ends (closed in transaction).
        assert out["refused"] == ""
        assert out["connects"] == 1
    assert out["in_atomic"] is False
    assert out["sees"] is False
    # The parent's transaction was neither committed nor rolled back by the child: it commits now.
    assert backend_id() == parent_session
    assert Order.objects.filter(ref="fork-atomic").count() == 1


def test_a_raw_driver_disconnect_leaves_aliases_outside_the_units_scope_alone(live: None) -> None:
    """When only the raw driver saw a disconnect, the unit drops its own aliases' connections, not others'."""
    with temp_alias("second", dict(connections["default"].settings_dict)):
        second = connections["second"]
        with second.cursor() as cursor:
            cursor.execute("SELECT 1")
        kept = second.connection
        with pytest.raises(driver_module().Error) as err, freshconn.unit_of_work(using="default"):
            select_one()
            kill_connection()
            raw_select()
        assert freshconn.is_disconnect(err.value)
        assert connection.connection is None
        assert second.connection is kept
        with second.cursor() as cursor:
            cursor.execute("SELECT 2")
            assert cursor.fetchone()[0] == 2


@pytest.mark.parametrize("outcome", ["returns", "not_retried", "raises", "nested_in_each"])
def test_a_retrying_unit_is_registered_with_the_statement_hook_only_while_it_is_open(live: None, outcome: str) -> None:
    """While a retrying unit is open the statement hook classifies its writes; once it ends, the hook forgets it."""
    seen: list[int] = []

    @freshconn.unit_of_work(retries=2)
    def work() -> None:
        seen.append(len(_state.tracking_units))
        if outcome == "raises":
            raise ValueError("the work's own error")
        if outcome in ("not_retried", "nested_in_each"):
            Order.objects.create(ref=f"track-{outcome}")
            kill_connection()
            select_one()

    if outcome == "returns":
        work()
    else:
        with pytest.raises(Exception) as err:
            if outcome == "nested_in_each":
                for _ in freshconn.each([1]):
                    work()
            else:
                work()
        assert isinstance(err.value, ValueError) == (outcome == "raises")
    if outcome in ("not_retried", "nested_in_each"):
        assert freshconn.is_disconnect(err.value)
        assert Order.objects.filter(ref=f"track-{outcome}").count() == 1
    assert seen == [1]  # one attempt, registered while it ran
    assert _state.tracking_units == set()
    for _ in freshconn.each([1]):
        Order.objects.create(ref=f"after-{outcome}")
    assert _state.tracking_units == set()
