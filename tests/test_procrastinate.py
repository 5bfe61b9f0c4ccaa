"""freshconn.contrib.procrastinate in a real Procrastinate worker (its Django app) on PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from django.db import connections

from tests.conftest import DRIVER, VENDOR
from tests.queue_tasks.faults import expect_failure_after_idle, run_scenario
from tests.queue_tasks.harness import WorkerProcess, redis_client, redis_server, worker_env

if VENDOR != "postgresql" or DRIVER != "psycopg":
    pytest.skip(
        "Procrastinate runs on PostgreSQL only, and its worker needs psycopg 3 (this run uses " + DRIVER + ")",
        allow_module_level=True,
    )
procrastinate = pytest.importorskip("procrastinate")

__all__ = ["redis_client", "redis_server"]  # fixtures used by the tests below

pytestmark = [pytest.mark.server, pytest.mark.broker, pytest.mark.slow]


def conninfo() -> str:
    s = connections["default"].settings_dict
    return f"host={s['HOST']} port={s['PORT']} dbname={s['NAME']} user={s['USER']} password={s['PASSWORD']}"


@pytest.fixture
def queue(live: None) -> Iterator[Any]:
    """A plain Procrastinate app on the test database, with its schema applied (the producer side)."""
    app = procrastinate.App(connector=procrastinate.SyncPsycopgConnector(conninfo=conninfo()))
    with app.open():
        if "procrastinate_jobs" not in connections["default"].introspection.table_names():
            app.schema_manager.apply_schema()
        yield app


def sender(app: Any, *task_names: str) -> Any:
    def send(refs: list[str]) -> None:
        for i, ref in enumerate(refs):
            app.configure_task(name=task_names[i % len(task_names)]).defer(ref=ref)

    return send


def worker(env: dict[str, str]) -> WorkerProcess:
    # The idle limit goes on Django's sessions only (see procrastinate_tasks), not in OPTIONS.
    env = {
        **env,
        "DJANGO_SETTINGS_MODULE": "tests.procrastinate_settings",
        "FRESHCONN_TEST_DB_OPTIONS": "{}",
        "FRESHCONN_TEST_DJANGO_IDLE_LIMIT": "1",
    }
    return WorkerProcess(
        ["-m", "django", "procrastinate", "worker", "--concurrency", "1", "--delete-jobs", "always"], env
    )


def test_tasks_ride_idle_kill_and_restart_on_persistent_connections(queue, server, redis_server, redis_client):
    """Sync and async tasks: no connect or ping while busy; idle, KILL and a restart cost no task; each applied once."""
    with worker(worker_env(redis_server)) as w:
        phases = run_scenario(sender(queue, "record_sync", "record_async"), redis_client, w, server)
    assert len({r["thread"] for r in phases["busy"]}) == 2


def test_without_freshconn_a_task_fails_after_idle_past_server_timeout(queue, redis_server, redis_client):
    """Contrast: DjangoApp's close_old_connections() alone, persistent connections: the first task after idle fails."""
    with worker(worker_env(redis_server, integration=False)) as w:
        assert len(expect_failure_after_idle(sender(queue, "record_sync"), redis_client, w)) == 1
