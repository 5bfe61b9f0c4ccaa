"""Django >= 5.1's PostgreSQL pool (OPTIONS["pool"], psycopg 3) in a worker, with freshconn's check at checkout."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, cast

import django
import pytest
from django.db import Error, connection, connections

import freshconn
from freshconn import _pool, _state
from freshconn.testing import kill_connection
from tests.app.models import Order
from tests.conftest import DRIVER, IDLE_PAST_TIMEOUT, SHORT_TIMEOUT, counters

if TYPE_CHECKING:
    # Only for cast(): importing it at run time needs psycopg, absent on the other legs.
    from django.db.backends.postgresql.base import DatabaseWrapper as PostgreSQLWrapper

pytestmark = [
    pytest.mark.server,
    pytest.mark.skipif(
        DRIVER != "psycopg" or django.VERSION < (5, 1), reason="Django's pool needs psycopg 3, Django 5.1+"
    ),
]


def pool_of() -> Any:
    return _pool.pools_of(type(connections["default"])).get("default")  # type: ignore[union-attr]


@pytest.fixture
def pooled(dbconf: Callable[..., None]) -> Iterator[Callable[..., Any]]:
    """The default alias on Django's pool; call it with OPTIONS extras (e.g. a short server idle limit)."""
    made: list[Any] = []

    def use(with_freshconn: bool = True, **pool_options: Any) -> Any:
        extra = pool_options.pop("_options", {})
        options = {"pool": {"min_size": 1, "max_size": 2, "timeout": 10, **pool_options}, **extra}
        dbconf(CONN_MAX_AGE=0, OPTIONS=options)
        if with_freshconn:
            _pool.install_pools(_state.raw_state)  # what AppConfig.ready() does at start-up
        pool = cast("PostgreSQLWrapper", connections["default"]).pool  # the pool is PostgreSQL's (Django 5.1+)
        made.append(pool)
        return pool

    yield use
    connections["default"].close()
    for pool in made:
        pool.close()
    pools = _pool.pools_of(type(connections["default"]))
    if pools is not None:
        pools.pop("default", None)


def short_idle() -> dict[str, Any]:
    return {"_options": {"options": f"-c idle_session_timeout={SHORT_TIMEOUT * 1000}"}}


def test_freshconn_builds_the_pool_with_its_own_check(pooled: Callable[..., Any]) -> None:
    """The pool Django uses for the alias is the one freshconn built, with freshconn's check at checkout."""
    pool = pooled()
    assert pool._check is _pool.check  # the pool's own hook, set through its constructor


def test_busy_units_on_the_pool_make_no_pings_and_no_new_connections(pooled: Callable[..., Any]) -> None:
    """1,000 busy units on the pool: 0 pings, 0 new connections, and the thread holds none between units."""
    pooled(max_size=1)
    pk = Order.objects.create(ref="p").pk
    with freshconn.unit_of_work():
        Order.objects.get(pk=pk)
    freshconn.reset_stats()
    for _ in range(1000):
        with freshconn.unit_of_work():
            assert Order.objects.get(pk=pk).ref == "p"
        assert connection.connection is None  # returned to the pool at the unit's end
    c = counters()
    assert c["pings"] == 0
    assert c["connects"] == 0
    assert pool_of().get_stats().get("connections_num", 0) <= 1


@pytest.mark.slow
def test_without_freshconn_an_idle_pool_hands_out_a_dead_connection(pooled: Callable[..., Any]) -> None:
    """For contrast: Django's pool without a check hands out a connection the server dropped while it sat idle."""
    pooled(with_freshconn=False, **short_idle())
    Order.objects.count()
    connection.close()
    time.sleep(IDLE_PAST_TIMEOUT)
    with pytest.raises(Error) as err:
        Order.objects.count()
    assert freshconn.is_disconnect(err.value)


@pytest.mark.slow
def test_idle_past_the_server_limit_the_next_unit_succeeds_without_a_ping(pooled: Callable[..., Any]) -> None:
    """A pooled connection idle past the server's limit is dropped at checkout with no round trip; the unit works."""
    pooled(**short_idle())
    with freshconn.unit_of_work():
        Order.objects.count()
    time.sleep(IDLE_PAST_TIMEOUT)
    with freshconn.unit_of_work():
        assert Order.objects.count() == 0
    c = counters()
    assert c["pings"] == 0
    assert c["discarded_server_idle"] >= 1


def test_a_pooled_connection_killed_in_the_pool_is_replaced(pooled: Callable[..., Any]) -> None:
    """A pooled connection killed while it sat in the pool is found at checkout and replaced; the unit works."""
    pooled()
    with freshconn.unit_of_work():
        Order.objects.count()
        kill_connection()
    with freshconn.unit_of_work():
        assert Order.objects.count() == 0
    assert counters()["discarded"] >= 1


def test_more_threads_than_the_pool_holds_do_not_exhaust_it(pooled: Callable[..., Any]) -> None:
    """Six threads on a pool of two: units return their connection, so no thread waits out the pool's timeout."""
    pooled(timeout=5)
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(50):
                with freshconn.unit_of_work():
                    Order.objects.count()
        except BaseException as exc:
            errors.append(exc)
        finally:
            connections.close_all()

    threads = [threading.Thread(target=work) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []


def test_a_forked_child_gets_its_own_pool_and_leaves_the_parents_alone(pooled: Callable[..., Any]) -> None:
    """After fork, the child drops the parent's pool without a byte on its sockets; both keep working."""
    parent_pool = pooled()
    with freshconn.unit_of_work():
        Order.objects.count()
    pid = os.fork()
    if pid == 0:  # the child
        code = 1
        try:
            freshconn.forget_inherited_connections()
            with freshconn.unit_of_work():
                Order.objects.count()
            code = 0 if pool_of() is not parent_pool else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert pool_of() is parent_pool
    with freshconn.unit_of_work():
        assert Order.objects.count() == 0
