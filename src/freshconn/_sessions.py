"""Side sessions: a second raw connection with an alias's settings, to ask the server about a session.

Used by ``freshconn.testing`` (kill a session, wait until it is gone) and by
``AmbiguousCommitError.wait_until_settled()``. The side session bypasses Django's
``connection_created``, so freshconn's counters stay true, and is always closed.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

from django.db import connections

from ._drivers import set_autocommit

__all__ = ["server_uptime", "session_exists", "side_session", "wait_session_gone"]


@contextlib.contextmanager
def side_session(alias: str) -> Iterator[tuple[Any, str]]:
    """A raw autocommit DB-API connection with ``alias``'s settings, and its vendor."""
    wrapper = connections.create_connection(alias)
    raw = wrapper.get_new_connection(wrapper.get_connection_params())
    try:
        set_autocommit(raw)
        yield raw, str(wrapper.vendor)
    finally:
        with contextlib.suppress(Exception):
            raw.close()


def session_exists(raw: Any, vendor: str, backend: int) -> bool:
    sql = (
        "SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE ID = %s"
        if vendor == "mysql"
        else "SELECT COUNT(*) FROM pg_stat_activity WHERE pid = %s"
    )
    cursor = raw.cursor()
    try:
        cursor.execute(sql, [backend])
        return bool(cursor.fetchone()[0])
    finally:
        cursor.close()


def server_uptime(raw: Any, vendor: str) -> float:
    """Seconds since the server started (MySQL/MariaDB count whole seconds)."""
    sql = (
        "SELECT VARIABLE_VALUE FROM information_schema.GLOBAL_STATUS WHERE VARIABLE_NAME = 'UPTIME'"
        if vendor == "mysql"
        else "SELECT EXTRACT(EPOCH FROM now() - pg_postmaster_start_time())"
    )
    cursor = raw.cursor()
    try:
        cursor.execute(sql)
        return float(cursor.fetchone()[0])
    finally:
        cursor.close()


def wait_session_gone(alias: str, backend: int, timeout: float, since: float | None = None) -> bool:
    """Poll until the server no longer lists session ``backend``; False if still there (or unreachable) at ``timeout``.

    Once the session is gone, whatever it was doing (a COMMIT the client lost sight of) has either
    happened or never will: reading the outcome then tells the truth. Behind a pooler such as
    PgBouncer the id is the pooler's, not the server's, and this cannot tell. ``since``
    (``time.monotonic()``): a server that started after it cannot hold that session any more,
    whatever id a new session got.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            with side_session(alias) as (raw, vendor):
                while True:
                    if not session_exists(raw, vendor, backend):
                        return True
                    # One second of margin: MySQL's uptime is whole seconds.
                    if since is not None and server_uptime(raw, vendor) + 1.0 < time.monotonic() - since:
                        return True
                    if time.monotonic() >= deadline:
                        return False
                    time.sleep(0.05)
        except Exception:  # noqa: BLE001 - the server may be restarting: keep asking until the deadline
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.2)
