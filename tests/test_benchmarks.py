"""The benchmark runs end to end for this process's driver (counts only: no timing assertion)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import DRIVER, ROOT

pytestmark = [
    pytest.mark.server,
    pytest.mark.skipif(
        DRIVER not in ("mysqlclient", "psycopg"),
        reason="one MySQL and one PostgreSQL driver are enough for a smoke test of the benchmark",
    ),
]

POLICIES = {"unsafe", "unsafe_again", "django_max_age_0", "django_health_checks", "freshconn"}


def test_quick_benchmark_reports_every_policy_and_freshconn_never_pings_when_busy(tmp_path):
    """A quick run reports all four policies with positive rates; freshconn sends no ping and reuses its connection."""
    env = {k: v for k, v in os.environ.items() if k != "DJANGO_SETTINGS_MODULE"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "src")])
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--drivers", DRIVER, "--out", str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert (tmp_path / "benchmark.png").stat().st_size > 0

    summary = results["summary"][DRIVER]
    assert set(summary) == POLICIES
    for policy in POLICIES:
        assert summary[policy]["rate"] > 0, policy
        assert summary[policy]["units"] > 0, policy

    fresh = summary["freshconn"]
    assert fresh["pings_per_1000"] == 0
    assert fresh["connects"] == 0
    rounds = results["drivers"][DRIVER]["rounds"]
    assert len(rounds) == results["drivers"][DRIVER]["config"]["rounds"]
    assert all(r["policies"]["freshconn"]["connects_incl_warmup"] <= 1 for r in rounds)
    assert results["drivers"][DRIVER]["freshconn_stats"]["units"] == fresh["units"]

    # The instrumentation sees what each Django policy really does: one ping, or one connect, per unit.
    assert summary["django_health_checks"]["pings_per_1000"] == 1000
    assert summary["django_max_age_0"]["connects_per_1000"] == 1000
    assert summary["unsafe"]["pings_per_1000"] == 0
