"""The demo (``python -m demo``), run as a real subprocess with its own MariaDB and Kafka broker."""

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


@pytest.fixture(scope="module")
def demo() -> dict[str, Any]:
    """The demo's machine-readable summary (its last output line with --json)."""
    env = {k: v for k, v in os.environ.items() if k != "DJANGO_SETTINGS_MODULE"}
    done = subprocess.run(
        [sys.executable, "-m", "demo", "--json"],
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


def still_running(pid: int) -> bool:
    # A number the kernel has since given to an unrelated process does not count.
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read()
    except OSError:
        return False
    return any(name in cmdline for name in (b"mariadbd", b"tansu", b"consume_orders"))


def test_plain_loop_stays_broken_after_the_server_drops_the_idle_connection(demo):
    """Without freshconn, the consumer hits a disconnect error after the idle and loses later orders."""
    plain = demo["modes"]["plain"]
    sent = sum(plain["sent"].values())
    assert plain["consumer"]["errors"] >= 1, demo["output"]
    assert plain["consumer"]["first_error_is_disconnect"] is True
    assert "2006" in plain["consumer"]["first_error"] or "2013" in plain["consumer"]["first_error"]
    assert plain["rows"]["1"] == plain["sent"]["1"]
    assert plain["rows"]["total"] < sent
    assert plain["consumer"]["seen"] == sent  # the worker kept running, and kept failing


def test_freshconn_loop_writes_every_order_exactly_once(demo):
    """With freshconn.each(), the consumer discards the dropped connection and writes every order once."""
    fresh = demo["modes"]["freshconn"]
    sent = sum(fresh["sent"].values())
    assert fresh["consumer"]["errors"] == 0, fresh["consumer"]["first_error"]
    assert fresh["rows"]["total"] == sent
    assert fresh["rows"]["distinct_refs"] == sent
    assert fresh["consumer"]["freshconn"]["discarded"] >= 1
    assert fresh["committed"] == sent


def test_demo_reports_success_and_leaves_nothing_behind(demo):
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
