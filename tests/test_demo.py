"""The demo (``python -m demo``), run as a real subprocess with its own servers: Kafka, then RQ (``--worker rq``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import pytest

from tests.conftest import DRIVER, ROOT

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(DRIVER != "mysqlclient", reason="the demo runs on MariaDB with mysqlclient only"),
]


def run_demo(*args: str) -> dict[str, Any]:
    """The demo's machine-readable summary (its last output line with --json)."""
    env = {k: v for k, v in os.environ.items() if k != "DJANGO_SETTINGS_MODULE"}
    done = subprocess.run(
        [sys.executable, "-m", "demo", *args, "--json"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.stdout.strip(), done.stderr
    summary: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    summary["returncode"] = done.returncode
    summary["output"] = done.stdout + done.stderr
    return summary


@pytest.fixture(scope="module")
def demo() -> dict[str, Any]:
    """The Kafka demo's summary."""
    return run_demo()


@pytest.fixture(scope="module")
def demo_rq() -> dict[str, Any]:
    """The RQ demo's summary."""
    return run_demo("--worker", "rq")


def still_running(pid: int) -> bool:
    # A number the kernel has since given to an unrelated process does not count.
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read()
    except OSError:
        return False
    return any(name in cmdline for name in (b"mariadbd", b"tansu", b"redis-server", b"consume_orders"))


def test_plain_loop_stays_broken_after_the_server_drops_the_idle_connection(demo: dict[str, Any]) -> None:
    """Without freshconn, the consumer hits a disconnect error after the idle and loses later orders."""
    plain = demo["modes"]["plain"]
    sent = sum(plain["sent"].values())
    assert plain["consumer"]["errors"] >= 1, demo["output"]
    assert plain["consumer"]["first_error_is_disconnect"] is True
    assert "2006" in plain["consumer"]["first_error"] or "2013" in plain["consumer"]["first_error"]
    assert plain["rows"]["1"] == plain["sent"]["1"]
    assert plain["rows"]["total"] < sent
    assert plain["consumer"]["seen"] == sent  # the worker kept running, and kept failing


def test_freshconn_loop_writes_every_order_exactly_once(demo: dict[str, Any]) -> None:
    """With freshconn.each(), the consumer discards the dropped connection and writes every order once."""
    fresh = demo["modes"]["freshconn"]
    sent = sum(fresh["sent"].values())
    assert fresh["consumer"]["errors"] == 0, fresh["consumer"]["first_error"]
    assert fresh["rows"]["total"] == sent
    assert fresh["rows"]["distinct_refs"] == sent
    assert fresh["consumer"]["freshconn"]["discarded"] >= 1
    assert fresh["committed"] == sent


def test_demo_reports_success_and_leaves_nothing_behind(demo: dict[str, Any]) -> None:
    """The demo exits 0 and every process and temporary folder it started is gone."""
    assert demo["returncode"] == 0, demo["output"]
    assert demo["ok"] is True
    assert demo["problems"] == []
    pids = [pid for pid in demo["cleanup"]["pids"] if pid]
    assert len(pids) == 4  # MariaDB, the broker, two consumers
    for pid in pids:
        assert not still_running(pid), f"process {pid} is still running"
    for path in demo["cleanup"]["dirs"]:
        assert not os.path.exists(path), f"{path} was not removed"


@pytest.mark.broker
def test_plain_rq_simple_worker_stays_broken_after_the_server_drops_the_idle_connection(
    demo_rq: dict[str, Any],
) -> None:
    """Without freshconn, rq.SimpleWorker fails every job after the idle with a disconnect, and RQ records them."""
    plain = demo_rq["modes"]["plain"]
    sent = sum(plain["sent"].values())
    assert plain["worker_class"] == "rq.SimpleWorker"
    assert plain["jobs"]["1"] == {"finished": plain["sent"]["1"], "failed": 0}, demo_rq["output"]
    assert plain["jobs"]["2"]["failed"] >= 1
    assert plain["failed_registry"] == plain["worker"]["errors"] == plain["jobs"]["2"]["failed"]
    assert plain["worker"]["first_error_is_disconnect"] is True
    assert "2006" in plain["first_failed_error"] or "2013" in plain["first_failed_error"]
    assert plain["rows"]["1"] == plain["sent"]["1"]
    assert plain["rows"]["total"] < sent
    assert plain["worker"]["seen"] == sent  # the worker kept running, and kept failing
    assert plain["job_pids"] == [plain["worker_pid"]]  # jobs ran in the worker process


@pytest.mark.broker
def test_freshconn_rq_simple_worker_writes_every_order_exactly_once(demo_rq: dict[str, Any]) -> None:
    """With FreshconnSimpleWorker, no job fails: the dropped connection is discarded and every order written once."""
    fresh = demo_rq["modes"]["freshconn"]
    sent = sum(fresh["sent"].values())
    assert fresh["worker_class"] == "FreshconnSimpleWorker"
    assert fresh["failed_registry"] == 0, fresh["first_failed_error"]
    assert fresh["jobs"]["2"] == {"finished": fresh["sent"]["2"], "failed": 0}
    assert fresh["rows"]["total"] == fresh["rows"]["distinct_refs"] == sent
    stats = fresh["worker"]["freshconn"]
    assert stats["units"] == sent
    assert stats["discarded_server_idle"] >= 1
    assert stats["pings"] == 0


@pytest.mark.broker
def test_plain_forking_rq_worker_opens_a_connection_per_job_and_never_closes_it(demo_rq: dict[str, Any]) -> None:
    """RQ's forking Worker survives the idle only because each job's horse connects anew, then exits without closing."""
    fork = demo_rq["modes"]["plain_fork"]
    sent = sum(fork["sent"].values())
    assert fork["worker_class"] == "rq.Worker (forking)"
    assert fork["failed_registry"] == 0, fork["first_failed_error"]
    assert fork["rows"]["total"] == sent
    assert len(fork["job_pids"]) == sent  # one work horse per job
    assert fork["worker_pid"] not in fork["job_pids"]
    assert fork["job_connects"] == sent
    assert fork["worker"]["freshconn"].get("connects", 0) == 0
    assert fork["aborted_clients"] == sent


@pytest.mark.broker
def test_rq_demo_reports_success_and_leaves_nothing_behind(demo_rq: dict[str, Any]) -> None:
    """The RQ demo exits 0 and every process (servers, workers, work horses) and folder it started is gone."""
    assert demo_rq["returncode"] == 0, demo_rq["output"]
    assert demo_rq["ok"] is True
    assert demo_rq["problems"] == []
    pids = [pid for pid in demo_rq["cleanup"]["pids"] if pid]
    assert len(pids) == 5  # MariaDB, Redis, three workers
    for pid in pids + demo_rq["modes"]["plain_fork"]["job_pids"]:
        assert not still_running(pid), f"process {pid} is still running"
    for path in demo_rq["cleanup"]["dirs"]:
        assert not os.path.exists(path), f"{path} was not removed"
