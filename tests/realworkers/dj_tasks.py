"""The task of django-tasks-db's ``db_worker`` (Django >= 6.0's ``django.tasks``)."""

from __future__ import annotations

from django.tasks import task

from tests.realworkers import record


@task()
def record_task(key: str) -> None:
    record(key)
