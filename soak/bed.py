"""The soak's test bed: a durable server (inside a network namespace when possible), HAProxy, Redis.

    worker (host) ── veth ──▶ HAProxy (namespace, ns_ip:P) ──▶ MariaDB / PostgreSQL (namespace, ns_ip:S)
    fault injector ── Unix socket ──▶ the server, as its superuser (never through the proxy or the veth)

The worker reaches the server only through HAProxy, so every fault of the soak strikes that one
path: a KILL or a restart on the server, an idle drop or a restart of the proxy, and a black hole
(an iptables DROP on the proxy's port inside the namespace: the worker's packets vanish, no reset).
The server is durable (``testbed`` durable mode): an acknowledged COMMIT survives its restarts, so a
missing row is a real loss. Without root (no namespace), everything runs on 127.0.0.1 and the black
hole is skipped, with a note.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from typing import Any

from testbed.netns import BlackHoleNet
from testbed.proxies import HAProxy
from testbed.redis import Redis
from testbed.servers import DB_NAME, MariaDB, PostgreSQL, Server

#: HAProxy closes a connection on which nothing moved for this long (the proxy idle-drop fault).
PROXY_IDLE = 2.0

VENDOR = {"mysqlclient": "mysql", "pymysql": "mysql", "psycopg": "postgresql", "psycopg2": "postgresql"}


def driver_options(driver: str) -> dict[str, Any]:
    """Driver timeouts, as docs/retries.md recommends: a black-holed path fails within seconds, never hangs."""
    if VENDOR[driver] == "mysql":
        options: dict[str, Any] = {"connect_timeout": 2, "read_timeout": 3, "write_timeout": 3}
        if driver == "pymysql":
            options["ssl_disabled"] = True  # the test bed has no TLS; PyMySQL would build a context per connect
        return options
    return {
        "connect_timeout": 2,
        "tcp_user_timeout": 2000,
        "keepalives": 1,
        "keepalives_idle": 2,
        "keepalives_interval": 1,
        "keepalives_count": 2,
    }


class Admin:
    """A superuser session over the server's Unix socket, reopened after a restart."""

    def __init__(self, server: Server, vendor: str, driver: str) -> None:
        self.server, self.vendor, self.driver = server, vendor, driver
        self.raw: Any = None

    def _connect(self) -> Any:
        if self.vendor == "mysql":
            import MySQLdb  # mysqlclient, or PyMySQL installed as MySQLdb

            return MySQLdb.connect(unix_socket=self.server.socket, user="root", db=DB_NAME, autocommit=True)  # type: ignore[attr-defined]
        if self.driver == "psycopg2":
            import psycopg2

            raw = psycopg2.connect(host=self.server.tmp, port=self.server.port, user="postgres", dbname=DB_NAME)
            raw.autocommit = True
            return raw
        import psycopg

        return psycopg.connect(
            host=self.server.tmp, port=self.server.port, user="postgres", dbname=DB_NAME, autocommit=True
        )

    def rows(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """Run ``sql`` and return its rows; one new session and a second try if the old one died."""
        for attempt in (1, 2):
            try:
                if self.raw is None:
                    self.raw = self._connect()
                cursor = self.raw.cursor()
                try:
                    cursor.execute(sql, params or None)
                    return list(cursor.fetchall()) if cursor.description else []
                finally:
                    cursor.close()
            except Exception:
                self.close()
                if attempt == 2:
                    raise
                time.sleep(0.2)
        raise AssertionError("unreachable")

    def try_rows(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]] | None:
        """Like rows(), None when the statement failed (the server refused it, or is down)."""
        try:
            return self.rows(sql, params)
        except Exception:
            return None

    def app_sessions(self) -> set[int]:
        sql = (
            "SELECT ID FROM information_schema.PROCESSLIST WHERE USER = 'app'"
            if self.vendor == "mysql"
            else "SELECT pid FROM pg_stat_activity WHERE usename = 'app'"
        )
        return {int(r[0]) for r in self.rows(sql)}

    def session_exists(self, session: int) -> bool:
        return session in self.app_sessions()

    def wait_gone(self, session: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            rows = self.try_rows(
                "SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE ID = %s"
                if self.vendor == "mysql"
                else "SELECT COUNT(*) FROM pg_stat_activity WHERE pid = %s",
                (session,),
            )
            if rows is not None and not rows[0][0]:
                return True
            time.sleep(0.02)
        return False

    def kill(self, session: int) -> bool:
        """Have the server kill ``session``; False when it no longer existed."""
        if self.vendor == "mysql":
            return self.try_rows(f"KILL {int(session)}") is not None
        rows = self.try_rows("SELECT pg_terminate_backend(%s)", (session,))
        return bool(rows and rows[0][0])

    def close(self) -> None:
        if self.raw is not None:
            with contextlib.suppress(Exception):
                self.raw.close()
        self.raw = None


class Bed:
    """Start with ``start()``, stop with ``stop()`` (always: it removes the namespace and temp dirs)."""

    def __init__(
        self,
        driver: str,
        *,
        proxy: bool = True,
        namespace: bool = True,
        redis: bool = True,
        server_extra: list[str] | None = None,
    ) -> None:
        self.driver = driver
        self.vendor = VENDOR[driver]
        self.want_proxy, self.want_namespace, self.want_redis = proxy, namespace, redis
        self.server_extra = list(server_extra or [])
        self.net: BlackHoleNet | None = None
        self.server: Server | None = None
        self.proxy: HAProxy | None = None
        self.redis: Redis | None = None
        self.notes: list[str] = []

    def start(self) -> None:
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> None:
        host, prefix = "127.0.0.1", []
        if self.want_namespace:
            why = self._namespace_unavailable()
            if why is None:
                try:
                    self.net = BlackHoleNet()
                    self.net.start()
                    host, prefix = self.net.ns_ip, self.net.prefix()
                except Exception as exc:
                    self.net = None
                    why = f"could not create a network namespace ({type(exc).__name__})"
            if why is not None:
                self.notes.append(f"black hole skipped: {why}; everything runs on 127.0.0.1")
        cls = MariaDB if self.vendor == "mysql" else PostgreSQL
        self.server = cls(host=host, prefix=prefix, durable=True, extra=self.server_extra)
        self.server.start()
        if self.want_proxy:
            self.proxy = HAProxy(
                self.server.port,
                idle_timeout=PROXY_IDLE,
                connect_timeout=2.0,
                backend_host=host,
                host=host,
                prefix=prefix,
            )
            self.proxy.start()
        if self.want_redis:
            self.redis = Redis()
            self.redis.start()

    @staticmethod
    def _namespace_unavailable() -> str | None:
        if os.geteuid() != 0:
            return "needs root (ip netns, iptables)"
        for tool in ("ip", "iptables", "nsenter"):
            if shutil.which(tool) is None:
                return f"{tool} is not installed"
        return None

    def db_settings(self) -> dict[str, Any]:
        """The DATABASES entry of the worker: through the proxy when there is one."""
        assert self.server is not None
        if self.proxy is not None:
            return self.server.django_settings(HOST=self.proxy.host, PORT=str(self.proxy.port))
        return self.server.django_settings()

    def admin(self) -> Admin:
        assert self.server is not None
        return Admin(self.server, self.vendor, self.driver)

    def versions(self) -> dict[str, str]:
        admin = self.admin()
        try:
            if self.vendor == "mysql":
                server = str(admin.rows("SELECT VERSION()")[0][0])
            else:
                server = "PostgreSQL " + str(admin.rows("SHOW server_version")[0][0])
        finally:
            admin.close()
        return {"server": server}

    def stop(self) -> None:
        for part in (self.redis, self.proxy, self.server):
            if part is not None:
                with contextlib.suppress(Exception):
                    part.stop()
        if self.net is not None:
            with contextlib.suppress(Exception):
                self.net.stop()
        self.redis = self.proxy = self.server = self.net = None
