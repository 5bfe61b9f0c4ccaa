"""A short chaos soak (scripts/soak) per vendor: every fault kind, real servers, counts only (no timing)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import DRIVER, ROOT

pytestmark = [
    pytest.mark.server,
    pytest.mark.slow,
    pytest.mark.broker,  # a Redis queue: on the full leg only (its behaviour does not depend on Django's series)
    pytest.mark.skipif(
        DRIVER not in ("mysqlclient", "psycopg"),
        reason="the soak is a test of freshconn's behaviour, not of the driver: one MySQL and one PostgreSQL "
        "driver keep it under a minute per vendor (scripts/soak --drivers pymysql,psycopg2 runs the others)",
    ),
]

KINDS = ("idle_expiry", "kill", "server_restart", "proxy", "black_hole", "commit_loss")


def soak(tmp_path: Path, *args: str) -> dict[str, Any]:
    """Run one soak child for this process's driver (it starts its own durable test bed) and return its result."""
    out = tmp_path / "result.json"
    env = {k: v for k, v in os.environ.items() if k != "DJANGO_SETTINGS_MODULE"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "src")])
    proc = subprocess.run(
        [sys.executable, "-m", "soak.child", f"--driver={DRIVER}", f"--out={out}", "--stall-timeout=60", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result: dict[str, Any] = json.loads(out.read_text())
    return result


def _black_hole_skipped(result: dict[str, Any]) -> bool:
    return any(note.startswith("black hole skipped") for note in result["notes"])


def test_short_soak_loses_nothing_applies_nothing_twice_and_never_restarts_the_worker(tmp_path: Path) -> None:
    """Under every fault kind, each message is applied exactly once, no worker restarts, every lost COMMIT surfaces."""
    r = soak(tmp_path, "--messages=180", "--faults=18", "--seed=3")
    assert (r["produced"], r["acked"], r["rows"]) == (180, 180, 180)
    assert r["lost"] == 0
    assert r["applied_twice"] == 0
    assert r["replays_stopped_by_unique"] == 0
    assert r["worker_restarts"] == 0
    assert not r["stalled"]
    # Each COMMIT held on the server and then cut came back as AmbiguousCommitError for that session.
    loss = r["commit_loss"]
    assert loss["in_flight"] >= 1
    assert loss["surfaced_as_ambiguous"] == loss["in_flight"]
    assert loss["not_surfaced"] == []
    for kind in KINDS:
        if kind == "black_hole" and _black_hole_skipped(r):
            continue
        assert r["faults"][kind]["injected"] >= 1, kind
        assert r["faults"][kind]["verified"] == r["faults"][kind]["injected"], kind
    assert r["stats"]["discarded"] >= 1
    assert r["stats"]["ambiguous_commits"] == r["ambiguous_commit_errors"]["total"]


def test_control_loop_without_freshconn_dies_under_the_same_faults(tmp_path: Path) -> None:
    """For contrast: a plain Django loop under the same faults dies and is restarted by its supervisor."""
    r = soak(tmp_path, "--mode=control", "--messages=60", "--faults=6", "--seed=3")
    assert r["mode"] == "control"
    assert r["worker_restarts"] >= 1
    # An expired idle session is fatal to a plain loop: its next query fails.
    expiries = r["faults"]["idle_expiry"]["injected"]
    assert expiries == 1
    assert r["worker_restarts_by_fault"].get("idle_expiry", 0) >= expiries
