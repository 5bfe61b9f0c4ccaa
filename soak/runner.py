"""The soak's command: one child process per driver (each starts its own test bed), then the report.

    python -m soak                                # 10,000 messages, ~1,000 faults, mysqlclient and psycopg
    python -m soak --messages 300 --drivers psycopg
    python -m soak --control                      # the same faults against a plain Django loop
    python -m soak --fleet                        # 100 threads across server restarts: the reconnect storm

Prints one JSON line per driver (stdout), then a table and the verdicts. Exit status 1 when a
freshconn run broke one of issue 9's guarantees (loss, double apply, a replay that only the
UNIQUE key stopped, a worker restart, a COMMIT lost without AmbiguousCommitError) or a fleet
thread surfaced an error or never came back.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from soak.child import DRIVERS
from soak.report import fleet_table, fleet_verdict, soak_table, soak_verdict

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "soak" / "out"


def parse_drivers(values: list[str]) -> list[str]:
    drivers: list[str] = []
    for value in values:
        for name in value.replace(",", " ").split():
            if name not in DRIVERS:
                raise SystemExit(f"unknown driver {name!r}: choose from {', '.join(DRIVERS)}")
            if name not in drivers:
                drivers.append(name)
    return drivers


def one_line(result: dict[str, Any]) -> dict[str, Any]:
    """The result without its long lists (every fault, every AmbiguousCommitError): those stay in the file."""
    shown = {k: v for k, v in result.items() if k not in ("fault_log", "samples", "restarts", "replays_stopped_detail")}
    if "ambiguous_commit_errors" in shown:
        ambiguous = dict(shown["ambiguous_commit_errors"])
        ambiguous["other"] = len(ambiguous.get("other", []))
        shown["ambiguous_commit_errors"] = ambiguous
    return shown


def run_child(driver: str, mode: str, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    out_file = out / f"{mode}-{driver}.json"
    env = dict(os.environ)
    env.pop("DJANGO_SETTINGS_MODULE", None)  # the child configures Django itself
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), str(ROOT / "src"), env.get("PYTHONPATH", "")) if p)
    cmd = [
        sys.executable,
        "-m",
        "soak.child",
        f"--driver={driver}",
        f"--mode={mode}",
        f"--messages={args.messages}",
        f"--seed={args.seed}",
        f"--workers={args.workers}",
        f"--progress={args.progress}",
        f"--threads={args.threads}",
        f"--restarts={args.restarts}",
        f"--down={args.down}",
        f"--gap={args.gap}",
        f"--out={out_file}",
    ]
    if args.faults is not None:
        cmd.append(f"--faults={args.faults}")
    if args.kinds:
        cmd += ["--kinds", *args.kinds]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"the {driver} {mode} process failed with exit code {proc.returncode}")
    with open(out_file) as fh:
        result: dict[str, Any] = json.load(fh)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--drivers", nargs="+", default=["mysqlclient,psycopg"], help=f"any of {', '.join(DRIVERS)}")
    parser.add_argument("--messages", type=int, default=10_000, help="messages per driver (default 10,000)")
    parser.add_argument("--faults", type=int, default=None, help="faults per driver (default: messages / 10)")
    parser.add_argument("--kinds", nargs="*", default=None, help="only these fault kinds (default: all six)")
    parser.add_argument("--seed", type=int, default=1, help="the fault schedule's seed (default 1)")
    parser.add_argument("--workers", type=int, default=1, help="worker threads draining the queue (default 1)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--control", action="store_true", help="a plain Django loop instead of freshconn")
    mode.add_argument("--fleet", action="store_true", help="the reconnect-storm measurement instead")
    parser.add_argument("--threads", type=int, default=100, help="fleet: threads (default 100)")
    parser.add_argument("--restarts", type=int, default=5, help="fleet: server restarts (default 5)")
    parser.add_argument("--down", type=float, default=2.0, help="fleet: seconds down per restart (default 2)")
    parser.add_argument(
        "--gap", type=float, default=3.0, help="fleet: seconds of steady work between restarts (default 3, +0-1 s)"
    )
    parser.add_argument("--progress", type=int, default=100, help="a progress line every N faults (0: none)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    parser.add_argument(
        "--report", action="store_true", help="run nothing: print the table and verdicts of the results in --out"
    )
    args = parser.parse_args(argv)
    drivers = parse_drivers(args.drivers)
    if args.messages < 1 or args.workers < 1 or args.threads < 1:
        parser.error("--messages, --workers and --threads must be >= 1")
    args.out.mkdir(parents=True, exist_ok=True)
    mode_name = "fleet" if args.fleet else "control" if args.control else "soak"
    results = []
    for driver in drivers:
        if args.report:
            with open(args.out / f"{mode_name}-{driver}.json") as fh:
                result = json.load(fh)
        else:
            result = run_child(driver, mode_name, args, args.out)
        print(json.dumps(one_line(result), sort_keys=True), flush=True)
        results.append(result)
    print()
    if args.fleet:
        print(fleet_table(results))
        verdicts = [line for r in results for line in fleet_verdict(r)]
        failed = any(r["errors_surfaced"] or r["threads_not_back"] for r in results)
    else:
        print(soak_table(results))
        verdicts = [line for r in results for line in soak_verdict(r)]
        failed = not args.control and any("FAILED" in line for line in verdicts)
    print()
    print("\n".join(verdicts))
    print(f"\nfull results: {args.out}/")
    return 1 if failed else 0
