"""Helpers for proving that a worker survives real connection loss, against a real server.

``kill_connection()`` has the server kill this thread's connection from a second session
(``KILL`` / ``pg_terminate_backend``); ``expire_idle()`` has the server drop it for idleness.
Both wait until the server has really let go of the session before they return.
"""

from __future__ import annotations

import time
from typing import Any

from django.db import connections

from . import _drivers
from ._sessions import session_exists, side_session

__all__ = ["expire_idle", "kill_connection"]


def _victim(alias: str) -> tuple[Any, _drivers.Driver, int]:
    conn = connections[alias]
    raw = conn.connection
    if raw is None:
        raise ValueError(f"alias {alias!r} has no open connection in this thread: run a query first")
    driver = _drivers.for_connection(raw)
    backend = driver.backend_id(raw)
    if driver.vendor not in ("mysql", "postgresql") or backend is None:
        raise ValueError(
            f"alias {alias!r} uses {conn.vendor!r}: only MySQL/MariaDB and PostgreSQL sessions can be killed"
        )
    return raw, driver, backend


def _wait_gone(admin: Any, vendor: str, backend: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while session_exists(admin, vendor, backend):
        if time.monotonic() > deadline:
            raise TimeoutError(f"the server still shows session {backend} after {timeout:g}s")
        time.sleep(0.02)


def kill_connection(alias: str = "default", timeout: float = 10.0) -> int:
    """Have the server kill this thread's connection on ``alias``; return the killed session's id."""
    backend = _victim(alias)[2]
    with side_session(alias) as (admin, vendor):
        cursor = admin.cursor()
        try:
            if vendor == "mysql":
                cursor.execute(f"KILL {int(backend)}")
            else:
                cursor.execute("SELECT pg_terminate_backend(%s)", [backend])
        finally:
            cursor.close()
        _wait_gone(admin, vendor, backend, timeout)
    return backend


def expire_idle(alias: str = "default", timeout: float = 10.0) -> int:
    """Have the server drop this thread's connection on ``alias`` for idleness; return its session id.

    Lowers the session's own idle limit (MySQL ``wait_timeout``, PostgreSQL 14+
    ``idle_session_timeout``) to about a second and waits until the server closes it.
    """
    raw, driver, backend = _victim(alias)
    cursor = raw.cursor()
    try:
        if driver.vendor == "mysql":
            cursor.execute("SET SESSION wait_timeout = 1")
        else:
            cursor.execute("SET idle_session_timeout = 500")
            if not connections[alias].autocommit:
                raw.commit()
    finally:
        cursor.close()
    with side_session(alias) as (admin, vendor):
        _wait_gone(admin, vendor, backend, timeout)
    return backend
