"""Settings of the demo project: one MariaDB alias (mysqlclient) with persistent connections.

``python -m demo`` starts the servers and passes their ports in the environment.
"""

import os

from testbed.servers import APP_PASSWORD, APP_USER, DB_NAME

SECRET_KEY = "demo-only-not-secret"
USE_TZ = True
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
INSTALLED_APPS = ["freshconn", "demo.orders"]

DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.mysql",  # mysqlclient (MySQLdb)
        "NAME": DB_NAME,
        "USER": APP_USER,
        "PASSWORD": APP_PASSWORD,
        "HOST": "127.0.0.1",
        "PORT": os.environ.get("DEMO_DB_PORT", "3306"),
        # Persistent connections, as most workers run: the worker keeps one connection for its whole life.
        "CONN_MAX_AGE": None,
    }
}

# Idle connections younger than this are reused without a round trip; freshconn reads the
# server's own idle limit (wait_timeout) when it connects and discards older ones unpinged.
FRESHCONN = {"CHECK_AFTER_IDLE": 5.0}

KAFKA_BOOTSTRAP = os.environ.get("DEMO_KAFKA_BOOTSTRAP", "127.0.0.1:9092")
REDIS_URL = os.environ.get("DEMO_REDIS_URL", "redis://127.0.0.1:6379/0")

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(name)s %(levelname)s %(message)s"}},
    "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "loggers": {
        "demo": {"handlers": ["stderr"], "level": "INFO"},
        "freshconn": {"handlers": ["stderr"], "level": "INFO"},
    },
}
