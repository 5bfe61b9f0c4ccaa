"""Chaos for a user's own test suite (``pytest --freshconn-chaos``): real connection loss at random points.

While each test's body runs, the server really kills (``KILL`` / ``pg_terminate_backend``) or
expires (the session's own idle limit, lowered to about a second) the test's connection, at
random, seeded points where code that is written to survive connection loss does survive it:

- ``unit start``: a unit of work opens while its connection has just died (a night without
  messages, a restart, a proxy's idle drop). freshconn's start checks must find it.
- ``mid-unit``: between two statements of a unit that retries (``@unit_of_work(retries=N)``):
  killed only, since its transaction may be open. The retry must run, when that is safe.
- ``outside units``: between two statements on the same connection issued by code under test
  (not by the test function itself) outside any unit: the naive worker loop. It cannot survive.

A unit without retries is never struck in its middle: a connection lost there always fails
the unit, by design, and the caller (a queue's redelivery) handles it. Statements the test file
itself sends (setup, assertions) are never struck between statements either, so a test's checks
do not fail for chaos' sake.

At most ``max`` strikes per test; each strike point is struck with probability ``rate``; the
random sequence of each test is seeded from the run's seed and the test's id, so a seed
reproduces it. Tests marked ``freshconn_no_chaos`` are left alone, and so is a test that runs
inside one transaction (pytest-django's ``django_db`` without ``transaction=True``): killing its
connection would only break the test's own rollback.

The hook points are existing ones: every wrapper freshconn manages gets a second execute wrapper
(``freshconn._state.on_register``), and ``freshconn._lifecycle.begin`` is wrapped for the run.
"""

from __future__ import annotations

import contextlib
import os
import random
import select
import sys
import sysconfig
import threading
import time
from collections.abc import Callable, Generator, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from django.db.backends.base.base import BaseDatabaseWrapper

__all__ = ["ChaosPlugin"]

SITE_UNIT_START = "unit start"
SITE_MID_UNIT = "mid-unit"
SITE_OUTSIDE = "outside units"
#: Share of strikes at a unit start that expire the idle session instead of killing it (slower: ~1 s).
EXPIRE_SHARE = 0.3
_POLL = select.POLLIN | select.POLLPRI | select.POLLERR | select.POLLHUP


@dataclass
class Strike:
    site: str
    action: str
    alias: str
    where: str
    error: str = ""

    def __str__(self) -> str:
        text = f"{self.action} at {self.site} on {self.alias!r} ({self.where})"
        return text + (f": strike failed, {self.error}" if self.error else "")


@dataclass
class TestRecord:
    nodeid: str
    strikes: list[Strike] = field(default_factory=list)
    outcome: str = "passed"
    skipped_reason: str = ""


class _Thread(threading.local):
    def __init__(self) -> None:
        #: Per alias: the raw connection and unit attempt the last statement ran on, and how many.
        self.last: dict[str, tuple[int, int]] = {}
        self.count: dict[str, int] = {}


class ChaosPlugin:
    """The pytest plugin object ``--freshconn-chaos`` registers (see the module docstring)."""

    def __init__(self, seed: int, rate: float, max_per_test: int) -> None:
        self.seed, self.rate, self.max_per_test = seed, rate, max_per_test
        self.records: list[TestRecord] = []
        self._current: TestRecord | None = None
        self._rng = random.Random(seed)
        self._lock = threading.RLock()
        self._tls = _Thread()
        self._installed = False
        self._test_files: set[str] = set()
        self._library_dirs: tuple[str, ...] = ()
        self._calm: set[int] = set()  # wrappers (by id) inside the test's own transaction: never struck
        self._striking = threading.local()

    # -- pytest hooks -----------------------------------------------------------------------------

    def pytest_report_header(self) -> str:
        return (
            f"freshconn chaos: seed {self.seed}, rate {self.rate:g}, at most {self.max_per_test} strikes per test "
            f"(reproduce with --freshconn-chaos --freshconn-chaos-seed={self.seed})"
        )

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_call(self, item: pytest.Item) -> Iterator[None]:
        if item.get_closest_marker("freshconn_no_chaos") is not None:
            yield
            return
        self._install()
        record = TestRecord(item.nodeid)
        self.records.append(record)
        self._test_files = {str(item.path)}
        self._calm = self._in_test_transaction()
        if self._calm:
            record.skipped_reason = "runs in one transaction (use django_db(transaction=True))"
        with self._lock:
            self._rng = random.Random(f"{self.seed}:{item.nodeid}")
            self._tls.last.clear()
            self._current = record
        try:
            yield
        finally:
            with self._lock:
                self._current = None
            if record.strikes:
                self._heal()

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_makereport(self, item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Any, None]:
        outcome = yield
        report = outcome.get_result()
        if report.when == "call" and self.records and self.records[-1].nodeid == item.nodeid:
            self.records[-1].outcome = report.outcome

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        tr = terminalreporter
        struck = [r for r in self.records if r.strikes]
        lost = [r for r in struck if r.outcome == "failed"]
        strikes = sum(len(r.strikes) for r in self.records)
        tr.write_sep("=", "freshconn chaos")
        tr.write_line(
            f"seed {self.seed}, rate {self.rate:g}: {strikes} strikes in {len(struck)} of {len(self.records)} tests; "
            f"{len(struck) - len(lost)} survived, {len(lost)} did not"
        )
        if lost:
            tr.write_line("did not survive:")
            for record in lost:
                tr.write_line(f"  {record.nodeid}")
                for strike in record.strikes:
                    tr.write_line(f"      {strike}")
        survived = [r for r in struck if r.outcome != "failed"]
        if survived:
            tr.write_line("survived:")
            for record in survived:
                kinds = ", ".join(sorted({f"{s.action} at {s.site}" for s in record.strikes}))
                tr.write_line(f"  {record.nodeid} ({len(record.strikes)}: {kinds})")
        skipped = [r for r in self.records if r.skipped_reason]
        for record in skipped:
            tr.write_line(f"not struck: {record.nodeid}: {record.skipped_reason}")
        tr.write_line(f"reproduce: pytest --freshconn-chaos --freshconn-chaos-seed={self.seed}")

    # -- installation -------------------------------------------------------------------------------

    def _install(self) -> None:
        """Hook into freshconn once Django is ready (pytest-django has configured it by the first test)."""
        if self._installed:
            return
        self._installed = True
        import django
        from django.db import connections

        from . import _lifecycle, _state

        _state.wire()  # every new connection is registered, even in code that never opens a unit
        _state.on_register.append(self._add_hook)
        for conn in connections.all(initialized_only=True):
            if getattr(conn, "_freshconn_hooked", False):
                self._add_hook(conn)
        original = _lifecycle.begin

        def begin(scope: Any, count: bool = True, thread: Any = None) -> None:
            self._at_unit_start(scope)
            original(scope, count, thread)

        _lifecycle.begin = begin
        here = os.path.dirname(os.path.abspath(__file__))
        dirs = {here, os.path.dirname(os.path.abspath(django.__file__)), os.path.dirname(pytest.__file__)}
        dirs |= {p for key in ("stdlib", "platstdlib", "purelib", "platlib") if (p := sysconfig.get_paths().get(key))}
        for name in ("_pytest", "pluggy", "asgiref"):
            module = sys.modules.get(name)
            if module is not None and module.__file__:
                dirs.add(os.path.dirname(os.path.abspath(module.__file__)))
        self._library_dirs = tuple(sorted(d.rstrip(os.sep) + os.sep for d in dirs))

    def _add_hook(self, conn: BaseDatabaseWrapper) -> None:
        if self._statement_hook in conn.execute_wrappers:
            return
        # Right inside freshconn's own hook (index 0): freshconn sees the failure a strike causes,
        # and Django's execute_wrapper() context manager, which pops from the end, never removes ours.
        conn.execute_wrappers.insert(1, self._statement_hook)

    def _in_test_transaction(self) -> set[int]:
        from django.db import connections

        return {id(c) for c in connections.all(initialized_only=True) if c.in_atomic_block}

    # -- strike points ------------------------------------------------------------------------------

    def _at_unit_start(self, scope: Any) -> None:
        if self._current is None:
            return
        from . import _state

        for alias, conn in list(_state.local().wrappers.items()):
            if scope is not None and alias not in scope:
                continue
            if conn.connection is None or conn.in_atomic_block or not _server(conn):
                continue
            self._maybe_strike(conn, SITE_UNIT_START, allow_expire=True)

    def _statement_hook(
        self, execute: Callable[..., Any], sql: str, params: Any, many: bool, context: Mapping[str, Any]
    ) -> Any:
        if self._current is not None and not getattr(self._striking, "on", False):
            conn = context["connection"]
            site = self._site(conn)
            if site is not None:
                self._maybe_strike(conn, site, allow_expire=False)
        return execute(sql, params, many, context)

    def _site(self, conn: BaseDatabaseWrapper) -> str | None:
        """Which strike point this statement is, if any (see the module docstring)."""
        from . import _state, _units

        raw = conn.connection
        if raw is None or not _server(conn):
            return None
        active = _state.local().active  # the innermost acting unit (one attempt of a retrying one)
        in_unit = _units.in_unit()
        attempt = id(active) if in_unit and active is not None else 0
        key = (id(raw), attempt)
        tls = self._tls
        if tls.last.get(conn.alias) != key:
            tls.last[conn.alias] = key
            tls.count[conn.alias] = 1
            return None  # the first statement on this connection (in this unit attempt): nothing is between
        tls.count[conn.alias] += 1
        if in_unit:
            return SITE_MID_UNIT if active is not None and active.tracking else None
        return SITE_OUTSIDE if self._caller_is_code_under_test() else None

    def _caller_is_code_under_test(self) -> bool:
        """True when the innermost frame outside libraries belongs to a module other than the test's own file."""
        frame = sys._getframe(2)
        while frame is not None:
            filename = os.path.abspath(frame.f_code.co_filename)
            if not filename.startswith(self._library_dirs) and not filename.startswith("<"):
                base = os.path.basename(filename)
                return filename not in self._test_files and base != "conftest.py"
            frame = frame.f_back  # type: ignore[assignment]
        return False

    def _where(self) -> str:
        frame = sys._getframe(3)
        while frame is not None:
            filename = os.path.abspath(frame.f_code.co_filename)
            if not filename.startswith(self._library_dirs) and not filename.startswith("<"):
                return f"{os.path.relpath(filename)}:{frame.f_lineno}"
            frame = frame.f_back  # type: ignore[assignment]
        return "?"

    def _maybe_strike(self, conn: BaseDatabaseWrapper, site: str, *, allow_expire: bool) -> None:
        with self._lock:
            record = self._current
            if record is None or id(conn) in self._calm or len(record.strikes) >= self.max_per_test:
                return
            if self._rng.random() >= self.rate:
                return
            expire = allow_expire and self._rng.random() < EXPIRE_SHARE
            strike = Strike(site, "expire" if expire else "kill", conn.alias, self._where())
            record.strikes.append(strike)
        self._striking.on = True
        try:
            self._strike(conn, expire)
        except Exception as exc:  # noqa: BLE001 - reported in the summary; the test goes on unharmed
            strike.error = type(exc).__name__
        finally:
            self._striking.on = False

    @staticmethod
    def _strike(conn: BaseDatabaseWrapper, expire: bool) -> None:
        from . import _drivers
        from .testing import expire_idle, kill_connection

        raw = conn.connection
        if expire:
            expire_idle(conn.alias)
        else:
            kill_connection(conn.alias)
        # The server has let go; wait until this side's socket shows it, as it would after any
        # real idle spell: otherwise the strike would test the kernel's timing, not the code.
        fd = _drivers.for_connection(raw).fileno(raw)
        if fd is not None:
            poller = select.poll()
            poller.register(fd, _POLL)
            deadline = time.monotonic() + 2.0
            while not poller.poll(20) and time.monotonic() < deadline:
                pass

    def _heal(self) -> None:
        """After a struck test: close this thread's connections, so that teardown (the flush) gets a live one."""
        from django.db import connections

        for conn in connections.all(initialized_only=True):
            if conn.connection is not None and not conn.in_atomic_block:
                with contextlib.suppress(Exception):
                    conn.close()
                conn.connection = None


def _server(conn: BaseDatabaseWrapper) -> bool:
    return conn.vendor in ("mysql", "postgresql")
