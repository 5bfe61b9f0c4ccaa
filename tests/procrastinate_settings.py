"""Settings of the Procrastinate worker subprocess: the test settings plus Procrastinate's Django app."""

import os

from tests.settings import *  # noqa: F403

INSTALLED_APPS = [*INSTALLED_APPS, "procrastinate.contrib.django"]  # noqa: F405
PROCRASTINATE_AUTODISCOVER_MODULE_NAME = ""
PROCRASTINATE_IMPORT_PATHS = ["tests.queue_tasks.procrastinate_tasks"]
if os.environ.get("FRESHCONN_TEST_INTEGRATION", "1") == "1":
    PROCRASTINATE_ON_APP_READY = "freshconn.contrib.procrastinate.on_app_ready"
