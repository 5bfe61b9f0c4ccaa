"""One driver's benchmark, in its own process: every variant and policy, interleaved in many short rounds.

    python -m benchmarks.child --driver mysqlclient --out FILE [--variants loop,gap,redis ...]
    (the Django DATABASES entry for the server arrives as JSON on stdin, so no password is in argv)

The driver is chosen before Django loads: PyMySQL installs itself as MySQLdb, and Django prefers
psycopg 3 over psycopg2 unless ``psycopg`` cannot be imported.

Each policy runs in its own worker thread, because Django keeps one connection per alias per
thread: every policy keeps its own connection (with its own settings) for the whole run, as that
many workers would. The threads take turns, never run together, in slices of ``slice`` seconds
(20 ms): a turn runs one slice of each policy of a variant, in an order rotated every turn (ABCD
BCDA CDAB DABC ...), and a round is as many turns as give each policy ``seconds`` of work. The
variants of a process (how messages arrive: back to back, after an idle gap, from a Redis list)
take turns by round. A burst of load from another process lasts much longer than a turn, so it
hits every policy alike; the median over rounds then sets aside the rounds it hit unevenly anyway.
Only the slices are timed, not the hand-overs.

With ``--idle-aliases N`` the process has N more aliases in DATABASES, configured and never
connected (the "idle_aliases" variant: freshconn's per-unit cost must not grow with them).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from typing import Any

from benchmarks.worker import ALL_POLICIES, ROWS, Variant, Worker, is_freshconn

DRIVERS = ("mysqlclient", "pymysql", "psycopg", "psycopg2")

#: Every variant, with the policies it runs. "freshconn_poll_never" and "freshconn_poll_always"
#: force freshconn's zero-timeout poll() of an idle socket off or on: the two sides of that trade-off
#: (the "polls/1k units" column says which of them freshconn's default behaved like). CONN_MAX_AGE=0
#: runs in the back-to-back loop only: its connect per message dwarfs any message source. "floor"
#: (the back-to-back loop only) is the least work any Python lifecycle does per unit, unsafe:
#: a reference for the lifecycle figures (benchmarks.worker.floor_each).
VARIANT_POLICIES: dict[str, tuple[str, ...]] = {
    "loop": (
        "unsafe",
        "unsafe_again",
        "django_max_age_0",
        "django_health_checks",
        "freshconn",
        "freshconn_poll_never",
        "freshconn_poll_always",
        "floor",
    ),
    "gap": ("unsafe", "unsafe_again", "django_health_checks", "freshconn", "freshconn_poll_never"),
    "redis": ("unsafe", "unsafe_again", "django_health_checks", "freshconn", "freshconn_poll_never"),
    "idle_aliases": ("unsafe", "unsafe_again", "django_health_checks", "freshconn"),
}
VARIANTS = tuple(VARIANT_POLICIES)
#: Django's PostgreSQL pool (psycopg 3 only), in a process of its own: see benchmarks.pool.
POOL = "pool"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def make_variant(name: str, gap_us: float) -> Variant:
    return Variant(
        name,
        VARIANT_POLICIES[name],
        gap=gap_us * 1e-6 if name == "gap" else 0.0,
        redis=name == "redis",
    )


def select_driver(driver: str) -> None:
    """Make Django load ``driver``; must run before anything imports django.db."""
    if driver == "pymysql":
        import pymysql

        pymysql.install_as_MySQLdb()
    elif driver == "psycopg2":
        sys.modules["psycopg"] = None  # type: ignore[assignment]  # Django then falls back to psycopg2


def idle_alias_names(n: int) -> list[str]:
    return [f"idle_{i:02d}" for i in range(1, n + 1)]


def configure(db: dict[str, Any], idle_aliases: int = 0, databases: dict[str, Any] | None = None) -> None:
    import django
    from django.conf import settings

    if databases is None:
        databases = {"default": {**db, "CONN_MAX_AGE": None}}
        # Configured, never connected: the same server, as a replica or a second schema would be.
        databases.update({name: {**db, "CONN_MAX_AGE": None} for name in idle_alias_names(idle_aliases)})
    settings.configure(
        DEBUG=False,  # DEBUG=True would record every query in memory
        SECRET_KEY="benchmarks-only",
        USE_TZ=True,
        INSTALLED_APPS=["freshconn", "benchmarks"],
        DATABASES=databases,
        DEFAULT_AUTO_FIELD="django.db.models.AutoField",
        LOGGING_CONFIG=None,
    )
    django.setup()


class Bench:
    def __init__(self, driver: str) -> None:
        from django.db import connections

        from benchmarks.models import Item

        self.driver = driver
        self.conn = connections["default"]  # the main thread's: setup and versions only
        self.Item = Item

    def create_table(self) -> None:
        Item = self.Item
        with self.conn.schema_editor() as editor:
            if Item._meta.db_table in self.conn.introspection.table_names():
                editor.delete_model(Item)
            editor.create_model(Item)
        Item.objects.bulk_create([Item(pk=pk, name=f"item-{pk}", qty=pk) for pk in range(1, ROWS + 1)])

    def versions(self) -> dict[str, Any]:
        from importlib import metadata

        import django

        import freshconn

        out: dict[str, Any] = {
            "django": django.__version__,
            "python": sys.version.split()[0],
            "freshconn": freshconn.__version__,
        }
        with self.conn.cursor() as cursor:
            if self.conn.vendor == "postgresql":
                cursor.execute("SHOW server_version")
                out["server"] = f"PostgreSQL {cursor.fetchone()[0]}"
            else:
                cursor.execute("SELECT VERSION()")
                out["server"] = str(cursor.fetchone()[0])
        if self.driver == "mysqlclient":
            import MySQLdb

            out["driver"] = f"mysqlclient {metadata.version('mysqlclient')}"
            out["client_library"] = f"libmariadb {MySQLdb.get_client_info()}"
        elif self.driver == "pymysql":
            import pymysql

            out["driver"] = f"PyMySQL {pymysql.__version__}"
            out["client_library"] = "pure Python"
        elif self.driver == "psycopg":
            import psycopg

            out["driver"] = f"psycopg {psycopg.__version__} ({psycopg.pq.__impl__})"
            out["client_library"] = f"libpq {_libpq(psycopg.pq.version())}"
        else:
            import psycopg2

            out["driver"] = f"psycopg2 {psycopg2.__version__}"
            out["client_library"] = f"libpq {_libpq(psycopg2.__libpq_version__)}"
        return out


def _libpq(version: int) -> str:
    return f"{version // 10000}.{version % 10000}"


def wire_freshconn_for_its_worker_only() -> None:
    """freshconn's connection_created receiver runs for the freshconn workers' connections only.

    Django's own policies run without freshconn: its receiver (which also reads the server's idle
    limit on every new connection) would otherwise add to their connects.
    """
    from django.db.backends.signals import connection_created

    from freshconn import _state

    connection_created.disconnect(dispatch_uid="freshconn.connection_created")

    def on_created(sender: Any, connection: Any, **kwargs: Any) -> None:
        worker: Worker | None = getattr(connection, "_bench_worker", None)
        if worker is None:
            return
        worker.connects += 1
        if is_freshconn(worker.policy):
            _state.on_connection_created(sender, connection, **kwargs)

    connection_created.connect(on_created, weak=False, dispatch_uid="benchmarks.on_created")


def _one_round(
    variant: Variant, r: int, workers: dict[str, Worker], turns: int, slice_s: float, fc_stats: dict[str, int]
) -> dict[str, Any]:
    keys = ("messages", "seconds", "cpu_seconds", "units", "pings", "connects", "starved")
    policies = variant.policies
    results: dict[str, Any] = {p: dict.fromkeys(keys, 0) for p in policies}
    for t in range(turns):
        k = (r + t) % len(policies)
        for policy in (*policies[k:], *policies[:k]):
            w = workers[policy]
            res = w.call(w.timed_run, variant, slice_s)
            for key in keys:
                results[policy][key] += res[key]
            for key, value in (res["freshconn_stats"] or {}).items():
                fc_stats[key] = fc_stats.get(key, 0) + value
    for res in results.values():
        res["rate"] = res["messages"] / res["seconds"]
    return {"turns": turns, "policies": results}


def _mostly_polled(counted: dict[str, int] | None) -> bool:
    return bool(counted and counted["polls"] * 2 > counted["units"])


def kill_trials(workers: dict[str, Worker], trials: int) -> dict[str, Any]:
    """The safety side of the poll trade-off: a server-side KILL between two units, then the next unit.

    For freshconn with its poll (the default after any pause) and with the poll switched off, the
    next unit starts right after the KILL statement returned, or 1 ms later; a failed unit is one
    whose query raised. Then, freshconn's default only, the KILL inside a unit after its last
    statement, the next unit at once: with a short tail (the back-to-back skip, no poll) and with
    a tail longer than ``_policy.SOCKET_CHECK_IDLE``. Also: how long after the KILL returned the
    socket showed it (poll spin).
    """
    w = workers.get("freshconn")
    if w is None or trials <= 0:
        return {}
    return dict(w.call(_kill_trials_in_worker, w, trials))


def _kill_trials_in_worker(w: Worker, trials: int) -> dict[str, Any]:
    import math

    from django.db import connections

    fc, conn, get = w.freshconn, w.conn, w.Item.objects.get
    killer = connections.create_connection("default")  # not this thread's wrapper: freshconn leaves it alone
    killer.ensure_connection()
    vendor = conn.vendor
    clock = time.perf_counter

    def session_id() -> int:
        with conn.cursor() as cur:
            cur.execute("SELECT CONNECTION_ID()" if vendor == "mysql" else "SELECT pg_backend_pid()")
            return int(cur.fetchone()[0])

    def kill(sid: int) -> None:
        with killer.cursor() as cur:
            if vendor == "mysql":
                cur.execute(f"KILL {sid}")
            else:
                cur.execute("SELECT pg_terminate_backend(%s)", [sid])

    out: dict[str, Any] = {"trials": trials}
    try:
        for label, threshold in (("poll", None), ("no_poll", math.inf)):
            for delay_label, delay in (("at_once", 0.0), ("after_1ms", 1e-3)):
                failed = 0
                fc.reset_stats()
                for _ in range(trials):
                    # Before the first unit: its end() decides whether the next unit may skip its checks.
                    w._threshold(threshold)
                    for pk in fc.each([1]):
                        get(pk=pk)
                        sid = session_id()
                    kill(sid)
                    until = clock() + delay
                    while clock() < until:
                        pass
                    try:
                        for pk in fc.each([2]):
                            get(pk=pk)
                    except Exception:
                        failed += 1
                    finally:
                        w._restore()
                stats = w._fc_stats()
                out[f"{label}_{delay_label}"] = {
                    "failed_units": failed,
                    "discarded_dead": stats.get("discarded_dead", 0),
                    "discarded_error": stats.get("discarded_error", 0),
                    "pings": stats.get("pings", 0),
                }
        # The trade of the back-to-back skip (_policy.SOCKET_CHECK_IDLE): a KILL inside a unit, after
        # its last statement, then the next unit at once. A short tail leaves the connection "busy"
        # (no poll: the next unit's query finds the KILL); a tail past the limit leaves it idle.
        idle_limit = w.policy_module.SOCKET_CHECK_IDLE
        for tail_label, tail in (("tail_short", 0.0), ("tail_long", 2e-3)):
            failed = short = 0
            fc.reset_stats()
            for _ in range(trials):
                for pk in fc.each([1]):
                    get(pk=pk)
                    sid = session_id()
                    used = clock()
                    kill(sid)
                    until = clock() + tail
                    while clock() < until:
                        pass
                    # A loaded machine can stretch the KILL's own round trip past the limit.
                    short += clock() - used < idle_limit / 2
                try:
                    for pk in fc.each([2]):
                        get(pk=pk)
                except Exception:
                    failed += 1
            stats = w._fc_stats()
            out[tail_label] = {
                "failed_units": failed,
                "tails_under_half_the_limit": short,
                "discarded_dead": stats.get("discarded_dead", 0),
                "discarded_error": stats.get("discarded_error", 0),
                "pings": stats.get("pings", 0),
            }
        # How long after the KILL returned the idle socket showed it (what the poll can see).
        delays: list[float] = []
        for _ in range(trials):
            for pk in fc.each([1]):
                get(pk=pk)
                sid = session_id()
            state = fc._state.state_of(conn)
            kill(sid)
            t0 = clock()
            while not state.poller.poll(0):
                if clock() - t0 > 1.0:
                    break
            delays.append((clock() - t0) * 1e6)
            conn.close()
        out["visible_after_us"] = {"median": statistics.median(delays), "max": max(delays), "min": min(delays)}
    finally:
        killer.close()
        fc.reset_stats()
    return out


def run(args: argparse.Namespace, bench: Bench) -> dict[str, Any]:
    wire_freshconn_for_its_worker_only()
    bench.conn.close()
    variants = [make_variant(name, args.gap_us) for name in args.variants]
    needed = [p for p in ALL_POLICIES if any(p in v.policies for v in variants)]
    redis_url = args.redis_url if any(v.redis for v in variants) else None
    workers = {policy: Worker(policy, redis_url) for policy in needed}
    try:
        out: dict[str, Any] = {}
        for v in variants:
            out[v.name] = {
                "policies": list(v.policies),
                "gap_us": v.gap * 1e6,
                "warmup": {p: workers[p].call(workers[p].warm_up, v, args.warmup) for p in v.policies},
                "rounds": [],
                "overhead_rounds": [],
                "freshconn_stats": {},
            }
        report_every = max(1, args.rounds // 4)
        turns = max(1, round(args.seconds / args.slice))
        for r in range(args.rounds):
            k = r % len(variants)
            for v in (*variants[k:], *variants[:k]):
                gc.collect()
                res = out[v.name]
                res["rounds"].append(_one_round(v, r, workers, turns, args.slice, res["freshconn_stats"]))
            if (r + 1) % report_every == 0 or r + 1 == args.rounds:
                for v in variants:
                    done = out[v.name]["rounds"][-report_every:]
                    medians = {
                        p: statistics.median(x["policies"][p]["rate"] / x["policies"]["unsafe"]["rate"] for x in done)
                        for p in v.policies[1:]
                    }
                    log(
                        f"  {args.driver:<11} {v.name:<12} rounds {r + 2 - len(done)}-{r + 1}/{args.rounds}: "
                        + ", ".join(f"{p} {m:.3f}x" for p, m in medians.items())
                    )
        for res in out.values():
            # Each policy opened its connection during its first warm-up: counted in the first round.
            for i, rnd in enumerate(res["rounds"]):
                for p, prow in rnd["policies"].items():
                    prow["connects_incl_warmup"] = prow["connects"] + (res["warmup"][p]["connects"] if i == 0 else 0)
        # How often freshconn's socket poll really runs per variant (an untimed, instrumented run).
        for v in variants:
            out[v.name]["polls"] = {
                p: workers[p].call(workers[p].count_polls, v, args.overhead_seconds)
                for p in v.policies
                if is_freshconn(p)
            }
        # The lifecycle alone and in the loop, without throughput timing: interleaved rounds of their own.
        for r in range(args.overhead_rounds):
            for v in variants:
                k = r % len(v.policies)
                row: dict[str, Any] = {}
                for p in (*v.policies[k:], *v.policies[:k]):
                    w = workers[p]
                    row[p] = {
                        **w.call(w.in_loop, v, args.overhead_seconds),
                        **w.call(w.overhead, v, args.overhead_seconds, _mostly_polled(out[v.name]["polls"].get(p))),
                    }
                for p in v.policies:
                    # Lifecycle in the loop = the policy's time around its query minus unsafe's (the
                    # message source and the loop itself, which every policy has).
                    row[p]["in_loop_us"] = row[p]["gap_median_us"] - row["unsafe"]["gap_median_us"]
                out[v.name]["overhead_rounds"].append(row)
        kills = kill_trials(workers, args.kill_trials)
        return {"variants": out, "kill_trials": kills}
    finally:
        for w in workers.values():
            w.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.child")
    parser.add_argument("--driver", required=True, choices=DRIVERS)
    parser.add_argument("--out", required=True)
    parser.add_argument("--variants", default="loop", help=f"comma-separated, of {', '.join(VARIANTS)}")
    parser.add_argument("--idle-aliases", type=int, default=0)
    parser.add_argument("--gap-us", type=float, default=100.0)
    parser.add_argument("--redis-url", default=None)
    parser.add_argument("--seconds", type=float, default=0.5)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--slice", type=float, default=0.02)
    parser.add_argument("--warmup", type=float, default=0.2)
    parser.add_argument("--overhead-rounds", type=int, default=5)
    parser.add_argument("--overhead-seconds", type=float, default=0.2)
    parser.add_argument("--kill-trials", type=int, default=0)
    parser.add_argument("--pool-messages", type=int, default=10, help="pool, after idle: messages per policy")
    parser.add_argument("--pool-gap", type=float, default=2.5, help="pool, after idle: seconds idle before each")
    parser.add_argument("--pool-idle-limit-ms", type=int, default=2000, help="pool, after idle: the server's limit")
    args = parser.parse_args(argv)
    args.variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in args.variants if v not in VARIANT_POLICIES and v != POOL]
    if unknown:
        parser.error(f"unknown variants {unknown}")
    if POOL in args.variants and args.variants != [POOL]:
        parser.error("the pool variant runs in a process of its own: --variants=pool alone")
    if "redis" in args.variants and not args.redis_url:
        parser.error("the redis variant needs --redis-url")

    db = json.loads(sys.stdin.read())
    select_driver(args.driver)
    if args.variants == [POOL]:
        return pool_main(args, db)
    configure(db, args.idle_aliases)
    bench = Bench(args.driver)
    bench.create_table()
    versions = bench.versions()
    measured = run(args, bench)
    out = {
        "driver": args.driver,
        "vendor": bench.conn.vendor,
        "versions": versions,
        "config": {
            "variants": args.variants,
            "idle_aliases": args.idle_aliases,
            "gap_us": args.gap_us,
            "seconds": args.seconds,
            "rounds": args.rounds,
            "slice": args.slice,
            "warmup": args.warmup,
            "overhead_rounds": args.overhead_rounds,
            "overhead_seconds": args.overhead_seconds,
            "kill_trials": args.kill_trials,
            "rows": ROWS,
        },
        **measured,
    }
    with open(args.out, "w") as fh:
        json.dump(out, fh, indent=1)
    return 0


def pool_main(args: argparse.Namespace, db: dict[str, Any]) -> int:
    """The pool section (benchmarks.pool): its own DATABASES, one pooled alias per shape and policy."""
    from benchmarks import pool

    out: dict[str, Any] = {"driver": args.driver, "variant": POOL}
    if args.driver != "psycopg":
        out["skipped"] = "Django's pool needs psycopg 3"
    else:
        configure(db, databases=pool.databases(db, args.pool_idle_limit_ms))
        out["skipped"] = pool.unavailable()
    if out["skipped"] is None:
        bench = Bench(args.driver)
        bench.create_table()
        out["versions"] = bench.versions()
        import psycopg_pool

        out["versions"]["psycopg_pool"] = psycopg_pool.__version__
        bench.conn.close()
        out["config"] = {
            "seconds": args.seconds,
            "rounds": args.rounds,
            "slice": args.slice,
            "warmup": args.warmup,
            "pool_messages": args.pool_messages,
            "pool_gap": args.pool_gap,
            "pool_idle_limit_ms": args.pool_idle_limit_ms,
            "rows": ROWS,
        }
        out.update(pool.run(args))
    with open(args.out, "w") as fh:
        json.dump(out, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
