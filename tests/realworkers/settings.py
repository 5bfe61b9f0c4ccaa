"""Settings of the real worker processes: the test settings, the framework's app, freshconn adopted or not.

Environment (set by tests/test_adopt_real.py): FRESHCONN_TEST_FRAMEWORK (db_worker, qcluster,
dramatiq, huey), FRESHCONN_TEST_ADOPT ("1": ``FRESHCONN = {"ADOPT_CLOSE_OLD_CONNECTIONS": True}``,
else no FRESHCONN setting), FRESHCONN_TEST_CONN_MAX_AGE ("none" or seconds; default Django's own
0), FRESHCONN_TEST_REDIS_URL for the Redis-backed frameworks.
"""

import os

from tests import realworkers
from tests.settings import *  # noqa: F403
from tests.settings import DATABASES, INSTALLED_APPS

FRAMEWORK = os.environ.get("FRESHCONN_TEST_FRAMEWORK", "")
REDIS_URL = os.environ.get("FRESHCONN_TEST_REDIS_URL", "redis://127.0.0.1:1/0")

_APPS = {"dramatiq": "django_dramatiq", "huey": "huey.contrib.djhuey", **realworkers.DB_APPS}
INSTALLED_APPS = [*INSTALLED_APPS, "tests.realworkers", *([_APPS[FRAMEWORK]] if FRAMEWORK in _APPS else [])]
# Only for their own framework: Django 6 fails its system checks on a TASKS backend whose app is not installed.
if FRAMEWORK == "qcluster":
    Q_CLUSTER = realworkers.Q_CLUSTER
if FRAMEWORK == "db_worker":
    TASKS = realworkers.TASKS

_max_age = os.environ.get("FRESHCONN_TEST_CONN_MAX_AGE", "0")
DATABASES["default"]["CONN_MAX_AGE"] = None if _max_age == "none" else int(_max_age)

if os.environ.get("FRESHCONN_TEST_ADOPT") == "1":
    FRESHCONN = {"ADOPT_CLOSE_OLD_CONNECTIONS": True}

# What a project using django_dramatiq writes: the stock middleware plus its DbConnectionsMiddleware.
DRAMATIQ_BROKER = {
    "BROKER": "dramatiq.brokers.redis.RedisBroker",
    "OPTIONS": {"url": REDIS_URL},
    "MIDDLEWARE": [
        "dramatiq.middleware.AgeLimit",
        "dramatiq.middleware.TimeLimit",
        "dramatiq.middleware.Callbacks",
        "dramatiq.middleware.Retries",
        "django_dramatiq.middleware.DbConnectionsMiddleware",
    ],
}

# What a project using huey.contrib.djhuey writes; tasks are @db_task (close_old_connections around each).
HUEY = {
    "huey_class": "huey.RedisHuey",
    "name": "freshconn-real",
    "url": REDIS_URL,
    "immediate": False,
    "results": False,
    "consumer": {"workers": 1, "worker_type": "thread"},
}
