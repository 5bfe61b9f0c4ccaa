"""Real third-party workers, run as real processes, for tests/test_adopt_real.py.

Each worker (django-tasks-db's ``db_worker``, Django-Q2's ``qcluster``, Dramatiq through
django_dramatiq's ``rundramatiq``, huey's ``run_huey``) loads ``tests.realworkers.settings``: the
test settings, the framework's own app, and either ``FRESHCONN = {"ADOPT_CLOSE_OLD_CONNECTIONS":
True}`` or no FRESHCONN at all. No freshconn integration is installed: the framework's own
``close_old_connections()`` calls are all freshconn gets.

Every task calls ``record(key)``: one ``Order`` row keyed by the task's key (UNIQUE, so a task run
twice fails loudly), then one line in the events file, ``error`` included when it failed. Every
process of the worker writes its freshconn counters to the stats folder ten times a second (see
``apps.py``), so the test reads the counters of every process the framework runs.
"""

from __future__ import annotations

import json
import os
from typing import Any

#: The frameworks whose queue or results live in the database: their apps (and these settings) are
#: installed in the worker processes and, for tests/test_adopt_real.py only, in the test process, whose
#: test database then gets their tables. Not in tests/settings.py: their models' system checks would
#: run (and query every database) in every test that runs ``manage.py check``.
#: Django-Q2 with its ORM broker: one worker, never recycled (its default restarts a worker process
#: every 500 tasks, which opens a new connection), no scheduler (it queries every 30 s), bulk fetches.
Q_CLUSTER = {
    "name": "freshconn-tests",
    "orm": "default",
    "workers": 1,
    "recycle": 1_000_000,
    "timeout": 30,
    "retry": 60,
    "max_attempts": 1,
    "save_limit": 0,
    "scheduler": False,
    "catch_up": False,
    "poll": 0.1,
    "bulk": 20,
    "log_level": "WARNING",
}
#: django-tasks-db: the database backend of Django >= 6.0's django.tasks.
TASKS = {"default": {"BACKEND": "django_tasks_db.DatabaseBackend"}}
DB_APPS = {"qcluster": "django_q", "db_worker": "django_tasks_db"}

EVENTS_ENV = "FRESHCONN_TEST_EVENTS"
STATS_DIR_ENV = "FRESHCONN_TEST_STATS_DIR"
FRAMEWORK_ENV = "FRESHCONN_TEST_FRAMEWORK"


def framework() -> str:
    return os.environ.get(FRAMEWORK_ENV, "")


def record(key: str) -> None:
    """The body of every task: one row keyed by ``key``, then one event line (with the error, if any)."""
    from tests.app.models import Order

    event: dict[str, Any] = {"key": key, "pid": os.getpid()}
    try:
        Order.objects.create(ref=key)
    except Exception as exc:
        event["error"] = f"{type(exc).__name__}: {exc}"
        raise
    finally:
        _append(event)


def _append(event: dict[str, Any]) -> None:
    path = os.environ.get(EVENTS_ENV)
    if not path:
        return
    # One write() on an O_APPEND descriptor: lines from concurrent processes never interleave.
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (json.dumps(event) + "\n").encode())
    finally:
        os.close(fd)
