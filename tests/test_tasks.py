"""freshconn.contrib.tasks with Django's own tasks framework (django.tasks, or the django_tasks backport)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest
from django.db import connections
from testbed.servers import DBServer

from freshconn.contrib import tasks as fc_tasks
from freshconn.testing import kill_connection
from tests.app.models import Order
from tests.conftest import IDLE_PAST_TIMEOUT, VENDOR, counters

try:
    from django.tasks import TaskResultStatus, task
except ImportError:  # Django < 6.0: the backport
    tasks_backport = pytest.importorskip("django_tasks")
    # mypy reads both imports (django-stubs has django.tasks); only one runs.
    from django_tasks import TaskResultStatus, task  # type: ignore[no-redef]

if TYPE_CHECKING:
    from django.tasks import TaskResult  # for annotations only: Django < 6.0 runs the backport

pytestmark = [pytest.mark.server]


@task()
def record_order(ref: str) -> int:
    pk: int = Order.objects.create(ref=ref).pk
    return pk


@task()
def killer(ref: str) -> None:
    Order.objects.create(ref=ref)
    kill_connection()
    Order.objects.count()  # the connection is gone: a disconnect error


@pytest.fixture
def installed() -> Iterator[None]:
    fc_tasks.install()
    try:
        yield
    finally:
        fc_tasks.uninstall()


def restart(server: DBServer) -> None:
    """Restart the database server; PostgreSQL first makes every acknowledged COMMIT durable."""
    if VENDOR == "postgresql":
        server.admin_sql("CHECKPOINT")
    server.restart()


def run(ref: str) -> TaskResult[[str], int]:
    return record_order.enqueue(ref)


@pytest.mark.slow
def test_every_task_is_a_unit_across_idle_kill_and_restart(
    short_timeout: int, installed: None, server: DBServer
) -> None:
    """ImmediateBackend tasks in a loop survive idle past the server timeout, KILL and a restart, each applied once."""
    assert run("warm").status == TaskResultStatus.SUCCESSFUL
    before = counters()
    results = [run(f"busy-{i}") for i in range(1000)]
    busy = counters()
    assert {r.status for r in results} == {TaskResultStatus.SUCCESSFUL}
    assert busy["units"] - before["units"] == 1000
    assert busy["connects"] - before["connects"] == 0
    assert busy["pings"] - before["pings"] == 0

    time.sleep(IDLE_PAST_TIMEOUT)
    assert run("idle").status == TaskResultStatus.SUCCESSFUL
    assert counters()["discarded_server_idle"] == 1

    kill_connection()
    assert run("killed").status == TaskResultStatus.SUCCESSFUL
    restart(server)
    assert run("restarted").status == TaskResultStatus.SUCCESSFUL
    c = counters()
    assert c["discarded_dead"] == 2
    assert c["discarded_error"] == 0
    assert Order.objects.count() == 1004
    assert Order.objects.filter(ref__in=["idle", "killed", "restarted"]).count() == 3


def test_a_disconnect_inside_a_task_drops_the_connection_at_its_end(live: None, installed: None) -> None:
    """A task whose connection is killed under it fails once; its unit's end discards the connection, the next runs."""
    assert killer.enqueue("k").status == TaskResultStatus.FAILED
    assert counters()["discarded_error"] == 1
    assert connections["default"].connection is None
    assert run("after").status == TaskResultStatus.SUCCESSFUL
    assert sorted(Order.objects.values_list("ref", flat=True)) == ["after", "k"]


def test_a_task_that_never_finished_has_its_unit_ended_by_the_next(live: None, installed: None) -> None:
    """A task_started with no task_finished (an interrupted worker) does not leave this thread inside a stale unit."""
    signals = fc_tasks._signals()
    result = run("first")
    signals.task_started.send(sender=type(record_order.get_backend()), task_result=result)  # never finished
    assert run("second").status == TaskResultStatus.SUCCESSFUL
    # The stale unit and the second task's were real units (a nested one would not count).
    assert counters()["units"] == 3
    assert counters()["abandoned_units"] == 0


@pytest.mark.slow
def test_without_freshconn_a_task_fails_after_idle_past_server_timeout(short_timeout: int) -> None:
    """Contrast: without install(), the first task after the server's idle timeout fails on the dead connection."""
    assert run("warm").status == TaskResultStatus.SUCCESSFUL
    time.sleep(IDLE_PAST_TIMEOUT)
    assert run("idle").status == TaskResultStatus.FAILED
