"""freshconn.contrib.faust in a real Faust worker process with the Kafka-protocol broker (Tansu)."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from testbed.redis import Redis
from testbed.servers import DBServer, Tansu

from tests.queue_tasks.faults import Contrast, run_scenario
from tests.queue_tasks.harness import (
    WorkerProcess,
    collect,
    errors,
    one_driver_per_vendor,
    redis_client,
    redis_db_client,
    redis_server,
    side_by_side,
    worker_env,
)

faust = pytest.importorskip("faust")
confluent_kafka = pytest.importorskip("confluent_kafka")

__all__ = ["redis_client", "redis_server"]  # fixtures used by the tests below

pytestmark = [
    pytest.mark.server,
    pytest.mark.broker,
    pytest.mark.kafka,
    pytest.mark.slow,
    one_driver_per_vendor(mysql="mysqlconnector", postgresql="psycopg2"),
]


@pytest.fixture(scope="module")
def kafka() -> Iterator[Tansu]:
    with Tansu() as srv:
        yield srv


def new_topic(kafka: Tansu) -> str:
    """A fresh one-partition topic (Faust's events arrive in order, one consumer)."""
    # confluent-kafka's admin module re-exports NewTopic (from cimpl) without marking it as exported.
    from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

    name = f"faust-{uuid.uuid4().hex[:10]}"
    admin = AdminClient({"bootstrap.servers": kafka.bootstrap})
    for future in admin.create_topics([NewTopic(name, 1, 1)]).values():
        future.result(10)
    return name


def sender(kafka: Tansu, topic: str) -> Callable[[list[str]], None]:
    def send(refs: list[str]) -> None:
        producer = confluent_kafka.Producer({"bootstrap.servers": kafka.bootstrap, "linger.ms": 5})
        for ref in refs:
            producer.produce(topic, value=ref.encode())
        assert producer.flush(10) == 0

    return send


def worker(env: dict[str, str], kafka: Tansu, topic: str, datadir: Path) -> WorkerProcess:
    env = {
        **env,
        "FRESHCONN_TEST_KAFKA": kafka.bootstrap,
        "FRESHCONN_TEST_FAUST_TOPIC": topic,
        "FRESHCONN_TEST_FAUST_ID": f"app-{topic}",
        "FRESHCONN_TEST_FAUST_DATA": str(datadir),
    }
    argv = ["-m", "faust", "-A", "tests.queue_tasks.faust_app", "worker", "-l", "warn", "--without-web"]
    return WorkerProcess(argv, env, stop_timeout=10)


def test_events_ride_idle_kill_and_restart_on_a_persistent_connection(
    live: None, server: DBServer, kafka: Tansu, redis_server: Redis, redis_client: Any, tmp_path: Path
) -> None:
    """Each event a unit through idle, KILL, a restart and a crashed actor; with Faust's own Agent, idle breaks it."""
    topic, plain_topic = new_topic(kafka), new_topic(kafka)
    scenario = worker(worker_env(redis_server), kafka, topic, tmp_path / "scenario")
    plain = worker(worker_env(redis_server, integration=False, db=1), kafka, plain_topic, tmp_path / "plain")
    with side_by_side(scenario, plain) as (w, p):
        contrast = Contrast(sender(kafka, plain_topic), redis_db_client(redis_server, 1), p, after=2)
        send = sender(kafka, topic)
        phases = run_scenario(send, redis_client, w, server, contrast=contrast)
        # An event whose connection dies under it crashes its actor: the unit ends with that
        # error (the connection is discarded at once) and Faust's restarted actor carries on.
        send(["crash-0"])
        assert errors(collect(redis_client, 1, w)) == []
        send([f"after-crash-{i}" for i in range(4)])
        after = collect(redis_client, 4, w)
        log = w.output()
    assert len({r["thread"] for r in phases["busy"]}) == 1  # the async ORM's one thread
    assert errors(after) == []
    assert max(r["stats"]["discarded_error"] for r in after) == 1
    assert "OperationalError" in log
    # With Faust's own Agent the first event after the idle spell fails, and so does every later
    # one: nothing closes the broken connection (faust-streaming #666).
    assert all(contrast.errors), contrast.errors
