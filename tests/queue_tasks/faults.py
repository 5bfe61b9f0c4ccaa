"""One fault scenario for every worker integration: busy, idle past the server timeout, KILL, restart.

A real worker process (started by the test) runs ``tests.queue_tasks.record`` for each task: one
``Order`` row with a unique ``ref`` (a task run twice fails its second INSERT) and a report of the
process, thread, server session and freshconn counters. ``run_scenario`` sends batches of tasks
through the framework's real broker and asserts, from the reports and the table:

- busy: 1,000 tasks after a warm-up open no connection and send no ping;
- after idling past the server's idle timeout, after a server-side KILL of the worker's sessions,
  and after a restart of the database server: every task succeeds;
- every task was applied exactly once (row count equals tasks sent).

A ``Contrast`` (the same worker without freshconn, started side by side with its own broker queue
and reports) is fed during the same run: one task before the warm-up, ``after`` tasks once the
idle spell is over; the scenario records their errors. It shares the scenario's start-up and idle
wait instead of paying its own.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from django.db import connections

from tests.conftest import IDLE_PAST_TIMEOUT, VENDOR, admin_connection
from tests.queue_tasks.harness import WorkerProcess, collect, errors, row_count

BUSY = 1000


def restart_server(server: Any) -> None:
    """Restart the database server; PostgreSQL first makes every acknowledged COMMIT durable.

    (The test bed runs PostgreSQL with ``synchronous_commit=off`` and stops it with ``-m immediate``.)
    """
    if VENDOR == "postgresql":
        server.admin_sql("CHECKPOINT")
    server.restart()


def kill_sessions(server: Any, backends: set[int]) -> None:
    """Have the server kill these sessions (KILL / pg_terminate_backend) and wait until they are gone."""
    admin = admin_connection(server)
    try:
        cursor = admin.cursor()
        for backend in backends:
            if VENDOR == "mysql":
                cursor.execute(f"KILL {int(backend)}")
            else:
                cursor.execute("SELECT pg_terminate_backend(%s)", [backend])
        sql = (
            "SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE ID IN ({})"
            if VENDOR == "mysql"
            else "SELECT COUNT(*) FROM pg_stat_activity WHERE pid IN ({})"
        ).format(",".join(str(int(b)) for b in backends))
        deadline = time.monotonic() + 10
        while True:
            cursor.execute(sql)
            if not cursor.fetchone()[0] or time.monotonic() > deadline:
                break
            time.sleep(0.02)
        cursor.close()
    finally:
        admin.close()


def per_pid(reports: list[dict[str, Any]], counter: str) -> dict[int, int]:
    """The highest value of a process-wide counter each process reported."""
    out: dict[int, int] = {}
    for r in reports:
        out[r["pid"]] = max(out.get(r["pid"], 0), r["stats"][counter])
    return out


def close_test_connections() -> None:
    """The test process's own connections died with the restart: drop them before reading the table."""
    for conn in connections.all(initialized_only=True):
        try:
            conn.close()
        except Exception:
            conn.connection = None


@dataclass
class Contrast:
    """A worker without freshconn, fed alongside a scenario (see the module docstring)."""

    send: Callable[[list[str]], None]
    client: Any
    worker: WorkerProcess
    #: Tasks sent after the idle spell, one after the other.
    after: int = 1
    #: The error each of them reported (None: it succeeded).
    errors: list[str | None] = field(default_factory=list)
    rows: int = 0

    def one(self, ref: str) -> str | None:
        self.send([ref])
        (report,) = collect(self.client, 1, self.worker)
        if "error" not in report:
            self.rows += 1
        error: str | None = report.get("error")
        return error


def run_scenario(
    send: Callable[[list[str]], None],
    client: Any,
    worker: WorkerProcess,
    server: Any,
    *,
    busy: int = BUSY,
    warm: int = 4,
    contrast: Contrast | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """Run the phases (see the module docstring) through ``send(refs)``; return the reports by phase."""
    phases: dict[str, list[dict[str, Any]]] = {}

    def batch(name: str, n: int) -> list[dict[str, Any]]:
        refs = [f"{name}-{i}" for i in range(n)]
        send(refs)
        got = collect(client, n, worker, timeout=120)
        phases[name] = got
        assert errors(got) == [], (name, errors(got)[:5], worker.output())
        return got

    if contrast is not None:
        # First: waiting for the contrast worker to start must not idle the scenario's connections.
        assert contrast.one("plain-warm") is None, contrast.worker.output()
    warmed = batch("warm", warm)
    busy_reports = batch("busy", busy)
    for counter in ("connects", "pings"):
        before, after = per_pid(warmed, counter), per_pid(busy_reports, counter)
        moved = {pid: after[pid] - before.get(pid, 0) for pid in after}
        # On failure: which busy task saw the counter move, and why (a connection discarded meanwhile?).
        first = next((r for r in busy_reports if r["stats"][counter] > before.get(r["pid"], 0)), None)
        assert moved == dict.fromkeys(after, 0), (counter, moved, first)
    time.sleep(IDLE_PAST_TIMEOUT)
    if contrast is not None:
        contrast.errors = [contrast.one(f"plain-after-idle-{i}") for i in range(contrast.after)]
    idle = batch("idle", warm)
    # Dropped without an error: by the idle limit freshconn read from the session, or by its closed socket.
    idle_drops, dead_drops = per_pid(idle, "discarded_server_idle"), per_pid(idle, "discarded_dead")
    assert max(idle_drops[pid] + dead_drops[pid] for pid in idle_drops) >= 1, [r["stats"] for r in idle]
    kill_sessions(server, {r["backend"] for r in idle})
    batch("kill", warm)
    restart_server(server)
    batch("restart", warm)
    close_test_connections()
    assert row_count() == sum(len(v) for v in phases.values()) + (contrast.rows if contrast else 0)
    return phases
