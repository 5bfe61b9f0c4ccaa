"""Test settings: one real server-backed alias chosen by FRESHCONN_TEST_DRIVER, plus a SQLite alias.

A process can load only one MySQL driver (PyMySQL installs itself as MySQLdb) and one PostgreSQL
driver (Django prefers psycopg 3 when importable), so each driver runs in its own pytest process.
HOST and PORT are filled in by tests/conftest.py once it has started the throwaway server.
"""

import json
import os
import sys

DRIVER = os.environ.get("FRESHCONN_TEST_DRIVER", "mysqlclient")
DRIVERS = ("mysqlclient", "pymysql", "mysqlconnector", "psycopg", "psycopg2")
if DRIVER not in DRIVERS:
    raise RuntimeError(f"FRESHCONN_TEST_DRIVER must be one of {DRIVERS}, got {DRIVER!r}")

if DRIVER == "pymysql":
    import pymysql

    pymysql.install_as_MySQLdb()
elif DRIVER == "psycopg2":
    sys.modules["psycopg"] = None  # type: ignore[assignment]  # makes Django fall back to psycopg2

VENDOR = "mysql" if DRIVER in ("mysqlclient", "pymysql", "mysqlconnector") else "postgresql"
# mysql-connector-python ships its own Django engine; the others use Django's.
ENGINE = "mysql.connector.django" if DRIVER == "mysqlconnector" else f"django.db.backends.{VENDOR}"
if DRIVER == "mysqlconnector":
    import testbed.servers

    testbed.servers.ENGINES["mysql"] = ENGINE  # every alias a test builds on a test-bed server too

SECRET_KEY = "tests-only"
USE_TZ = True
INSTALLED_APPS = ["freshconn", "tests.app", "tests.workerapp"]
DATABASES = {
    "default": {
        "ENGINE": ENGINE,
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
