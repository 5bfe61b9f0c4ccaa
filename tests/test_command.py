"""freshconn.WorkerCommand as a real ``manage.py`` subprocess: graceful stop, commit, no connection left."""

from __future__ import annotations

import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from django.core.management import call_command
from django.db import connections
from testbed.servers import DBServer

import freshconn
from freshconn.command import policy_summary
from tests.app.models import Order
from tests.conftest import DRIVER_NAME, ROOT, VENDOR, subprocess_env
from tests.test_threads import app_connections, baseline

pytestmark = pytest.mark.server

PASSWORD = "app-secret-pw"


def abandoned_sessions(server: DBServer) -> int:
    """Sessions the server saw end without a proper close from the client (the process just vanished)."""
    if VENDOR == "mysql":
        return int(server.admin_sql("SHOW GLOBAL STATUS LIKE 'Aborted_clients'").split()[1])
    name = connections["default"].settings_dict["NAME"]
    return int(server.admin_sql(f"SELECT sessions_abandoned FROM pg_stat_database WHERE datname = '{name}'").strip())


def settle(read: Callable[[], int], expected: int, timeout: float = 10.0) -> int:
    deadline = time.monotonic() + timeout
    value = read()
    while value != expected and time.monotonic() < deadline:
        time.sleep(0.05)
        value = read()
    return value


class Worker:
    """A ``python -m django <command>`` subprocess whose stdout lines can be awaited."""

    def __init__(self, *argv: str, env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "django", *argv],
            cwd=ROOT,
            env=env or subprocess_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.out: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))

    def wait_for(self, marker: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.1)
            except queue.Empty:
                if self.proc.poll() is not None:
                    break
                continue
            self.out.append(line)
            if marker in line:
                return
        raise AssertionError(f"{marker!r} never printed; stdout so far: {self.out}; stderr: {self.stderr()}")

    def finish(self, timeout: float = 30.0) -> int:
        code = self.proc.wait(timeout)
        self.reader.join(5)
        while not self.lines.empty():
            self.out.append(self.lines.get())
        return code

    def stderr(self) -> str:
        if self.proc.poll() is None or self.proc.stderr is None:
            return "(running)"
        return self.proc.stderr.read()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


@pytest.fixture
def worker(live: None) -> Iterator[Callable[..., Worker]]:
    made: list[Worker] = []

    def make(*argv: str) -> Worker:
        made.append(Worker(*argv))
        return made[-1]

    yield make
    for w in made:
        w.close()


def rows() -> list[str]:
    return sorted(Order.objects.values_list("ref", flat=True))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_stop_signal_lets_the_current_unit_finish_and_commit_then_exits_0(
    sig: signal.Signals, worker: Callable[..., Worker], server: DBServer
) -> None:
    """A stop signal during a slow unit: that unit commits, no other message starts, exit 0, no connection left."""
    before = baseline(server)
    abandoned = abandoned_sessions(server)
    w = worker("fc_slow_worker", "w1", "w2", "w3", "--pause", "1.5")
    w.wait_for("UNIT-STARTED w1")
    w.proc.send_signal(sig)
    w.wait_for("STOP-SEEN w1")  # the signal landed while the unit was running
    assert w.finish() == 0, w.stderr()
    assert any("stopped: the last unit finished" in line for line in w.out), w.out
    assert settle(lambda: app_connections(server), before) == before
    # Closed by the command itself (a clean protocol goodbye), not dropped by the dying process.
    assert abandoned_sessions(server) == abandoned
    assert rows() == ["w1-end", "w1-start"]


def test_a_message_fetched_after_sigterm_is_never_started(worker: Callable[..., Worker]) -> None:
    """SIGTERM while the source blocks in next(): what it then returns goes to message_not_started(), exit 0."""
    w = worker("fc_blocking_worker")
    w.wait_for("SOURCE-BLOCKING")
    w.proc.send_signal(signal.SIGTERM)
    assert w.finish() == 0, w.stderr()
    assert "HANDLED first" in w.out
    assert "NOT-STARTED late" in w.out
    assert "HANDLED late" not in w.out
    assert rows() == ["first"]


def test_a_second_signal_stops_at_once_and_the_open_transaction_rolls_back(worker: Callable[..., Worker]) -> None:
    """A second stop signal aborts the unit in progress (exit 128 + signal) and its transaction is rolled back."""
    w = worker("fc_slow_worker", "w1", "--pause", "30")
    w.wait_for("UNIT-STARTED w1")
    w.proc.send_signal(signal.SIGTERM)
    w.wait_for("STOP-SEEN w1")  # the first signal only asked; now insist
    w.proc.send_signal(signal.SIGTERM)
    assert w.finish() == 128 + signal.SIGTERM
    assert rows() == []


def test_start_up_line_shows_the_effective_policy_without_credentials(worker: Callable[..., Worker]) -> None:
    """The command starts by printing CHECK_AFTER_IDLE, CONN_MAX_AGE and the driver per alias, never a password."""
    w = worker("fc_slow_worker", "w1", "--pause", "0")
    assert w.finish() == 0, w.stderr()
    head = w.out[0]
    assert head.startswith("freshconn policy: CHECK_AFTER_IDLE=5s, RECONNECT_TIMEOUT=60s;")
    assert f"default: {VENDOR} via {DRIVER_NAME} " in head
    assert "CONN_MAX_AGE=1800s" in head
    assert PASSWORD not in "\n".join(w.out) + w.stderr()
    assert rows() == ["w1-end", "w1-start"]


def test_abandoned_session_counter_sees_a_process_that_exits_without_closing(live: None, server: DBServer) -> None:
    """The 'no connection left' check can fail: a process that exits without closing is counted as abandoned."""
    abandoned = abandoned_sessions(server)
    code = (
        "import os, django; django.setup(); from django.db import connection; "
        "connection.ensure_connection(); os._exit(0)"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=subprocess_env(), check=True, timeout=60)
    assert settle(lambda: abandoned_sessions(server), abandoned + 1) == abandoned + 1


def test_in_process_run_uses_one_unit_per_message(live: None) -> None:
    """Called in-process (not the main thread's signals), each message is one unit and connections are closed after."""
    freshconn.reset_stats()
    done: list[BaseException] = []

    def run() -> None:
        try:
            call_command("fc_slow_worker", "a", "b", "--pause", "0", verbosity=0)
        except BaseException as exc:
            done.append(exc)

    t = threading.Thread(target=run)
    t.start()
    t.join(30)
    assert done == []
    assert rows() == ["a-end", "a-start", "b-end", "b-start"]
    assert freshconn.stats()["default"]["units"] == 2


def test_policy_summary_names_each_alias_and_never_a_password() -> None:
    """policy_summary() lists every alias with its vendor, driver and effective lifetime, and no credential."""
    line = policy_summary()
    assert "default:" in line
    assert "lite: sqlite via sqlite3" in line
    assert PASSWORD not in line
