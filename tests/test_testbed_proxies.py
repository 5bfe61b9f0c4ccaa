"""The test-bed proxies pass real queries through and drop an idle client after their own timeout."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path

import pytest
from django.db import connections
from testbed.proxies import HAProxy, PgBouncer
from testbed.servers import DBServer, Server

import freshconn

from .conftest import VENDOR
from .tempalias import temp_alias

pytestmark = [pytest.mark.server, pytest.mark.slow]

PROXY_IDLE = 2
PROXIES: list[str] = ["haproxy"] + (["pgbouncer"] if VENDOR == "postgresql" else [])


def _proxy(kind: str, server: DBServer) -> AbstractContextManager[Server]:
    if kind == "haproxy":
        return HAProxy(server.port, idle_timeout=PROXY_IDLE)
    return PgBouncer(server.port, client_idle_timeout=PROXY_IDLE)


def _select_one(alias: str) -> int:
    with connections[alias].cursor() as cursor:
        cursor.execute("SELECT 1")
        return int(cursor.fetchone()[0])


@pytest.fixture(params=PROXIES)
def proxied(request: pytest.FixtureRequest, server: DBServer, live: None) -> Iterator[tuple[str, Callable[[], int]]]:
    """An alias ``proxied`` that reaches the session's server through the proxy under test."""
    with _proxy(request.param, server) as proxy:
        settings_dict = dict(connections["default"].settings_dict, PORT=str(proxy.port), CONN_MAX_AGE=None)
        with temp_alias("proxied", settings_dict):
            yield request.param, lambda: proxy.port


def test_query_passes_through_the_proxy(proxied: tuple[str, Callable[[], int]]) -> None:
    """A query on an alias pointed at the proxy's port reaches the real server and returns its row."""
    _kind, proxy_port = proxied
    assert _select_one("proxied") == 1
    assert connections["proxied"].settings_dict["PORT"] == str(proxy_port())


def test_proxy_drops_an_idle_client_the_server_keeps(proxied: tuple[str, Callable[[], int]]) -> None:
    """After idling past the proxy's timeout the proxied connection is gone while a direct one survives."""
    assert _select_one("proxied") == 1
    assert _select_one("default") == 1
    time.sleep(PROXY_IDLE + 1.5)
    assert _select_one("default") == 1
    with pytest.raises(Exception) as caught:
        _select_one("proxied")
    assert freshconn.is_disconnect(caught.value), repr(caught.value)


def test_a_stopped_proxy_refuses_to_come_back_up(
    server: DBServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After stop() removed its files, up() raises instead of writing its log into the current directory."""
    monkeypatch.chdir(tmp_path)
    proxy = HAProxy(server.port, idle_timeout=PROXY_IDLE)
    proxy.start()
    proxy.stop()
    with pytest.raises(RuntimeError, match="was stopped"):
        proxy.up()
    assert not list(tmp_path.iterdir())
