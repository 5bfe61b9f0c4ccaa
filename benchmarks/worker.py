"""The four policies, each as a worker thread with its own Django connection, and their measurements.

Importing this module does not import Django: the child process picks its driver first.
"""

from __future__ import annotations

import math
import queue
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

#: "unsafe_again" is the same loop as "unsafe" on a second connection: an A/A control. Its ratio
#: shows how far two identical policies drift apart in this setup (for PostgreSQL, each
#: connection is its own server process, which the kernel may place and cache differently).
POLICIES = ("unsafe", "unsafe_again", "django_max_age_0", "django_health_checks", "freshconn")

#: Django settings per policy; everything else about the alias stays the same.
POLICY_SETTINGS: dict[str, dict[str, Any]] = {
    "unsafe": {"CONN_MAX_AGE": None, "CONN_HEALTH_CHECKS": False},
    "unsafe_again": {"CONN_MAX_AGE": None, "CONN_HEALTH_CHECKS": False},
    "django_max_age_0": {"CONN_MAX_AGE": 0, "CONN_HEALTH_CHECKS": False},
    "django_health_checks": {"CONN_MAX_AGE": None, "CONN_HEALTH_CHECKS": True},
    "freshconn": {"CONN_MAX_AGE": None, "CONN_HEALTH_CHECKS": False},
}

ROWS = 1000


class Messages:
    """A message source that yields primary keys until ``seconds`` have passed, and counts them."""

    def __init__(self, pks: list[int], seconds: float) -> None:
        self.pks = pks
        self.seconds = seconds
        self.count = 0

    def __iter__(self) -> Iterator[int]:
        pks, n, clock = self.pks, len(self.pks), time.perf_counter
        end = clock() + self.seconds
        i = 0
        while clock() < end:
            yield pks[i % n]
            i += 1
        self.count = i


def best_per_iteration(body: Callable[[int], None], batch: int, seconds: float) -> float:
    """Seconds per iteration of ``body(batch)``: the fastest batch, run until ``seconds`` passed.

    The fastest batch (the timeit convention) is the one least disturbed by other processes.
    """
    clock = time.perf_counter
    end = clock() + seconds
    best = math.inf
    while True:
        t0 = clock()
        body(batch)
        t1 = clock()
        best = min(best, (t1 - t0) / batch)
        if t1 >= end:
            return best


class Worker(threading.Thread):
    """One policy: its own thread, hence its own Django connection; runs what the main thread sends."""

    def __init__(self, policy: str) -> None:
        super().__init__(name=f"bench-{policy}", daemon=True)
        self.policy = policy
        self.inbox: queue.Queue[Callable[[], Any] | None] = queue.Queue()
        self.outbox: queue.Queue[tuple[bool, Any]] = queue.Queue()
        self.connects = 0
        self.is_usable_calls = 0
        self.inside_query = 0.0
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
        self.call(self._close)
        self.inbox.put(None)
        self.join()

    # ----- in the worker thread ----------------------------------------------------------------
    def _setup(self) -> None:
        from django.db import close_old_connections, connections

        import freshconn
        from benchmarks.models import Item

        conn = connections["default"]  # this thread's own wrapper
        # A private copy: the settings dict is shared by every thread's wrapper of the alias.
        conn.settings_dict = {**conn.settings_dict, **POLICY_SETTINGS[self.policy]}
        conn._bench_worker = self  # type: ignore[attr-defined]  # read by on_created()
        real_is_usable, real_connect = conn.is_usable, conn.connect
        clock = time.perf_counter

        # Instrumentation, not a mock: count Django's liveness checks on this thread's wrapper and
        # time them and its connects, which Django runs inside the message's first query (an
        # instance attribute shadows the method; the wrapper outlives its reconnects).
        def counting_is_usable() -> bool:
            self.is_usable_calls += 1
            t0 = clock()
            try:
                return bool(real_is_usable())
            finally:
                self.inside_query += clock() - t0

        def timed_connect() -> None:
            t0 = clock()
            try:
                real_connect()
            finally:
                self.inside_query += clock() - t0

        conn.is_usable = counting_is_usable  # type: ignore[method-assign]
        conn.connect = timed_connect  # type: ignore[method-assign]
        self.conn = conn
        self.freshconn = freshconn
        self.Item = Item
        self.pks = list(range(1, ROWS + 1))
        get = Item.objects.get
        each = freshconn.each

        def unsafe(msgs: Messages) -> None:
            for pk in msgs:
                get(pk=pk)

        def django_policy(msgs: Messages) -> None:
            for pk in msgs:
                close_old_connections()
                get(pk=pk)
                close_old_connections()

        def fresh(msgs: Messages) -> None:
            for pk in each(msgs):
                get(pk=pk)

        self.loop = {"unsafe": unsafe, "unsafe_again": unsafe, "freshconn": fresh}.get(self.policy, django_policy)

        # The same loops, timing what happens between one message's query and the next one's
        # (plus, for Django, the ping or connect it runs inside the query): the lifecycle as it
        # runs in a real loop, where caches are cold after the ORM and the driver ran.
        def unsafe_timed(msgs: Messages, samples: list[float], queries: list[float]) -> None:
            last = 0.0
            for pk in msgs:
                t = clock()
                samples.append(t - last)
                get(pk=pk)
                last = clock()
                queries.append(last - t)

        def django_timed(msgs: Messages, samples: list[float], queries: list[float]) -> None:
            last = 0.0
            for pk in msgs:
                close_old_connections()
                self.inside_query = 0.0
                t = clock()
                get(pk=pk)
                done = clock()
                samples.append(t - last + self.inside_query)
                queries.append(done - t - self.inside_query)
                last = done
                close_old_connections()

        def fresh_timed(msgs: Messages, samples: list[float], queries: list[float]) -> None:
            last = 0.0
            for pk in each(msgs):
                t = clock()
                samples.append(t - last)
                get(pk=pk)
                last = clock()
                queries.append(last - t)

        self.timed_loop = {"unsafe": unsafe_timed, "unsafe_again": unsafe_timed, "freshconn": fresh_timed}.get(
            self.policy, django_timed
        )

    def _close(self) -> None:
        self.conn.close()

    def _reset(self) -> None:
        self.connects = 0
        self.is_usable_calls = 0
        self.freshconn.reset_stats()

    def _fc_stats(self) -> dict[str, int]:
        return dict(self.freshconn.stats().get("default", {}))

    def warm_up(self, seconds: float) -> dict[str, int]:
        self._reset()
        msgs = Messages(self.pks, seconds)
        self.loop(msgs)
        return {"messages": msgs.count, "connects": self.connects, "pings": self._pings()}

    def _pings(self) -> int:
        fc = self._fc_stats().get("pings", 0) if self.policy == "freshconn" else 0
        return fc + self.is_usable_calls

    def timed_run(self, seconds: float) -> dict[str, Any]:
        self._reset()
        msgs = Messages(self.pks, seconds)
        c0 = time.thread_time()
        t0 = time.perf_counter()
        self.loop(msgs)
        elapsed = time.perf_counter() - t0
        cpu = time.thread_time() - c0
        fc = self._fc_stats()
        return {
            "messages": msgs.count,
            "seconds": elapsed,
            # CPU time of this worker thread only: not inflated by waiting for a CPU that another
            # process holds, so it shows the lifecycle's own cost even on a busy machine.
            "cpu_seconds": cpu,
            # A unit is one message's lifecycle: freshconn counts its own; Django's run one per message.
            "units": fc.get("units", 0) if self.policy == "freshconn" else msgs.count,
            "pings": self._pings(),
            "connects": self.connects,
            "freshconn_stats": fc if self.policy == "freshconn" else None,
        }

    def in_loop(self, seconds: float) -> dict[str, Any]:
        """Per message: the time from the end of one query to the start of the next, in the real loop.

        Plus, for Django's policies, the ping or connect that Django runs inside the query. The
        median of the samples sets aside the messages a context switch happened to hit; the first
        sample (no previous message) is dropped.
        """
        samples: list[float] = []
        queries: list[float] = []
        self._reset()
        self.timed_loop(Messages(self.pks, seconds), samples, queries)
        samples = samples[1:]
        return {
            "gap_median_us": statistics.median(samples) * 1e6,
            "gap_mean_us": statistics.fmean(samples) * 1e6,
            "gap_samples": len(samples),
            # The query itself (for Django, minus the ping or connect it ran first).
            "query_median_us": statistics.median(queries) * 1e6,
        }

    def overhead(self, seconds: float) -> dict[str, Any]:
        """Per-unit cost of the policy's lifecycle with no query, on this worker's connection.

        unsafe: nothing, by definition. freshconn: ``each()`` over an open connection used a moment
        ago (the busy path), and the ``with unit_of_work():`` form. Django policies:
        ``close_old_connections()`` before and after, plus what it makes the next query do first:
        the health-check ping at the first cursor, or the reconnect under CONN_MAX_AGE=0.
        """
        from django.db import close_old_connections

        if self.policy in ("unsafe", "unsafe_again") or seconds <= 0:
            return {"overhead_us": 0.0}
        conn, fc = self.conn, self.freshconn

        def empty(batch: int) -> None:
            for _ in range(batch):
                pass

        base = best_per_iteration(empty, 1000, 0.02)
        out: dict[str, Any] = {}
        self._reset()
        if self.policy == "freshconn":
            conn.ensure_connection()

            def each_form(batch: int) -> None:
                for _ in fc.each(range(batch)):
                    pass

            def with_form(batch: int) -> None:
                for _ in range(batch):
                    with fc.unit_of_work():
                        pass

            out["overhead_us"] = (best_per_iteration(each_form, 200, seconds / 2) - base) * 1e6
            out["overhead_with_unit_of_work_us"] = (best_per_iteration(with_form, 200, seconds / 2) - base) * 1e6
            stats = self._fc_stats()
            out.update(overhead_units=stats.get("units", 0), overhead_pings=stats.get("pings", 0))
            out["overhead_connects"] = stats.get("connects", 0)
        elif self.policy == "django_health_checks":
            conn.ensure_connection()

            def health(batch: int) -> None:
                for _ in range(batch):
                    close_old_connections()
                    conn.close_if_health_check_failed()  # what the unit's first cursor does
                    close_old_connections()

            def close_twice(batch: int) -> None:
                for _ in range(batch):
                    close_old_connections()
                    close_old_connections()

            out["overhead_us"] = (best_per_iteration(health, 50, seconds * 0.8) - base) * 1e6
            out["overhead_pings"] = self.is_usable_calls
            out["close_old_connections_x2_us"] = (best_per_iteration(close_twice, 200, seconds * 0.2) - base) * 1e6
        else:

            def reconnect(batch: int) -> None:
                for _ in range(batch):
                    close_old_connections()
                    conn.ensure_connection()  # what the unit's first query does
                    close_old_connections()

            out["overhead_us"] = (best_per_iteration(reconnect, 1, seconds) - base) * 1e6
            out["overhead_connects"] = self.connects
        return out
