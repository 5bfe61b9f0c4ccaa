"""Test settings: one real server-backed alias chosen by FRESHCONN_TEST_DRIVER, plus a SQLite alias.

A process can load only one MySQL driver (PyMySQL installs itself as MySQLdb) and one PostgreSQL
driver (Django prefers psycopg 3 when importable), so each driver runs in its own pytest process.
HOST and PORT are filled in by tests/conftest.py once it has started the throwaway server.
"""

import importlib.util
import json
import os
import sys

import django

DRIVER = os.environ.get("FRESHCONN_TEST_DRIVER", "mysqlclient")
DRIVERS = ("mysqlclient", "pymysql", "psycopg", "psycopg2")
if DRIVER not in DRIVERS:
    raise RuntimeError(f"FRESHCONN_TEST_DRIVER must be one of {DRIVERS}, got {DRIVER!r}")

if DRIVER == "pymysql":
    import pymysql

    pymysql.install_as_MySQLdb()
elif DRIVER == "psycopg2":
    sys.modules["psycopg"] = None  # type: ignore[assignment]  # makes Django fall back to psycopg2

VENDOR = "mysql" if DRIVER in ("mysqlclient", "pymysql") else "postgresql"

SECRET_KEY = "tests-only"
USE_TZ = True
INSTALLED_APPS = ["freshconn", "tests.app", "tests.workerapp"]
DATABASES = {
    "default": {
        "ENGINE": f"django.db.backends.{VENDOR}",
        # Subprocesses (real worker processes in integration tests) inherit these from conftest.
        "NAME": os.environ.get("FRESHCONN_TEST_DB_NAME", "freshconn"),
        "USER": "app",
        "PASSWORD": "app-secret-pw",
        "HOST": "127.0.0.1",
        "PORT": os.environ.get("FRESHCONN_TEST_DB_PORT", "0"),
        "CONN_MAX_AGE": None,
        # Real worker subprocesses get per-test OPTIONS (e.g. a short server idle timeout) as JSON.
        "OPTIONS": json.loads(os.environ.get("FRESHCONN_TEST_DB_OPTIONS", "{}")),
    },
    "lite": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:", "TEST": {"DEPENDENCIES": []}},
}
LOGGING_CONFIG = None

# Real third-party workers (tests/test_adopt_real.py) keep their queues and results in the database:
# their apps are installed here, when the package is, so that their tables exist in the test database.
# Django-Q2 with its ORM broker: one worker, never recycled (its default restarts a worker process
# every 500 tasks, which would open a new connection), no scheduler (it queries every 30 s).
if importlib.util.find_spec("django_q") is not None:
    INSTALLED_APPS.append("django_q")
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
# django-tasks-db is the database backend of Django >= 6.0's django.tasks (older series: skipped).
if django.VERSION >= (6, 0) and importlib.util.find_spec("django_tasks_db") is not None:
    INSTALLED_APPS.append("django_tasks_db")
    TASKS = {"default": {"BACKEND": "django_tasks_db.DatabaseBackend"}}
