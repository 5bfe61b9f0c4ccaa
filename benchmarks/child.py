"""One driver's benchmark, in its own process: every policy, interleaved in many short rounds.

    python -m benchmarks.child --driver mysqlclient --out FILE [--seconds S --rounds R ...]
    (the Django DATABASES entry for the server arrives as JSON on stdin, so no password is in argv)

The driver is chosen before Django loads: PyMySQL installs itself as MySQLdb, and Django prefers
psycopg 3 over psycopg2 unless ``psycopg`` cannot be imported.

Each policy runs in its own worker thread, because Django keeps one connection per alias per
thread: every policy keeps its own connection (with its own settings) for the whole run, as four
workers would. The threads take turns, never run together, in slices of ``slice`` seconds (20 ms):
a turn runs one slice of each policy, in an order rotated every turn (ABCD BCDA CDAB DABC ...), and
a round is as many turns as give each policy ``seconds`` of work. A burst of load from another
process lasts much longer than a turn, so it hits every policy alike; the median over rounds then
sets aside the rounds it hit unevenly anyway. Only the slices are timed, not the hand-overs.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
from typing import Any

from benchmarks.worker import POLICIES, ROWS, Worker

DRIVERS = ("mysqlclient", "pymysql", "psycopg", "psycopg2")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def select_driver(driver: str) -> None:
    """Make Django load ``driver``; must run before anything imports django.db."""
    if driver == "pymysql":
        import pymysql

        pymysql.install_as_MySQLdb()
    elif driver == "psycopg2":
        sys.modules["psycopg"] = None  # type: ignore[assignment]  # Django then falls back to psycopg2


def configure(db: dict[str, Any]) -> None:
    import django
    from django.conf import settings

    settings.configure(
        DEBUG=False,  # DEBUG=True would record every query in memory
        SECRET_KEY="benchmarks-only",
        USE_TZ=True,
        INSTALLED_APPS=["freshconn", "benchmarks"],
        DATABASES={"default": {**db, "CONN_MAX_AGE": None}},
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
    """freshconn's connection_created receiver runs for the freshconn worker's connections only.

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
        if worker.policy == "freshconn":
            _state.on_connection_created(sender, connection, **kwargs)

    connection_created.connect(on_created, weak=False, dispatch_uid="benchmarks.on_created")


def run(args: argparse.Namespace, bench: Bench) -> dict[str, Any]:
    wire_freshconn_for_its_worker_only()
    bench.conn.close()
    workers = {policy: Worker(policy) for policy in POLICIES}
    try:
        warmup = {policy: w.call(w.warm_up, args.warmup) for policy, w in workers.items()}
        rounds: list[dict[str, Any]] = []
        fc_stats: dict[str, int] = {}
        report_every = max(1, args.rounds // 4)
        turns = max(1, round(args.seconds / args.slice))
        keys = ("messages", "seconds", "cpu_seconds", "units", "pings", "connects")
        for r in range(args.rounds):
            gc.collect()
            results: dict[str, Any] = {p: dict.fromkeys(keys, 0) for p in POLICIES}
            for t in range(turns):
                k = (r + t) % len(POLICIES)
                for policy in (*POLICIES[k:], *POLICIES[:k]):
                    w = workers[policy]
                    res = w.call(w.timed_run, args.slice)
                    for key in keys:
                        results[policy][key] += res[key]
                    for key, value in (res["freshconn_stats"] or {}).items():
                        fc_stats[key] = fc_stats.get(key, 0) + value
            for policy, res in results.items():
                res["rate"] = res["messages"] / res["seconds"]
                # Each policy opened its connection during the warm-up: counted in the first round.
                res["connects_incl_warmup"] = res["connects"] + (warmup[policy]["connects"] if r == 0 else 0)
            rounds.append({"turns": turns, "policies": results})
            if (r + 1) % report_every == 0 or r + 1 == args.rounds:
                done = rounds[-report_every:]
                medians = {
                    p: statistics.median(x["policies"][p]["rate"] / x["policies"]["unsafe"]["rate"] for x in done)
                    for p in POLICIES[1:]
                }
                log(
                    f"  {args.driver:<11} rounds {r + 2 - len(done)}-{r + 1}/{args.rounds}, median ratio: "
                    + ", ".join(f"{p} {m:.3f}x" for p, m in medians.items())
                )
        # The lifecycle alone, without the query: its own interleaved rounds, after the throughput ones.
        overhead: list[dict[str, Any]] = []
        for r in range(args.overhead_rounds):
            k = r % len(POLICIES)
            order = (*POLICIES[k:], *POLICIES[:k])
            row: dict[str, Any] = {}
            for p in order:
                w = workers[p]
                row[p] = {**w.call(w.in_loop, args.overhead_seconds), **w.call(w.overhead, args.overhead_seconds)}
            for p in POLICIES:
                # Lifecycle in the loop = the policy's time around its query minus unsafe's (the
                # message source and the loop itself, which every policy has).
                row[p]["in_loop_us"] = row[p]["gap_median_us"] - row["unsafe"]["gap_median_us"]
            overhead.append(row)
        return {"warmup": warmup, "rounds": rounds, "overhead_rounds": overhead, "freshconn_stats": fc_stats}
    finally:
        for w in workers.values():
            w.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.child")
    parser.add_argument("--driver", required=True, choices=DRIVERS)
    parser.add_argument("--out", required=True)
    parser.add_argument("--seconds", type=float, default=0.5)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--slice", type=float, default=0.02)
    parser.add_argument("--warmup", type=float, default=0.2)
    parser.add_argument("--overhead-rounds", type=int, default=5)
    parser.add_argument("--overhead-seconds", type=float, default=0.2)
    args = parser.parse_args(argv)

    db = json.loads(sys.stdin.read())
    select_driver(args.driver)
    configure(db)
    bench = Bench(args.driver)
    bench.create_table()
    versions = bench.versions()
    measured = run(args, bench)
    out = {
        "driver": args.driver,
        "vendor": bench.conn.vendor,
        "versions": versions,
        "config": {
            "seconds": args.seconds,
            "rounds": args.rounds,
            "slice": args.slice,
            "warmup": args.warmup,
            "overhead_rounds": args.overhead_rounds,
            "overhead_seconds": args.overhead_seconds,
            "rows": ROWS,
        },
        **measured,
    }
    with open(args.out, "w") as fh:
        json.dump(out, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
