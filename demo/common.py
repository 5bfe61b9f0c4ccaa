"""What the demo's runners share: the orchestration around them, the worker subprocess, the report's pieces.

``run_demo()`` starts a MariaDB whose ``wait_timeout`` is a few seconds and the runner's own server
(a Kafka-protocol broker for ``demo.run``, a Redis for ``demo.rq_run``), runs each of the runner's
modes, prints its report and the verdict, and stops everything it started, also on a signal. A
runner is a subclass of ``Run``: what it adds is its server, its steps, its checks and its report.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any, ClassVar, Generic, Protocol, TypeVar

from testbed.servers import DB_NAME, MariaDB

ROOT = Path(__file__).resolve().parent.parent
MANAGE = ROOT / "demo" / "manage.py"

Result = dict[str, Any]


class DemoError(Exception):
    """The demo could not run (a server, the consumer or Kafka misbehaved): not a verdict on freshconn."""


class Sidecar(Protocol):
    """The server a runner starts next to the MariaDB (``testbed``'s ``Tansu`` or ``Redis``)."""

    tmp: str
    proc: subprocess.Popen[bytes] | None

    def start(self) -> None: ...

    def stop(self) -> None: ...


S = TypeVar("S", bound=Sidecar)


def say(text: str = "") -> None:
    print(text, flush=True)


def wait_for(what: str, check: Callable[[], bool], timeout: float, alive: Callable[[], None]) -> float:
    """Poll ``check`` until true; return the seconds it took. ``alive`` raises if the consumer died."""
    start = time.monotonic()
    while not check():
        alive()
        if time.monotonic() - start > timeout:
            raise DemoError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.1)
    return time.monotonic() - start


def demo_env(db: MariaDB, **extra: str) -> dict[str, str]:
    """The environment of the demo project's processes (manage.py): settings, ports, import path."""
    env = dict(os.environ)
    env.update(
        DJANGO_SETTINGS_MODULE="demo.settings",
        DEMO_DB_PORT=str(db.port),
        PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), str(ROOT / "src"), os.environ.get("PYTHONPATH")) if p),
        **extra,
    )
    return env


def count_rows(db: MariaDB) -> dict[str, int]:
    """Rows of the orders table per batch, counted by the server (root session, not the app's)."""
    sql = f"SELECT batch, COUNT(*), COUNT(DISTINCT ref) FROM {DB_NAME}.orders_order GROUP BY batch"
    out = db.admin_sql(sql)
    counts: dict[str, int] = {"total": 0, "distinct_refs": 0, "1": 0, "2": 0}
    for line in out.splitlines():
        batch, count, distinct = line.split("\t")
        counts[batch] = int(count)
        counts["total"] += int(count)
        counts["distinct_refs"] += int(distinct)
    return counts


def migrate(env: dict[str, str]) -> None:
    done = subprocess.run(
        [sys.executable, str(MANAGE), "migrate", "--verbosity", "0"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode:
        raise DemoError(f"manage.py migrate failed:\n{done.stderr[-2000:]}")


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def ignore_signals() -> None:
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)


def tail(path: str, lines: int = 15) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return ""


class WorkerProcess:
    """One ``manage.py consume_orders`` subprocess: its log, whether it is alive, its SIGTERM stop, its summary."""

    def __init__(self, noun: str, key: str, args: list[str], env: dict[str, str], log_path: str) -> None:
        self.noun = noun
        self.key = key
        self.log_path = log_path
        with open(log_path, "wb") as log:
            # Its own session: a Ctrl-C reaches only this orchestrator, which then stops the worker.
            self.proc = subprocess.Popen(
                [sys.executable, str(MANAGE), "consume_orders", *args],
                env=env,
                stdout=subprocess.PIPE,
                stderr=log,
                cwd=ROOT,
                start_new_session=True,
            )

    def alive(self) -> None:
        if self.proc.poll() is not None:
            raise DemoError(
                f"the {self.key} {self.noun} exited early (code {self.proc.returncode}):\n{tail(self.log_path)}"
            )

    def stop(self) -> bytes:
        """SIGTERM, then what it printed until it exited."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            out, _ = self.proc.communicate(timeout=20)
        except subprocess.TimeoutExpired as exc:
            raise DemoError(f"the {self.key} {self.noun} did not stop within 20 s of SIGTERM") from exc
        return out

    def close(self) -> None:
        """Kill it if it is still running (the run failed half-way), and close its pipe."""
        stop_process(self.proc)
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    def summary(self, out: bytes) -> Result:
        """The JSON summary it printed last, on its way out."""
        lines = out.decode(errors="replace").strip().splitlines()
        try:
            summary: Result = json.loads(lines[-1])
        except (IndexError, ValueError) as exc:
            raise DemoError(f"the {self.key} {self.noun} printed no summary:\n{tail(self.log_path)}") from exc
        say(f"[{self.key}] {self.noun} stopped with SIGTERM, exit code {self.proc.returncode}")
        return summary


def freshconn_cell(stats: dict[str, int], used: bool) -> str:
    """A worker's ``freshconn.stats()`` for the report's table."""
    if not used:
        return f"(not used; connects={stats.get('connects', 0)})"
    reasons = ", ".join(f"{k[len('discarded_') :]}={v}" for k, v in stats.items() if k.startswith("discarded_") and v)
    return (
        f"units={stats.get('units', 0)} pings={stats.get('pings', 0)} connects={stats.get('connects', 0)} "
        f"discarded={stats.get('discarded', 0)}" + (f" ({reasons})" if reasons else "")
    )


def error_lines(who: str, first_label: str, then_label: str, first: str | None, texts: dict[str, int]) -> None:
    """The first error a run met, then how many of each it met after it."""
    if not first:
        return
    say(f"{who}, {first_label}{first}")
    later = dict(texts)
    later[first] -= 1
    for text, count in later.items():
        if count:
            say(f"{who}, {then_label}{count} x {'the same' if text == first else text}")


class Run(Generic[S]):
    """The servers and settings shared by a runner's modes; a subclass adds its steps, checks and report."""

    #: What runs the jobs ("consumer", "worker"): in messages, and the keys of each mode's result.
    noun: ClassVar[str]
    #: What a signal stopped, besides the servers.
    stopped: ClassVar[str]
    #: The keys of the modes in the results, in the order they run.
    keys: ClassVar[tuple[str, ...]]

    def __init__(self, db: MariaDB, server: S, tmp: str, orders: int, wait_timeout: int) -> None:
        self.db = db
        self.server = server
        self.tmp = tmp
        self.orders = orders
        self.wait_timeout = wait_timeout
        self.idle = wait_timeout + 1.5
        self.env = demo_env(db, **self.env_extra())

    @classmethod
    def title(cls, wait_timeout: int) -> str:
        """The demo's first line."""
        raise NotImplementedError

    @classmethod
    def new_server(cls) -> S:
        """The server the runner needs besides the MariaDB, not started yet."""
        raise NotImplementedError

    def env_extra(self) -> dict[str, str]:
        """What the demo project's processes need to reach that server."""
        raise NotImplementedError

    def server_line(self) -> str:
        """That server, for the line that says the servers are up."""
        raise NotImplementedError

    def run_mode(self, key: str) -> Result:
        raise NotImplementedError

    def report(self, results: dict[str, Result]) -> None:
        raise NotImplementedError

    def problems(self, results: dict[str, Result]) -> list[str]:
        """What did not go as the demo claims; empty when the plain run broke and the freshconn one did not."""
        raise NotImplementedError

    def success(self, results: dict[str, Result]) -> str:
        """The verdict when nothing is wrong."""
        raise NotImplementedError

    def rows(self) -> dict[str, int]:
        return count_rows(self.db)

    def start_worker(self, key: str, args: list[str]) -> WorkerProcess:
        log_path = os.path.join(self.tmp, f"{self.noun}-{key}.log")
        return WorkerProcess(self.noun, key, args, self.env, log_path)

    def idle_spell(self, key: str) -> None:
        say(f"[{key}] idle {self.idle:.1f} s: the server drops sessions idle for {self.wait_timeout} s")
        time.sleep(self.idle)

    def exit_problems(self, r: Result) -> list[str]:
        code = r[f"{self.noun}_exit"]
        return [f"{r['mode']}: the {self.noun} exited with code {code}"] if code != 0 else []

    def batch_one_problems(self, r: Result) -> list[str]:
        written = r["rows"].get("1", 0)
        return [f"{r['mode']}: batch 1 has {written} rows, expected {self.orders}"] if written != self.orders else []

    def claim_problems(
        self, plain: Result, fresh: Result, *, plain_not_broken: str | None, fresh_failed: str | None
    ) -> list[str]:
        """The demo's claim: the plain run lost batch 2 after the idle, the freshconn run wrote every order once.

        ``plain_not_broken`` and ``fresh_failed`` are the runner's own findings (``None`` when all is as claimed),
        from what it knows of the errors its workers met.
        """
        orders = self.orders
        found = [plain_not_broken] if plain_not_broken else []
        if plain["rows"].get("2", 0) >= orders:
            found.append("plain: every order of batch 2 was written; the server did not drop the idle connection")
        if fresh_failed:
            found.append(fresh_failed)
        if fresh["rows"]["total"] != 2 * orders or fresh["rows"]["distinct_refs"] != 2 * orders:
            found.append(f"freshconn: {fresh['rows']['total']} rows, expected {2 * orders} distinct orders")
        if fresh[self.noun]["freshconn"].get("discarded", 0) < 1:
            found.append("freshconn: no connection was discarded")
        return found

    def table(
        self,
        plain: Result,
        fresh: Result,
        heads: tuple[str, str],
        unit: str,
        batch: Callable[[Result, str], str],
        more: Sequence[tuple[str, str, str]],
    ) -> None:
        """The plain and the freshconn run side by side: a batch a row, the rows in the table, then ``more``."""
        n = self.orders
        rows = [
            ("", *heads),
            (f"batch 1 ({n} {unit})", batch(plain, "1"), batch(fresh, "1")),
            (f"batch 2, after {self.idle:.1f} s idle", batch(plain, "2"), batch(fresh, "2")),
            (
                "rows in the table",
                f"{plain['rows']['total']} of {2 * n}",
                f"{fresh['rows']['total']} of {2 * n} ({fresh['rows']['distinct_refs']} distinct)",
            ),
            *more,
        ]
        say()
        for label, left, right in rows:
            say(f"{label:<28}{left:<34}{right}")


def run_demo(args: argparse.Namespace, run_class: type[Run[Any]]) -> int:
    """The whole demo for one runner: servers up, every mode, report, verdict, everything stopped; the exit status."""
    started = time.monotonic()

    stopped_by = [signal.SIGINT]

    def on_signal(signum: int, frame: Any) -> None:
        # Unwinds like a Ctrl-C, through the ExitStack that stops the workers and the servers.
        stopped_by[0] = signal.Signals(signum)
        raise KeyboardInterrupt

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)
    results: dict[str, Result] = {}
    # What the demo started, so that a test can check that none of it is left behind.
    cleanup: dict[str, list[Any]] = {"pids": [], "dirs": []}
    found: list[str]
    try:
        with ExitStack() as stack:
            say(run_class.title(args.wait_timeout))
            # The server's own idle limit, as in production (not a per-session init_command).
            db = MariaDB(extra=[f"--wait-timeout={args.wait_timeout}"])
            stack.callback(db.stop)
            server = run_class.new_server()
            stack.callback(server.stop)
            tmp = tempfile.mkdtemp(prefix="fc-demo-")
            stack.callback(shutil.rmtree, tmp, ignore_errors=True)
            # Runs first on the way out: a second Ctrl-C must not interrupt the servers' shutdown.
            stack.callback(ignore_signals)
            cleanup["dirs"].append(tmp)
            for each in (db, server):
                each.start()
                cleanup["pids"].append(each.proc.pid if each.proc else None)
                cleanup["dirs"].append(each.tmp)
            version = db.admin_sql("SELECT VERSION()").strip().split("-")[0]
            run = run_class(db, server, tmp, args.orders, args.wait_timeout)
            migrate(run.env)
            say(
                f"servers up in {time.monotonic() - started:.1f} s: MariaDB {version} on 127.0.0.1:{db.port}, "
                f"{run.server_line()}; table orders_order migrated"
            )
            for key in run.keys:
                results[key] = run.run_mode(key)
                cleanup["pids"].append(results[key][f"{run.noun}_pid"])
        run.report(results)
        found = run.problems(results)
    except DemoError as exc:
        found = [f"the demo could not complete: {exc}"]
    except Exception as exc:
        found = [f"the demo could not complete: {type(exc).__name__}: {exc}"]
    except KeyboardInterrupt:
        say(f"\nstopped by {stopped_by[0].name}: {run_class.stopped} and every server were stopped")
        return 128 + stopped_by[0]
    wall = time.monotonic() - started
    say()
    if found:
        say("UNEXPECTED: " + "\n            ".join(found))
    else:
        say(run.success(results))
    say(f"demo finished in {wall:.1f} s; every server stopped")
    if args.json:
        summary = {"ok": not found, "problems": found, "wall_seconds": round(wall, 2), "modes": results}
        say(json.dumps({**summary, "cleanup": cleanup}))
    return 1 if found else 0
