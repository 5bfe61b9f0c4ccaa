"""The policies, each as a worker thread with its own Django connection, the message sources, the measurements.

Importing this module does not import Django: the child process picks its driver first.
"""

from __future__ import annotations

import math
import queue
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

#: "unsafe_again" is the same loop as "unsafe" on a second connection: an A/A control. Its ratio
#: shows how far two identical policies drift apart in this setup (for PostgreSQL, each
#: connection is its own server process, which the kernel may place and cache differently).
#: The two "freshconn_poll_*" policies are freshconn with its zero-timeout poll() of an idle
#: socket forced on every unit, or never: the two sides of that trade-off, measured in the same run.
ALL_POLICIES = (
    "unsafe",
    "unsafe_again",
    "django_max_age_0",
    "django_health_checks",
    "freshconn",
    "freshconn_poll_always",
    "freshconn_poll_never",
    "floor",
)

#: Django settings per policy; everything else about the alias stays the same.
POLICY_SETTINGS: dict[str, dict[str, Any]] = {
    "unsafe": {"CONN_MAX_AGE": None, "CONN_HEALTH_CHECKS": False},
    "unsafe_again": {"CONN_MAX_AGE": None, "CONN_HEALTH_CHECKS": False},
    "django_max_age_0": {"CONN_MAX_AGE": 0, "CONN_HEALTH_CHECKS": False},
    "django_health_checks": {"CONN_MAX_AGE": None, "CONN_HEALTH_CHECKS": True},
    "freshconn": {"CONN_MAX_AGE": None, "CONN_HEALTH_CHECKS": False},
    "freshconn_poll_always": {"CONN_MAX_AGE": None, "CONN_HEALTH_CHECKS": False},
    "freshconn_poll_never": {"CONN_MAX_AGE": None, "CONN_HEALTH_CHECKS": False},
    "floor": {"CONN_MAX_AGE": None, "CONN_HEALTH_CHECKS": False},
}

#: freshconn skips the poll() for a connection used less than ``_policy.SOCKET_CHECK_AFTER`` seconds
#: ago; these policies override that threshold for their own turns only (the threads never run together).
POLL_THRESHOLD = {"freshconn_poll_always": 0.0, "freshconn_poll_never": math.inf}

ROWS = 1000


def is_freshconn(policy: str) -> bool:
    return policy.startswith("freshconn")


def is_unsafe(policy: str) -> bool:
    return policy.startswith("unsafe")


class _FloorCtx:
    __slots__ = ("check_at", "deadline", "raw")

    def __init__(self) -> None:
        self.raw: Any = None
        self.check_at = 0.0
        self.deadline = math.inf


class _FloorLocal(threading.local):
    def __init__(self) -> None:
        self.ctx = _FloorCtx()


_FLOOR = _FloorLocal()


def floor_each(msgs: Iterable[int], conn: Any) -> Iterator[int]:
    """The "floor" policy: the least work a per-unit lifecycle written in Python does, and no more.

    Not a safe policy (it acts on nothing): a reference, measured in the same run, for what any
    Python busy path costs. Per unit, as freshconn's at its leanest: at the start a thread-local
    read, the clock, and for the connection: is it the one seen last, is it within its idle
    window, has Django flagged an error, is a transaction open; at the end the clock, the error
    flag and the lifetime. freshconn does more (unit counting, nesting, the statement hook, the
    poll decision, autocommit, the idle aliases' scope), which the tests prove it needs.
    """
    local, clock = _FLOOR, time.monotonic
    for m in msgs:
        ctx = local.ctx
        now = clock()
        raw = conn.connection
        if raw is not ctx.raw or now >= ctx.check_at or conn.errors_occurred or conn.in_atomic_block:
            ctx.raw = raw  # the slow path: taken once, at the first unit
        yield m
        now = clock()
        if conn.errors_occurred or now >= ctx.deadline:
            ctx.raw = None
        ctx.check_at = now + 5.0


class Messages:
    """A message source that yields primary keys until ``seconds`` have passed, and counts them.

    At least ``at_least`` messages, however long they take: a slice of a slow policy (a connect
    per message) on a loaded machine still measures something.
    """

    def __init__(self, pks: list[int], seconds: float, at_least: int = 1) -> None:
        self.pks = pks
        self.seconds = seconds
        self.at_least = at_least
        self.count = 0

    def __iter__(self) -> Iterator[int]:
        pks, n, clock, at_least = self.pks, len(self.pks), time.perf_counter, self.at_least
        end = clock() + self.seconds
        i = 0
        while i < at_least or clock() < end:
            yield pks[i % n]
            i += 1
        self.count = i


class GapMessages(Messages):
    """As ``Messages``, with an idle gap of ``gap`` seconds (a busy-wait) before every message but the first.

    The wait happens while the next message is fetched, outside any unit of work, as a consumer
    waits in its queue's poll: freshconn sees the connection idle for the gap. A busy-wait, not a
    sleep: a sleep's wake-up on a loaded machine lasts anything from the gap to milliseconds.
    """

    def __init__(self, pks: list[int], seconds: float, gap: float, at_least: int = 1) -> None:
        super().__init__(pks, seconds, at_least)
        self.gap = gap

    def __iter__(self) -> Iterator[int]:
        pks, n, clock, gap, at_least = self.pks, len(self.pks), time.perf_counter, self.gap, self.at_least
        end = clock() + self.seconds
        i = 0
        while True:
            now = clock()
            if i:
                until = now + gap
                while now < until:
                    now = clock()
            if now >= end and i >= at_least:
                break
            yield pks[i % n]
            i += 1
        self.count = i


class RedisMessages(Messages):
    """Primary keys popped one by one with BLPOP from a Redis list, until ``seconds`` have passed.

    The list is filled before the timed slice (``prefill``) with more messages than the slice can
    take, so BLPOP never blocks for long: each message costs one real round trip to Redis, the
    gap a real consumer has between units. ``starved`` counts the times the list ran dry anyway.
    """

    def __init__(self, client: Any, key: str, seconds: float, at_least: int = 1) -> None:
        super().__init__([], seconds, at_least)
        self.client = client
        self.key = key
        self.starved = 0

    def prefill(self, pks: list[int], count: int) -> None:
        n = len(pks)
        self.client.delete(self.key)
        self.client.rpush(self.key, *(pks[i % n] for i in range(count)))

    def __iter__(self) -> Iterator[int]:
        clock, blpop, key, at_least = time.perf_counter, self.client.blpop, self.key, self.at_least
        end = clock() + self.seconds
        i = 0
        while i < at_least or clock() < end:
            item = blpop(key, timeout=1)
            if item is None:
                self.starved += 1
                continue
            yield int(item[1])
            i += 1
        self.count = i


class Variant:
    """How messages arrive: back to back, after a fixed idle gap, or from a Redis list."""

    def __init__(self, name: str, policies: tuple[str, ...], gap: float = 0.0, redis: bool = False) -> None:
        self.name = name
        self.policies = policies
        self.gap = gap
        self.redis = redis


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


class CountingPoller:
    """Stands in for a ConnState's ``select.poll`` object to count freshconn's polls (untimed runs only)."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.calls = 0

    def poll(self, *args: Any) -> Any:
        self.calls += 1
        return self.real.poll(*args)


class Worker(threading.Thread):
    """One policy: its own thread, hence its own Django connection; runs what the main thread sends."""

    def __init__(self, policy: str, redis_url: str | None = None) -> None:
        super().__init__(name=f"bench-{policy}", daemon=True)
        self.policy = policy
        self.redis_url = redis_url
        self.inbox: queue.Queue[Callable[[], Any] | None] = queue.Queue()
        self.outbox: queue.Queue[tuple[bool, Any]] = queue.Queue()
        self.connects = 0
        self.is_usable_calls = 0
        self.inside_query = 0.0
        #: Messages per second in this worker's last Redis slice: sizes the next prefill.
        self.redis_rate = 10000.0
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
        from freshconn import _policy

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
        # Any: the thresholds differ between cores (SOCKET_CHECK_IDLE exists in older cores and in
        # this one, with other meanings; cores in between lack it).
        self.policy_module: Any = _policy
        self.default_poll_threshold = _policy.SOCKET_CHECK_AFTER
        self.default_idle_threshold = getattr(_policy, "SOCKET_CHECK_IDLE", None)
        self.Item = Item
        self.pks = list(range(1, ROWS + 1))
        self.redis = None
        if self.redis_url:
            import redis

            self.redis = redis.Redis.from_url(self.redis_url)
            self.redis.ping()
        get = Item.objects.get
        each = freshconn.each

        # The message source as each non-Django policy iterates it: as it is, inside freshconn's
        # units, or inside the floor's minimal lifecycle. Wrapped once per slice, outside the loop.
        wrap: Callable[[Iterable[int]], Iterable[int]] = (
            each
            if is_freshconn(self.policy)
            else (lambda msgs: floor_each(msgs, conn))
            if self.policy == "floor"
            else (lambda msgs: msgs)
        )

        def plain(msgs: Iterable[int]) -> None:
            for pk in wrap(msgs):
                get(pk=pk)

        def django_policy(msgs: Iterable[int]) -> None:
            for pk in msgs:
                close_old_connections()
                get(pk=pk)
                close_old_connections()

        is_django = not (is_freshconn(self.policy) or is_unsafe(self.policy) or self.policy == "floor")
        self.loop = django_policy if is_django else plain

        # The same loops, timing what happens between one message's query and the next one's
        # (plus, for Django, the ping or connect it runs inside the query): the lifecycle as it
        # runs in a real loop, where caches are cold after the ORM and the driver ran.
        def plain_timed(msgs: Iterable[int], samples: list[float], queries: list[float]) -> None:
            last = 0.0
            for pk in wrap(msgs):
                t = clock()
                samples.append(t - last)
                get(pk=pk)
                last = clock()
                queries.append(last - t)

        def django_timed(msgs: Iterable[int], samples: list[float], queries: list[float]) -> None:
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

        self.timed_loop = django_timed if is_django else plain_timed

    def _close(self) -> None:
        self.conn.close()
        if self.redis is not None:
            self.redis.delete(self._redis_key())
            self.redis.close()

    def _reset(self) -> None:
        self.connects = 0
        self.is_usable_calls = 0
        self.freshconn.reset_stats()

    def _fc_stats(self) -> dict[str, int]:
        return dict(self.freshconn.stats().get("default", {}))

    def _pings(self) -> int:
        fc = self._fc_stats().get("pings", 0) if is_freshconn(self.policy) else 0
        return fc + self.is_usable_calls

    def _redis_key(self) -> str:
        return f"freshconn-bench:{self.policy}"

    def _threshold(self, forced: float | None = None) -> None:
        """Apply this policy's poll threshold (or ``forced``: 0 polls every unit, inf never) for the next turn.

        freshconn skips its poll between back-to-back units (``_policy.SOCKET_CHECK_AFTER``, and in
        cores that have it, ``SOCKET_CHECK_IDLE``); 0 makes no unit back to back, inf every unit.
        """
        value = forced if forced is not None else POLL_THRESHOLD.get(self.policy)
        if value is None:  # freshconn's own choice
            self._restore()
            return
        module = self.policy_module
        module.SOCKET_CHECK_AFTER = value
        if value == math.inf and self.default_idle_threshold is not None:
            module.SOCKET_CHECK_IDLE = value

    def _restore(self) -> None:
        """freshconn's own poll thresholds again."""
        self.policy_module.SOCKET_CHECK_AFTER = self.default_poll_threshold
        if self.default_idle_threshold is not None:
            self.policy_module.SOCKET_CHECK_IDLE = self.default_idle_threshold

    def source(self, variant: Variant, seconds: float, at_least: int = 1) -> Messages:
        """The messages of one slice of ``variant`` (a Redis list is filled here, before any timing)."""
        if variant.redis:
            msgs = RedisMessages(self.redis, self._redis_key(), seconds, at_least)
            msgs.prefill(self.pks, int(3 * self.redis_rate * seconds) + 100 + at_least)
            return msgs
        if variant.gap:
            return GapMessages(self.pks, seconds, variant.gap, at_least)
        return Messages(self.pks, seconds, at_least)

    def _after(self, msgs: Messages, seconds: float) -> int:
        """Restore the default poll threshold; for Redis, learn the rate and drop the leftovers."""
        self._restore()
        if isinstance(msgs, RedisMessages):
            self.redis_rate = max(100.0, msgs.count / seconds)
            self.redis.delete(msgs.key)  # type: ignore[union-attr]
            return msgs.starved
        return 0

    def warm_up(self, variant: Variant, seconds: float) -> dict[str, int]:
        self._reset()
        msgs = self.source(variant, seconds)
        self._threshold()
        self.loop(msgs)
        self._after(msgs, seconds)
        return {"messages": msgs.count, "connects": self.connects, "pings": self._pings()}

    def timed_run(self, variant: Variant, seconds: float) -> dict[str, Any]:
        self._reset()
        msgs = self.source(variant, seconds)
        self._threshold()
        c0 = time.thread_time()
        t0 = time.perf_counter()
        self.loop(msgs)
        elapsed = time.perf_counter() - t0
        cpu = time.thread_time() - c0
        starved = self._after(msgs, elapsed)
        fc = self._fc_stats()
        return {
            "messages": msgs.count,
            "seconds": elapsed,
            # CPU time of this worker thread only: not inflated by waiting for a CPU that another
            # process holds, so it shows the lifecycle's own cost even on a busy machine.
            "cpu_seconds": cpu,
            # A unit is one message's lifecycle: freshconn counts its own; Django's run one per message.
            "units": fc.get("units", 0) if is_freshconn(self.policy) else msgs.count,
            "pings": self._pings(),
            "connects": self.connects,
            "starved": starved,
            "freshconn_stats": fc if is_freshconn(self.policy) else None,
        }

    def in_loop(self, variant: Variant, seconds: float) -> dict[str, Any]:
        """Per message: the time from the end of one query to the start of the next, in the real loop.

        Plus, for Django's policies, the ping or connect that Django runs inside the query. The
        median of the samples sets aside the messages a context switch happened to hit; the first
        sample (no previous message) is dropped.
        """
        samples: list[float] = []
        queries: list[float] = []
        self._reset()
        msgs = self.source(variant, seconds, at_least=5)
        self._threshold()
        self.timed_loop(msgs, samples, queries)
        self._after(msgs, seconds)
        samples = samples[1:]
        return {
            "gap_median_us": statistics.median(samples) * 1e6,
            "gap_mean_us": statistics.fmean(samples) * 1e6,
            "gap_samples": len(samples),
            # The query itself (for Django, minus the ping or connect it ran first).
            "query_median_us": statistics.median(queries) * 1e6,
        }

    def count_polls(self, variant: Variant, seconds: float) -> dict[str, int]:
        """An untimed run of freshconn's loop with its socket poll counted: how often the poll really runs."""
        if not is_freshconn(self.policy):
            return {}
        self.conn.ensure_connection()
        state = self.freshconn._state.state_of(self.conn)
        real = state.poller
        counter = CountingPoller(real)
        state.poller = counter
        self._reset()
        msgs = self.source(variant, seconds)
        self._threshold()
        try:
            self.loop(msgs)
        finally:
            self._after(msgs, seconds)
            state.poller = real
        fc = self._fc_stats()
        return {"units": fc.get("units", 0), "polls": counter.calls, "pings": fc.get("pings", 0)}

    def overhead(self, variant: Variant, seconds: float, polled: bool = False) -> dict[str, Any]:
        """Per-unit cost of the policy's lifecycle with no query, on this worker's connection.

        unsafe: nothing, by definition. freshconn: ``each()`` over an open connection used a moment
        ago (the busy path), and the ``with unit_of_work():`` form; in the variants with a pause
        between messages, with the poll of the socket that such a pause brings. Django policies:
        ``close_old_connections()`` before and after, plus what it makes the next query do first:
        the health-check ping at the first cursor, or the reconnect under CONN_MAX_AGE=0.
        """
        from django.db import close_old_connections

        if is_unsafe(self.policy) or seconds <= 0:
            return {"overhead_us": 0.0}
        conn, fc = self.conn, self.freshconn

        def empty(batch: int) -> None:
            for _ in range(batch):
                pass

        base = best_per_iteration(empty, 1000, 0.02)
        out: dict[str, Any] = {}
        self._reset()
        if is_freshconn(self.policy):
            conn.ensure_connection()

            def each_form(batch: int) -> None:
                for _ in fc.each(range(batch)):
                    pass

            def with_form(batch: int) -> None:
                for _ in range(batch):
                    with fc.unit_of_work():
                        pass

            # No query here, so nothing would make these units look back to back or not as in the
            # real loop: the poll runs or not as it did there (``polled``: most units of the
            # variant's real loop polled, counted by count_polls()).
            forced = POLL_THRESHOLD.get(self.policy, 0.0 if polled else math.inf)
            self._threshold(forced)
            try:
                out["overhead_us"] = (best_per_iteration(each_form, 200, seconds / 2) - base) * 1e6
                out["overhead_with_unit_of_work_us"] = (best_per_iteration(with_form, 200, seconds / 2) - base) * 1e6
            finally:
                self._restore()
            stats = self._fc_stats()
            out.update(overhead_units=stats.get("units", 0), overhead_pings=stats.get("pings", 0))
            out["overhead_connects"] = stats.get("connects", 0)
        elif self.policy == "floor":
            conn.ensure_connection()

            def floor_form(batch: int) -> None:
                for _ in floor_each(range(batch), conn):
                    pass

            out["overhead_us"] = (best_per_iteration(floor_form, 200, seconds) - base) * 1e6
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

    # ----- instruction counts (benchmarks.instructions, under callgrind) -----------------------
    def counted(self, kind: str, units: int, threshold: float | None = None) -> dict[str, Any]:
        """Run ``units`` messages of this policy's loop inside ``sys.call_tracing``: callgrind's marker.

        benchmarks.instructions runs the process with ``--toggle-collect=sys_call_tracing
        --dump-after=sys_call_tracing``: only what runs inside the call is counted, one dump per
        call. The loop reads a plain list (no clock), so every run executes the same code.
        """
        import gc

        fc, conn = self.freshconn, self.conn
        msgs = [self.pks[i % len(self.pks)] for i in range(units)]
        if kind == "loop":

            def body() -> None:
                self.loop(msgs)

        elif kind == "alone":

            def body() -> None:
                for _ in fc.each(range(units)):
                    pass

        elif kind == "queries_no_unit":  # the statement hook alone: freshconn's connection, no unit

            def body() -> None:
                for pk in msgs:
                    self.Item.objects.get(pk=pk)

        elif kind == "redis":
            source = RedisMessages(self.redis, self._redis_key(), math.inf)
            source.prefill(self.pks, units)
            it = iter(source)
            stream = [None] * units

            def body() -> None:
                # The same number of BLPOPs for every policy: a list of exactly ``units`` messages.
                self.loop(next(it) for _ in stream)

        else:
            raise ValueError(kind)
        conn.ensure_connection()
        self.Item.objects.get(pk=1)  # the connection was used a moment ago, as in a busy loop
        self._threshold(threshold if threshold is not None else POLL_THRESHOLD.get(self.policy))
        gc.collect()
        self._reset()
        try:
            sys.call_tracing(body, ())
        finally:
            self._restore()
        fc_stats = self._fc_stats() if is_freshconn(self.policy) else {}
        return {"units": units, "pings": self._pings(), "connects": self.connects, "freshconn": fc_stats}
