"""One driver's soak, in its own process (a process loads one MySQL and one PostgreSQL driver only).

    python -m soak.child --driver mysqlclient --mode soak --messages 10000 --faults 1000 --seed 1 --out FILE

``--mode soak`` runs the worker with freshconn, ``control`` the plain Django loop (freshconn not
even installed), ``fleet`` the reconnect-storm measurement (soak/fleet.py). The child starts its
own test bed (soak/bed.py) and stops it whatever happens; its result is one JSON document in FILE.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import random
import signal
import sys
import time
from typing import Any

from soak.bed import VENDOR, Bed, driver_options

DRIVERS = tuple(VENDOR)


def select_driver(driver: str) -> None:
    """Make Django load ``driver``; must run before anything imports django.db."""
    if driver == "pymysql":
        import pymysql

        pymysql.install_as_MySQLdb()
    elif driver == "psycopg2":
        sys.modules["psycopg"] = None  # type: ignore[assignment]  # Django then falls back to psycopg2


def configure(db: dict[str, Any], *, freshconn: bool, log_file: str) -> None:
    import django
    from django.conf import settings

    settings.configure(
        DEBUG=False,  # DEBUG=True would keep every query in memory
        SECRET_KEY="soak-only",
        USE_TZ=True,
        INSTALLED_APPS=(["freshconn"] if freshconn else []) + ["soak"],
        # Persistent connections, as a worker keeps them; freshconn's defaults apply inside units.
        DATABASES={"default": {**db, "CONN_MAX_AGE": None}},
        DEFAULT_AUTO_FIELD="django.db.models.AutoField",
        LOGGING_CONFIG=None,
    )
    handler = logging.FileHandler(log_file)
    handler.setFormatter(logging.Formatter("%(asctime)s %(threadName)s %(name)s %(levelname)s %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    django.setup()


def create_tables(bed: Bed) -> None:
    from django.db import connection

    from soak.models import BUCKETS, Applied, Counter

    with connection.schema_editor() as editor:
        editor.create_model(Applied)
        editor.create_model(Counter)
    Counter.objects.bulk_create([Counter(id=i, n=0) for i in range(BUCKETS)])
    connection.close()
    if bed.vendor == "postgresql":
        from soak.faults import PG_HOLD_SETUP

        admin = bed.admin()
        try:
            for sql in PG_HOLD_SETUP:
                admin.rows(sql)
        finally:
            admin.close()


def plan(kinds: list[str], faults: int, rng: random.Random) -> list[str]:
    """``faults`` faults, the kinds as evenly as possible, in a seeded random order."""
    out = [kinds[i % len(kinds)] for i in range(faults)]
    rng.shuffle(out)
    return out


def run_soak(args: argparse.Namespace, bed: Bed) -> dict[str, Any]:
    from soak.faults import KINDS, Injector
    from soak.worker import JOBS, Ledger, Pool, encode

    assert bed.redis is not None
    mode = "control" if args.mode == "control" else "freshconn"
    rng = random.Random(args.seed)
    kinds = [k for k in (args.kinds or KINDS) if k != "black_hole" or bed.net is not None]
    ledger = Ledger()
    pool = Pool(bed.redis.url, ledger, mode, workers=args.workers)
    client = bed.redis.client()
    produced = 0

    def push(count: int) -> None:
        nonlocal produced
        batch = []
        for _ in range(count):
            if produced >= args.messages:
                break
            now = time.monotonic()
            raw = encode(produced, now)
            ledger.produced[raw.split("|")[0]] = now
            batch.append(raw)
            produced += 1
        if batch:
            client.rpush(JOBS, *batch)

    stalls: list[int] = []

    def drain() -> None:
        deadline = time.monotonic() + args.stall_timeout
        while not pool.drained(produced):
            if time.monotonic() > deadline:
                stalls.append(produced)
                raise TimeoutError(f"the workers acknowledged nothing new for {args.stall_timeout:g}s")
            time.sleep(0.005)

    schedule = plan(kinds, args.faults, rng)
    batch = max(1, args.messages // (len(schedule) + 1))
    injector = Injector(bed, pool, ledger, rng, push)
    faults = []
    started = time.monotonic()
    pool.start()
    try:
        # The soak measures a running worker: it is connected before the first fault strikes (a
        # worker that starts in the middle of an outage is a different case, not measured here).
        push(1)
        drain()
        for index, kind in enumerate(schedule):
            faults.append(injector.inject(index, kind, batch, drain))
            drain()
            ledger.fault = "none"
            if args.progress and (index + 1) % args.progress == 0:
                print(
                    f"soak {args.driver} {mode}: {index + 1}/{len(schedule)} faults, {produced} messages, "
                    f"{len(ledger.restarts)} worker restarts",
                    file=sys.stderr,
                    flush=True,
                )
        push(args.messages - produced)
        drain()
    except TimeoutError as exc:
        print(f"soak {args.driver} {mode}: STALLED: {exc}", file=sys.stderr, flush=True)
    finally:
        elapsed = time.monotonic() - started
        pool.stop(timeout=30.0)
        injector.close()
    return summarize(args, bed, ledger, faults, produced, elapsed, stalls, mode)


def summarize(
    args: argparse.Namespace,
    bed: Bed,
    ledger: Any,
    faults: list[Any],
    produced: int,
    elapsed: float,
    stalls: list[int],
    mode: str,
) -> dict[str, Any]:
    from soak.faults import KINDS

    admin = bed.admin()
    try:
        db_ids = {str(r[0]) for r in admin.rows("SELECT msg_id FROM soak_applied")}
        rows = int(admin.rows("SELECT COUNT(*) FROM soak_applied")[0][0])
        counted = int(admin.rows("SELECT COALESCE(SUM(n), 0) FROM soak_counter")[0][0])
        by_delivery = {int(d): int(n) for d, n in admin.rows("SELECT delivery, COUNT(*) FROM soak_applied GROUP BY 1")}
    finally:
        admin.close()
    produced_ids = set(ledger.produced)
    acked_ids = set(ledger.first_ack)
    delivery_times = [ledger.first_ack[m] - ledger.produced[m] for m in acked_ids]
    longest = max(delivery_times, default=0.0)
    longest_id = max(acked_ids, key=lambda m: ledger.first_ack[m] - ledger.produced[m], default=None)

    by_kind: dict[str, dict[str, Any]] = {}
    for kind in KINDS:
        mine = [f for f in faults if f.kind == kind]
        row: dict[str, Any] = {
            "attempted": len(mine),
            "injected": sum(f.injected for f in mine),
            "verified": sum(f.verified for f in mine),
            "retries": ledger.retries.get(kind, 0),
            "worker_restarts": sum(1 for r in ledger.restarts if r["fault"].split("#")[0] == kind),
            "ambiguous": sum(1 for a in ledger.ambiguous if a["fault"].split("#")[0] == kind),
        }
        variants: dict[str, int] = {}
        for f in mine:
            name = f.variant if kind in ("proxy", "commit_loss") else ""
            if name:
                variants[name] = variants.get(name, 0) + 1
        if variants:
            row["variants"] = variants
        by_kind[kind] = row

    # Each COMMIT-loss fault that caught a COMMIT in flight must come back as an AmbiguousCommitError
    # for that very session (matched by the server's session id, exc.backend_id).
    ambiguous_sessions = {a["backend_id"] for a in ledger.ambiguous}
    in_flight = [f for f in faults if f.kind == "commit_loss" and f.injected]
    surfaced = [f for f in in_flight if any(s in ambiguous_sessions for s in f.sessions)]
    commit_loss = {
        "attempted": sum(1 for f in faults if f.kind == "commit_loss"),
        "in_flight": len(in_flight),
        "not_in_flight": sum(1 for f in faults if f.kind == "commit_loss" and not f.injected),
        "surfaced_as_ambiguous": len(surfaced),
        "not_surfaced": [
            {"index": f.index, "variant": f.variant, "sessions": f.sessions} for f in in_flight if f not in surfaced
        ],
        "server_committed": sum(1 for f in in_flight if f.server_committed),
        "server_rolled_back": sum(1 for f in in_flight if f.server_committed is False),
    }
    ambiguous = {
        "total": len(ledger.ambiguous),
        "from_commit_loss_faults": sum(1 for a in ledger.ambiguous if a["fault"].startswith("commit_loss")),
        "other": [
            {k: a[k] for k in ("fault", "cause", "applied", "settled")}
            for a in ledger.ambiguous
            if not a["fault"].startswith("commit_loss")
        ],
        "settled": sum(1 for a in ledger.ambiguous if a["settled"]),
        "settle_s_max": max((a["settle_s"] for a in ledger.ambiguous), default=0.0),
        "not_settled": [
            {k: a[k] for k in ("fault", "backend_id", "session_now", "settle_s", "applied")}
            for a in ledger.ambiguous
            if not a["settled"]
        ],
        "found_applied": sum(1 for a in ledger.ambiguous if a["applied"]),
        "found_not_applied": sum(1 for a in ledger.ambiguous if not a["applied"]),
    }
    result: dict[str, Any] = {
        "driver": args.driver,
        "vendor": bed.vendor,
        "mode": mode,
        "seed": args.seed,
        "workers": args.workers,
        "produced": produced,
        "acked": len(acked_ids),
        "acks_total": ledger.acks,
        "rows": rows,
        "lost": len(produced_ids - db_ids),
        "acked_but_missing": len(acked_ids - db_ids),
        "applied_twice": counted - rows,
        "replays_stopped_by_unique": len(ledger.replays_stopped),
        "replays_stopped_detail": ledger.replays_stopped[:20],
        "worker_restarts": len(ledger.restarts),
        "worker_restart_errors": _tally(r["error"] for r in ledger.restarts),
        "worker_restarts_by_fault": _tally(r["fault"].split("#")[0] for r in ledger.restarts),
        "redelivered": ledger.redelivered,
        "rows_by_delivery": by_delivery,
        "ambiguous_commit_errors": ambiguous,
        "commit_loss": commit_loss,
        "longest_delivery_s": round(longest, 3),
        "longest_delivery_msg": longest_id,
        "stalled": bool(stalls),
        "elapsed_s": round(elapsed, 1),
        "faults": by_kind,
        "faults_total": {
            "attempted": len(faults),
            "injected": sum(f.injected for f in faults),
            "verified": sum(f.verified for f in faults),
        },
        "notes": list(bed.notes),
        "fault_log": [f.as_dict() for f in faults],
    }
    if mode == "freshconn":
        import freshconn

        result["stats"] = freshconn.stats().get("default", {})
    return result


def _tally(items: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for item in items:
        out[item] = out.get(item, 0) + 1
    return out


def versions(driver: str) -> dict[str, str]:
    from importlib import metadata

    import django

    out = {"django": django.__version__, "python": sys.version.split()[0]}
    dist = {"mysqlclient": "mysqlclient", "pymysql": "PyMySQL", "psycopg": "psycopg", "psycopg2": "psycopg2-binary"}
    with contextlib.suppress(metadata.PackageNotFoundError):
        out["driver"] = f"{driver} {metadata.version(dist[driver])}"
    if "driver" not in out and driver == "psycopg2":
        with contextlib.suppress(metadata.PackageNotFoundError):
            out["driver"] = f"psycopg2 {metadata.version('psycopg2')}"
    return out


def _stop(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m soak.child")
    parser.add_argument("--driver", choices=DRIVERS, required=True)
    parser.add_argument("--mode", choices=("soak", "control", "fleet"), default="soak")
    parser.add_argument("--messages", type=int, default=10_000)
    parser.add_argument("--faults", type=int, default=None)
    parser.add_argument("--kinds", nargs="*", default=None)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--stall-timeout", type=float, default=180.0)
    parser.add_argument("--progress", type=int, default=0, help="a progress line every N faults (stderr)")
    parser.add_argument("--threads", type=int, default=100, help="fleet: worker threads")
    parser.add_argument("--restarts", type=int, default=5, help="fleet: server restarts")
    parser.add_argument("--down", type=float, default=2.0, help="fleet: seconds the server stays down")
    parser.add_argument("--gap", type=float, default=3.0, help="fleet: seconds of steady work between restarts")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    if args.faults is None:
        args.faults = max(1, args.messages // 10)
    signal.signal(signal.SIGTERM, _stop)
    select_driver(args.driver)
    fleet = args.mode == "fleet"
    extra: list[str] = []
    if fleet:
        # A connection limit just above the fleet: a storm of duplicate connects would meet it.
        limit = args.threads + 10
        extra = [f"--max-connections={limit}"] if VENDOR[args.driver] == "mysql" else [f"-c max_connections={limit}"]
    bed = Bed(args.driver, proxy=not fleet, namespace=not fleet, redis=not fleet, server_extra=extra)
    log_file = os.path.splitext(args.out)[0] + ".log"
    started = time.time()
    try:
        bed.start()
        db = bed.db_settings()
        db["OPTIONS"] = driver_options(args.driver)
        configure(db, freshconn=args.mode != "control", log_file=log_file)
        create_tables(bed)
        if fleet:
            from soak.fleet import run_fleet

            result = run_fleet(args, bed)
        else:
            result = run_soak(args, bed)
        result["versions"] = {**versions(args.driver), **bed.versions()}
        result["started"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started))
        result["log"] = log_file
    finally:
        bed.stop()
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
