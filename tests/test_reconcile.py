"""AmbiguousCommitError.wait_until_settled() against a real server: a read is meaningful only once it returned True."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from django.db import connection, transaction
from testbed.proxies import Relay
from testbed.servers import DBServer

import freshconn
from tests.app.models import Order
from tests.conftest import VENDOR, admin_connection, driver_module

pytestmark = pytest.mark.server

HOLD_LOCK = 4343


class CommitHold:
    """Makes the server hold the COMMIT of a transaction that wrote a 'settle-%' order until release()."""

    def __init__(self, server: Any) -> None:
        self.admin = superuser(server)
        # PostgreSQL advisory locks belong to a database: the holder must be in the test database.
        self.holder = superuser(server)

    def _run(self, raw: Any, sql: str) -> list[Any]:
        cursor = raw.cursor()
        try:
            cursor.execute(sql)
            return list(cursor.fetchall()) if cursor.description else []
        finally:
            cursor.close()

    def hold(self) -> None:
        if VENDOR == "mysql":
            # MariaDB: every COMMIT waits ("Waiting for backup lock"); reads and writes go on.
            self._run(self.holder, "BACKUP STAGE START")
            self._run(self.holder, "BACKUP STAGE BLOCK_COMMIT")
        else:
            self._run(self.holder, f"SELECT pg_advisory_lock({HOLD_LOCK})")

    def release(self) -> None:
        if VENDOR == "mysql":
            self._run(self.holder, "BACKUP STAGE END")
        else:
            self._run(self.holder, f"SELECT pg_advisory_unlock({HOLD_LOCK})")

    def held_session(self) -> int | None:
        sql = (
            "SELECT ID FROM information_schema.PROCESSLIST WHERE USER = 'app' AND INFO = 'COMMIT' "
            "AND STATE LIKE '%backup lock%'"
            if VENDOR == "mysql"
            else "SELECT pid FROM pg_stat_activity WHERE usename = 'app' AND query = 'COMMIT' "
            "AND wait_event = 'advisory'"
        )
        rows = self._run(self.admin, sql)
        return int(rows[0][0]) if rows else None

    @staticmethod
    def rows(ref: str) -> int:
        """Committed orders with ``ref``, read by a new session of the app (what a reconciling worker does)."""
        with freshconn.unit_of_work():
            count: int = Order.objects.filter(ref=ref).count()
            return count

    def close(self) -> None:
        self.admin.close()
        self.holder.close()


def superuser(server: Any) -> Any:
    """A raw superuser session (autocommit); on PostgreSQL in the test database, where the app's tables are."""
    if VENDOR == "mysql":
        return admin_connection(server)
    raw = driver_module().connect(
        host=server.tmp, port=server.port, user="postgres", dbname=connection.settings_dict["NAME"]
    )
    raw.autocommit = True
    return raw


@pytest.fixture
def commit_hold(live: None, server: Any) -> Iterator[CommitHold]:
    hold = CommitHold(server)
    if VENDOR == "postgresql":
        # Deferred, so it runs inside COMMIT: it waits for the advisory lock the test holds.
        hold._run(
            hold.admin,
            "CREATE OR REPLACE FUNCTION fc_hold_commit() RETURNS trigger LANGUAGE plpgsql AS "
            f"$$ BEGIN PERFORM pg_advisory_xact_lock({HOLD_LOCK}); RETURN NULL; END $$",
        )
        hold._run(
            hold.admin,
            "CREATE CONSTRAINT TRIGGER fc_hold_commit AFTER INSERT ON app_order DEFERRABLE INITIALLY DEFERRED "
            "FOR EACH ROW WHEN (NEW.ref LIKE 'settle-%') EXECUTE FUNCTION fc_hold_commit()",
        )
    try:
        yield hold
    finally:
        if VENDOR == "postgresql":
            hold._run(hold.admin, "DROP TRIGGER fc_hold_commit ON app_order")
        hold.close()


@pytest.fixture
def relay(server: Any) -> Iterator[Relay]:
    with Relay(server.port) as r:
        yield r


def _cut_when_held(hold: CommitHold, relay: Relay, seen: list[int]) -> Callable[[], None]:
    """Cut the relay's clients once the COMMIT is held; accept connections again half a second later.

    Django reconnects right after the failed COMMIT; that reconnect is refused, then (freshconn
    waiting patiently) lets the unit end once the path is back, as after a proxy restart.
    """

    def run() -> None:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            session = hold.held_session()
            if session is not None:
                seen.append(session)
                relay.cut()
                time.sleep(0.5)
                relay.listen()
                return
            time.sleep(0.01)

    return run


def _lose_a_held_commit(
    dbconf: Any, commit_hold: Any, relay: Relay, ref: str
) -> tuple[freshconn.AmbiguousCommitError, list[int]]:
    """A unit whose COMMIT the server holds while the relay cuts its client: its AmbiguousCommitError, and the
    sessions the cutter saw."""
    dbconf(HOST="127.0.0.1", PORT=str(relay.port))
    seen: list[int] = []
    cutter = threading.Thread(target=_cut_when_held(commit_hold, relay, seen), daemon=True)
    commit_hold.hold()
    cutter.start()
    try:
        with pytest.raises(freshconn.AmbiguousCommitError) as err, freshconn.unit_of_work(), transaction.atomic():
            Order.objects.create(ref=ref)
    finally:
        cutter.join()
    return err.value, seen


def test_wait_until_settled_returns_only_after_the_server_finished_a_commit_its_client_lost(
    dbconf: Callable[..., None], commit_hold: CommitHold, relay: Relay
) -> None:
    """The client is cut while the server holds its COMMIT: False while held, True once committed, row then visible."""
    exc, seen = _lose_a_held_commit(dbconf, commit_hold, relay, "settle-1")
    assert seen == [exc.backend_id]

    # The server still holds the COMMIT (it knows nothing of the cut): not settled, and a read now
    # says "absent" although the transaction is about to be applied.
    assert exc.wait_until_settled(timeout=0.5) is False
    assert commit_hold.rows("settle-1") == 0

    commit_hold.release()
    assert relay.wait_backend_reply(10.0)  # the server finished the COMMIT and answered into the void
    relay.close_backends()  # ...and only now learns that its client is gone: the session ends
    assert exc.wait_until_settled(timeout=30.0) is True
    assert commit_hold.rows("settle-1") == 1


def test_wait_until_settled_after_the_server_rolled_the_commit_back(
    dbconf: Callable[..., None], commit_hold: CommitHold, relay: Relay, server: DBServer
) -> None:
    """When the lost session is killed instead, wait_until_settled() returns True and the row is absent for good."""
    exc, _ = _lose_a_held_commit(dbconf, commit_hold, relay, "settle-2")
    assert exc.backend_id is not None
    commit_hold._run(
        commit_hold.admin,
        f"KILL {exc.backend_id}" if VENDOR == "mysql" else f"SELECT pg_terminate_backend({exc.backend_id})",
    )
    assert exc.wait_until_settled(timeout=30.0) is True
    commit_hold.release()
    relay.close_backends()
    assert commit_hold.rows("settle-2") == 0


def test_wait_until_settled_counts_a_server_restart_after_the_commit_as_settled(live: None, server: DBServer) -> None:
    """A server restarted after the COMMIT was sent settles it, even when a new session carries the lost one's id."""
    from freshconn._sessions import side_session

    # Stand-in for "a new session took the lost session's id" (MariaDB numbers sessions from 1
    # again after a restart): the id of a session that is alive, so only the restart can tell.
    def error_for_a_live_session(sent_at: float) -> tuple[freshconn.AmbiguousCommitError, Any]:
        holder = side_session("default")
        raw, vendor = holder.__enter__()
        cursor = raw.cursor()
        cursor.execute("SELECT CONNECTION_ID()" if vendor == "mysql" else "SELECT pg_backend_pid()")
        backend = int(cursor.fetchone()[0])
        cursor.close()
        exc = freshconn.AmbiguousCommitError("lost")
        exc.alias, exc.backend_id, exc.sent_at = "default", backend, sent_at
        return exc, holder

    exc, holder = error_for_a_live_session(time.monotonic())
    try:
        assert exc.wait_until_settled(timeout=0.5) is False  # no restart: the session is still listed
    finally:
        holder.__exit__(None, None, None)

    sent_at = time.monotonic()
    time.sleep(1.5)  # the restart must come measurably after the COMMIT (MySQL's uptime is whole seconds)
    server.restart()
    connection.close()
    exc, holder = error_for_a_live_session(sent_at)
    try:
        assert exc.wait_until_settled(timeout=5) is True
    finally:
        holder.__exit__(None, None, None)
