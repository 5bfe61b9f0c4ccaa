"""The benchmark's parent process: servers, the child processes per driver, the summaries, JSON, tables, chart.

Usage: python -m benchmarks [--quick] [--drivers mysqlclient,psycopg] [--variants loop,gap,redis,idle_aliases,pool] ...
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import instructions
from benchmarks import pool as pool_section
from benchmarks.child import DRIVERS, POOL, VARIANT_POLICIES, VARIANTS
from benchmarks.report import plural, render_chart, render_markdown, render_table

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "benchmarks" / "out"
DOCS_CHART = ROOT / "docs" / "img" / "benchmark.png"
VENDOR = {"mysqlclient": "mysql", "pymysql": "mysql", "psycopg": "postgresql", "psycopg2": "postgresql"}
#: The variants that share one process per driver; "idle_aliases" needs its own (DATABASES differs).
SHARED = ("loop", "gap", "redis")
#: Every variant the command runs: the four above, and Django's PostgreSQL pool (psycopg 3 only, its own process).
ALL_VARIANTS = (*VARIANTS, POOL)
#: The one driver Django's pool runs on.
POOL_DRIVER = "psycopg"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def parse_list(values: list[str], known: tuple[str, ...], what: str) -> list[str]:
    out: list[str] = []
    for value in values:
        for name in value.replace(",", " ").split():
            if name not in known:
                raise SystemExit(f"unknown {what} {name!r}: choose from {', '.join(known)}")
            if name not in out:
                out.append(name)
    return out


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


def summarize(res: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """One variant of one driver, per policy: median rate, median per-round ratio to unsafe, counts per 1,000 units."""
    rounds = res["rounds"]
    overhead = res["overhead_rounds"]
    out: dict[str, dict[str, Any]] = {}
    for policy in res["policies"]:
        rows = [r["policies"][policy] for r in rounds]
        ratios = [r["policies"][policy]["rate"] / r["policies"]["unsafe"]["rate"] for r in rounds]
        units = sum(row["units"] for row in rows)

        def per_k(key: str, rows: list[dict[str, Any]] = rows, units: int = units) -> float:
            return 1000.0 * sum(row[key] for row in rows) / units if units else 0.0

        def over(key: str, policy: str = policy) -> float | None:
            values = [o[policy][key] for o in overhead if key in o[policy]]
            return statistics.median(values) if values else None

        q1, q3 = _quartiles(ratios)
        polls = res.get("polls", {}).get(policy)
        out[policy] = {
            "rate": statistics.median(row["rate"] for row in rows),
            "ratio": statistics.median(ratios),
            "ratio_q1": q1,
            "ratio_q3": q3,
            "ratio_min": min(ratios),
            "ratio_max": max(ratios),
            "pings_per_1000": per_k("pings"),
            "connects_per_1000": per_k("connects"),
            # How often freshconn's poll() of the socket ran, from an untimed instrumented run.
            "polls_per_1000": 1000.0 * polls["polls"] / polls["units"] if polls and polls["units"] else None,
            "overhead_us": over("overhead_us"),
            "in_loop_us": over("in_loop_us"),
            # The time between one query's end and the next one's start, as the loop saw it.
            "between_queries_us": over("gap_median_us"),
            "query_us": over("query_median_us"),
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
            "starved": sum(row.get("starved", 0) for row in rows),
            "max_connects_per_round_incl_warmup": max(row["connects_incl_warmup"] for row in rows),
        }
    return out


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("DJANGO_SETTINGS_MODULE", None)  # the child configures Django itself
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), str(ROOT / "src"), env.get("PYTHONPATH", "")) if p)
    return env


def run_child(driver: str, db: dict[str, Any], out_file: str, options: list[str]) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "benchmarks.child", f"--driver={driver}", f"--out={out_file}", *options]
    # The DATABASES entry (with its password) goes through stdin, not argv.
    proc = subprocess.run(cmd, input=json.dumps(db), text=True, cwd=ROOT, env=_child_env(), check=False)
    if proc.returncode != 0:
        raise SystemExit(f"the {driver} benchmark process failed with exit code {proc.returncode}")
    with open(out_file) as fh:
        result: dict[str, Any] = json.load(fh)
    return result


def run_instructions(
    driver: str,
    db: dict[str, Any],
    workdir: str,
    options: list[str],
    module: str = "benchmarks.instructions",
    cache_sim: bool = False,
) -> dict[str, Any]:
    """One callgrind run (benchmarks.instructions, or benchmarks.breakdown): events per unit, per case."""
    out_dir = tempfile.mkdtemp(prefix=f"cg-{driver}-", dir=workdir)
    out_file = os.path.join(out_dir, "cases.json")
    args = [f"--driver={driver}", f"--out={out_file}", *options]
    cmd = instructions.command(out_dir, sys.executable, args, module, cache_sim)
    # A fixed hash seed: the same dict layouts in every run, so counts also compare across processes.
    env = {**_child_env(), "PYTHONHASHSEED": "0"}
    proc = subprocess.run(cmd, input=json.dumps(db), text=True, cwd=ROOT, env=env, check=False, capture_output=True)
    if proc.returncode != 0:
        log(proc.stderr[-3000:])
        raise SystemExit(f"the {driver} instruction count failed with exit code {proc.returncode}")
    with open(out_file) as fh:
        data: dict[str, Any] = json.load(fh)
    totals = instructions.read_dumps(out_dir)
    if len(totals) < len(data["cases"]):
        raise SystemExit(f"callgrind wrote {len(totals)} dumps for {len(data['cases'])} cases")
    cases: dict[str, list[dict[str, int]]] = {}
    for case, total in zip(data["cases"], totals, strict=False):
        cases.setdefault(case["case"], []).append(total)
        case["events"] = total
    shutil.rmtree(out_dir, ignore_errors=True)
    units = {case["case"]: case["units"] for case in data["cases"]}
    per_unit = {name: statistics.median(t["Ir"] for t in runs) / units[name] for name, runs in cases.items()}
    out: dict[str, Any] = {"per_unit": per_unit, "cases": data["cases"], "idle_aliases": data.get("idle_aliases", 0)}
    if cache_sim:
        # Per unit: every event, and the estimated cycles (first repeat; the counts are deterministic).
        out["events_per_unit"] = {
            name: {k: v / units[name] for k, v in runs[0].items()} for name, runs in cases.items()
        }
        out["cycles_per_unit"] = {
            name: instructions.estimated_cycles(ev) for name, ev in out["events_per_unit"].items()
        }
    return out


def _stop_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="One primary-key SELECT per message through the ORM, per driver, message source and policy.",
    )
    parser.add_argument("--quick", action="store_true", help="short runs (a smoke test, not a measurement)")
    parser.add_argument(
        "--drivers", nargs="+", default=[",".join(DRIVERS)], help=f"any of {', '.join(DRIVERS)} (default: all)"
    )
    parser.add_argument(
        "--variants",
        nargs="+",
        default=[",".join(ALL_VARIANTS)],
        help=f"any of {', '.join(ALL_VARIANTS)} (default: all; pool runs on psycopg only)",
    )
    parser.add_argument("--gap-us", type=float, default=100.0, help="idle gap before each message, gap variant (100)")
    parser.add_argument("--idle-aliases", type=int, default=20, help="aliases configured, never connected (20)")
    parser.add_argument("--seconds", type=float, help="timed seconds per policy per round (default 0.4; quick 0.04)")
    parser.add_argument("--rounds", type=int, help="rounds; medians over rounds are reported (default 16; quick 3)")
    parser.add_argument("--slice", type=float, default=0.02, help="policies take turns every SLICE seconds (0.02)")
    parser.add_argument("--kill-trials", type=int, help="KILLs between units, per case (default 10; quick 2)")
    parser.add_argument(
        "--instructions",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="count instructions per unit with callgrind (default: on, except --quick; needs valgrind)",
    )
    parser.add_argument("--instr-units", type=int, default=150, help="messages per callgrind case (150)")
    parser.add_argument("--pool-messages", type=int, help="pool, after idle: messages per policy (default 10; quick 1)")
    parser.add_argument(
        "--pool-gap", type=float, default=2.5, help="pool, after idle: seconds idle before each message (2.5)"
    )
    parser.add_argument(
        "--pool-idle-limit-ms",
        type=int,
        default=2000,
        help="pool, after idle: the server's idle_session_timeout for those sessions, ms (2000)",
    )
    parser.add_argument("--out", type=Path, default=None, help=f"output folder (default {DEFAULT_OUT})")
    parser.add_argument(
        "--chart",
        type=Path,
        default=None,
        help="PNG path (default: docs/img/benchmark.png for a full run, else OUT/benchmark.png)",
    )
    args = parser.parse_args(argv)
    drivers = parse_list(args.drivers, DRIVERS, "driver")
    variants = parse_list(args.variants, ALL_VARIANTS, "variant")
    if args.seconds is None:
        args.seconds = 0.04 if args.quick else 0.4
    if args.rounds is None:
        args.rounds = 3 if args.quick else 16
    if args.kill_trials is None:
        args.kill_trials = 2 if args.quick else 10
    if args.pool_messages is None:
        args.pool_messages = 1 if args.quick else 10
    if args.pool_messages < 1 or args.pool_idle_limit_ms < 1 or args.pool_gap * 1000 <= args.pool_idle_limit_ms:
        parser.error("--pool-messages must be >= 1, and --pool-gap longer than --pool-idle-limit-ms")
    if args.instructions is None:
        # Instructions are counted for the shared loop's policies: nothing to count for the pool alone.
        only_pool = variants == [POOL]
        args.instructions = not args.quick and not only_pool and shutil.which("valgrind") is not None
    elif args.instructions and shutil.which("valgrind") is None:
        parser.error("--instructions needs valgrind (apt-get install valgrind)")
    if args.seconds <= 0 or args.slice <= 0 or args.rounds < 1 or args.gap_us <= 0 or args.idle_aliases < 1:
        parser.error("--seconds, --slice and --gap-us must be > 0, --rounds and --idle-aliases >= 1")
    warmup = 0.03 if args.quick else 0.2
    overhead = 0.03 if args.quick else 0.2
    overhead_rounds = 1 if args.quick else 5
    out_dir: Path = args.out or DEFAULT_OUT
    out_dir.mkdir(parents=True, exist_ok=True)
    chart = args.chart
    if chart is None:
        full = not args.quick and args.out is None and drivers == list(DRIVERS) and variants == list(ALL_VARIANTS)
        chart = DOCS_CHART if full else out_dir / "benchmark.png"

    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    from testbed.redis import Redis
    from testbed.servers import MariaDB, PostgreSQL, Server

    machine = machine_info()
    machine["loadavg_start"] = os.getloadavg()
    started = time.monotonic()
    servers: dict[str, Server] = {}
    redis: Redis | None = None
    children: dict[str, dict[str, Any]] = {}
    counted: dict[str, dict[str, Any]] = {}
    pieces: dict[str, Any] = {}
    cache: dict[str, Any] = {}
    common = [
        f"--seconds={args.seconds}",
        f"--rounds={args.rounds}",
        f"--overhead-rounds={overhead_rounds}",
        f"--slice={args.slice}",
        f"--warmup={warmup}",
        f"--overhead-seconds={overhead}",
        f"--gap-us={args.gap_us}",
    ]
    shared = [v for v in variants if v in SHARED]
    run_pool = POOL in variants and POOL_DRIVER in drivers
    if POOL in variants and not run_pool:
        log(f"pool: Django's pool runs on {POOL_DRIVER} only, which --drivers leaves out: skipped")
    try:
        for vendor in dict.fromkeys(VENDOR[d] for d in drivers):
            log(f"starting a throwaway {'MariaDB' if vendor == 'mysql' else 'PostgreSQL'} server ...")
            srv: Server = MariaDB() if vendor == "mysql" else PostgreSQL()
            servers[vendor] = srv
            srv.start()
        if "redis" in variants or args.instructions:
            log("starting a throwaway Redis server ...")
            redis = Redis()
            redis.start()
        redis_opt = [f"--redis-url={redis.url}"] if redis is not None else []
        with tempfile.TemporaryDirectory(prefix="fc-bench-") as workdir:
            for driver in drivers:
                db = servers[VENDOR[driver]].django_settings()
                runs: dict[str, Any] = {}
                if shared:
                    per_policy = f"{plural(args.rounds, 'round')} x {args.seconds:g} s per policy"
                    log(f"{driver}: {', '.join(shared)}: {per_policy}")
                    before = os.getloadavg()
                    opts = [*common, f"--variants={','.join(shared)}", f"--kill-trials={args.kill_trials}"]
                    if "redis" in shared:
                        opts += redis_opt
                    runs["shared"] = run_child(driver, db, os.path.join(workdir, f"{driver}.json"), opts)
                    runs["shared"].update(loadavg_before=before, loadavg_after=os.getloadavg())
                if "idle_aliases" in variants:
                    log(f"{driver}: idle_aliases ({args.idle_aliases} more aliases in DATABASES, never connected)")
                    before = os.getloadavg()
                    opts = [*common, "--variants=idle_aliases", f"--idle-aliases={args.idle_aliases}"]
                    runs["idle_aliases"] = run_child(driver, db, os.path.join(workdir, f"{driver}-aliases.json"), opts)
                    runs["idle_aliases"].update(loadavg_before=before, loadavg_after=os.getloadavg())
                if run_pool and driver == POOL_DRIVER:
                    log(
                        f"{driver}: pool, busy: {args.rounds} rounds x {args.seconds:g} s per policy; after idle: "
                        f"{args.pool_messages} messages per policy, each after {args.pool_gap:g} s idle "
                        f"(server limit {args.pool_idle_limit_ms} ms)"
                    )
                    before = os.getloadavg()
                    opts = [
                        *common,
                        f"--variants={POOL}",
                        f"--pool-messages={args.pool_messages}",
                        f"--pool-gap={args.pool_gap}",
                        f"--pool-idle-limit-ms={args.pool_idle_limit_ms}",
                    ]
                    pool_started = time.monotonic()
                    runs[POOL] = run_child(driver, db, os.path.join(workdir, f"{driver}-pool.json"), opts)
                    runs[POOL].update(
                        loadavg_before=before,
                        loadavg_after=os.getloadavg(),
                        wall_seconds=round(time.monotonic() - pool_started, 1),
                    )
                    if runs[POOL].get("skipped"):
                        log(f"pool: skipped: {runs[POOL]['skipped']}")
                children[driver] = runs
            if args.instructions:
                for driver in drivers:
                    db = servers[VENDOR[driver]].django_settings()
                    log(f"{driver}: instructions per unit (callgrind, {args.instr_units} messages per case) ...")
                    base = [f"--units={args.instr_units}"]
                    counted[driver] = {"default": run_instructions(driver, db, workdir, [*base, *redis_opt])}
                    if "idle_aliases" in variants:
                        counted[driver]["idle_aliases"] = run_instructions(
                            driver, db, workdir, [*base, f"--idle-aliases={args.idle_aliases}"]
                        )
                # Where the busy path's instructions go: the same for every driver, so measured on the first.
                log(f"{drivers[0]}: freshconn's busy path, piece by piece (callgrind) ...")
                db = servers[VENDOR[drivers[0]]].django_settings()
                pieces = run_instructions(drivers[0], db, workdir, [], "benchmarks.breakdown")
                pieces["driver"] = drivers[0]
                log(f"{drivers[0]}: cache misses per message (callgrind cache simulation) ...")
                cache = run_instructions(drivers[0], db, workdir, [*base, "--cache-cases"], cache_sim=True)
                cache["driver"] = drivers[0]
    finally:
        if redis is not None:
            redis.stop()
        for srv in servers.values():
            srv.stop()
    machine["loadavg_end"] = os.getloadavg()

    summary: dict[str, dict[str, Any]] = {}
    pool_run = children.get(POOL_DRIVER, {}).get(POOL) if run_pool else None
    pool_summary: dict[str, Any] | None = None
    if pool_run is not None:
        pool_summary = (
            {"skipped": pool_run["skipped"]}
            if pool_run.get("skipped")
            else {POOL_DRIVER: pool_section.summarize(pool_run)}
        )
    for variant in variants:
        if variant == POOL:
            continue
        key = "idle_aliases" if variant == "idle_aliases" else "shared"
        summary[variant] = {d: summarize(children[d][key]["variants"][variant]) for d in drivers}
    results = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python -m benchmarks", *(argv if argv is not None else sys.argv[1:])]),
        "quick": args.quick,
        "wall_seconds": round(time.monotonic() - started, 1),
        "machine": machine,
        "config": {
            "variants": variants,
            "policies": {v: list(VARIANT_POLICIES[v]) for v in variants if v != POOL},
            "pool": {
                "driver": POOL_DRIVER,
                "policies": {"busy": list(pool_section.BUSY_POLICIES), "idle": list(pool_section.IDLE_POLICIES)},
                "pool_options": pool_section.POOL_OPTIONS,
                "messages": args.pool_messages,
                "gap_s": args.pool_gap,
                "idle_limit_ms": args.pool_idle_limit_ms,
            }
            if run_pool
            else None,
            "gap_us": args.gap_us,
            "idle_aliases": args.idle_aliases,
            "seconds": args.seconds,
            "rounds": args.rounds,
            "slice": args.slice,
            "kill_trials": args.kill_trials,
            "instr_units": args.instr_units if args.instructions else None,
        },
        "summary": summary,
        "pool": pool_summary,
        "kill_trials": {d: children[d].get("shared", {}).get("kill_trials", {}) for d in drivers},
        "instructions": counted,
        "breakdown": pieces,
        "cache": cache,
        "drivers": children,
    }
    (out_dir / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    table = render_table(results)
    (out_dir / "results.md").write_text(render_markdown(results))
    wrote = [str(out_dir / "results.json"), str(out_dir / "results.md")]
    if summary:  # the chart has one panel per variant of the shared processes (none with --variants pool)
        chart.parent.mkdir(parents=True, exist_ok=True)
        render_chart(results, chart)
        wrote.append(str(chart))
    print(table)
    log(f"\nwrote {', '.join(wrote)}")
    return 0
