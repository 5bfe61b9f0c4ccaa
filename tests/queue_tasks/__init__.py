"""Task bodies for the task-queue integration tests, shared by the real worker processes.

Every task writes one ``Order`` row, then pushes a report to a Redis list: which process and
thread ran it, which server session (backend id) it used, and freshconn's counters in that
process at that moment. The test reads the reports back; a task that failed reports its error.

Worker processes get everything from the environment (``tests.conftest.subprocess_env`` plus
the variables below); ``FRESHCONN_TEST_INTEGRATION=0`` runs the same worker without freshconn.
"""

from __future__ import annotations

import json
import os
import threading
from typing import Any

REDIS_URL_ENV = "FRESHCONN_TEST_REDIS_URL"
REPORTS_KEY = "freshconn-tests:reports"
PARENT_KEY = "freshconn-tests:parent"

_client: Any = None
_client_lock = threading.Lock()


def setup_django() -> None:
    """For workers that do not set Django up themselves (Dramatiq, RQ, Huey)."""
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.settings")
    import django

    django.setup()


def integration_enabled() -> bool:
    return os.environ.get("FRESHCONN_TEST_INTEGRATION", "1") == "1"


def redis_url() -> str:
    return os.environ.get(REDIS_URL_ENV, "redis://127.0.0.1:1/0")


def redis_client() -> Any:
    """One client per process (redis-py's pool is thread-safe and notices a fork by itself)."""
    global _client
    with _client_lock:
        if _client is None:
            import redis

            _client = redis.Redis.from_url(redis_url())
        return _client


def backend_id(alias: str = "default") -> int | None:
    """The server-side id of this thread's open session on ``alias`` (no query)."""
    from django.db import connections

    from freshconn import _drivers

    raw = connections[alias].connection
    return None if raw is None else _drivers.for_connection(raw).backend_id(raw)


def push(key: str, report: dict[str, Any]) -> None:
    redis_client().rpush(key, json.dumps(report))


def record(ref: str) -> dict[str, Any]:
    """Write one row and report who wrote it, on which session, and the process's counters."""
    import freshconn
    from tests.app.models import Order

    report: dict[str, Any] = {"ref": ref, "pid": os.getpid(), "thread": threading.get_ident()}
    try:
        Order.objects.create(ref=ref)
        report["backend"] = backend_id()
        report["stats"] = freshconn.stats().get("default", {})
    except Exception as exc:
        report["error"] = f"{type(exc).__name__}: {exc}"
        raise
    finally:
        push(REPORTS_KEY, report)
    return report


def parent_session(stage: str) -> None:
    """In a worker's parent process: use (at "init", open) a connection its forked children inherit.

    The session's idle timeout is lifted, so that only a child talking on it could end it.
    """
    from django.db import connection

    report: dict[str, Any] = {"stage": stage, "pid": os.getpid()}
    try:
        with connection.cursor() as cursor:
            if stage == "init":
                if connection.vendor == "mysql":
                    cursor.execute("SET SESSION wait_timeout = 600")
                else:
                    cursor.execute("SET idle_session_timeout = 0")
            cursor.execute("SELECT 1")
            cursor.fetchall()
        report["backend"] = backend_id()
    except Exception as exc:
        report["error"] = f"{type(exc).__name__}: {exc}"
    push(PARENT_KEY, report)
