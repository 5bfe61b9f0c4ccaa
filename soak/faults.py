"""The six faults of the soak, injected for real, each verified afterwards by evidence from the server side.

============== ============================================================== =====================================
kind           what happens                                                   verified by
============== ============================================================== =====================================
idle_expiry    while the worker idles, its session's own idle limit is         the server no longer lists the session
               lowered (run in the worker thread, between two messages,
               as ``freshconn.testing.expire_idle()`` does) and the server
               drops it for idleness
kill           ``KILL`` / ``pg_terminate_backend`` of the worker's session,   the session is gone
               0-15 ms after a batch of messages was queued (mostly mid-unit)
server_restart the server is stopped cleanly and started again after 0-1 s,   the server's uptime began after
               mid-batch                                                      the restart
proxy          alternately: the worker idles past HAProxy's idle timeout      the session behind the proxy is gone
               (idle drop), or HAProxy is restarted mid-batch (down 0-0.5 s)
black_hole     iptables DROP on the proxy's port for 0.5-4 s, mid-batch (no  the DROP rule's packet counter > 0
               reset, no error: packets vanish)
commit_loss    the server holds the worker's COMMIT (PostgreSQL: a deferred   the held session ends (the COMMIT is
               trigger waits for an advisory lock; MariaDB: BACKUP STAGE      settled); whether the server then
               BLOCK_COMMIT), then alternately the session is killed, the     committed it is read from the table
               proxy is cut so the reconnect is refused while the server
               completes the COMMIT, or both
============== ============================================================== =====================================

A fault is *attempted* when the injector tried it and *injected* when it struck something real (a
live session killed, a COMMIT seen held when the cut came); *verified* is the evidence above. A
COMMIT-loss fault that never saw a COMMIT held is attempted but not injected: "not in flight".
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from soak.bed import PROXY_IDLE, Bed
from soak.worker import Ledger, Pool, backend_id

KINDS = ("idle_expiry", "kill", "server_restart", "proxy", "black_hole", "commit_loss")
PROXY_VARIANTS = ("idle_drop", "restart")
COMMIT_VARIANTS = ("kill", "proxy_cut", "kill_proxy_cut")
#: Lowers the session's own idle limit to about a second (as ``freshconn.testing.expire_idle()`` does).
EXPIRE_SQL = {"mysql": "SET SESSION wait_timeout = 1", "postgresql": "SET idle_session_timeout = 500"}
#: The PostgreSQL advisory lock the commit blocker's trigger waits for.
HOLD_LOCK = 7701

PG_HOLD_SETUP = (
    "CREATE TABLE soak_hold (id integer PRIMARY KEY, armed boolean NOT NULL)",
    "INSERT INTO soak_hold VALUES (1, false)",
    "GRANT SELECT ON soak_hold TO app",
    # Deferred: it runs inside COMMIT. When armed, COMMIT waits for the injector's advisory lock.
    "CREATE FUNCTION soak_hold_commit() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
    f"IF (SELECT armed FROM soak_hold WHERE id = 1) THEN PERFORM pg_advisory_xact_lock({HOLD_LOCK}); END IF; "
    "RETURN NULL; END $$",
    "CREATE CONSTRAINT TRIGGER soak_hold_commit AFTER INSERT ON soak_applied DEFERRABLE INITIALLY DEFERRED "
    "FOR EACH ROW EXECUTE FUNCTION soak_hold_commit()",
)


@dataclass
class Fault:
    index: int
    kind: str
    variant: str = ""
    injected: bool = False
    verified: bool = False
    note: str = ""
    sessions: list[int] = field(default_factory=list)
    held_msg: str | None = None
    server_committed: bool | None = None
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class Injector:
    """Injects one fault at a time; ``push(n)`` queues ``n`` more messages (the worker starts on them at once)."""

    def __init__(self, bed: Bed, pool: Pool, ledger: Ledger, rng: random.Random, push: Callable[[int], None]) -> None:
        self.bed, self.pool, self.ledger, self.rng, self.push = bed, pool, ledger, rng, push
        self.admin = bed.admin()
        self.holder = bed.admin()  # holds the COMMIT blocker
        self.vendor = bed.vendor
        self._turns: dict[str, int] = {}

    def close(self) -> None:
        self.admin.close()
        self.holder.close()

    def _variant(self, kind: str, variants: tuple[str, ...]) -> str:
        turn = self._turns.get(kind, 0)
        self._turns[kind] = turn + 1
        return variants[turn % len(variants)]

    def _session(self, wid: int = 0) -> int | None:
        return self.ledger.sessions.get(wid)

    def _soon(self) -> None:
        """A moment after a batch was queued: the worker is most likely inside a unit."""
        time.sleep(self.rng.uniform(0.0, 0.015))

    def inject(self, index: int, kind: str, batch: int, drain: Callable[[], None]) -> Fault:
        fault = Fault(index, kind)
        self.ledger.fault = f"{kind}#{index}"
        started = time.monotonic()
        try:
            getattr(self, "_" + kind)(fault, batch, drain)
        finally:
            fault.seconds = round(time.monotonic() - started, 3)
        return fault

    # -- idle faults: the batch is drained first, the worker waits for its next message ----------

    def _idle_then(self, batch: int, drain: Callable[[], None]) -> int:
        """Queue most of the batch and let the worker finish it; the rest comes after the fault (returned)."""
        after = max(1, batch // 3)
        self.push(batch - after)
        drain()
        return after

    def _idle_expiry(self, fault: Fault, batch: int, drain: Callable[[], None]) -> None:
        after = self._idle_then(batch, drain)
        admin = self.bed.admin()  # its own session: the request runs in the worker thread
        vendor = self.vendor

        def expire() -> int | None:
            from django.db import connections

            raw = connections["default"].connection
            if raw is None:
                return None
            session = backend_id(raw)
            # On the raw connection, unseen by Django and freshconn: exactly what a server does to a
            # session that sat idle past its limit. freshconn still believes the limit it read at connect.
            cursor = raw.cursor()
            try:
                cursor.execute(
                    "SET SESSION wait_timeout = 1" if vendor == "mysql" else "SET idle_session_timeout = 500"
                )
            finally:
                cursor.close()
            return session if session is not None and admin.wait_gone(session, 10.0) else None

        try:
            session = self.pool.run_in_worker(0, expire)
        finally:
            admin.close()
        self.push(after)  # the next message meets the expired session
        if session is None:
            fault.note = "the worker had no open connection"
            return
        fault.sessions = [session]
        fault.injected = fault.verified = True

    # -- faults that strike while the worker is busy ------------------------------------------------

    def _kill(self, fault: Fault, batch: int, drain: Callable[[], None]) -> None:
        self.push(batch)
        self._soon()
        session = self._session()
        if session is None:
            fault.note = "the worker had no session"
            return
        fault.sessions = [session]
        fault.injected = self.admin.kill(session)
        if not fault.injected:
            fault.note = "the session had already ended"
            return
        fault.verified = self.admin.wait_gone(session, 10.0)

    def _server_restart(self, fault: Fault, batch: int, drain: Callable[[], None]) -> None:
        assert self.bed.server is not None
        before = self.admin.try_rows("SELECT 1")  # a live superuser session now: one less reconnect later
        self.push(batch)
        self._soon()
        session = self._session()
        down_for = self.rng.uniform(0.0, 1.0)
        fault.variant = f"down {down_for:.2f}s"
        began = time.monotonic()
        self.bed.server.restart(down_for=down_for)
        fault.injected = before is not None
        if session is not None:
            fault.sessions = [session]
        # The server's own uptime proves the restart. (Not "the old session id is gone": MariaDB
        # numbers sessions from 1 again after a restart, so a new session soon carries the old id.)
        uptime = self.admin.try_rows(
            "SELECT VARIABLE_VALUE FROM information_schema.GLOBAL_STATUS WHERE VARIABLE_NAME = 'UPTIME'"
            if self.vendor == "mysql"
            else "SELECT EXTRACT(EPOCH FROM now() - pg_postmaster_start_time())"
        )
        fault.verified = bool(uptime and float(uptime[0][0]) <= time.monotonic() - began + 1.0)

    def _proxy(self, fault: Fault, batch: int, drain: Callable[[], None]) -> None:
        assert self.bed.proxy is not None
        fault.variant = self._variant("proxy", PROXY_VARIANTS)
        if fault.variant == "idle_drop":
            after = self._idle_then(batch, drain)
            session = self._session()
            time.sleep(PROXY_IDLE + 0.5)
            self.push(after)  # the next message meets the dropped connection
        else:
            self.push(batch)
            self._soon()
            session = self._session()
            self.bed.proxy.restart(down_for=self.rng.uniform(0.0, 0.5))
        if session is None:
            fault.note = "the worker had no session"
            return
        fault.sessions = [session]
        fault.injected = True
        fault.verified = self.admin.wait_gone(session, 10.0)

    def _black_hole(self, fault: Fault, batch: int, drain: Callable[[], None]) -> None:
        assert self.bed.net is not None
        assert self.bed.proxy is not None
        hold = self.rng.uniform(0.5, 4.0)
        fault.variant = f"{hold:.1f}s"
        first = max(1, (2 * batch) // 3)
        self.push(first)
        self._soon()
        self.bed.net.drop(self.bed.proxy.port)
        try:
            time.sleep(hold / 2)
            # More work arrives while the path is dark: the next unit meets the black hole too.
            self.push(batch - first)
            time.sleep(hold / 2)
            dropped = self.bed.net.dropped()
        finally:
            self.bed.net.restore()
        fault.injected = True
        fault.verified = dropped > 0
        fault.note = f"{dropped} packets dropped"

    # -- COMMIT loss --------------------------------------------------------------------------------

    def _arm(self) -> None:
        if self.vendor == "mysql":
            self.holder.rows("BACKUP STAGE START")
            self.holder.rows("BACKUP STAGE BLOCK_COMMIT")
        else:
            self.holder.rows("SELECT pg_advisory_lock(%s)", (HOLD_LOCK,))
            self.admin.rows("UPDATE soak_hold SET armed = true WHERE id = 1")

    def _disarm(self) -> None:
        """No COMMIT is held from now on (PostgreSQL: the trigger stops waiting; MariaDB: see _release)."""
        if self.vendor == "postgresql":
            self.admin.rows("UPDATE soak_hold SET armed = false WHERE id = 1")

    def _release(self) -> None:
        """The held COMMIT (if its session still lives) goes ahead."""
        if self.vendor == "mysql":
            self.holder.try_rows("BACKUP STAGE END")
        else:
            self.holder.try_rows("SELECT pg_advisory_unlock(%s)", (HOLD_LOCK,))

    def _held(self) -> list[int]:
        sql = (
            "SELECT ID FROM information_schema.PROCESSLIST WHERE USER = 'app' AND INFO = 'COMMIT' "
            "AND STATE LIKE '%backup lock%'"
            if self.vendor == "mysql"
            else "SELECT pid FROM pg_stat_activity WHERE usename = 'app' AND query = 'COMMIT' "
            "AND wait_event = 'advisory'"
        )
        return [int(r[0]) for r in self.admin.rows(sql)]

    def _commit_loss(self, fault: Fault, batch: int, drain: Callable[[], None]) -> None:
        assert self.bed.proxy is not None
        fault.variant = self._variant("commit_loss", COMMIT_VARIANTS)
        self._arm()
        released = False
        try:
            self.push(batch)
            deadline = time.monotonic() + 5.0
            held: list[int] = []
            while not held and time.monotonic() < deadline:
                held = self._held()
                if not held:
                    time.sleep(0.005)
            if not held:
                fault.note = "no COMMIT was seen held: not in flight"
                return
            fault.held_msg = self.ledger.current.get(0)
            fault.sessions = held
            self._disarm()
            self._cut(fault.variant, held)
            released = True
            fault.injected = True
        finally:
            if not released:
                self._disarm()
                self._release()
        fault.verified = all(self.admin.wait_gone(s, 20.0) for s in held)
        if fault.held_msg is not None:
            rows = self.admin.rows("SELECT COUNT(*) FROM soak_applied WHERE msg_id = %s", (fault.held_msg,))
            fault.server_committed = bool(rows[0][0])

    def _cut(self, variant: str, held: list[int]) -> None:
        assert self.bed.proxy is not None
        proxy = self.bed.proxy
        if variant == "kill":
            for session in held:
                self.admin.kill(session)
            self._release()
            return
        # The proxy is cut: the worker's COMMIT fails, and Django's reconnect right after it is refused.
        proxy.down()
        if variant == "kill_proxy_cut":
            for session in held:
                self.admin.kill(session)
        down_for = self.rng.uniform(0.3, 1.5)
        # The server completes the held COMMIT while the proxy is still down, or after it is back.
        # MariaDB notices a vanished client within about half a second of waiting for a lock and
        # then rolls the COMMIT back (measured), so there it is released before that; PostgreSQL
        # never looks at the client while a backend waits, so any moment shows something.
        release_at = self.rng.uniform(0.0, 0.35) if self.vendor == "mysql" else self.rng.uniform(0.0, down_for + 0.5)
        timer = threading.Timer(release_at, self._release)
        timer.start()
        try:
            time.sleep(down_for)
            proxy.up()
        finally:
            timer.join()
