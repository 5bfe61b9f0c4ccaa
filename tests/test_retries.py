"""Retries after a disconnect: only when provably safe; COMMIT lost in flight is ambiguous; real kills."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from django.db import Error, OperationalError, connection, connections, transaction
from testbed.servers import DBServer, MariaDB

import freshconn
from freshconn.testing import kill_connection
from tests.app.models import Order
from tests.conftest import VENDOR, backend_id, counters

pytestmark = pytest.mark.server


def test_reads_only_killed_mid_unit_are_retried(live: None) -> None:
    """A unit that had only read when its connection was killed runs again and returns the right result."""
    Order.objects.create(ref="r-1", qty=7)
    calls = []

    @freshconn.unit_of_work(retries=2)
    def total() -> int:
        calls.append(1)
        first: int = Order.objects.get(ref="r-1").qty
        if len(calls) == 1:
            kill_connection()
        second: int = Order.objects.get(ref="r-1").qty
        return first + second

    assert total() == 14
    assert len(calls) == 2
    assert counters()["retries"] == 1
    assert counters()["not_retried_unsafe"] == 0


def test_autocommit_write_then_kill_is_not_retried(live: None) -> None:
    """After an applied autocommit INSERT, a later disconnect reaches the caller and no second row appears."""
    calls = []

    @freshconn.unit_of_work(retries=3)
    def write_then_read() -> None:
        calls.append(1)
        Order.objects.create(ref="w-1")
        kill_connection()
        Order.objects.count()

    with pytest.raises(Error) as err:
        write_then_read()
    assert freshconn.is_disconnect(err.value)
    assert not isinstance(err.value, freshconn.AmbiguousCommitError)
    assert len(calls) == 1
    assert Order.objects.filter(ref="w-1").count() == 1
    assert counters()["not_retried_unsafe"] == 1
    assert counters()["retries"] == 0


def test_kill_inside_atomic_retries_the_whole_transaction_once(live: None) -> None:
    """Writes inside a transaction the disconnect rolled back are retried, leaving exactly one committed copy."""
    calls = []

    @freshconn.unit_of_work(retries=2)
    def transfer() -> None:
        calls.append(1)
        with transaction.atomic():
            Order.objects.create(ref="tx-a")
            if len(calls) == 1:
                kill_connection()
            Order.objects.create(ref="tx-b")

    transfer()
    assert len(calls) == 2
    assert sorted(Order.objects.values_list("ref", flat=True)) == ["tx-a", "tx-b"]
    assert counters()["retries"] == 1


def test_committed_transaction_then_kill_is_not_retried(live: None) -> None:
    """Once a transaction has committed, a later disconnect in the same unit is not retried."""
    calls = []

    @freshconn.unit_of_work(retries=2)
    def two_steps() -> None:
        calls.append(1)
        with transaction.atomic():
            Order.objects.create(ref="c-1")
        kill_connection()
        Order.objects.count()

    with pytest.raises(Error):
        two_steps()
    assert len(calls) == 1
    assert Order.objects.filter(ref="c-1").count() == 1
    assert counters()["not_retried_unsafe"] == 1


def _kill_at_the_next_autocommit_restore(monkeypatch: pytest.MonkeyPatch) -> None:
    """The session dies once, after the server applied a COMMIT and before Django restores autocommit."""
    cls = type(connections["default"])
    restore = cls._set_autocommit  # type: ignore[attr-defined]  # private, not in django-stubs

    def killed_first(self: Any, autocommit: bool) -> None:
        if autocommit:
            monkeypatch.setattr(cls, "_set_autocommit", restore)
            kill_connection()
        restore(self, autocommit)

    # On the class: freshconn's own hook on the instance calls the class's method.
    monkeypatch.setattr(cls, "_set_autocommit", killed_first)


def test_connection_lost_right_after_commit_is_not_retried(live: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """Killed between a successful COMMIT and Django's autocommit restore, the applied transaction is not replayed."""
    calls = []

    @freshconn.unit_of_work(retries=2)
    def transfer() -> None:
        calls.append(1)
        with transaction.atomic():
            Order.objects.create(ref="after-commit")
            if len(calls) == 1:
                _kill_at_the_next_autocommit_restore(monkeypatch)
        Order.objects.count()  # on the dead session: a disconnect after an applied write

    with pytest.raises(Error) as err:
        transfer()
    assert freshconn.is_disconnect(err.value)
    assert len(calls) == 1
    assert Order.objects.filter(ref="after-commit").count() == 1
    assert counters()["not_retried_unsafe"] == 1


def test_atomic_block_whose_connection_dies_right_after_commit_succeeds(
    live: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Lost between COMMIT and the autocommit restore: the block succeeds, on_commit runs, the connection is dropped."""
    ran: list[str] = []
    with freshconn.unit_of_work(), transaction.atomic():
        Order.objects.create(ref="lost-after-commit")
        transaction.on_commit(lambda: ran.append("on_commit"))
        _kill_at_the_next_autocommit_restore(monkeypatch)
    assert ran == ["on_commit"]
    with freshconn.unit_of_work():
        assert Order.objects.filter(ref="lost-after-commit").count() == 1
    assert counters()["discarded_dead"] == 1


def test_idempotent_unit_is_retried_after_an_autocommit_write(live: None) -> None:
    """With idempotent=True the caller vouches for replays, so an applied write does not block the retry."""
    calls = []

    @freshconn.unit_of_work(retries=2, idempotent=True)
    def upsert() -> None:
        calls.append(1)
        Order.objects.get_or_create(ref="i-1")
        if len(calls) == 1:
            kill_connection()
        Order.objects.count()

    upsert()
    assert len(calls) == 2
    assert Order.objects.filter(ref="i-1").count() == 1
    assert counters()["retries"] == 1


def test_retries_are_exhausted_then_the_error_surfaces(live: None) -> None:
    """A unit that keeps losing its connection is retried N times, then the disconnect reaches the caller."""
    calls = []

    @freshconn.unit_of_work(retries=2)
    def doomed() -> None:
        calls.append(1)
        Order.objects.count()
        kill_connection()
        Order.objects.count()

    with pytest.raises(Error):
        doomed()
    assert len(calls) == 3
    assert counters()["retries"] == 2
    assert counters()["retries_exhausted"] == 1


def test_non_disconnect_errors_are_never_retried(live: None) -> None:
    """An IntegrityError is the application's business: no retry, no discard."""
    Order.objects.create(ref="dup")
    calls = []

    @freshconn.unit_of_work(retries=3)
    def dup() -> None:
        calls.append(1)
        Order.objects.create(ref="dup")

    with pytest.raises(Error):
        dup()
    assert len(calls) == 1
    assert counters()["discarded"] == 0


def test_with_block_cannot_take_retries(live: None) -> None:
    """A with block cannot be re-run, so asking it for retries fails loudly and says what to do."""
    with pytest.raises(TypeError, match="decorator form"), freshconn.unit_of_work(retries=1):
        pass


def test_retrying_function_inside_a_unit_retries(live: None) -> None:
    """Inside an outer unit with no transaction open, a retrying function is re-run on a fresh connection."""
    calls = []

    @freshconn.unit_of_work(retries=3)
    def inner() -> int:
        calls.append(1)
        Order.objects.count()
        if len(calls) == 1:
            kill_connection()
        rows: int = Order.objects.count()
        return rows

    with freshconn.unit_of_work():
        assert inner() == 0
    assert len(calls) == 2
    assert counters()["retries"] == 1


def test_retrying_function_inside_the_callers_transaction_runs_once(
    live: None, caplog: pytest.LogCaptureFixture
) -> None:
    """Inside the caller's atomic block a retrying function runs once, with a warning and a counter."""
    calls = []

    @freshconn.unit_of_work(retries=3)
    def inner() -> None:
        calls.append(1)
        Order.objects.count()
        kill_connection()
        Order.objects.count()

    with pytest.raises(Error), freshconn.unit_of_work(), transaction.atomic():
        inner()
    assert len(calls) == 1
    assert counters()["not_retried_in_transaction"] == 1
    assert "inside the caller's transaction" in caplog.text


def _slow_write_sql() -> str:
    if VENDOR == "mysql":
        return "INSERT INTO app_order (ref, qty) SELECT 'slow-w', SLEEP(3)"
    return "INSERT INTO app_order (ref, qty) SELECT 'slow-w', 1 FROM pg_sleep(3)"


def _session_state_sql(session: int) -> str:
    if VENDOR == "mysql":
        return (
            "SELECT CONCAT(COALESCE(STATE, ''), '|', COALESCE(INFO, '')) "
            f"FROM information_schema.PROCESSLIST WHERE ID = {session}"
        )
    return f"SELECT state || '|' || query FROM pg_stat_activity WHERE pid = {session}"


def _kill_sql(session: int) -> str:
    return f"KILL {session}" if VENDOR == "mysql" else f"SELECT pg_terminate_backend({session})"


class KillWhen(threading.Thread):
    """Kills a session from the admin side as soon as its server-side state matches ``needle``."""

    def __init__(self, server: DBServer, session: int, needle: str, timeout: float = 10.0) -> None:
        super().__init__(daemon=True)
        self.server, self.session, self.needle, self.timeout = server, session, needle.lower(), timeout
        self.killed = False

    def run(self) -> None:
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            state = self.server.admin_sql(_session_state_sql(self.session)).strip().lower()
            if self.needle in state:
                self.server.admin_sql(_kill_sql(self.session))
                self.killed = True
                return
            time.sleep(0.03)


def test_write_in_flight_in_autocommit_is_not_retried(live: None, server: DBServer) -> None:
    """A connection lost while an autocommit write is running may have applied it: never retried."""
    calls = []

    @freshconn.unit_of_work(retries=3)
    def slow_insert() -> None:
        calls.append(1)
        killer = KillWhen(server, backend_id(), "slow-w")
        killer.start()
        with connection.cursor() as cursor:
            cursor.execute(_slow_write_sql())
        killer.join()

    with pytest.raises(Error):
        slow_insert()
    assert len(calls) == 1
    assert counters()["not_retried_unsafe"] == 1


@pytest.fixture
def commit_blocker(server: DBServer) -> Iterator[Any]:
    """Make the next COMMIT of a transaction that wrote an 'amb-%' order hang on the server.

    Yields, on MariaDB, the root session that holds the lock (raw MySQLdb: Any); on PostgreSQL, None.
    """
    if VENDOR == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute(
                "CREATE OR REPLACE FUNCTION fc_slow_commit() RETURNS trigger LANGUAGE plpgsql AS "
                "$$ BEGIN PERFORM pg_sleep(30); RETURN NULL; END $$"
            )
            cursor.execute(
                "CREATE CONSTRAINT TRIGGER fc_slow_commit AFTER INSERT ON app_order DEFERRABLE INITIALLY DEFERRED "
                "FOR EACH ROW WHEN (NEW.ref LIKE 'amb-%%') EXECUTE FUNCTION fc_slow_commit()"
            )
        connection.close()
        yield
        with connection.cursor() as cursor:
            cursor.execute("DROP TRIGGER fc_slow_commit ON app_order")
        return
    # MariaDB: a global read lock held by another session blocks COMMIT ("Waiting for commit lock").
    import MySQLdb

    assert isinstance(server, MariaDB)
    holder = MySQLdb.connect(unix_socket=server.socket, user="root")
    try:
        yield holder
    finally:
        holder.cursor().execute("UNLOCK TABLES")
        holder.close()


def _block_commits(blocker: Any) -> None:
    if VENDOR == "mysql":
        blocker.cursor().execute("FLUSH TABLES WITH READ LOCK")


@pytest.mark.parametrize("form", ["decorator", "with"])
def test_connection_lost_during_commit_raises_ambiguous_commit(
    live: None, server: DBServer, commit_blocker: Any, form: str
) -> None:
    """Losing the connection while COMMIT is in flight raises AmbiguousCommitError and is never retried."""
    calls = []

    raws = []

    def body() -> None:
        calls.append(1)
        with transaction.atomic():
            Order.objects.create(ref="amb-1")
            raws.append(connection.connection)
            _block_commits(commit_blocker)
            killer = KillWhen(server, backend_id(), "commit")
            killer.start()
        killer.join()

    with pytest.raises(freshconn.AmbiguousCommitError) as err:
        if form == "decorator":
            freshconn.unit_of_work(retries=3)(body)()
        else:
            with freshconn.unit_of_work():
                body()
    assert len(calls) == 1
    exc = err.value
    assert isinstance(exc, OperationalError)
    assert freshconn.is_disconnect(exc)
    assert exc.__cause__ is not None
    assert "wait_until_settled()" in str(exc)
    assert "app-secret-pw" not in str(exc)
    # The lost session is gone for good; Django's Atomic may already have opened a fresh one.
    assert connection.connection is not raws[0]
    if form == "decorator":
        assert counters()["not_retried_unsafe"] == 1


def test_a_reconcile_read_while_handling_ambiguous_commit_is_retried(
    live: None, server: DBServer, commit_blocker: Any
) -> None:
    """A retrying read run inside ``except AmbiguousCommitError`` is retried after its own disconnect."""
    reads = []

    @freshconn.unit_of_work(retries=3)
    def lost_commit() -> None:
        with transaction.atomic():
            Order.objects.create(ref="amb-2")
            _block_commits(commit_blocker)
            killer = KillWhen(server, backend_id(), "commit")
            killer.start()
        killer.join()

    @freshconn.unit_of_work(retries=2)
    def applied() -> bool:
        reads.append(1)
        found: bool = Order.objects.filter(ref="amb-2").exists()
        if len(reads) == 1:
            kill_connection()  # the reconcile loses its connection too (a restart in progress)
            Order.objects.count()
        return found

    outcome = None
    try:
        lost_commit()
    except freshconn.AmbiguousCommitError:
        # The read's disconnect has the AmbiguousCommitError as its __context__: not a COMMIT of its own.
        outcome = applied()
    assert outcome is False
    assert len(reads) == 2
    assert counters()["ambiguous_commits"] == 1
    assert counters()["retries"] == 1


def test_no_silent_reconnect_inside_an_atomic_block(live: None) -> None:
    """After a kill inside atomic, the block stays failed (Django's semantics): nothing reconnects mid-transaction."""
    from django.db.transaction import TransactionManagementError

    with pytest.raises(Error), freshconn.unit_of_work(), transaction.atomic():
        Order.objects.create(ref="atomic-1")
        kill_connection()
        try:
            Order.objects.create(ref="atomic-2")
        except Error:
            # The transaction is broken: the next query in the same block must not run on a
            # fresh connection (which would commit half a transaction).
            with pytest.raises((TransactionManagementError, Error)):
                Order.objects.create(ref="atomic-3")
            assert counters()["connects"] == 1
            raise
    with freshconn.unit_of_work():
        assert Order.objects.count() == 0
