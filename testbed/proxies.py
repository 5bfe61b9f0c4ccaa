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

import contextlib
import os
import selectors
import socket
import tempfile
import threading
from typing import Any, ClassVar

from testbed.servers import APP_PASSWORD, APP_USER, DB_NAME, Server, _which, free_port


class HAProxy(Server):
    """HAProxy in TCP mode in front of ``backend_port``; drops a session idle for ``idle_timeout`` seconds.

    ``timeout client`` and ``timeout server`` are both ``idle_timeout``: a connection on which
    neither side sends anything for that long is closed on both sides, as a cloud load balancer does.
    ``host`` / ``prefix`` run it inside a network namespace (like ``Server``), ``backend_host`` is
    where the server listens. ``restart()`` / ``down()`` / ``up()`` stop the process (every client
    and server connection through it is cut at once) and start it again on the same port.
    """

    def __init__(
        self,
        backend_port: int,
        idle_timeout: float,
        *,
        connect_timeout: float = 5.0,
        standby_port: int | None = None,
        backend_host: str = "127.0.0.1",
        host: str = "127.0.0.1",
        prefix: list[str] | None = None,
    ) -> None:
        super().__init__(host=host, prefix=list(prefix or []))
        self.backend_port = backend_port
        self.backend_host = backend_host
        self.idle_timeout = idle_timeout
        self.connect_timeout = connect_timeout
        #: A second server, in maintenance until switch_over(): a failover's new primary.
        self.standby_port = standby_port

    def start(self) -> None:
        self.tmp = tempfile.mkdtemp(prefix="fc-hap-")
        self.port = self.port or free_port()
        idle_ms = max(1, int(self.idle_timeout * 1000))
        standby = f"    server standby {self.backend_host}:{self.standby_port} disabled\n" if self.standby_port else ""
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
                f"    bind {self.host}:{self.port}\n"
                f"    server backend {self.backend_host}:{self.backend_port}\n" + standby
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
        self._spawn([*self.prefix, binary, "-db", "-f", self._config], "haproxy.log")


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


class Relay:
    """A TCP relay in this process that can cut its clients while the server's side of each link stays open.

    What a network partition between a client and its proxy does: the client's connection fails
    (here: closed at once, and new connections are refused until ``listen()``), while the server
    sees nothing at all and carries on with whatever the session was doing. The server-side
    sockets of cut links stay open, their replies are read and counted but go nowhere, until
    ``close_backends()`` (the moment the server finally learns its client is gone). One thread,
    one selector; every method is safe to call from any thread.

        with Relay(server.port) as relay:      # clients connect to 127.0.0.1:relay.port
            relay.cut()                        # clients cut, reconnects refused, server unaware
            relay.listen()                     # new connections pass again
            relay.wait_backend_reply(10)       # a cut link's server spoke (a COMMIT's reply)
            relay.close_backends()             # now the server sees its sessions end
    """

    def __init__(self, backend_port: int, backend_host: str = "127.0.0.1") -> None:
        self.backend = (backend_host, backend_port)
        self.port = 0
        self._lock = threading.Lock()
        self._replied = threading.Condition(self._lock)
        self._listener: socket.socket | None = None
        self._peer: dict[socket.socket, socket.socket | None] = {}  # each socket -> its other end
        self._orphans: set[socket.socket] = set()  # server sides of cut links
        self._clients: set[socket.socket] = set()  # client sides of live links
        self.orphan_bytes = 0
        self._wake_r, self._wake_w = socket.socketpair()
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        self._stopping = False
        self._thread = threading.Thread(target=self._run, daemon=True, name="testbed-relay")

    def __enter__(self) -> Relay:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        self.port = free_port()
        self.listen()
        self._thread.start()

    def listen(self) -> None:
        """Accept connections (again) on the same port."""
        with self._lock:
            if self._listener is not None:
                return
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", self.port))
            sock.listen(64)
            sock.setblocking(False)
            self._listener = sock
            self._selector.register(sock, selectors.EVENT_READ)
        self._wake()

    def cut(self) -> None:
        """Close every client connection and stop listening; the server-side sockets stay open and silent."""
        with self._lock:
            if self._listener is not None:
                self._selector.unregister(self._listener)
                self._listener.close()
                self._listener = None
            for sock, peer in list(self._peer.items()):
                if peer is not None and sock not in self._orphans and sock in self._clients:
                    self._drop(sock)
                    self._peer[peer] = None
                    self._orphans.add(peer)
        self._wake()

    def wait_backend_reply(self, timeout: float) -> bool:
        """Wait until a cut link's server side has sent something (True), or ``timeout`` passed (False)."""
        with self._replied:
            return self._replied.wait_for(lambda: self.orphan_bytes > 0, timeout)

    def close_backends(self) -> None:
        """Close the server-side sockets of cut links: the server now sees those sessions end."""
        with self._lock:
            for sock in list(self._orphans):
                self._drop(sock)
            self._orphans.clear()
        self._wake()

    def stop(self) -> None:
        self._stopping = True
        self._wake()
        if self._thread.is_alive():
            self._thread.join(5)
        with self._lock:
            for sock in list(self._peer):
                self._drop(sock)
            if self._listener is not None:
                self._listener.close()
                self._listener = None
        self._wake_r.close()
        self._wake_w.close()
        self._selector.close()

    # -- the relay thread ---------------------------------------------------------------------------

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")

    def _drop(self, sock: socket.socket) -> None:
        """Under the lock: forget and close one socket."""
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(sock)
        self._peer.pop(sock, None)
        self._clients.discard(sock)
        sock.close()

    def _accept(self) -> None:
        assert self._listener is not None
        try:
            client, _ = self._listener.accept()
        except BlockingIOError:
            return
        try:
            server = socket.create_connection(self.backend, timeout=5)
        except OSError:
            client.close()
            return
        for sock in (client, server):
            sock.setblocking(False)
            self._selector.register(sock, selectors.EVENT_READ)
        self._peer[client], self._peer[server] = server, client
        self._clients.add(client)

    def _pump(self, sock: socket.socket) -> None:
        try:
            data = sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if sock in self._orphans:
            if data:
                self.orphan_bytes += len(data)
                self._replied.notify_all()
            else:
                self._orphans.discard(sock)
                self._drop(sock)
            return
        peer = self._peer.get(sock)
        if not data or peer is None:
            # One side closed: close the other, as a TCP proxy does.
            self._drop(sock)
            if peer is not None:
                self._drop(peer)
            return
        peer.setblocking(True)
        try:
            peer.sendall(data)
        except OSError:
            self._drop(sock)
            self._drop(peer)
        else:
            peer.setblocking(False)

    def _run(self) -> None:
        while not self._stopping:
            for key, _ in self._selector.select(timeout=0.5):
                sock = key.fileobj
                with self._lock:
                    if sock is self._wake_r:
                        with contextlib.suppress(OSError):
                            self._wake_r.recv(4096)
                    elif sock is self._listener:
                        self._accept()
                    elif sock in self._peer:
                        self._pump(sock)


__all__ = ["HAProxy", "PgBouncer", "Relay"]
