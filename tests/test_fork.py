"""After fork(), the child drops the connections it inherited without touching the parent's session."""

from __future__ import annotations

import json
import os
import traceback
from collections.abc import Callable

import pytest
from django.db import Error, connection

import freshconn
from freshconn import _drivers
from freshconn._fork import forget_inherited_connections
from tests.conftest import counters

pytestmark = pytest.mark.server


def backend_id() -> int:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
    raw = connection.connection
    bid = _drivers.for_connection(raw).backend_id(raw)
    assert bid is not None
    return bid


def run_in_child(body: Callable[[], dict[str, object]]) -> dict[str, object]:
    """Fork; run ``body`` in the child and return what it returned (or raise what it raised)."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child never returns into pytest
        code = 0
        try:
            os.close(read_fd)
            try:
                out: dict[str, object] = body()
            except BaseException:
                out = {"error": traceback.format_exc()}
                code = 1
            os.write(write_fd, json.dumps(out).encode())
        finally:
            os._exit(code)
    os.close(write_fd)
    chunks = []
    with os.fdopen(read_fd, "rb") as reader:
        while chunk := reader.read(65536):
            chunks.append(chunk)
    _, status = os.waitpid(pid, 0)
    result: dict[str, object] = json.loads(b"".join(chunks) or b"{}")
    assert os.waitstatus_to_exitcode(status) == 0, result.get("error")
    return result


def _others_open() -> int:
    """Connections open in this thread on aliases other than the default one."""
    from django.db import connections

    return sum(1 for c in connections.all(initialized_only=True) if c.alias != "default" and c.connection is not None)


def test_child_forgets_inherited_connection_and_parent_session_survives(live: None) -> None:
    """A forked child that forgets its inherited connection gets its own session; the parent's keeps working."""
    parent_backend = backend_id()
    others = _others_open()

    def child() -> dict[str, object]:
        dropped = forget_inherited_connections()
        assert connection.connection is None
        with freshconn.unit_of_work():
            own = backend_id()
        connection.close()
        return {"dropped": dropped, "backend": own, "connects": counters()["connects"]}

    out = run_in_child(child)
    # Other aliases another test left open in this thread (an in-memory SQLite) are dropped too.
    assert out["dropped"] == 1 + others
    assert out["backend"] != parent_backend
    # reset_stats: the child's counters describe the child only (one connection of its own).
    assert out["connects"] == 1
    assert backend_id() == parent_backend
    assert counters()["connects"] == 1


def test_child_closing_its_inherited_connection_the_usual_way_kills_the_parents_session(live: None) -> None:
    """Contrast: a plain close() in the child sends the driver's quit message on the parent's session."""
    backend_id()

    def child() -> dict[str, object]:
        connection.close()
        return {}

    run_in_child(child)
    with pytest.raises(Error) as failure:
        backend_id()
    assert freshconn.is_disconnect(failure.value)


def test_forget_without_connections_is_a_no_op(live: None) -> None:
    """With nothing open, forgetting drops nothing and leaves the wrapper usable."""
    connection.close()
    others = _others_open()
    assert forget_inherited_connections(reset_stats=False) == others
    assert backend_id() > 0
