"""The benchmark's parent process: servers, one child per driver, the summary, JSON and chart.

Usage: python -m benchmarks [--quick] [--drivers mysqlclient,psycopg] [--seconds 0.5] [--rounds 20]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.child import DRIVERS
from benchmarks.report import render_chart, render_markdown, render_table
from benchmarks.worker import POLICIES

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "benchmarks" / "out"
DOCS_CHART = ROOT / "docs" / "img" / "benchmark.png"
VENDOR = {"mysqlclient": "mysql", "pymysql": "mysql", "psycopg": "postgresql", "psycopg2": "postgresql"}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def parse_drivers(values: list[str]) -> list[str]:
    drivers: list[str] = []
    for value in values:
        for name in value.replace(",", " ").split():
            if name not in DRIVERS:
                raise SystemExit(f"unknown driver {name!r}: choose from {', '.join(DRIVERS)}")
            if name not in drivers:
                drivers.append(name)
    return drivers


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), cpu)
    except OSError:
        pass
    flags = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as fh:
        flags = next((line for line in fh if line.startswith("flags")), "")
    info: dict[str, Any] = {
        "cpu_count": os.cpu_count(),
        "virtual_machine": " hypervisor " in f" {flags.split(':', 1)[-1]} ",
        "cpu_model": cpu,
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "python_implementation": platform.python_implementation(),
    }
    # The core changes between commits (and before them): fingerprint the source that was measured.
    digest = hashlib.sha1()
    for path in sorted((ROOT / "src" / "freshconn").rglob("*.py")):
        digest.update(path.read_bytes())
    info["freshconn_src_sha1"] = digest.hexdigest()[:12]
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        info["freshconn_commit"] = subprocess.run(
            ["git", "-C", str(ROOT), "describe", "--always", "--dirty"], capture_output=True, text=True, check=True
        ).stdout.strip()
    return info


def _quartiles(values: list[float]) -> tuple[float, float]:
    if len(values) < 2:
        return values[0], values[0]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], q[2]


def summarize(child: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per policy: median rate, median of the per-round ratios to unsafe, counts per 1,000 units."""
    rounds = child["rounds"]
    out: dict[str, dict[str, Any]] = {}
    for policy in POLICIES:
        rows = [r["policies"][policy] for r in rounds]
        ratios = [r["policies"][policy]["rate"] / r["policies"]["unsafe"]["rate"] for r in rounds]
        units = sum(row["units"] for row in rows)

        def per_k(key: str, rows: list[dict[str, Any]] = rows, units: int = units) -> float:
            return 1000.0 * sum(row[key] for row in rows) / units if units else 0.0

        q1, q3 = _quartiles(ratios)
        out[policy] = {
            "rate": statistics.median(row["rate"] for row in rows),
            "ratio": statistics.median(ratios),
            "ratio_q1": q1,
            "ratio_q3": q3,
            "ratio_min": min(ratios),
            "ratio_max": max(ratios),
            "rounds_at_or_above_target": sum(x >= 0.97 for x in ratios),
            "pings_per_1000": per_k("pings"),
            "connects_per_1000": per_k("connects"),
            "overhead_us": statistics.median(o[policy]["overhead_us"] for o in child["overhead_rounds"])
            if child["overhead_rounds"]
            else None,
            "in_loop_us": statistics.median(o[policy]["in_loop_us"] for o in child["overhead_rounds"])
            if child["overhead_rounds"]
            else None,
            # The cost seen from throughput instead: extra time per message compared with unsafe.
            "throughput_overhead_us": statistics.median(
                1e6 / r["policies"][policy]["rate"] - 1e6 / r["policies"]["unsafe"]["rate"] for r in rounds
            ),
            "cpu_us_per_message": statistics.median(1e6 * row["cpu_seconds"] / row["messages"] for row in rows),
            "cpu_overhead_us": statistics.median(
                1e6 * r["policies"][policy]["cpu_seconds"] / r["policies"][policy]["messages"]
                - 1e6 * r["policies"]["unsafe"]["cpu_seconds"] / r["policies"]["unsafe"]["messages"]
                for r in rounds
            ),
            "messages": sum(row["messages"] for row in rows),
            "units": units,
            "pings": sum(row["pings"] for row in rows),
            "connects": sum(row["connects"] for row in rows),
            "max_connects_per_round_incl_warmup": max(row["connects_incl_warmup"] for row in rows),
        }
    return out


def run_child(
    driver: str,
    db: dict[str, Any],
    args: argparse.Namespace,
    workdir: str,
    warmup: float,
    overhead: float,
    overhead_rounds: int,
) -> dict[str, Any]:
    out_file = os.path.join(workdir, f"{driver}.json")
    env = dict(os.environ)
    env.pop("DJANGO_SETTINGS_MODULE", None)  # the child configures Django itself
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), str(ROOT / "src"), env.get("PYTHONPATH", "")) if p)
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.child",
        f"--driver={driver}",
        f"--out={out_file}",
        f"--seconds={args.seconds}",
        f"--rounds={args.rounds}",
        f"--overhead-rounds={overhead_rounds}",
        f"--slice={args.slice}",
        f"--warmup={warmup}",
        f"--overhead-seconds={overhead}",
    ]
    # The DATABASES entry (with its password) goes through stdin, not argv.
    proc = subprocess.run(cmd, input=json.dumps(db), text=True, cwd=ROOT, env=env, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"the {driver} benchmark process failed with exit code {proc.returncode}")
    with open(out_file) as fh:
        result: dict[str, Any] = json.load(fh)
    return result


def _stop_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="One primary-key SELECT per message through the ORM, per driver and connection policy.",
    )
    parser.add_argument("--quick", action="store_true", help="short runs (a smoke test, not a measurement)")
    parser.add_argument(
        "--drivers", nargs="+", default=[",".join(DRIVERS)], help=f"any of {', '.join(DRIVERS)} (default: all)"
    )
    parser.add_argument("--seconds", type=float, help="timed seconds per policy per round (default 0.5; quick 0.1)")
    parser.add_argument("--rounds", type=int, help="rounds; medians over rounds are reported (default 20; quick 6)")
    parser.add_argument("--slice", type=float, default=0.02, help="policies take turns every SLICE seconds (0.02)")
    parser.add_argument("--out", type=Path, default=None, help=f"output folder (default {DEFAULT_OUT})")
    parser.add_argument(
        "--chart",
        type=Path,
        default=None,
        help="PNG path (default: docs/img/benchmark.png for a full run of all drivers, else OUT/benchmark.png)",
    )
    args = parser.parse_args(argv)
    drivers = parse_drivers(args.drivers)
    if args.seconds is None:
        args.seconds = 0.1 if args.quick else 0.5
    if args.rounds is None:
        args.rounds = 6 if args.quick else 20
    if args.seconds <= 0 or args.slice <= 0 or args.rounds < 1:
        parser.error("--seconds and --slice must be > 0, --rounds >= 1")
    warmup = 0.05 if args.quick else 0.2
    overhead = 0.05 if args.quick else 0.2
    overhead_rounds = 2 if args.quick else 5
    out_dir: Path = args.out or DEFAULT_OUT
    out_dir.mkdir(parents=True, exist_ok=True)
    chart = args.chart
    if chart is None:
        full = not args.quick and args.out is None and drivers == list(DRIVERS)
        chart = DOCS_CHART if full else out_dir / "benchmark.png"

    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    from testbed.servers import MariaDB, PostgreSQL, Server

    machine = machine_info()
    machine["loadavg_start"] = os.getloadavg()
    started = time.monotonic()
    servers: dict[str, Server] = {}
    children: dict[str, dict[str, Any]] = {}
    try:
        for vendor in dict.fromkeys(VENDOR[d] for d in drivers):
            log(f"starting a throwaway {'MariaDB' if vendor == 'mysql' else 'PostgreSQL'} server ...")
            srv: Server = MariaDB() if vendor == "mysql" else PostgreSQL()
            servers[vendor] = srv
            srv.start()
        with tempfile.TemporaryDirectory(prefix="fc-bench-") as workdir:
            for driver in drivers:
                log(f"{driver}: {args.rounds} rounds x {len(POLICIES)} policies x {args.seconds:g} s")
                db = servers[VENDOR[driver]].django_settings()  # type: ignore[attr-defined]
                load_before = os.getloadavg()
                children[driver] = run_child(driver, db, args, workdir, warmup, overhead, overhead_rounds)
                children[driver]["loadavg_before"] = load_before
                children[driver]["loadavg_after"] = os.getloadavg()
    finally:
        for srv in servers.values():
            srv.stop()
    machine["loadavg_end"] = os.getloadavg()

    summary = {driver: summarize(child) for driver, child in children.items()}
    results = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python -m benchmarks", *(argv if argv is not None else sys.argv[1:])]),
        "quick": args.quick,
        "wall_seconds": round(time.monotonic() - started, 1),
        "machine": machine,
        "policies": list(POLICIES),
        "summary": summary,
        "drivers": children,
    }
    (out_dir / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    table = render_table(results)
    (out_dir / "results.md").write_text(render_markdown(results))
    chart.parent.mkdir(parents=True, exist_ok=True)
    render_chart(results, chart)
    print(table)
    log(f"\nwrote {out_dir / 'results.json'}, {out_dir / 'results.md'} and {chart}")
    return 0
