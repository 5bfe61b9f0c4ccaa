"""``python -m demo``: the same Kafka consumer, without and with freshconn, against a MariaDB that drops idle sessions.

For each mode it starts ``demo/manage.py consume_orders`` as a real subprocess, sends a batch of
orders, waits until they are in the table, stays idle past the server's ``wait_timeout``, sends a
second batch, waits until the consumer has committed it, stops the consumer with SIGTERM, and
compares what reached the table with what was sent. Every figure printed comes from that run.
Exit status 0 when the plain loop broke and the freshconn loop did not.
The orchestration both runners share (servers, signals, verdict, ``--json``) is in ``demo/common.py``.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from testbed.servers import DB_NAME, Tansu

from demo.common import DemoError, Result, Run, error_lines, freshconn_cell, run_demo, say, wait_for

MODES = ("plain", "freshconn")
LOOPS = {"plain": "for msg in poll_iter(consumer)", "freshconn": "for msg in freshconn.each(poll_iter(consumer))"}


class KafkaRun(Run[Tansu]):
    """The Kafka consumer loop, plain and with ``freshconn.each()``, against a Kafka-protocol broker (Tansu)."""

    noun = "consumer"
    stopped = "the consumer"
    keys = MODES

    @classmethod
    def title(cls, wait_timeout: int) -> str:
        return (
            "freshconn demo: a Django Kafka consumer writing orders to a MariaDB "
            f"whose wait_timeout is {wait_timeout} s"
        )

    @classmethod
    def new_server(cls) -> Tansu:
        return Tansu()

    def env_extra(self) -> dict[str, str]:
        return {"DEMO_KAFKA_BOOTSTRAP": self.server.bootstrap}

    def server_line(self) -> str:
        return f"Kafka-protocol broker (Tansu) on {self.server.bootstrap}"

    def kafka_conf(self, **extra: Any) -> dict[str, Any]:
        # log_level 0 keeps librdkafka quiet on the terminal; the consumer logs to its own file.
        return {"bootstrap.servers": self.server.bootstrap, "log_level": 0, **extra}

    def run_mode(self, mode: str) -> Result:
        from confluent_kafka import Consumer, Producer, TopicPartition
        from confluent_kafka.admin import AdminClient, NewTopic

        topic, group = f"orders-{mode}", f"order-writers-{mode}"
        self.db.admin_sql(f"TRUNCATE TABLE {DB_NAME}.orders_order")
        admin = AdminClient(self.kafka_conf())  # kept referenced: its futures fail once it is collected
        for future in admin.create_topics([NewTopic(topic, 1, 1)]).values():
            future.result(10)

        worker = self.start_worker(
            mode,
            [
                "--worker",
                "kafka",
                "--mode",
                mode,
                "--bootstrap",
                self.server.bootstrap,
                "--topic",
                topic,
                "--group",
                group,
            ],
        )
        producer = Producer(self.kafka_conf())
        checker = Consumer(self.kafka_conf(**{"group.id": group, "enable.auto.commit": False}))

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
                "batch 1 in the table", lambda: self.rows().get("1", 0) >= self.orders, timeout=30, alive=worker.alive
            )
            written = self.rows().get("1", 0)
            say(f"[{mode}] batch 1: {self.orders} orders sent, {written} in the table after {took:.1f} s")
            self.idle_spell(mode)
            send(2)
            took = wait_for(
                "the consumer to handle batch 2",
                lambda: committed() >= 2 * self.orders,
                timeout=20,
                alive=worker.alive,
            )
            say(f"[{mode}] batch 2: {self.orders} orders sent, all handled (offsets committed) after {took:.1f} s")
            out = worker.stop()
            final_offset = committed()
        finally:
            worker.close()
            checker.close()
        summary = worker.summary(out)
        return {
            "mode": mode,
            "sent": {"1": self.orders, "2": self.orders},
            "rows": self.rows(),
            "committed": final_offset,
            "consumer_exit": worker.proc.returncode,
            "consumer_pid": worker.proc.pid,
            "consumer": summary,
        }

    def problems(self, results: dict[str, Result]) -> list[str]:
        found = []
        plain, fresh = results["plain"], results["freshconn"]
        for r in (plain, fresh):
            found += self.exit_problems(r) + self.batch_one_problems(r)
        pc, fc = plain["consumer"], fresh["consumer"]
        return found + self.claim_problems(
            plain,
            fresh,
            plain_not_broken=None
            if pc["errors"] and pc["first_error_is_disconnect"]
            else f"plain: expected a disconnect error after the idle, got {pc['first_error']!r}",
            fresh_failed=f"freshconn: {fc['errors']} errors, first: {fc['first_error']}" if fc["errors"] else None,
        )

    def report(self, results: dict[str, Result]) -> None:
        n = self.orders

        def batch(r: Result, b: str) -> str:
            errors = r["consumer"]["batches"].get(b, {}).get("errors", 0)
            return f"{r['rows'].get(b, 0)}/{n} written, {errors} errors"

        def stats(r: Result) -> str:
            return freshconn_cell(r["consumer"]["freshconn"], used=r["mode"] != "plain")

        plain, fresh = results["plain"], results["freshconn"]
        self.table(
            plain,
            fresh,
            ("plain loop", "freshconn.each()"),
            "orders",
            batch,
            [("freshconn.stats()", stats(plain), stats(fresh))],
        )
        for r in (plain, fresh):
            c = r["consumer"]
            error_lines(f"{r['mode']} loop", "first error: ", "then:       ", c["first_error"], c["error_texts"])

    def success(self, results: dict[str, Result]) -> str:
        plain, fresh = results["plain"], results["freshconn"]
        lost = self.orders - plain["rows"].get("2", 0)
        return (
            "OK: without freshconn the worker stayed broken after the server dropped its idle connection "
            f"({lost} of {self.orders} later orders lost);\n"
            f"    with freshconn.each() it replaced the connection before using it and wrote all "
            f"{fresh['rows']['total']} orders, each once."
        )


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
        from demo.rq_run import RQRun

        return run_demo(args, RQRun)
    return run_demo(args, KafkaRun)
