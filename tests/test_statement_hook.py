"""The statement hook sees every statement on every cursor Django hands out, by whatever path."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from django.db import DatabaseError, connection, connections
from django.db.backends.base.base import BaseDatabaseWrapper

import freshconn
from freshconn import _django, _state

pytestmark = [pytest.mark.server]


def _passthrough(execute: Callable[..., Any], sql: str, params: Any, many: bool, context: dict[str, Any]) -> Any:
    return execute(sql, params, many, context)


@contextlib.contextmanager
def _cursor_path(debug: bool, user_wrapper: bool) -> Iterator[None]:
    previous = connection.force_debug_cursor
    connection.force_debug_cursor = debug
    try:
        with connection.execute_wrapper(_passthrough) if user_wrapper else contextlib.nullcontext():
            yield
    finally:
        connection.force_debug_cursor = previous


@pytest.mark.parametrize("user_wrapper", [False, True], ids=["alone", "under_a_user_wrapper"])
@pytest.mark.parametrize("debug", [False, True], ids=["plain_cursor", "debug_cursor"])
def test_every_cursor_path_runs_the_statement_hook(live: None, debug: bool, user_wrapper: bool) -> None:
    """A statement on a plain or debug cursor, alone or beside a user's wrapper, is recorded, and so is a failed one."""
    with freshconn.unit_of_work():
        connection.ensure_connection()
        state = _state.state_of(connection)
        assert state is not None
        with _cursor_path(debug, user_wrapper):
            before = state.last_used
            until = time.monotonic() + 0.001
            while time.monotonic() < until:
                pass
            with connection.cursor() as cursor:
                cursor.execute("SELECT 1")
                assert isinstance(cursor, _state._Cursor) is not debug
            assert state.last_used > before
            thread = _state.local()
            thread.clean_until = math.inf
            with pytest.raises(DatabaseError), connection.cursor() as cursor:
                cursor.execute("SELECT no_such_column FROM no_such_table")
            assert thread.clean_until == -math.inf
        if user_wrapper:
            assert _passthrough not in connection.execute_wrappers


def test_a_backend_with_its_own_make_cursor_keeps_it() -> None:
    """freshconn shadows make_cursor() only where the backend left Django's, so a backend's own cursor class stays."""

    def make_cursor(self: BaseDatabaseWrapper, cursor: Any) -> Any:
        return ("backend's own", cursor)

    default = connections["default"]
    own = type("OwnCursorWrapper", (type(default),), {"make_cursor": make_cursor})
    wrapper = own(default.settings_dict, alias="default")
    _state.hook(wrapper)
    assert _django.MAKE_CURSOR not in wrapper.__dict__
    assert wrapper.make_cursor("raw") == ("backend's own", "raw")
    assert _state.statement_hook in wrapper.execute_wrappers
    plain = type(default)(default.settings_dict, alias="default")
    _state.hook(plain)
    assert _django.MAKE_CURSOR in plain.__dict__
