"""Compound faults around a COMMIT: a COMMIT held on the server, then a second fault while the client waits.

The second fault is a session kill, a proxy cut whose reconnect is refused, a server restart, or
a black hole. Whatever error finally surfaces (Django's Atomic reconnects in its ``finally`` and
may fail, replacing the COMMIT's error), the unit raises AmbiguousCommitError, a retrying unit
never runs the transaction again, and no row is ever applied twice.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from django.db import connection, transaction
from django.test import override_settings
from testbed.netns import BlackHoleNet
from testbed.proxies import HAProxy
from testbed.servers import DBServer, MariaDB, PostgreSQL

import freshconn
from tests.conftest import VENDOR, admin_connection, backend_id, counters

pytestmark = [pytest.mark.server, pytest.mark.slow]

HOLD = 2.5  # seconds the server keeps the COMMIT waiting


def _admin_sql(server: DBServer, sql: str, db: str) -> str:
    if VENDOR == "mysql":
        return server.admin_sql(f"USE {db}; {sql}")
    assert isinstance(server, PostgreSQL)
    return server.admin_sql(sql, db=db)


def prepare(server: DBServer, db: str) -> None:
    """A table fc_tx, and (PostgreSQL) a deferred trigger that holds a COMMIT for SET LOCAL fc.hold seconds."""
    if VENDOR == "mysql":
        _admin_sql(server, "CREATE TABLE IF NOT EXISTS fc_tx (id INT AUTO_INCREMENT PRIMARY KEY, ref VARCHAR(40))", db)
        _admin_sql(server, "DELETE FROM fc_tx", db)
        return
    _admin_sql(
        server,
        "CREATE TABLE IF NOT EXISTS fc_tx (id SERIAL PRIMARY KEY, ref TEXT);"
        "ALTER TABLE fc_tx OWNER TO app;"
        "CREATE OR REPLACE FUNCTION fc_hold_commit() RETURNS trigger LANGUAGE plpgsql AS "
        "$$ BEGIN PERFORM pg_sleep(coalesce(nullif(current_setting('fc.hold', true), ''), '0')::float); "
        "RETURN NULL; END $$;"
        "DROP TRIGGER IF EXISTS fc_hold_commit ON fc_tx;"
        "CREATE CONSTRAINT TRIGGER fc_hold_commit AFTER INSERT ON fc_tx DEFERRABLE INITIALLY DEFERRED "
        "FOR EACH ROW EXECUTE FUNCTION fc_hold_commit();"
        "DELETE FROM fc_tx;",
        db,
    )


class Hold:
    """Makes the next COMMIT of this test wait on the server for ``seconds``."""

    def __init__(self, server: DBServer, admin: Callable[[], Any], seconds: float = HOLD) -> None:
        self.server, self.admin, self.seconds = server, admin, seconds
        self.holder: Any = None

    def arm(self) -> None:
        """Inside the transaction, before its end: the COMMIT that follows will wait."""
        if VENDOR == "mysql":
            # A global read lock held by another session blocks COMMIT ("Waiting for commit lock").
            self.holder = self.admin()
            self.holder.cursor().execute("FLUSH TABLES WITH READ LOCK")
            threading.Timer(self.seconds, self.release).start()
        else:
            with connection.cursor() as cursor:
                cursor.execute(f"SET LOCAL fc.hold = '{self.seconds}'")

    def release(self) -> None:
        holder, self.holder = self.holder, None
        if holder is not None:
            try:
                holder.cursor().execute("UNLOCK TABLES")
                holder.close()
            except Exception:
                pass  # the server restarted meanwhile: the lock died with it


_pending: list[threading.Timer] = []


def after(seconds: float, action: Callable[[], None]) -> None:
    """Runs ``action`` in ``seconds``; the test joins it (join_pending) before its fixtures stop anything."""
    timer = threading.Timer(seconds, action)
    _pending.append(timer)
    timer.start()


def join_pending() -> None:
    # A unit may raise before the fault's follow-up (a proxy or server coming back) has run; the
    # fixture's teardown must not stop that proxy or server while the follow-up is starting it.
    while _pending:
        _pending.pop().join()


def _state_sql(session: int) -> str:
    if VENDOR == "mysql":
        return (
            "SELECT CONCAT(COALESCE(STATE, ''), '|', COALESCE(INFO, '')) "
            f"FROM information_schema.PROCESSLIST WHERE ID = {session}"
        )
    return f"SELECT coalesce(state, '') || '|' || coalesce(query, '') FROM pg_stat_activity WHERE pid = {session}"


class WhenCommitting(threading.Thread):
    """Runs ``action`` as soon as the server shows the session waiting in its COMMIT."""

    def __init__(self, server: DBServer, session: int, action: Callable[[], None]) -> None:
        super().__init__(daemon=True)
        self.server, self.session, self.action = server, session, action
        self.fired = False

    def run(self) -> None:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            state = self.server.admin_sql(_state_sql(self.session)).strip().lower()
            if "commit" in state:
                self.action()
                self.fired = True
                return
            time.sleep(0.02)


def rows(server: DBServer, db: str, ref: str) -> int:
    return int(_admin_sql(server, f"SELECT COUNT(*) FROM fc_tx WHERE ref = '{ref}'", db).split()[-1])


def run_lost_commit(
    server: DBServer, db: str, fault: Callable[[], None], ref: str, hold_for: float = HOLD
) -> tuple[Any, int]:
    """A retrying unit whose COMMIT is held, then hit by ``fault``; returns (the error raised, attempts)."""
    hold = Hold(server, lambda: admin_connection(server), hold_for)
    calls: list[int] = []
    watchers: list[WhenCommitting] = []

    @freshconn.unit_of_work(retries=3)
    def work() -> None:
        calls.append(1)
        with transaction.atomic():
            with connection.cursor() as cursor:
                cursor.execute("INSERT INTO fc_tx (ref) VALUES (%s)", [ref])
            hold.arm()
            watcher = WhenCommitting(server, backend_id(), fault)
            watcher.start()
            watchers.append(watcher)

    try:
        with pytest.raises(freshconn.AmbiguousCommitError) as err:
            work()
    finally:
        for w in watchers:
            w.join()
        hold.release()
        join_pending()
    assert watchers[0].fired
    return err.value, len(calls)


def check_never_twice(exc: Any, attempts: int, server: DBServer, db: str, ref: str) -> None:
    assert attempts == 1
    assert freshconn.is_disconnect(exc)
    assert exc.alias == "default"
    assert "app-secret-pw" not in str(exc)
    c = counters()
    assert c["ambiguous_commits"] == 1
    assert c["not_retried_unsafe"] == 1
    assert c["retries"] == 0
    # Once the old session is gone, its COMMIT has happened or never will: only then is the outcome final.
    assert exc.wait_until_settled(30.0)
    assert rows(server, db, ref) <= 1


def test_commit_lost_to_a_kill_is_ambiguous_and_never_replayed(live: None, server: DBServer) -> None:
    """COMMIT held, then the session killed (Django's reconnect succeeds): AmbiguousCommitError, one attempt."""
    db = connection.settings_dict["NAME"]
    prepare(server, db)
    victim: list[int] = []

    def kill() -> None:
        sql = f"KILL {victim[0]}" if VENDOR == "mysql" else f"SELECT pg_terminate_backend({victim[0]})"
        server.admin_sql(sql)

    connection.ensure_connection()
    victim.append(backend_id())
    exc, attempts = run_lost_commit(server, db, kill, "kill")
    check_never_twice(exc, attempts, server, db, "kill")


@pytest.fixture
def proxied(dbconf: Callable[..., None], server: DBServer) -> Iterator[HAProxy]:
    """The default alias through an HAProxy (TCP) in front of the session's server."""
    proxy = HAProxy(server.port, idle_timeout=3600)
    proxy.start()
    try:
        dbconf(PORT=str(proxy.port), OPTIONS={"connect_timeout": 2})
        yield proxy
    finally:
        proxy.stop()


def test_commit_lost_to_a_proxy_cut_with_reconnect_refused_is_ambiguous(proxied: HAProxy, server: DBServer) -> None:
    """COMMIT held, then the proxy restarts: Django's reconnect is refused, yet the unit raises AmbiguousCommitError."""
    db = connection.settings_dict["NAME"]
    prepare(server, db)

    def cut() -> None:
        proxied.down()
        after(1.5, proxied.up)

    exc, attempts = run_lost_commit(server, db, cut, "cut")
    # The error that surfaced is the refused reconnect; the lost COMMIT is in its context.
    assert exc.__cause__ is not None
    check_never_twice(exc, attempts, server, db, "cut")
    assert rows(server, db, "cut") == 1  # the server finished that COMMIT after the client was gone


def test_commit_lost_to_a_server_restart_is_ambiguous(live: None, server: DBServer) -> None:
    """COMMIT held, then the server restarts (reconnect refused while it is down): AmbiguousCommitError, one attempt."""
    db = connection.settings_dict["NAME"]
    prepare(server, db)

    def restart() -> None:
        # MariaDB's clean shutdown ends the session holding the COMMIT back first, and the COMMIT
        # then completes: a crash is what leaves it in flight. PostgreSQL's fast shutdown ends
        # the committing backend itself.
        if VENDOR == "mysql":
            server.crash()
        else:
            server.down()
        after(2.0, server.up)

    with override_settings(FRESHCONN={"RECONNECT_TIMEOUT": 20}):
        exc, attempts = run_lost_commit(server, db, restart, "restart")
    check_never_twice(exc, attempts, server, db, "restart")


@pytest.fixture(scope="module")
def black_hole_server() -> Iterator[tuple[BlackHoleNet, DBServer]]:
    """A server inside a network namespace whose port can silently drop every packet."""
    net = BlackHoleNet()
    net.start()
    srv: DBServer = (MariaDB if VENDOR == "mysql" else PostgreSQL)(host=net.ns_ip, prefix=net.prefix())
    try:
        srv.start()
        yield net, srv
    finally:
        srv.stop()
        net.stop()


def _read_timeout_options() -> dict[str, Any]:
    if VENDOR == "mysql":
        return {"connect_timeout": 2, "read_timeout": 2, "write_timeout": 2}
    return {
        "connect_timeout": 2,
        "tcp_user_timeout": 2000,
        "keepalives_idle": 1,
        "keepalives_interval": 1,
        "keepalives_count": 2,
    }


def test_commit_lost_to_a_black_hole_is_ambiguous(
    dbconf: Callable[..., None], black_hole_server: tuple[BlackHoleNet, DBServer]
) -> None:
    """COMMIT held, then its path black-holed: the read times out, the reconnect too, and the unit is ambiguous."""
    net, srv = black_hole_server
    prepare(srv, "freshconn")
    dbconf(HOST=srv.host, PORT=str(srv.port), NAME="freshconn", OPTIONS=_read_timeout_options())

    def black_hole() -> None:
        net.drop(srv.port)
        # The client gives up on the COMMIT's reply (read_timeout / keepalives) before the server
        # sends it; the path comes back after that, so the server then learns the client is gone.
        after(7.0, net.restore)

    with override_settings(FRESHCONN={"RECONNECT_TIMEOUT": 30}):
        exc, attempts = run_lost_commit(srv, "freshconn", black_hole, "hole", hold_for=6.0)
    check_never_twice(exc, attempts, srv, "freshconn", "hole")


def test_commit_lost_inside_each_surfaces_as_ambiguous(proxied: HAProxy, server: DBServer) -> None:
    """The README's headline shape, each() around a retrying handler: a lost COMMIT reaches the loop as ambiguous."""
    db = connection.settings_dict["NAME"]
    prepare(server, db)
    hold = Hold(server, lambda: admin_connection(server))
    seen: list[str] = []
    watchers: list[WhenCommitting] = []

    def cut() -> None:
        proxied.down()
        after(1.5, proxied.up)

    @freshconn.unit_of_work(retries=3)
    def handle(ref: str) -> None:
        seen.append(ref)
        with transaction.atomic():
            with connection.cursor() as cursor:
                cursor.execute("INSERT INTO fc_tx (ref) VALUES (%s)", [ref])
            hold.arm()
            w = WhenCommitting(server, backend_id(), cut)
            w.start()
            watchers.append(w)

    try:
        with pytest.raises(freshconn.AmbiguousCommitError) as err:
            for ref in freshconn.each(["each-1"]):
                handle(ref)
    finally:
        for w in watchers:
            w.join()
        hold.release()
        join_pending()
    assert seen == ["each-1"]
    assert err.value.wait_until_settled(30.0)
    assert rows(server, db, "each-1") == 1
