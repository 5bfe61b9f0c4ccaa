from django.apps import AppConfig


class WorkerAppConfig(AppConfig):
    """A test app that ships WorkerCommand subclasses, run as real ``manage.py`` subprocesses."""

    name = "tests.workerapp"
    label = "workerapp"
