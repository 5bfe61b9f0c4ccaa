"""The pool section: Django >= 5.1's PostgreSQL pool (psycopg 3), three ways, in one process of its own.

    python -m benchmarks.child --driver psycopg --variants pool --out FILE [--pool-messages 15 ...]

Django keeps one ``psycopg_pool.ConnectionPool`` per alias per process, in a class attribute, so
every policy has its own aliases (one per shape), hence its own pool, with the same options
(``POOL_OPTIONS``, ``CONN_MAX_AGE=0``, as Django requires). Each policy runs in its own worker
thread, as in the rest of the benchmark, so freshconn's per-thread state never touches Django's
policies (and freshconn's ``connection_created`` receiver acts only for freshconn's aliases).

The policies, one primary-key SELECT per message:

- ``pool``: Django's pool alone (``CONN_HEALTH_CHECKS=False``: the pool has no ``check``). Outside
  requests nothing returns a connection to the pool, so the loop does what the worker integrations
  do (django_dramatiq, huey's ``db_task``, django-tasks-db's ``db_worker``): ``close_old_connections()``
  before and after each message; with ``CONN_MAX_AGE=0`` the one after returns it to the pool.
- ``pool_again``: the same on a pool of its own: the A/A control of the busy shape.
- ``pool_health_checks``: the same loop with ``CONN_HEALTH_CHECKS=True``: Django gives the pool
  psycopg_pool's ``check_connection``, a round trip at every checkout.
- ``pool_freshconn``: freshconn's pool (freshconn builds it at start-up with its own ``check``) and a
  unit per message (``freshconn.each()`` busy, ``freshconn.unit_of_work()`` after idling), which
  returns the connection to the pool at its end.

Two shapes:

- busy: back-to-back messages, interleaved in rounds of short slices exactly as the other variants
  (``benchmarks.child``); the ratio is to ``pool`` in the same round.
- after idle: the sessions of these aliases get ``idle_session_timeout`` (``--pool-idle-limit-ms``),
  and every message comes after a sleep longer than that (``--pool-gap``): one sleep, then one
  message per policy in a rotated order. Per message: did an error escape to the worker, the
  check's round trips, the new connections, and the time from the message's arrival to the end of
  its first query (checkout, check, connect included), or to the error.

Counts, like with like: pings are freshconn's own (``freshconn.stats()``) for freshconn, and for
Django's pools the calls of the pool's ``check`` (psycopg_pool's ``check_connection``, one round
trip each: the real function runs, counted on the way); new connections are freshconn's
``connects`` for freshconn, ``get_stats()["connections_num"]`` of the pool for the others (both are
kept for every policy in the JSON: for freshconn they must agree).
"""

from __future__ import annotations

import argparse
import gc
import logging
import queue
import statistics
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from benchmarks.worker import ROWS, Messages

BUSY_POLICIES = ("pool", "pool_again", "pool_health_checks", "pool_freshconn")
IDLE_POLICIES = ("pool", "pool_health_checks", "pool_freshconn")
POLICIES = BUSY_POLICIES
#: After the last message after idle: time for the pools' own threads to replace what was returned broken.
SETTLE = 0.5
SHAPES = {"busy": BUSY_POLICIES, "idle": IDLE_POLICIES}
#: Every pool's options: one connection kept open (a worker thread needs one at a time), room to grow.
POOL_OPTIONS: dict[str, Any] = {"min_size": 1, "max_size": 4, "timeout": 10}
#: What the check of each policy's pool must be (verified before anything is measured).
EXPECTED_CHECK = {
    "pool": "none",
    "pool_again": "none",
    "pool_health_checks": "psycopg_pool.check_connection",
    "pool_freshconn": "freshconn",
}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def alias(shape: str, policy: str) -> str:
    return f"{shape}_{policy}"


def is_freshconn(policy: str) -> bool:
    return policy == "pool_freshconn"


def databases(db: dict[str, Any], idle_limit_ms: int) -> dict[str, Any]:
    """``default`` (setup only), and one pooled alias per shape and policy (the idle ones with the short limit)."""
    out: dict[str, Any] = {"default": {**db, "CONN_MAX_AGE": None}}
    for shape, policies in SHAPES.items():
        for policy in policies:
            options: dict[str, Any] = {**(db.get("OPTIONS") or {}), "pool": dict(POOL_OPTIONS)}
            if shape == "idle":
                options["options"] = f"-c idle_session_timeout={idle_limit_ms}"
            out[alias(shape, policy)] = {
                **db,
                "CONN_MAX_AGE": 0,
                "CONN_HEALTH_CHECKS": policy == "pool_health_checks",
                "OPTIONS": options,
            }
    return out


def unavailable() -> str | None:
    """Why the pool section cannot run here (None if it can): Django >= 5.1, psycopg 3, psycopg_pool >= 3.2."""
    import django

    if django.VERSION < (5, 1):
        return f"Django {django.__version__} has no connection pool (5.1+)"
    try:
        import psycopg_pool
    except ImportError:
        return "psycopg_pool is not installed (pip install 'psycopg[pool]')"
    if not hasattr(psycopg_pool.ConnectionPool, "check_connection"):
        return f"psycopg_pool {psycopg_pool.__version__} has no check (3.2+)"
    return None


class CountingCheck:
    """Stands in for a pool's ``check`` to count its calls (each one runs the real check)."""

    def __init__(self, real: Callable[[Any], None]) -> None:
        self.real = real
        self.calls = 0
        self.failed = 0

    def __call__(self, conn: Any) -> None:
        self.calls += 1
        try:
            self.real(conn)
        except BaseException:
            self.failed += 1
            raise


def build_pools() -> dict[str, dict[str, Any]]:
    """Each alias's pool, built by whoever the policy says, its ``check`` verified and counted.

    freshconn's app built every pool at ``django.setup()`` with its own check (``install_pools``,
    from ``AppConfig.ready()``); for Django's policies that pool (never opened) is dropped, and
    Django builds its own at the first access, exactly as without freshconn.
    """
    from django.db import connections
    from psycopg_pool import ConnectionPool

    from freshconn import _pool

    pools = _pool.pools_of(type(connections["default"]))
    assert pools is not None
    out: dict[str, dict[str, Any]] = {}
    for shape, policies in SHAPES.items():
        for policy in policies:
            name = alias(shape, policy)
            if not is_freshconn(policy):
                built = pools.pop(name, None)
                if built is not None:
                    built.close()  # never opened: no connection, no thread
            pool = connections[name].pool  # type: ignore[attr-defined]  # PostgreSQL backend, Django 5.1+
            check = pool._check
            kind = (
                "none"
                if check is None
                else "freshconn"
                if check is _pool.check
                else "psycopg_pool.check_connection"
                if check == ConnectionPool.check_connection
                else repr(check)
            )
            if kind != EXPECTED_CHECK[policy]:
                raise SystemExit(f"{name}: the pool's check is {kind}, expected {EXPECTED_CHECK[policy]}")
            counter = None
            if check is not None:
                counter = CountingCheck(check)
                pool._check = counter
            out[name] = {"pool": pool, "check": kind, "counter": counter}
    return out


def wire_freshconn_for_its_aliases_only() -> None:
    """freshconn's connection_created receiver runs for freshconn's aliases only (Django's pools run without it)."""
    from django.db.backends.signals import connection_created

    from freshconn import _state

    ours = {alias(shape, "pool_freshconn") for shape in SHAPES}
    connection_created.disconnect(dispatch_uid="freshconn.connection_created")

    def on_created(sender: Any, connection: Any, **kwargs: Any) -> None:
        if connection.alias in ours:
            _state.on_connection_created(sender, connection, **kwargs)

    connection_created.connect(on_created, weak=False, dispatch_uid="benchmarks.pool.on_created")


class PoolWorker(threading.Thread):
    """One policy: its own thread (Django's connections are per thread), running what the main thread sends."""

    def __init__(self, policy: str, pools: dict[str, dict[str, Any]]) -> None:
        super().__init__(name=f"bench-{policy}", daemon=True)
        self.policy = policy
        self.pools = pools
        self.inbox: queue.Queue[Callable[[], Any] | None] = queue.Queue()
        self.outbox: queue.Queue[tuple[bool, Any]] = queue.Queue()
        self.start()
        self.call(self._setup)

    def run(self) -> None:
        while True:
            job = self.inbox.get()
            if job is None:
                return
            try:
                self.outbox.put((True, job()))
            except BaseException as exc:  # handed back to the main thread, re-raised there
                self.outbox.put((False, exc))

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        self.inbox.put(lambda: fn(*args))
        ok, value = self.outbox.get()
        if not ok:
            raise value
        return value

    def stop(self) -> None:
        from django.db import connections

        self.call(connections.close_all)
        self.inbox.put(None)
        self.join()

    # ----- in the worker thread ----------------------------------------------------------------
    def _setup(self) -> None:
        from django.db import close_old_connections

        import freshconn
        from benchmarks.models import Item

        self.freshconn = freshconn
        self.pks = list(range(1, ROWS + 1))
        clock = time.perf_counter
        busy_get = Item.objects.using(alias("busy", self.policy)).get
        idle_get = Item.objects.using(alias("idle", self.policy)).get if self.policy in IDLE_POLICIES else None
        each, unit = freshconn.each, freshconn.unit_of_work

        def django_busy(msgs: Messages) -> None:
            for pk in msgs:
                close_old_connections()
                busy_get(pk=pk)
                close_old_connections()

        def fresh_busy(msgs: Messages) -> None:
            for pk in each(msgs):
                busy_get(pk=pk)

        def django_idle(pk: int) -> float:
            close_old_connections()
            try:
                idle_get(pk=pk)  # type: ignore[misc]
                return clock()
            finally:
                close_old_connections()  # also after a failure, as a worker's middleware does

        def fresh_idle(pk: int) -> float:
            with unit():
                idle_get(pk=pk)  # type: ignore[misc]
                return clock()

        self.busy_loop = fresh_busy if is_freshconn(self.policy) else django_busy
        self.idle_one = fresh_idle if is_freshconn(self.policy) else django_idle

    def counts(self, shape: str) -> dict[str, int]:
        """Cumulative counters of this policy's alias for ``shape`` (outside any timing)."""
        name = alias(shape, self.policy)
        entry = self.pools[name]
        stats = entry["pool"].get_stats()
        counter: CountingCheck | None = entry["counter"]
        out = {
            "pool_connections_num": stats.get("connections_num", 0),
            "pool_connections_lost": stats.get("connections_lost", 0),
            "pool_returns_bad": stats.get("returns_bad", 0),
            "checks": counter.calls if counter else 0,
            "checks_failed": counter.failed if counter else 0,
        }
        if is_freshconn(self.policy):
            fc = self.freshconn.stats().get(name, {})
            out.update({f"freshconn_{k}": v for k, v in fc.items()})
            out["pings"] = fc.get("pings", 0)
            out["connects"] = fc.get("connects", 0)
        else:
            out["pings"] = out["checks"]  # psycopg_pool's check_connection: one round trip per call
            out["connects"] = out["pool_connections_num"]
        return out

    def busy_slice(self, seconds: float) -> dict[str, Any]:
        before = self.counts("busy")
        msgs = Messages(self.pks, seconds)
        c0 = time.thread_time()
        t0 = time.perf_counter()
        self.busy_loop(msgs)
        elapsed = time.perf_counter() - t0
        cpu = time.thread_time() - c0
        delta = _delta(self.counts("busy"), before)
        units = delta.get("freshconn_units", 0) if is_freshconn(self.policy) else msgs.count
        return {"messages": msgs.count, "seconds": elapsed, "cpu_seconds": cpu, "units": units, "counts": delta}

    def idle_message(self, pk: int) -> dict[str, Any]:
        """One message after the gap: the time to the end of its first query, or to the error that escaped."""
        error = None
        t0 = time.perf_counter()
        try:
            done = self.idle_one(pk)
        except Exception as exc:  # an error that escaped to the worker: what this shape counts
            done = time.perf_counter()
            first = str(exc).strip().splitlines()
            error = f"{type(exc).__name__}: {first[0] if first else ''}"[:200]
        return {"ms": (done - t0) * 1e3, "error": error}


def _delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: v - before.get(k, 0) for k, v in after.items()}


def _busy_round(r: int, workers: dict[str, PoolWorker], turns: int, slice_s: float) -> dict[str, Any]:
    results: dict[str, Any] = {
        p: {"messages": 0, "seconds": 0.0, "cpu_seconds": 0.0, "units": 0, "counts": {}} for p in BUSY_POLICIES
    }
    for t in range(turns):
        k = (r + t) % len(BUSY_POLICIES)
        for policy in (*BUSY_POLICIES[k:], *BUSY_POLICIES[:k]):
            res = workers[policy].call(workers[policy].busy_slice, slice_s)
            row = results[policy]
            for key in ("messages", "seconds", "cpu_seconds", "units"):
                row[key] += res[key]
            for key, value in res["counts"].items():
                row["counts"][key] = row["counts"].get(key, 0) + value
    for row in results.values():
        row["rate"] = row["messages"] / row["seconds"]
    return {"turns": turns, "policies": results}


def run(args: argparse.Namespace) -> dict[str, Any]:
    # psycopg_pool logs a WARNING for each broken connection returned (pool alone after idling):
    # counted below (returns_bad), not printed.
    logging.getLogger("psycopg.pool").setLevel(logging.ERROR)
    wire_freshconn_for_its_aliases_only()
    pools = build_pools()
    workers = {policy: PoolWorker(policy, pools) for policy in BUSY_POLICIES}
    try:
        warmup = {p: workers[p].call(workers[p].busy_slice, args.warmup) for p in BUSY_POLICIES}
        turns = max(1, round(args.seconds / args.slice))
        rounds = []
        for r in range(args.rounds):
            gc.collect()
            rounds.append(_busy_round(r, workers, turns, args.slice))
        ratios = {
            p: statistics.median(x["policies"][p]["rate"] / x["policies"]["pool"]["rate"] for x in rounds)
            for p in BUSY_POLICIES[1:]
        }
        log("  psycopg     pool busy    " + ", ".join(f"{p} {m:.3f}x" for p, m in ratios.items()))

        # After idle: one message per policy to open each pool, then N x (sleep past the limit, one each).
        # A message's counts run from its start to the next message's start: the pool replaces a
        # connection returned broken in its own thread, after the message (pool alone's case).
        idle_warmup = {p: workers[p].call(workers[p].idle_message, 1) for p in IDLE_POLICIES}
        messages: dict[str, list[dict[str, Any]]] = {p: [] for p in IDLE_POLICIES}
        snapshots: dict[str, list[dict[str, int]]] = {p: [] for p in IDLE_POLICIES}
        for i in range(args.pool_messages):
            time.sleep(args.pool_gap)
            k = i % len(IDLE_POLICIES)
            for policy in (*IDLE_POLICIES[k:], *IDLE_POLICIES[:k]):
                w = workers[policy]
                snapshots[policy].append(w.call(w.counts, "idle"))
                messages[policy].append(w.call(w.idle_message, 1 + i % ROWS))
        time.sleep(SETTLE)
        for policy in IDLE_POLICIES:
            snapshots[policy].append(workers[policy].call(workers[policy].counts, "idle"))
            for i, msg in enumerate(messages[policy]):
                msg["counts"] = _delta(snapshots[policy][i + 1], snapshots[policy][i])
        log(
            "  psycopg     pool idle    "
            + ", ".join(f"{p} {sum(m['error'] is not None for m in ms)}/{len(ms)} failed" for p, ms in messages.items())
        )
        return {
            "policies": {"busy": list(BUSY_POLICIES), "idle": list(IDLE_POLICIES)},
            "pool_options": POOL_OPTIONS,
            "checks": {name: entry["check"] for name, entry in pools.items()},
            "busy": {"warmup": warmup, "rounds": rounds},
            "idle": {
                "idle_limit_ms": args.pool_idle_limit_ms,
                "gap_s": args.pool_gap,
                "warmup": idle_warmup,
                "messages": messages,
            },
        }
    finally:
        for w in workers.values():
            w.stop()
        for entry in pools.values():
            entry["pool"].close()


# ----- in the parent process (no Django) -----------------------------------------------------


def _quartiles(values: list[float]) -> tuple[float, float]:
    if len(values) < 2:
        return values[0], values[0]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], q[2]


def summarize(res: dict[str, Any]) -> dict[str, Any]:
    """Per shape and policy: busy rates and ratios to ``pool`` (per round, then the median); after idle, per message."""
    rounds = res["busy"]["rounds"]
    busy: dict[str, Any] = {}
    for policy in res["policies"]["busy"]:
        rows = [r["policies"][policy] for r in rounds]
        ratios = [r["policies"][policy]["rate"] / r["policies"]["pool"]["rate"] for r in rounds]
        units = sum(row["units"] for row in rows)

        def total(key: str, rows: list[dict[str, Any]] = rows) -> int:
            return sum(row["counts"].get(key, 0) for row in rows)

        q1, q3 = _quartiles(ratios)
        busy[policy] = {
            "rate": statistics.median(row["rate"] for row in rows),
            "ratio": statistics.median(ratios),
            "ratio_q1": q1,
            "ratio_q3": q3,
            "messages": sum(row["messages"] for row in rows),
            "units": units,
            "pings": total("pings"),
            "connects": total("connects"),
            "pings_per_1000": 1000.0 * total("pings") / units if units else 0.0,
            "connects_per_1000": 1000.0 * total("connects") / units if units else 0.0,
            "checks_per_1000": 1000.0 * total("checks") / units if units else 0.0,
            "pool_connections_num": total("pool_connections_num"),
            "cpu_us_per_message": statistics.median(1e6 * row["cpu_seconds"] / row["messages"] for row in rows),
            "check": res["checks"][alias("busy", policy)],
        }
    idle: dict[str, Any] = {}
    for policy in res["policies"]["idle"]:
        msgs = res["idle"]["messages"][policy]
        n = len(msgs)
        ok = [m["ms"] for m in msgs if m["error"] is None]
        failed = [m["ms"] for m in msgs if m["error"] is not None]

        def per_msg(key: str, msgs: list[dict[str, Any]] = msgs, n: int = n) -> float:
            return sum(m["counts"].get(key, 0) for m in msgs) / n if n else 0.0

        idle[policy] = {
            "messages": n,
            "failures": len(failed),
            "errors": sorted({m["error"] for m in msgs if m["error"] is not None}),
            "pings_per_message": per_msg("pings"),
            "connects_per_message": per_msg("connects"),
            "checks_per_message": per_msg("checks"),
            "failed_checks_per_message": per_msg("checks_failed"),
            "pool_connections_num": sum(m["counts"].get("pool_connections_num", 0) for m in msgs),
            "connects": sum(m["counts"].get("connects", 0) for m in msgs),
            "first_query_ms_median": statistics.median(ok) if ok else None,
            "first_query_ms_max": max(ok) if ok else None,
            "error_ms_median": statistics.median(failed) if failed else None,
            "check": res["checks"][alias("idle", policy)],
        }
    return {"busy": busy, "idle": idle}
