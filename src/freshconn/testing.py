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


def _admin(alias: str) -> Any:
    """A second raw session with the alias's settings; it bypasses connection_created, so stats stay true."""
    wrapper = connections.create_connection(alias)
    raw = wrapper.get_new_connection(wrapper.get_connection_params())
    if wrapper.vendor == "mysql":
        raw.autocommit(True)
    else:
        raw.autocommit = True
    return raw


def _exists(admin: Any, vendor: str, backend: int) -> bool:
    sql = (
        "SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE ID = %s"
        if vendor == "mysql"
        else "SELECT COUNT(*) FROM pg_stat_activity WHERE pid = %s"
    )
    cursor = admin.cursor()
    try:
        cursor.execute(sql, [backend])
        return bool(cursor.fetchone()[0])
    finally:
        cursor.close()


def _wait_gone(admin: Any, vendor: str, backend: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while _exists(admin, vendor, backend):
        if time.monotonic() > deadline:
            raise TimeoutError(f"the server still shows session {backend} after {timeout:g}s")
        time.sleep(0.02)


def kill_connection(alias: str = "default", timeout: float = 10.0) -> int:
    """Have the server kill this thread's connection on ``alias``; return the killed session's id."""
    _, driver, backend = _victim(alias)
    admin = _admin(alias)
    try:
        cursor = admin.cursor()
        try:
            if driver.vendor == "mysql":
                cursor.execute(f"KILL {int(backend)}")
            else:
                cursor.execute("SELECT pg_terminate_backend(%s)", [backend])
        finally:
            cursor.close()
        _wait_gone(admin, driver.vendor, backend, timeout)
    finally:
        admin.close()
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
    admin = _admin(alias)
    try:
        _wait_gone(admin, driver.vendor, backend, timeout)
    finally:
        admin.close()
    return backend
