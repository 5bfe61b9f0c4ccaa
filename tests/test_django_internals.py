"""Every Django internal named in freshconn._django exists and behaves as freshconn assumes (on each Django leg)."""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from typing import Any

import django
import pytest
from django.core.signals import request_finished, request_started
from django.db import close_old_connections, connection, connections, transaction
from django.db.backends.base.base import BaseDatabaseWrapper

import freshconn
from freshconn import _django, _errors
from tests.app.models import Order

pytestmark = [pytest.mark.server]


def test_django_version_is_a_supported_series() -> None:
    """The suite runs on a Django series freshconn supports (4.2, 5.2 or 6.x)."""
    assert django.VERSION[:2] >= (4, 2)


def test_thread_wrapper_reads_this_threads_local_without_creating_one(live: None) -> None:
    """connections._connections is the per-thread Local: read it without creating a wrapper for another thread."""
    connection.ensure_connection()
    assert _django.thread_wrapper("default") is connections["default"]
    seen = []
    t = threading.Thread(target=lambda: seen.append(_django.thread_wrapper("default")))
    t.start()
    t.join()
    assert seen == [None]


def test_initialized_wrappers_lists_only_this_threads_wrappers(live: None) -> None:
    """connections.all(initialized_only=True) (Django >= 4.1) lists the wrappers this thread created."""
    connection.ensure_connection()
    assert connections["default"] in _django.initialized_wrappers()


def test_health_check_done_exists_and_is_reset_by_close_if_unusable(live: None) -> None:
    """health_check_done is a wrapper attribute Django resets in close_if_unusable_or_obsolete()."""
    conn = connections["default"]
    conn.ensure_connection()
    assert hasattr(conn, _django.HEALTH_CHECK_DONE)
    type(conn).close_if_unusable_or_obsolete(conn)
    assert getattr(conn, _django.HEALTH_CHECK_DONE) is False


def test_close_old_connections_calls_the_per_connection_step_on_the_instance(live: None) -> None:
    """django.db.close_old_connections() looks the per-connection step up on each wrapper instance."""
    calls = []
    conn = connections["default"]
    conn.ensure_connection()
    original = getattr(conn, _django.PER_CONNECTION_STEP)
    setattr(conn, _django.PER_CONNECTION_STEP, lambda: calls.append(1))
    try:
        close_old_connections()
    finally:
        setattr(conn, _django.PER_CONNECTION_STEP, original)
    assert calls == [1]


def test_close_old_connections_is_djangos_request_signal_receiver() -> None:
    """Django connects close_old_connections to both request signals (freshconn re-points them under adoption)."""
    for signal in (request_started, request_finished):
        assert any(_deref(entry[1]) is close_old_connections for entry in signal.receivers)


def _deref(ref: object) -> object:
    return ref() if isinstance(ref, weakref.ReferenceType) else ref


def test_execute_wrappers_index_zero_is_outermost_and_survives_execute_wrapper_exit(live: None) -> None:
    """A wrapper inserted at index 0 wraps every other one and is not popped by connection.execute_wrapper()."""
    order: list[str] = []

    def outer(execute: Callable[..., Any], sql: str, params: Any, many: bool, context: dict[str, Any]) -> Any:
        order.append("outer")
        return execute(sql, params, many, context)

    def inner(execute: Callable[..., Any], sql: str, params: Any, many: bool, context: dict[str, Any]) -> Any:
        order.append("inner")
        return execute(sql, params, many, context)

    conn = connections["default"]
    conn.ensure_connection()
    conn.execute_wrappers.insert(0, outer)
    try:
        with conn.execute_wrapper(inner), conn.cursor() as cursor:
            cursor.execute("SELECT 1")
        assert outer in conn.execute_wrappers
    finally:
        conn.execute_wrappers.remove(outer)
    assert order[:2] == ["outer", "inner"]


def test_a_lost_commit_error_carries_djangos_commit_frame(live: None) -> None:
    """An error raised during COMMIT has a traceback through BaseDatabaseWrapper._commit with the wrapper as self."""
    try:
        with transaction.atomic():
            Order.objects.create(ref="frame")
            connection.connection.close()  # the driver's COMMIT now fails, inside Django's _commit
    except Exception as exc:
        frames = []
        for e in _errors.chain(exc):
            tb = e.__traceback__
            while tb is not None:
                frames.append(tb.tb_frame)
                tb = tb.tb_next
        assert any(_django.commit_frame_alias(f) == "default" for f in frames)
    else:
        pytest.fail("COMMIT on a closed driver connection did not fail")


def test_commit_and_atomic_exit_use_the_names_freshconn_expects() -> None:
    """BaseDatabaseWrapper has _commit, on_commit(robust=...), execute_wrappers and close_if_unusable_or_obsolete."""
    assert callable(getattr(BaseDatabaseWrapper, _django.COMMIT_FRAME))
    assert callable(getattr(BaseDatabaseWrapper, _django.AUTOCOMMIT_STEP))
    assert callable(getattr(BaseDatabaseWrapper, _django.ROLLBACK_STEP))
    assert "set_autocommit" in _django.ATOMIC_EXIT_CODE.co_names  # Atomic.__exit__ restores autocommit itself
    assert "robust" in BaseDatabaseWrapper.on_commit.__code__.co_varnames
    assert callable(getattr(BaseDatabaseWrapper, _django.PER_CONNECTION_STEP))
    assert isinstance(connection.execute_wrappers, list)


def test_rollback_goes_through_the_instances_rollback_step(live: None) -> None:
    """Django's rollback() calls the wrapper's own _rollback(), so an instance attribute shadows it."""
    seen: list[str] = []
    connection.ensure_connection()
    own = connection.__dict__.get(_django.ROLLBACK_STEP)  # freshconn's hook, when installed
    setattr(connection, _django.ROLLBACK_STEP, lambda: seen.append("rollback"))
    try:
        connection.rollback()
    finally:
        if own is None:
            delattr(connection, _django.ROLLBACK_STEP)
        else:
            setattr(connection, _django.ROLLBACK_STEP, own)
    assert seen == ["rollback"]


def test_freshconn_leaves_djangos_close_at_alone(live: None) -> None:
    """freshconn never rewrites close_at: code outside units keeps Django's own CONN_MAX_AGE."""
    with freshconn.unit_of_work():
        Order.objects.count()
    settings_age = connection.settings_dict["CONN_MAX_AGE"]
    assert (connection.close_at is None) == (settings_age is None)


def test_cursors_come_from_the_instances_make_cursor_and_wrappers_get_the_call_freshconn_makes(live: None) -> None:
    """_prepare_cursor() calls the instance's make_cursor(); wrappers get (executor, sql, params, many, context)."""
    from django.db.backends.utils import CursorWrapper

    assert BaseDatabaseWrapper.make_cursor.__code__.co_varnames[:2] == ("self", "cursor")
    assert "make_cursor" in BaseDatabaseWrapper._prepare_cursor.__code__.co_names  # type: ignore[attr-defined]
    run = CursorWrapper._execute_with_wrappers  # type: ignore[attr-defined]
    assert run.__code__.co_varnames[:5] == ("self", "sql", "params", "many", "executor")
    # A wrapper freshconn does not manage: Django's own behaviour, no freshconn hook in the way.
    conn = connections.create_connection("default")
    made: list[Any] = []
    calls: list[tuple[Any, ...]] = []

    def make_cursor(cursor: Any) -> Any:
        made.append(cursor)
        return CursorWrapper(cursor, conn)

    def wrapper(execute: Callable[..., Any], sql: str, params: Any, many: bool, context: dict[str, Any]) -> Any:
        calls.append((sql, params, many, dict(context)))
        return execute(sql, params, many, context)

    conn.make_cursor = make_cursor  # type: ignore[method-assign]
    try:
        with conn.execute_wrapper(wrapper), conn.cursor() as cursor:
            cursor.execute("SELECT %s", [1])
        # MySQL's connection setup runs its own statements through cursors (and wrappers) first.
        assert made[-1] is cursor.cursor
        mine = [c for c in calls if c[0] == "SELECT %s"]
        assert [c[:3] for c in mine] == [("SELECT %s", [1], False)]
        assert set(mine[0][3]) == {"connection", "cursor"}
        assert mine[0][3]["connection"] is conn
        assert mine[0][3]["cursor"] is cursor
    finally:
        conn.close()
