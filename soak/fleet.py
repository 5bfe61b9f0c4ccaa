"""The fleet: many worker threads in one process across server restarts. Do they storm the server?

Each of ``--threads`` threads runs the README's shape, ``for tick in freshconn.each(ticks)`` with a
``@freshconn.unit_of_work(retries=3)`` handler that sends a SELECT, 20-80 ms apart (a worker with
a steady trickle of messages). The server is stopped cleanly (every session is cut at once),
stays down ``--down`` seconds, and is started again, ``--restarts`` times, ``--gap`` to ``--gap`` + 1
seconds after every thread was back from the previous restart (a short gap is a flapping server).

Every connection attempt is timed at the driver boundary (Django's ``get_new_connection``, wrapped
for the run: the attempts freshconn makes and any other), with its thread and its error code.
``freshconn.stats()["reconnect_attempts"]`` is sampled every 100 ms as well. Per restart:

- attempts per 100 ms while the server is down (from the moment it is told to stop until its port
  accepts a connection again), and how many were refused;
- failed attempts per thread, from the stop until that thread's first unit succeeded again;
- the time from the port accepting connections until every thread has completed a unit;
- ``Too many connections`` (MySQL 1040; PostgreSQL 53300 ``too_many_connections``): the server's
  connection limit is the fleet size + 10, so a storm of duplicate connects would reach it.
"""

from __future__ import annotations

import argparse
import bisect
import itertools
import math
import random
import socket
import statistics
import threading
import time
from collections.abc import Iterator
from typing import Any

from soak.bed import Bed
from soak.worker import short_error


def _code(exc: BaseException) -> str:
    return short_error(exc).rsplit(" ", 1)[-1]


def run_fleet(args: argparse.Namespace, bed: Bed) -> dict[str, Any]:
    from django.db import connection, connections

    import freshconn

    assert bed.server is not None
    server = bed.server
    rng = random.Random(args.seed)
    lock = threading.Lock()
    attempts: list[tuple[float, int, bool, str]] = []  # (when, thread index, ok, error code)
    index_of: dict[int, int] = {}
    successes: list[list[float]] = [[] for _ in range(args.threads)]
    surfaced: list[tuple[float, int, str]] = []
    stop = threading.Event()

    wrapper_cls = type(connections["default"])
    original = wrapper_cls.get_new_connection

    def counting(self: Any, conn_params: Any) -> Any:
        started = time.monotonic()
        who = index_of.get(threading.get_ident(), -1)
        try:
            raw = original(self, conn_params)
        except Exception as exc:
            with lock:
                attempts.append((started, who, False, _code(exc)))
            raise
        with lock:
            attempts.append((started, who, True, ""))
        return raw

    wrapper_cls.get_new_connection = counting  # type: ignore[method-assign]

    @freshconn.unit_of_work(retries=3)
    def work() -> None:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
            cursor.fetchone()

    def ticks(my_rng: random.Random) -> Iterator[None]:
        while not stop.is_set():
            time.sleep(my_rng.uniform(0.02, 0.08))
            yield None

    def body(i: int) -> None:
        index_of[threading.get_ident()] = i
        my_rng = random.Random(args.seed * 1000 + i)
        mine = successes[i]
        try:
            while not stop.is_set():
                try:
                    for _ in freshconn.each(ticks(my_rng)):
                        try:
                            work()
                        except Exception as exc:
                            with lock:
                                surfaced.append((time.monotonic(), i, short_error(exc)))
                            continue
                        mine.append(time.monotonic())
                except Exception as exc:  # a unit could not even start: still an error the thread saw
                    with lock:
                        surfaced.append((time.monotonic(), i, short_error(exc)))
        finally:
            freshconn.close_thread_connections()

    samples: list[tuple[float, int]] = []

    def sampler() -> None:
        while not stop.is_set():
            samples.append((time.monotonic(), freshconn.stats().get("default", {}).get("reconnect_attempts", 0)))
            time.sleep(0.1)

    threads = [threading.Thread(target=body, args=(i,), daemon=True, name=f"fleet-{i}") for i in range(args.threads)]
    watcher = threading.Thread(target=sampler, daemon=True)
    freshconn.reset_stats()
    started = time.monotonic()
    for t in threads:
        t.start()
    watcher.start()
    restarts: list[dict[str, Any]] = []
    try:
        time.sleep(3.0)  # every thread connected and busy
        for r in range(args.restarts):
            # Steady work between restarts: --gap seconds (+ up to 1 s) after every thread was back.
            time.sleep(args.gap + rng.uniform(0.0, 1.0))
            t_stop = time.monotonic()
            server.down()
            t_stopped = time.monotonic()
            time.sleep(args.down)
            listen = _Listen(server.host, server.port)
            listen.start()
            server.up()
            listen.join()
            t_listen = listen.when or time.monotonic()
            back = _wait_all_back(successes, t_listen, timeout=30.0)
            restarts.append(
                {
                    "restart": r + 1,
                    "t_stop": t_stop,
                    "stop_took_s": round(t_stopped - t_stop, 3),
                    "t_listen": t_listen,
                    "back": back,
                }
            )
        time.sleep(1.0)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
        watcher.join(5)
        wrapper_cls.get_new_connection = original  # type: ignore[method-assign]
    elapsed = time.monotonic() - started
    return _summarize(args, restarts, attempts, samples, surfaced, successes, elapsed, bed)


class _Listen(threading.Thread):
    """Notes the first moment the server's port accepts a TCP connection (polled every 5 ms)."""

    def __init__(self, host: str, port: int) -> None:
        super().__init__(daemon=True)
        self.host, self.port = host, port
        self.when: float | None = None

    def run(self) -> None:
        deadline = time.monotonic() + 60.0
        while time.monotonic() < deadline:
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2):
                    self.when = time.monotonic()
                    return
            except OSError:
                time.sleep(0.005)


def _wait_all_back(successes: list[list[float]], since: float, timeout: float) -> list[float | None]:
    """Per thread, the end of its first unit that succeeded after ``since`` (None: not back within ``timeout``)."""
    deadline = time.monotonic() + timeout
    while True:
        back = [_first_after(s, since) for s in successes]
        if all(b is not None for b in back) or time.monotonic() > deadline:
            return back
        time.sleep(0.02)


def _first_after(times: list[float], since: float) -> float | None:
    i = bisect.bisect_right(times, since)
    return times[i] if i < len(times) else None


def _summarize(
    args: argparse.Namespace,
    restarts: list[dict[str, Any]],
    attempts: list[tuple[float, int, bool, str]],
    samples: list[tuple[float, int]],
    surfaced: list[tuple[float, int, str]],
    successes: list[list[float]],
    elapsed: float,
    bed: Bed,
) -> dict[str, Any]:
    too_many = {"1040", "53300"}
    per_restart = []
    bins_all: list[int] = []
    stats_bins: list[int] = []
    failed_per_thread: list[int] = []
    back_times: list[float] = []
    not_back = 0
    down_attempts = down_failed = 0
    for r in restarts:
        t0, t1 = r["t_stop"], r["t_listen"]
        n_bins = max(1, math.ceil((t1 - t0) / 0.1))
        bins = [0] * n_bins
        window = [a for a in attempts if t0 <= a[0] < t1]
        for a in window:
            bins[min(n_bins - 1, int((a[0] - t0) / 0.1))] += 1
        bins_all += bins
        down_attempts += len(window)
        down_failed += sum(1 for a in window if not a[2])
        back = r["back"]
        last_back = max((b for b in back if b is not None), default=t1)
        failed = [0] * args.threads
        for a in attempts:
            if t0 <= a[0] <= last_back and not a[2] and a[1] >= 0:
                failed[a[1]] += 1
        failed_per_thread += failed
        not_back += sum(1 for b in back if b is None)
        all_back = max(b for b in back if b is not None) - t1 if any(b is not None for b in back) else None
        first_back = min(b for b in back if b is not None) - t1 if any(b is not None for b in back) else None
        if all_back is not None:
            back_times.append(all_back)
        # stats() samples inside the window: the largest increase between two samples 100 ms apart.
        inside = [s for s in samples if t0 - 0.1 <= s[0] <= t1 + 0.1]
        steps = [b[1] - a[1] for a, b in itertools.pairwise(inside)]
        stats_bins += steps
        per_restart.append(
            {
                "restart": r["restart"],
                "down_window_s": round(t1 - t0, 3),
                "stop_took_s": r["stop_took_s"],
                "attempts_while_down": len(window),
                "failed_while_down": sum(1 for a in window if not a[2]),
                "attempts_per_100ms_max": max(bins),
                "stats_attempts_per_100ms_max": max(steps, default=0),
                "failed_per_thread_max": max(failed),
                "failed_per_thread_mean": round(statistics.fmean(failed), 2),
                "first_back_s": round(first_back, 3) if first_back is not None else None,
                "all_back_s": round(all_back, 3) if all_back is not None else None,
                "threads_not_back": sum(1 for b in back if b is None),
            }
        )
    import freshconn

    return {
        "driver": args.driver,
        "vendor": bed.vendor,
        "mode": "fleet",
        "seed": args.seed,
        "threads": args.threads,
        "down_s": args.down,
        "gap_s": args.gap,
        "restarts": per_restart,
        "attempts_per_100ms_max": max(bins_all, default=0),
        "attempts_per_100ms_mean": round(statistics.fmean(bins_all), 2) if bins_all else 0,
        "stats_attempts_per_100ms_max": max(stats_bins, default=0),
        "attempts_while_down": down_attempts,
        "failed_attempts": down_failed,
        "failed_per_thread_max": max(failed_per_thread, default=0),
        "failed_per_thread_mean": round(statistics.fmean(failed_per_thread), 2) if failed_per_thread else 0,
        "all_back_s_max": round(max(back_times), 3) if back_times else None,
        "all_back_s_median": round(statistics.median(back_times), 3) if back_times else None,
        "threads_not_back": not_back,
        "too_many_connections": sum(1 for a in attempts if not a[2] and a[3] in too_many),
        "errors_surfaced": len(surfaced),
        "errors_surfaced_kinds": sorted({e[2] for e in surfaced}),
        "attempt_errors": sorted({a[3] for a in attempts if not a[2]}),
        "units": sum(len(s) for s in successes),
        "elapsed_s": round(elapsed, 1),
        "stats": freshconn.stats().get("default", {}),
        "notes": list(bed.notes),
    }
