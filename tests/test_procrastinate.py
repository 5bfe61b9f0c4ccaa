"""freshconn.contrib.procrastinate in a real Procrastinate worker (its Django app) on PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from django.db import connections
from testbed.redis import Redis
from testbed.servers import DBServer

from tests.conftest import DRIVER, VENDOR
from tests.queue_tasks.faults import Contrast, run_scenario
from tests.queue_tasks.harness import (
    WorkerProcess,
    redis_client,
    redis_db_client,
    redis_server,
    side_by_side,
    worker_env,
)

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


def sender(app: Any, *task_names: str, queue: str = "default") -> Any:
    """Defer jobs through a pool of its own each time (one left over a server restart would wait out its backoff)."""

    def send(refs: list[str]) -> None:
        with app.replace_connector(procrastinate.SyncPsycopgConnector(conninfo=conninfo(), min_size=1)) as fresh:
            fresh.open()
            try:
                # Small batches, one insert per task name each: the kinds stay interleaved (a thread
                # whose tasks all came last would idle past the server's timeout in the busy phase).
                for start in range(0, len(refs), 20):
                    chunk = refs[start : start + 20]
                    for k, name in enumerate(task_names):
                        if mine := chunk[k :: len(task_names)]:
                            fresh.configure_task(name=name, queue=queue).batch_defer(*({"ref": r} for r in mine))
            finally:
                fresh.close()

    return send


def worker(env: dict[str, str], queue: str = "default") -> WorkerProcess:
    # The idle limit goes on Django's sessions only (see procrastinate_tasks), not in OPTIONS.
    env = {
        **env,
        "DJANGO_SETTINGS_MODULE": "tests.procrastinate_settings",
        "FRESHCONN_TEST_DB_OPTIONS": "{}",
        "FRESHCONN_TEST_DJANGO_IDLE_LIMIT": "1",
    }
    return WorkerProcess(
        [
            "-m",
            "django",
            "procrastinate",
            "worker",
            "--queues",
            queue,
            "--concurrency",
            "1",
            # Jobs deferred while its LISTEN connection reconnects (server restart) are polled for soon.
            "--fetch-job-polling-interval",
            "0.5",
            "--delete-jobs",
            "always",
        ],
        env,
    )


def test_tasks_ride_idle_kill_and_restart_on_persistent_connections(
    queue: Any, server: DBServer, redis_server: Redis, redis_client: Any
) -> None:
    """Sync and async tasks ride idle, KILL and a restart with no connect or ping while busy; DjangoApp's fails once."""
    scenario, plain = worker_env(redis_server), worker_env(redis_server, integration=False, db=1)
    with side_by_side(worker(scenario), worker(plain, queue="plain")) as (w, p):
        contrast = Contrast(sender(queue, "record_sync", queue="plain"), redis_db_client(redis_server, 1), p, after=2)
        phases = run_scenario(sender(queue, "record_sync", "record_async"), redis_client, w, server, contrast=contrast)
    assert len({r["thread"] for r in phases["busy"]}) == 2
    # DjangoApp's close_old_connections() alone, persistent connections: the first task after the idle
    # spell fails on the dead connection; the next one reconnects.
    assert [bool(e) for e in contrast.errors] == [True, False], contrast.errors
