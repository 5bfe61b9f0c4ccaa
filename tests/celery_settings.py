"""Settings of the Celery worker and beat subprocesses with django-celery-results and django-celery-beat."""

from tests.settings import *  # noqa: F403

INSTALLED_APPS = [*INSTALLED_APPS, "django_celery_results", "django_celery_beat"]  # noqa: F405
