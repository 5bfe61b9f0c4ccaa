"""``python -m demo --worker rq``: the same orders as RQ jobs, run by real RQ workers without and with freshconn.

Against a MariaDB whose ``wait_timeout`` is a few seconds and a throwaway Redis, it runs
``demo/manage.py consume_orders --worker rq`` three times as a real subprocess, each time with an
empty table and its own queue: enqueues a batch of ``demo.orders.jobs.write_order`` jobs, waits
until RQ has finished (or failed) them, stays idle past the server's ``wait_timeout``, enqueues a
second batch, waits again, then stops the worker with SIGTERM (RQ's warm shutdown).

- ``plain``: ``rq.SimpleWorker``: jobs run in the worker process, on the persistent connection
  it keeps between jobs. This is the worker that shows the bug.
- ``freshconn``: ``freshconn.contrib.rq.FreshconnSimpleWorker``, otherwise the same.
- ``plain_fork``: RQ's default forking ``rq.Worker``, measured for comparison: the worker process
  never queries, so each work horse opens a connection of its own and exits after one job; no
  connection lives through the idle spell, hence nothing goes stale (a connect per job instead).

Every figure printed comes from that run: rows counted in the table, job outcomes from RQ's
finished and failed job registries, errors from the failed jobs' results, counters from
``freshconn.stats()`` in the worker process (its summary at exit) and in each process that ran a
job (the job's return value), aborted sessions from the server's ``Aborted_clients``.
Exit status 0 when the plain SimpleWorker broke after the idle and the freshconn one did not.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from contextlib import ExitStack
from typing import Any

from testbed.redis import Redis
from testbed.servers import DB_NAME, MariaDB

from demo.run import (
    MANAGE,
    ROOT,
    DemoError,
    count_rows,
    demo_env,
    ignore_signals,
    migrate,
    say,
    stop_process,
    tail,
    wait_for,
)

JOB = "demo.orders.jobs.write_order"

#: (key in the results, consume_orders --mode, --rq-class, the RQ worker class it runs)
RUNS = (
    ("plain", "plain", "simple", "rq.SimpleWorker"),
    ("freshconn", "freshconn", "simple", "FreshconnSimpleWorker"),
    ("plain_fork", "plain", "fork", "rq.Worker (forking)"),
)


class RQRun:
    """The servers and settings shared by the three runs."""

    def __init__(self, db: MariaDB, redis: Redis, tmp: str, orders: int, wait_timeout: int) -> None:
        self.db = db
        self.redis = redis
        self.tmp = tmp
        self.orders = orders
        self.wait_timeout = wait_timeout
        self.idle = wait_timeout + 1.5
        self.env = demo_env(db, DEMO_REDIS_URL=redis.url)

    def aborted_clients(self) -> int:
        """Sessions the server saw end without a proper goodbye (a timeout, or a client gone without quitting)."""
        out = self.db.admin_sql("SHOW GLOBAL STATUS LIKE 'Aborted_clients'")
        return int(out.split()[-1])

    def run_mode(self, key: str, mode: str, rq_class: str, label: str) -> dict[str, Any]:
        from rq import Queue
        from rq.job import Job
        from rq.registry import FailedJobRegistry, FinishedJobRegistry

        queue_name = f"orders-{key.replace('_', '-')}"
        self.db.admin_sql(f"TRUNCATE TABLE {DB_NAME}.orders_order")
        aborted_before = self.aborted_clients()
        client = self.redis.client()
        queue = Queue(queue_name, connection=client)
        finished_reg = FinishedJobRegistry(queue=queue)
        failed_reg = FailedJobRegistry(queue=queue)

        log_path = f"{self.tmp}/worker-{key}.log"
        cmd = [sys.executable, str(MANAGE), "consume_orders", "--worker", "rq", "--mode", mode]
        cmd += ["--rq-class", rq_class, "--redis", self.redis.url, "--queue", queue_name]
        with open(log_path, "wb") as log:
            # Its own session: a Ctrl-C reaches only this orchestrator, which then stops the worker.
            proc = subprocess.Popen(
                cmd, env=self.env, stdout=subprocess.PIPE, stderr=log, cwd=ROOT, start_new_session=True
            )

        def alive() -> None:
            if proc.poll() is not None:
                raise DemoError(f"the {key} worker exited early (code {proc.returncode}):\n{tail(log_path)}")

        def ids(registry: Any, batch: int) -> list[str]:
            prefix = f"{queue_name}-b{batch}-"
            return sorted(i for i in registry.get_job_ids() if i.startswith(prefix))

        def handled(batch: int) -> int:
            return len(ids(finished_reg, batch)) + len(ids(failed_reg, batch))

        def send(batch: int) -> None:
            for i in range(1, self.orders + 1):
                ref = f"{queue_name}-b{batch}-{i:03d}"
                queue.enqueue(JOB, ref=ref, batch=batch, qty=i % 5 + 1, job_id=ref)

        say(f"\n[{key}] manage.py consume_orders --worker rq --mode {mode} --rq-class {rq_class}: {label}")
        try:
            send(1)
            took = wait_for("RQ to run batch 1", lambda: handled(1) >= self.orders, timeout=30, alive=alive)
            say(
                f"[{key}] batch 1: {self.orders} jobs enqueued, {len(ids(finished_reg, 1))} finished, "
                f"{len(ids(failed_reg, 1))} failed after {took:.1f} s"
            )
            say(f"[{key}] idle {self.idle:.1f} s: the server drops sessions idle for {self.wait_timeout} s")
            time.sleep(self.idle)
            send(2)
            took = wait_for("RQ to run batch 2", lambda: handled(2) >= self.orders, timeout=20, alive=alive)
            say(
                f"[{key}] batch 2: {self.orders} jobs enqueued, {len(ids(finished_reg, 2))} finished, "
                f"{len(ids(failed_reg, 2))} failed after {took:.1f} s"
            )
            proc.send_signal(signal.SIGTERM)
            try:
                out, _ = proc.communicate(timeout=20)
            except subprocess.TimeoutExpired as exc:
                raise DemoError(f"the {key} worker did not stop within 20 s of SIGTERM") from exc

            jobs: dict[str, dict[str, int]] = {}
            failed_errors: Counter[str] = Counter()
            first_failed_error = None
            horse_stats: list[dict[str, Any]] = []
            job_pids: set[int] = set()
            for batch in (1, 2):
                finished, failed = ids(finished_reg, batch), ids(failed_reg, batch)
                jobs[str(batch)] = {"finished": len(finished), "failed": len(failed)}
                for job in Job.fetch_many(failed, connection=client):
                    result = job.latest_result() if job is not None else None
                    text = last_line(result.exc_string if result is not None else None)
                    failed_errors[text] += 1
                    first_failed_error = first_failed_error or text
                for job in Job.fetch_many(finished, connection=client):
                    value = job.return_value() if job is not None else None
                    if isinstance(value, dict):
                        job_pids.add(int(value["pid"]))
                        horse_stats.append(value["freshconn"])
            failed_registry = failed_reg.count
        finally:
            stop_process(proc)
            if proc.stdout is not None:
                proc.stdout.close()
            client.close()
        lines = out.decode(errors="replace").strip().splitlines()
        try:
            summary = json.loads(lines[-1])
        except (IndexError, ValueError) as exc:
            raise DemoError(f"the {key} worker printed no summary:\n{tail(log_path)}") from exc
        say(f"[{key}] worker stopped with SIGTERM, exit code {proc.returncode}")
        return {
            "mode": key,
            "worker_mode": mode,
            "rq_class": rq_class,
            "worker_class": label,
            "sent": {"1": self.orders, "2": self.orders},
            "rows": count_rows(self.db),
            "jobs": jobs,
            "failed_registry": failed_registry,
            "failed_errors": dict(failed_errors),
            "first_failed_error": first_failed_error,
            # Processes that ran a finished job, and freshconn.stats() in each right after its job.
            "job_pids": sorted(job_pids),
            "job_connects": sum_counter(horse_stats, "connects") if rq_class == "fork" else None,
            "aborted_clients": self.aborted_clients() - aborted_before,
            "worker_exit": proc.returncode,
            "worker_pid": proc.pid,
            "worker": summary,
        }


def last_line(text: str | None) -> str:
    """The exception line of a formatted traceback, without the module path of its class."""
    lines = [line for line in (text or "").strip().splitlines() if line.strip()]
    if not lines:
        return "(no error text)"
    name, sep, rest = lines[-1].partition(": ")
    return f"{name.rsplit('.', 1)[-1]}{sep}{rest}"


def sum_counter(stats: list[dict[str, Any]], counter: str) -> int:
    return sum(int(s.get(counter, 0)) for s in stats)


def problems(results: dict[str, dict[str, Any]], orders: int) -> list[str]:
    """What did not go as the demo claims; empty when the plain SimpleWorker broke and freshconn's did not."""
    found = []
    for r in results.values():
        if r["worker_exit"] != 0:
            found.append(f"{r['mode']}: the worker exited with code {r['worker_exit']}")
    plain, fresh = results["plain"], results["freshconn"]
    for r in (plain, fresh):
        if r["rows"].get("1", 0) != orders:
            found.append(f"{r['mode']}: batch 1 has {r['rows'].get('1', 0)} rows, expected {orders}")
        if r["failed_registry"] != r["worker"]["errors"]:
            found.append(
                f"{r['mode']}: RQ's failed job registry holds {r['failed_registry']} jobs, "
                f"the worker counted {r['worker']['errors']} failures"
            )
    pw = plain["worker"]
    if plain["jobs"]["2"]["failed"] < 1 or not pw["first_error_is_disconnect"]:
        found.append(f"plain: expected failed jobs with a disconnect error after the idle, got {pw['first_error']!r}")
    if plain["rows"].get("2", 0) >= orders:
        found.append("plain: every order of batch 2 was written; the server did not drop the idle connection")
    if fresh["failed_registry"]:
        found.append(f"freshconn: {fresh['failed_registry']} failed jobs, first: {fresh['first_failed_error']}")
    if fresh["rows"]["total"] != 2 * orders or fresh["rows"]["distinct_refs"] != 2 * orders:
        found.append(f"freshconn: {fresh['rows']['total']} rows, expected {2 * orders} distinct orders")
    if fresh["worker"]["freshconn"].get("discarded", 0) < 1:
        found.append("freshconn: no connection was discarded")
    return found


def report(results: dict[str, dict[str, Any]], run: RQRun) -> None:
    n = run.orders

    def batch(r: dict[str, Any], b: str) -> str:
        return f"{r['rows'].get(b, 0)}/{n} written, {r['jobs'][b]['failed']} jobs failed"

    def stats(r: dict[str, Any]) -> str:
        s = r["worker"]["freshconn"]
        if r["worker_mode"] == "plain":
            return f"(not used; connects={s.get('connects', 0)})"
        reasons = ", ".join(f"{k[len('discarded_') :]}={v}" for k, v in s.items() if k.startswith("discarded_") and v)
        return (
            f"units={s.get('units', 0)} pings={s.get('pings', 0)} connects={s.get('connects', 0)} "
            f"discarded={s.get('discarded', 0)}" + (f" ({reasons})" if reasons else "")
        )

    plain, fresh, fork = results["plain"], results["freshconn"], results["plain_fork"]
    rows = [
        ("", plain["worker_class"], fresh["worker_class"]),
        (f"batch 1 ({n} jobs)", batch(plain, "1"), batch(fresh, "1")),
        (f"batch 2, after {run.idle:.1f} s idle", batch(plain, "2"), batch(fresh, "2")),
        (
            "rows in the table",
            f"{plain['rows']['total']} of {2 * n}",
            f"{fresh['rows']['total']} of {2 * n} ({fresh['rows']['distinct_refs']} distinct)",
        ),
        ("RQ failed job registry", f"{plain['failed_registry']} jobs", f"{fresh['failed_registry']} jobs"),
        ("freshconn.stats() (worker)", stats(plain), stats(fresh)),
    ]
    say()
    for label, left, right in rows:
        say(f"{label:<28}{left:<34}{right}")
    for r in (plain, fresh):
        first = r["first_failed_error"]
        if first:
            say(f"{r['mode']} worker, first failed job: {first}")
            later = dict(r["failed_errors"])
            later[first] -= 1
            for text, count in later.items():
                if count:
                    say(f"{r['mode']} worker, then:             {count} x {'the same' if text == first else text}")
    handled = sum(fork["jobs"][b]["finished"] + fork["jobs"][b]["failed"] for b in ("1", "2"))
    horses = [p for p in fork["job_pids"] if p != fork["worker_pid"]]
    say(
        f"\nFor comparison, {fork['worker_class']} without freshconn: {fork['rows']['total']} of {2 * n} written, "
        f"{fork['failed_registry']} jobs failed. Its {handled} jobs ran in {len(horses)} work horses"
    )
    say(
        f"    (processes forked for one job each), which opened {fork['job_connects']} connections between them; "
        f"the worker process itself opened {fork['worker']['freshconn'].get('connects', 0)}."
    )
    say(
        "    RQ ends each horse with os._exit(), so none closes its session: the server counted "
        f"{fork['aborted_clients']} aborted clients\n"
        f"    (with the SimpleWorkers: {plain['aborted_clients']} and {fresh['aborted_clients']}, the session "
        "the server dropped at its wait_timeout)."
    )
    if not fork["failed_registry"] and fork["job_connects"] == handled:
        say("    So it does not get stuck: no connection lives through the idle spell; it pays a connect per job.")


def main(args: argparse.Namespace) -> int:
    started = time.monotonic()

    stopped_by = [signal.SIGINT]

    def on_signal(signum: int, frame: Any) -> None:
        # Unwinds like a Ctrl-C, through the ExitStack that stops the worker and the servers.
        stopped_by[0] = signal.Signals(signum)
        raise KeyboardInterrupt

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)
    results: dict[str, dict[str, Any]] = {}
    # What the demo started, so that a test can check that none of it is left behind.
    cleanup: dict[str, list[Any]] = {"pids": [], "dirs": []}
    found: list[str]
    try:
        with ExitStack() as stack:
            say(
                "freshconn demo: RQ workers writing orders to a MariaDB "
                f"whose wait_timeout is {args.wait_timeout} s (jobs in a throwaway Redis)"
            )
            # The server's own idle limit, as in production (not a per-session init_command).
            db = MariaDB(extra=[f"--wait-timeout={args.wait_timeout}"])
            stack.callback(db.stop)
            redis = Redis()
            stack.callback(redis.stop)
            tmp = tempfile.mkdtemp(prefix="fc-demo-")
            stack.callback(shutil.rmtree, tmp, ignore_errors=True)
            # Runs first on the way out: a second Ctrl-C must not interrupt the servers' shutdown.
            stack.callback(ignore_signals)
            cleanup["dirs"].append(tmp)
            db.start()
            cleanup["pids"].append(db.proc.pid if db.proc else None)
            cleanup["dirs"].append(db.tmp)
            redis.start()
            cleanup["pids"].append(redis.proc.pid if redis.proc else None)
            cleanup["dirs"].append(redis.tmp)
            version = db.admin_sql("SELECT VERSION()").strip().split("-")[0]
            run = RQRun(db, redis, tmp, args.orders, args.wait_timeout)
            migrate(run.env)
            say(
                f"servers up in {time.monotonic() - started:.1f} s: MariaDB {version} on 127.0.0.1:{db.port}, "
                f"Redis on 127.0.0.1:{redis.port}; table orders_order migrated"
            )
            for key, mode, rq_class, label in RUNS:
                results[key] = run.run_mode(key, mode, rq_class, label)
                cleanup["pids"].append(results[key]["worker_pid"])
        report(results, run)
        found = problems(results, args.orders)
    except DemoError as exc:
        found = [f"the demo could not complete: {exc}"]
    except Exception as exc:
        found = [f"the demo could not complete: {type(exc).__name__}: {exc}"]
    except KeyboardInterrupt:
        say(f"\nstopped by {stopped_by[0].name}: the workers and every server were stopped")
        return 128 + stopped_by[0]
    wall = time.monotonic() - started
    say()
    if found:
        say("UNEXPECTED: " + "\n            ".join(found))
    else:
        plain, fresh = results["plain"], results["freshconn"]
        failed = plain["jobs"]["2"]["failed"]
        say(
            "OK: with rq.SimpleWorker the worker stayed broken after the server dropped its idle connection "
            f"({failed} of {args.orders} later jobs failed);\n"
            f"    with FreshconnSimpleWorker it replaced the connection before the next job and wrote all "
            f"{fresh['rows']['total']} orders, each once."
        )
    say(f"demo finished in {wall:.1f} s; every server stopped")
    if args.json:
        summary = {"ok": not found, "problems": found, "wall_seconds": round(wall, 2), "modes": results}
        say(json.dumps({**summary, "cleanup": cleanup}))
    return 1 if found else 0
