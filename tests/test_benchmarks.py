"""The benchmark runs end to end for this process's driver (counts only: no timing assertion)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import django
import pytest

from tests.conftest import DRIVER, ROOT

pytestmark = [
    pytest.mark.server,
    pytest.mark.skipif(
        DRIVER not in ("mysqlclient", "psycopg"),
        reason="one MySQL and one PostgreSQL driver are enough for a smoke test of the benchmark",
    ),
]

BASE = {"unsafe", "unsafe_again", "django_health_checks", "freshconn"}
VARIANTS = {
    "loop": BASE | {"django_max_age_0", "freshconn_poll_never", "freshconn_poll_always", "floor"},
    "gap": BASE | {"freshconn_poll_never"},
    "redis": BASE | {"freshconn_poll_never"},
    "idle_aliases": BASE,
}
POOL_BUSY = {"pool", "pool_again", "pool_health_checks", "pool_freshconn"}
POOL_IDLE = {"pool", "pool_health_checks", "pool_freshconn"}
needs_pool = pytest.mark.skipif(
    DRIVER != "psycopg" or django.VERSION < (5, 1), reason="Django's pool needs psycopg 3 and Django 5.1+"
)


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One quick run of every variant (loop, gap, Redis, idle aliases, pool on psycopg), this driver, no callgrind."""
    out = tmp_path_factory.mktemp("bench")
    env = {k: v for k, v in os.environ.items() if k != "DJANGO_SETTINGS_MODULE"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "src")])
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--drivers", DRIVER, "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "benchmark.png").stat().st_size > 0
    assert "freshconn against the targets" in (out / "results.md").read_text()
    data: dict[str, Any] = json.loads((out / "results.json").read_text())
    data["_out"] = out
    return data


def test_quick_benchmark_reports_every_variant_and_policy(results: dict[str, Any]) -> None:
    """Every variant reports its policies with positive rates, and every round ran."""
    assert set(results["summary"]) == set(VARIANTS)
    assert results["instructions"] == {}  # --quick skips callgrind
    for variant, policies in VARIANTS.items():
        summary = results["summary"][variant][DRIVER]
        assert set(summary) == policies, variant
        for policy in policies:
            assert summary[policy]["rate"] > 0, (variant, policy)
            assert summary[policy]["units"] > 0, (variant, policy)
    shared = results["drivers"][DRIVER]["shared"]
    for variant in ("loop", "gap", "redis"):
        assert len(shared["variants"][variant]["rounds"]) == shared["config"]["rounds"]
    assert results["drivers"][DRIVER]["idle_aliases"]["config"]["idle_aliases"] == results["config"]["idle_aliases"]


def test_freshconn_never_pings_or_reconnects_when_busy_in_any_variant(results: dict[str, Any]) -> None:
    """0 pings and no connect beyond the first, whatever the message source, and with idle aliases configured."""
    for variant in VARIANTS:
        for policy, s in results["summary"][variant][DRIVER].items():
            if not policy.startswith("freshconn"):
                continue
            assert s["pings_per_1000"] == 0, (variant, policy)
            assert s["connects"] == 0, (variant, policy)
            assert s["max_connects_per_round_incl_warmup"] <= 1, (variant, policy)


def test_the_poll_runs_after_a_pause_and_the_forced_policies_do_what_they_say(results: dict[str, Any]) -> None:
    """After a gap or a Redis round trip every unit polls the socket; poll_never never does, poll_always always."""
    for variant in ("gap", "redis"):
        s = results["summary"][variant][DRIVER]
        assert s["freshconn"]["polls_per_1000"] == 1000, variant
        assert s["freshconn_poll_never"]["polls_per_1000"] == 0, variant
    loop = results["summary"]["loop"][DRIVER]
    # Back to back, the default skips the poll (_policy.SOCKET_CHECK_AFTER; a preemption between
    # two units on a loaded machine is a real pause, so not necessarily every time).
    assert loop["freshconn"]["polls_per_1000"] < 500
    assert loop["freshconn_poll_always"]["polls_per_1000"] == 1000
    assert loop["freshconn_poll_never"]["polls_per_1000"] == 0
    assert results["summary"]["redis"][DRIVER]["unsafe"]["starved"] == 0  # the Redis list never ran dry


def test_django_policies_ping_or_connect_once_per_unit(results: dict[str, Any]) -> None:
    """The instrumentation sees what each Django policy really does: one ping, or one connect, per unit."""
    for variant in VARIANTS:
        s = results["summary"][variant][DRIVER]
        assert s["django_health_checks"]["pings_per_1000"] == 1000, variant
        assert s["unsafe"]["pings_per_1000"] == 0, variant
    assert results["summary"]["loop"][DRIVER]["django_max_age_0"]["connects_per_1000"] == 1000


def test_kill_trials_without_the_poll_fail_the_next_unit(results: dict[str, Any]) -> None:
    """The safety side of the trade-off is measured: with the poll off, a KILL between units fails the next one."""
    kills = results["kill_trials"][DRIVER]
    n = kills["trials"]
    assert n > 0
    assert kills["no_poll_at_once"]["failed_units"] == n
    assert kills["no_poll_after_1ms"]["failed_units"] == n
    for case in ("poll_at_once", "poll_after_1ms"):
        # With the poll the KILL is seen before the query (or, on PostgreSQL, may still be in flight
        # "at once"): never more failures than trials, and each seen KILL discarded the connection.
        assert 0 <= kills[case]["failed_units"] <= n
        assert kills[case]["discarded_dead"] + kills[case]["discarded_error"] == n
    # The back-to-back skip's price, measured: a KILL in a unit's short tail fails the next unit
    # (its query finds it); past SOCKET_CHECK_IDLE the poll finds it first (MySQL) or the query does.
    # How many short tails fail is not asserted: a loaded machine stretches a tail past the limit,
    # or preempts the worker between the two units (a pause: the poll runs). The skip itself is
    # proven by tests/test_socket_poll.py.
    short = kills["tail_short"]
    assert 0 <= short["tails_under_half_the_limit"] <= n
    assert 0 <= short["failed_units"] <= n
    assert kills["tail_long"]["tails_under_half_the_limit"] == 0
    for case in ("tail_short", "tail_long"):
        assert kills[case]["discarded_dead"] + kills[case]["discarded_error"] == n
    if DRIVER == "mysqlclient":
        assert kills["tail_long"]["failed_units"] == 0


@needs_pool
def test_pool_section_reports_three_policies_and_the_control_in_both_shapes(results: dict[str, Any]) -> None:
    """The pool section ran on psycopg: its two tables, every policy, each pool with the check its policy says."""
    pool = results["pool"][DRIVER]
    assert set(pool["busy"]) == POOL_BUSY
    assert set(pool["idle"]) == POOL_IDLE
    checks = {p: s["check"] for p, s in pool["busy"].items()}
    assert checks == {
        "pool": "none",
        "pool_again": "none",
        "pool_health_checks": "psycopg_pool.check_connection",
        "pool_freshconn": "freshconn",
    }
    for policy, s in pool["busy"].items():
        assert s["rate"] > 0, policy
        assert s["units"] > 0, policy
    for policy, s in pool["idle"].items():
        assert s["messages"] == results["config"]["pool"]["messages"], policy
    md = (results["_out"] / "results.md").read_text()
    assert "**pool, busy:" in md
    assert "**pool, after idle:" in md
    for policy in POOL_BUSY:
        assert f"| {DRIVER} | {policy} |" in md, policy


@needs_pool
def test_pool_busy_freshconn_sends_no_round_trip_and_health_checks_one_per_checkout(results: dict[str, Any]) -> None:
    """Busy: freshconn's check hands the connection out with 0 pings; Django's health checks ping at every checkout."""
    busy = results["pool"][DRIVER]["busy"]
    assert busy["pool_freshconn"]["pings_per_1000"] == 0
    assert busy["pool_health_checks"]["pings_per_1000"] == 1000
    assert busy["pool"]["pings_per_1000"] == 0
    for policy, s in busy.items():
        assert s["connects"] == 0, policy  # the pool's connection is reused, whoever checks it
    # freshconn's units are counted by freshconn itself: one per message.
    assert busy["pool_freshconn"]["units"] == busy["pool_freshconn"]["messages"]


@needs_pool
def test_pool_after_idle_freshconn_never_fails_and_the_pool_alone_does(results: dict[str, Any]) -> None:
    """After idling past the server's limit: freshconn 0 failures, 0 pings; the pool alone hands out dead ones."""
    idle = results["pool"][DRIVER]["idle"]
    fc, hc, alone = idle["pool_freshconn"], idle["pool_health_checks"], idle["pool"]
    assert fc["failures"] == 0, fc["errors"]
    assert fc["pings_per_message"] == 0  # dropped by its idle time, without a round trip
    assert fc["connects_per_message"] >= 1  # the server closed it: a new one is unavoidable
    assert fc["connects"] == fc["pool_connections_num"]  # freshconn's count agrees with the pool's
    assert hc["failures"] == 0, hc["errors"]
    assert hc["pings_per_message"] >= 1  # a round trip at every checkout, and one more per dead connection
    assert alone["failures"] == alone["messages"]
    assert all("idle-session timeout" in e for e in alone["errors"]), alone["errors"]
