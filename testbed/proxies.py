"""Throwaway TCP proxies (HAProxy, PgBouncer) between a client and a test-bed database server.

They reproduce what sits between a worker and its database in production: a load balancer or
connection pooler with its own idle timeout, which the database server knows nothing about.
Like ``testbed.servers``: loopback only, a kernel-picked port, a temp directory, stopped by PID.

    with MariaDB() as db, HAProxy(db.port, idle_timeout=2) as proxy:
        settings = db.django_settings(PORT=str(proxy.port))

    with PostgreSQL() as db, PgBouncer(db.port, client_idle_timeout=2) as bouncer:
        settings = bouncer.django_settings()
"""

from __future__ import annotations

import os
import tempfile
from typing import Any, ClassVar

from testbed.servers import APP_PASSWORD, APP_USER, DB_NAME, Server, _which, free_port


class HAProxy(Server):
    """HAProxy in TCP mode in front of ``backend_port``; drops a session idle for ``idle_timeout`` seconds.

    ``timeout client`` and ``timeout server`` are both ``idle_timeout``: a connection on which
    neither side sends anything for that long is closed on both sides, as a cloud load balancer does.
    """

    def __init__(
        self, backend_port: int, idle_timeout: float, *, connect_timeout: float = 5.0, standby_port: int | None = None
    ) -> None:
        super().__init__()
        self.backend_port = backend_port
        self.idle_timeout = idle_timeout
        self.connect_timeout = connect_timeout
        #: A second server, in maintenance until switch_over(): a failover's new primary.
        self.standby_port = standby_port

    def start(self) -> None:
        self.tmp = tempfile.mkdtemp(prefix="fc-hap-")
        self.port = self.port or free_port()
        idle_ms = max(1, int(self.idle_timeout * 1000))
        config = os.path.join(self.tmp, "haproxy.cfg")
        with open(config, "w") as f:
            self._admin_socket = os.path.join(self.tmp, "admin.sock")
            f.write(
                "global\n"
                "    maxconn 512\n"
                f"    stats socket {self._admin_socket} level admin\n"
                "defaults\n"
                "    mode tcp\n"
                f"    timeout connect {int(self.connect_timeout * 1000)}\n"
                f"    timeout client {idle_ms}\n"
                f"    timeout server {idle_ms}\n"
                "listen db\n"
                f"    bind 127.0.0.1:{self.port}\n"
                f"    server backend 127.0.0.1:{self.backend_port}\n"
                + (f"    server standby 127.0.0.1:{self.standby_port} disabled\n" if self.standby_port else "")
            )
        self._config = config
        self._launch()

    def switch_over(self) -> None:
        """New connections go to the standby from now on; established ones stay where they are.

        What a failover looks like from a client whose connection outlived it: the old primary,
        now read-only, keeps serving that connection, while every new one reaches the new primary.
        """
        for command in ("set server db/standby state ready", "set server db/backend state maint"):
            self._admin(command)

    def _admin(self, command: str) -> str:
        import socket

        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(self._admin_socket)
            sock.sendall(command.encode() + b"\n")
            reply = b""
            while chunk := sock.recv(4096):
                reply += chunk
        return reply.decode()

    def _launch(self) -> None:
        """Start (or, after down(), restart) HAProxy on the same port with the same configuration."""
        binary = _which("haproxy", "/usr/sbin/haproxy")
        # -db: stay in the foreground, so self.proc is the process that serves (stopped by its PID).
        self._spawn([binary, "-db", "-f", self._config], "haproxy.log")


class PgBouncer(Server):
    """PgBouncer in front of a PostgreSQL on ``backend_port``; the app user logs in through it.

    ``client_idle_timeout`` (seconds, 0 = never) closes a client connection idle that long.
    PgBouncer (1.18) applies it only to a client not linked to a server connection, which in
    ``session`` mode is never: so ``pool_mode`` defaults to ``transaction`` when a
    ``client_idle_timeout`` is set, else ``session``. In transaction mode give psycopg 3
    ``OPTIONS={"prepare_threshold": None}`` if a test runs the same query five times or more.
    ``settings`` adds or overrides lines of the ``[pgbouncer]`` section. PgBouncer refuses to run
    as root: it is started with ``-u postgres`` and its files are made readable by that user.
    """

    engine: ClassVar[str] = "postgresql"

    def __init__(
        self,
        backend_port: int,
        client_idle_timeout: float = 0,
        *,
        pool_mode: str | None = None,
        server_idle_timeout: float = 600,
        settings: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.backend_port = backend_port
        self.client_idle_timeout = client_idle_timeout
        self.pool_mode = pool_mode or ("transaction" if client_idle_timeout else "session")
        self.server_idle_timeout = server_idle_timeout
        self.settings = dict(settings or {})

    def start(self) -> None:
        self.tmp = tempfile.mkdtemp(prefix="fc-pgb-")
        os.chmod(self.tmp, 0o755)
        self.port = self.port or free_port()
        auth_file = os.path.join(self.tmp, "users.txt")
        with open(auth_file, "w") as f:
            # A plain password lets PgBouncer answer SCRAM from the client and log in to the server.
            f.write(f'"{APP_USER}" "{APP_PASSWORD}"\n')
        conf: dict[str, Any] = {
            "listen_addr": "127.0.0.1",
            "listen_port": self.port,
            "unix_socket_dir": "",
            "auth_type": "scram-sha-256",
            "auth_file": auth_file,
            "pool_mode": self.pool_mode,
            "client_idle_timeout": self.client_idle_timeout,
            "server_idle_timeout": self.server_idle_timeout,
            "max_client_conn": 200,
            "default_pool_size": 20,
            "ignore_startup_parameters": "extra_float_digits",
            **self.settings,
        }
        config = os.path.join(self.tmp, "pgbouncer.ini")
        with open(config, "w") as f:
            f.write(f"[databases]\n{DB_NAME} = host=127.0.0.1 port={self.backend_port} dbname={DB_NAME}\n")
            f.write(f"* = host=127.0.0.1 port={self.backend_port}\n")
            f.write("[pgbouncer]\n")
            for key, value in conf.items():
                f.write(f"{key} = {value}\n")
        for name in (auth_file, config):
            os.chmod(name, 0o644)
        self._config = config
        self._launch()

    def _launch(self) -> None:
        """Start (or, after down(), restart) PgBouncer on the same port with the same configuration."""
        binary = _which("pgbouncer", "/usr/sbin/pgbouncer")
        cmd = [binary, self._config]
        if os.geteuid() == 0:
            cmd = [binary, "-u", "postgres", self._config]
        self._spawn(cmd, "pgbouncer.log")

    def log_text(self) -> str:
        """PgBouncer's own log (useful when a login through it fails)."""
        path = os.path.join(self.tmp, "pgbouncer.log")
        if not self.tmp or not os.path.exists(path):
            return ""
        with open(path, errors="replace") as f:
            return f.read()


__all__ = ["HAProxy", "PgBouncer"]
