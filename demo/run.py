"""``python -m demo``: the same Kafka consumer, without and with freshconn, against a MariaDB that drops idle sessions.

For each mode it starts ``demo/manage.py consume_orders`` as a real subprocess, sends a batch of
orders, waits until they are in the table, stays idle past the server's ``wait_timeout``, sends a
second batch, waits until the consumer has committed it, stops the consumer with SIGTERM, and
compares what reached the table with what was sent. Every figure printed comes from that run.
Exit status 0 when the plain loop broke and the freshconn loop did not.
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
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from testbed.servers import DB_NAME, MariaDB, Tansu

ROOT = Path(__file__).resolve().parent.parent
MANAGE = ROOT / "demo" / "manage.py"
MODES = ("plain", "freshconn")
LOOPS = {"plain": "for msg in poll_iter(consumer)", "freshconn": "for msg in freshconn.each(poll_iter(consumer))"}


class DemoError(Exception):
    """The demo could not run (a server, the consumer or Kafka misbehaved): not a verdict on freshconn."""


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


class Run:
    """The servers and settings shared by both modes."""

    def __init__(self, db: MariaDB, broker: Tansu, tmp: str, orders: int, wait_timeout: int) -> None:
        self.db = db
        self.broker = broker
        self.tmp = tmp
        self.orders = orders
        self.wait_timeout = wait_timeout
        self.idle = wait_timeout + 1.5
        self.env = demo_env(db, DEMO_KAFKA_BOOTSTRAP=broker.bootstrap)

    def kafka_conf(self, **extra: Any) -> dict[str, Any]:
        # log_level 0 keeps librdkafka quiet on the terminal; the consumer logs to its own file.
        return {"bootstrap.servers": self.broker.bootstrap, "log_level": 0, **extra}

    def rows(self) -> dict[str, int]:
        return count_rows(self.db)

    def migrate(self) -> None:
        migrate(self.env)

    def run_mode(self, mode: str) -> dict[str, Any]:
        from confluent_kafka import Consumer, Producer, TopicPartition
        from confluent_kafka.admin import AdminClient, NewTopic

        topic, group = f"orders-{mode}", f"order-writers-{mode}"
        self.db.admin_sql(f"TRUNCATE TABLE {DB_NAME}.orders_order")
        admin = AdminClient(self.kafka_conf())  # kept referenced: its futures fail once it is collected
        for future in admin.create_topics([NewTopic(topic, 1, 1)]).values():
            future.result(10)

        log_path = os.path.join(self.tmp, f"consumer-{mode}.log")
        cmd = [sys.executable, str(MANAGE), "consume_orders", "--worker", "kafka", "--mode", mode]
        cmd += ["--bootstrap", self.broker.bootstrap, "--topic", topic, "--group", group]
        with open(log_path, "wb") as log:
            # Its own session: a Ctrl-C reaches only this orchestrator, which then stops the consumer.
            proc = subprocess.Popen(
                cmd, env=self.env, stdout=subprocess.PIPE, stderr=log, cwd=ROOT, start_new_session=True
            )
        producer = Producer(self.kafka_conf())
        checker = Consumer(self.kafka_conf(**{"group.id": group, "enable.auto.commit": False}))

        def alive() -> None:
            if proc.poll() is not None:
                raise DemoError(f"the {mode} consumer exited early (code {proc.returncode}):\n{tail(log_path)}")

        def committed() -> int:
            offsets = checker.committed([TopicPartition(topic, 0)], timeout=5)
            return max(int(offsets[0].offset), 0)

        def send(batch: int) -> None:
            for i in range(1, self.orders + 1):
                ref = f"{mode}-b{batch}-{i:03d}"
                value = json.dumps({"ref": ref, "batch": batch, "qty": i % 5 + 1})
                producer.produce(topic, value.encode(), key=ref.encode())
            if producer.flush(10):
                raise DemoError("the broker did not take the orders")

        say(f"\n[{mode}] manage.py consume_orders --mode {mode}, loop: {LOOPS[mode]}:")
        try:
            send(1)
            took = wait_for(
                "batch 1 in the table", lambda: self.rows().get("1", 0) >= self.orders, timeout=30, alive=alive
            )
            written = self.rows().get("1", 0)
            say(f"[{mode}] batch 1: {self.orders} orders sent, {written} in the table after {took:.1f} s")
            say(f"[{mode}] idle {self.idle:.1f} s: the server drops sessions idle for {self.wait_timeout} s")
            time.sleep(self.idle)
            send(2)
            took = wait_for(
                "the consumer to handle batch 2", lambda: committed() >= 2 * self.orders, timeout=20, alive=alive
            )
            say(f"[{mode}] batch 2: {self.orders} orders sent, all handled (offsets committed) after {took:.1f} s")
            proc.send_signal(signal.SIGTERM)
            try:
                out, _ = proc.communicate(timeout=20)
            except subprocess.TimeoutExpired as exc:
                raise DemoError(f"the {mode} consumer did not stop within 20 s of SIGTERM") from exc
            final_offset = committed()
        finally:
            stop_process(proc)
            if proc.stdout is not None:
                proc.stdout.close()
            checker.close()
        lines = out.decode(errors="replace").strip().splitlines()
        try:
            summary = json.loads(lines[-1])
        except (IndexError, ValueError) as exc:
            raise DemoError(f"the {mode} consumer printed no summary:\n{tail(log_path)}") from exc
        say(f"[{mode}] consumer stopped with SIGTERM, exit code {proc.returncode}")
        return {
            "mode": mode,
            "sent": {"1": self.orders, "2": self.orders},
            "rows": self.rows(),
            "committed": final_offset,
            "consumer_exit": proc.returncode,
            "consumer_pid": proc.pid,
            "consumer": summary,
        }


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


def problems(results: dict[str, dict[str, Any]], orders: int) -> list[str]:
    """What did not go as the demo claims; empty when plain broke and freshconn did not."""
    found = []
    plain, fresh = results["plain"], results["freshconn"]
    for r in (plain, fresh):
        if r["consumer_exit"] != 0:
            found.append(f"{r['mode']}: the consumer exited with code {r['consumer_exit']}")
        if r["rows"].get("1", 0) != orders:
            found.append(f"{r['mode']}: batch 1 has {r['rows'].get('1', 0)} rows, expected {orders}")
    pc = plain["consumer"]
    if not pc["errors"] or not pc["first_error_is_disconnect"]:
        found.append(f"plain: expected a disconnect error after the idle, got {pc['first_error']!r}")
    if plain["rows"].get("2", 0) >= orders:
        found.append("plain: every order of batch 2 was written; the server did not drop the idle connection")
    fc = fresh["consumer"]
    if fc["errors"]:
        found.append(f"freshconn: {fc['errors']} errors, first: {fc['first_error']}")
    if fresh["rows"]["total"] != 2 * orders or fresh["rows"]["distinct_refs"] != 2 * orders:
        found.append(f"freshconn: {fresh['rows']['total']} rows, expected {2 * orders} distinct orders")
    if fc["freshconn"].get("discarded", 0) < 1:
        found.append("freshconn: no connection was discarded")
    return found


def report(results: dict[str, dict[str, Any]], run: Run) -> None:
    n = run.orders

    def batch(r: dict[str, Any], b: str) -> str:
        errors = r["consumer"]["batches"].get(b, {}).get("errors", 0)
        return f"{r['rows'].get(b, 0)}/{n} written, {errors} errors"

    def stats(r: dict[str, Any]) -> str:
        s = r["consumer"]["freshconn"]
        if r["mode"] == "plain":
            return f"(not used; connects={s.get('connects', 0)})"
        reasons = ", ".join(f"{k[len('discarded_') :]}={v}" for k, v in s.items() if k.startswith("discarded_") and v)
        return (
            f"units={s.get('units', 0)} pings={s.get('pings', 0)} connects={s.get('connects', 0)} "
            f"discarded={s.get('discarded', 0)}" + (f" ({reasons})" if reasons else "")
        )

    plain, fresh = results["plain"], results["freshconn"]
    rows = [
        ("", "plain loop", "freshconn.each()"),
        (f"batch 1 ({n} orders)", batch(plain, "1"), batch(fresh, "1")),
        (f"batch 2, after {run.idle:.1f} s idle", batch(plain, "2"), batch(fresh, "2")),
        (
            "rows in the table",
            f"{plain['rows']['total']} of {2 * n}",
            f"{fresh['rows']['total']} of {2 * n} ({fresh['rows']['distinct_refs']} distinct)",
        ),
        ("freshconn.stats()", stats(plain), stats(fresh)),
    ]
    say()
    for label, left, right in rows:
        say(f"{label:<28}{left:<34}{right}")
    for r in (plain, fresh):
        c = r["consumer"]
        if c["first_error"]:
            say(f"{r['mode']} loop, first error: {c['first_error']}")
            later = dict(c["error_texts"])
            later[c["first_error"]] -= 1
            for text, count in later.items():
                if count:
                    what = "the same" if text == c["first_error"] else text
                    say(f"{r['mode']} loop, then:       {count} x {what}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m demo",
        description="freshconn's demo: the same Django Kafka consumer (or, with --worker rq, the same RQ "
        "worker), without and with freshconn, against a MariaDB that drops idle sessions.",
    )
    parser.add_argument(
        "--worker",
        choices=("kafka", "rq"),
        default="kafka",
        help="kafka: a Kafka consumer loop (default); rq: real RQ workers with a throwaway Redis",
    )
    parser.add_argument("--json", action="store_true", help="end with one JSON line: every figure of the run")
    parser.add_argument("--orders", type=int, default=20, help="orders per batch (default 20)")
    parser.add_argument("--wait-timeout", type=int, default=3, help="MariaDB wait_timeout in seconds (default 3)")
    args = parser.parse_args(argv)
    if args.orders < 1 or args.wait_timeout < 1:
        parser.error("--orders and --wait-timeout must be at least 1")
    if args.worker == "rq":
        from demo.rq_run import main as rq_main

        return rq_main(args)

    started = time.monotonic()

    stopped_by = [signal.SIGINT]

    def on_signal(signum: int, frame: Any) -> None:
        # Unwinds like a Ctrl-C, through the ExitStack that stops the consumer and the servers.
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
                "freshconn demo: a Django Kafka consumer writing orders to a MariaDB "
                f"whose wait_timeout is {args.wait_timeout} s"
            )
            # The server's own idle limit, as in production (not a per-session init_command).
            db = MariaDB(extra=[f"--wait-timeout={args.wait_timeout}"])
            stack.callback(db.stop)
            broker = Tansu()
            stack.callback(broker.stop)
            tmp = tempfile.mkdtemp(prefix="fc-demo-")
            stack.callback(shutil.rmtree, tmp, ignore_errors=True)
            # Runs first on the way out: a second Ctrl-C must not interrupt the servers' shutdown.
            stack.callback(ignore_signals)
            cleanup["dirs"].append(tmp)
            db.start()
            cleanup["pids"].append(db.proc.pid if db.proc else None)
            cleanup["dirs"].append(db.tmp)
            broker.start()
            cleanup["pids"].append(broker.proc.pid if broker.proc else None)
            cleanup["dirs"].append(broker.tmp)
            version = db.admin_sql("SELECT VERSION()").strip().split("-")[0]
            run = Run(db, broker, tmp, args.orders, args.wait_timeout)
            run.migrate()
            say(
                f"servers up in {time.monotonic() - started:.1f} s: MariaDB {version} on 127.0.0.1:{db.port}, "
                f"Kafka-protocol broker (Tansu) on {broker.bootstrap}; table orders_order migrated"
            )
            for mode in MODES:
                results[mode] = run.run_mode(mode)
                cleanup["pids"].append(results[mode]["consumer_pid"])
        report(results, run)
        found = problems(results, args.orders)
    except DemoError as exc:
        found = [f"the demo could not complete: {exc}"]
    except Exception as exc:
        found = [f"the demo could not complete: {type(exc).__name__}: {exc}"]
    except KeyboardInterrupt:
        say(f"\nstopped by {stopped_by[0].name}: the consumer and every server were stopped")
        return 128 + stopped_by[0]
    wall = time.monotonic() - started
    say()
    if found:
        say("UNEXPECTED: " + "\n            ".join(found))
    else:
        plain, fresh = results["plain"], results["freshconn"]
        lost = args.orders - plain["rows"].get("2", 0)
        say(
            "OK: without freshconn the worker stayed broken after the server dropped its idle connection "
            f"({lost} of {args.orders} later orders lost);\n"
            f"    with freshconn.each() it replaced the connection before using it and wrote all "
            f"{fresh['rows']['total']} orders, each once."
        )
    say(f"demo finished in {wall:.1f} s; every server stopped")
    if args.json:
        summary = {"ok": not found, "problems": found, "wall_seconds": round(wall, 2), "modes": results}
        say(json.dumps({**summary, "cleanup": cleanup}))
    return 1 if found else 0
