"""A failover to a new primary while a worker's connection stays on the old one, now read-only.

HAProxy fronts two real servers. The switch-over demotes the primary to read-only (MariaDB
``read_only``, PostgreSQL ``default_transaction_read_only``) and sends new connections to the
standby; the worker's established connection keeps reaching the demoted node, as it does behind a
proxy or a stale DNS answer after an Aurora, RDS or Patroni failover.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import pytest
from django.db import Error, connections
from testbed.proxies import HAProxy
from testbed.servers import DB_NAME, DBServer, MariaDB, PostgreSQL

import freshconn
from tests.conftest import VENDOR, counters
from tests.tempalias import temp_alias

pytestmark = [pytest.mark.server]

USER, PASSWORD = "fo_app", "fo-secret-pw"


def _prepare(srv: DBServer) -> None:
    """A table, and an app user without SUPER (MariaDB's read_only does not apply to SUPER users)."""
    if VENDOR == "mysql":
        srv.admin_sql(
            f"CREATE USER IF NOT EXISTS '{USER}'@'%' IDENTIFIED BY '{PASSWORD}';"
            f"GRANT ALL ON {DB_NAME}.* TO '{USER}'@'%';"
            f"CREATE TABLE IF NOT EXISTS {DB_NAME}.fc_fo (id INT AUTO_INCREMENT PRIMARY KEY, ref VARCHAR(40));"
            f"DELETE FROM {DB_NAME}.fc_fo; SET GLOBAL read_only = 0;"
        )
        return
    _pg_read_only(srv, "RESET default_transaction_read_only", "off")
    if USER not in srv.admin_sql("SELECT rolname FROM pg_roles"):
        srv.admin_sql(f"CREATE ROLE {USER} LOGIN PASSWORD '{PASSWORD}'")
    assert isinstance(srv, PostgreSQL)
    srv.admin_sql(
        f"CREATE TABLE IF NOT EXISTS fc_fo (id SERIAL PRIMARY KEY, ref TEXT); ALTER TABLE fc_fo OWNER TO {USER};"
        "DELETE FROM fc_fo;",
        db=DB_NAME,
    )


def _demote(srv: DBServer) -> None:
    if VENDOR == "mysql":
        srv.admin_sql("SET GLOBAL read_only = 1")
    else:
        _pg_read_only(srv, "SET default_transaction_read_only = on", "on")


def _pg_read_only(srv: DBServer, change: str, expected: str) -> None:
    srv.admin_sql(f"ALTER SYSTEM {change}")
    srv.admin_sql("SELECT pg_reload_conf()")
    # pg_reload_conf() only signals the postmaster, which reloads and then signals every backend
    # (an idle one applies the change before its next command). A new session showing the value
    # proves the postmaster has done both, so the worker's next statement meets the new mode.
    deadline = time.monotonic() + 10
    while srv.admin_sql("SHOW default_transaction_read_only").strip() != expected:
        assert time.monotonic() < deadline, f"the server never reported default_transaction_read_only={expected}"
        time.sleep(0.02)


def refs(srv: DBServer) -> list[str]:
    sql = "SELECT ref FROM fc_fo ORDER BY id"
    if VENDOR == "mysql":
        out = srv.admin_sql(f"USE {DB_NAME}; {sql}")
    else:
        assert isinstance(srv, PostgreSQL)
        out = srv.admin_sql(sql, db=DB_NAME)
    return out.split()


@pytest.fixture(scope="module")
def standby() -> Iterator[DBServer]:
    srv: DBServer = MariaDB() if VENDOR == "mysql" else PostgreSQL()
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def failover(live: None, server: DBServer, standby: DBServer) -> Iterator[tuple[HAProxy, Callable[[], None]]]:
    """Alias "fo" through HAProxy to the session's server; the callable performs the switch-over."""
    for srv in (server, standby):
        _prepare(srv)
    proxy = HAProxy(server.port, idle_timeout=3600, standby_port=standby.port)
    proxy.start()
    settings = server.django_settings(PORT=str(proxy.port), USER=USER, PASSWORD=PASSWORD, CONN_MAX_AGE=None)
    if VENDOR == "mysql":
        settings["ENGINE"] = connections["default"].settings_dict["ENGINE"]

    def switch_over() -> None:
        _demote(server)
        proxy.switch_over()

    try:
        with temp_alias("fo", settings):
            yield proxy, switch_over
    finally:
        proxy.stop()
        _prepare(server)  # the session's server is writable again for the tests after this one


def write(ref: str) -> None:
    with connections["fo"].cursor() as cursor:
        cursor.execute("INSERT INTO fc_fo (ref) VALUES (%s)", [ref])


def test_without_freshconn_a_worker_stays_on_the_read_only_node(
    failover: tuple[HAProxy, Callable[[], None]], server: DBServer, standby: DBServer
) -> None:
    """For contrast: a plain persistent connection keeps hitting the demoted node; every write fails."""
    _, switch_over = failover
    write("before")
    switch_over()
    for ref in ("a", "b"):
        with pytest.raises(Error) as err:
            write(ref)
        assert freshconn.is_read_only(err.value)
        assert not freshconn.is_disconnect(err.value)
    assert refs(standby) == []


def test_a_read_only_error_discards_the_connection_and_the_next_unit_reaches_the_new_primary(
    failover: tuple[HAProxy, Callable[[], None]], server: DBServer, standby: DBServer
) -> None:
    """The unit that meets the demoted node fails and drops that connection; the next unit writes to the new primary."""
    _, switch_over = failover
    with freshconn.unit_of_work(using="fo"):
        write("before")
    switch_over()
    with pytest.raises(Error) as err, freshconn.unit_of_work(using="fo"):
        write("refused")
    assert freshconn.is_read_only(err.value)
    assert connections["fo"].connection is None
    with freshconn.unit_of_work(using="fo"):
        write("after")
    assert refs(server) == ["before"]
    assert refs(standby) == ["after"]
    assert counters("fo")["discarded_read_only"] == 1


def test_a_retrying_unit_rides_the_failover_and_writes_once(
    failover: tuple[HAProxy, Callable[[], None]], server: DBServer, standby: DBServer
) -> None:
    """A retrying unit whose write the demoted node refused is retried on a fresh connection: applied exactly once."""
    _, switch_over = failover
    calls: list[int] = []

    @freshconn.unit_of_work(using="fo", retries=3)
    def work(ref: str) -> None:
        calls.append(1)
        write(ref)

    work("before")
    switch_over()
    work("moved")
    assert len(calls) == 3
    assert refs(server) == ["before"]
    assert refs(standby) == ["moved"]
    c = counters("fo")
    assert c["discarded_read_only"] == 1
    assert c["retries"] == 1


def test_a_refused_write_after_an_applied_one_is_not_retried(
    failover: tuple[HAProxy, Callable[[], None]], server: DBServer, standby: DBServer
) -> None:
    """A unit that already applied a write in autocommit is not retried after a read-only refusal."""
    _, switch_over = failover
    calls: list[int] = []

    @freshconn.unit_of_work(using="fo", retries=3)
    def two_writes() -> None:
        calls.append(1)
        write("first")
        if len(calls) == 1:
            switch_over()
        write("second")

    with pytest.raises(Error) as err:
        two_writes()
    assert freshconn.is_read_only(err.value)
    assert len(calls) == 1
    assert refs(server) == ["first"]
    assert refs(standby) == []
    assert counters("fo")["not_retried_unsafe"] == 1
