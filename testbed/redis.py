"""A throwaway Redis server (Debian's redis-server) on loopback, for the task-queue integration tests.

Like the database servers in ``testbed.servers``: it binds 127.0.0.1 on a port the kernel picked,
keeps its working directory in a temporary folder, persists nothing, and is stopped by its own PID.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
from typing import Any

from testbed.servers import _which, free_port, wait_port


class Redis:
    """``Redis()`` then ``start()``/``stop()`` (or ``with``); ``.port`` and ``.url`` once started."""

    def __init__(self, port: int = 0) -> None:
        self.port = port
        self.tmp = ""
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def __enter__(self) -> Redis:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        redis_server = _which("redis-server", "/usr/bin/redis-server")
        self.tmp = tempfile.mkdtemp(prefix="fc-redis-")
        self.port = self.port or free_port()
        log = open(os.path.join(self.tmp, "server.log"), "ab")
        self.proc = subprocess.Popen(
            [
                redis_server,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                self.tmp,
                # Debian's default config is not read (no file given): keep the test server quiet.
                "--loglevel",
                "warning",
            ],
            stdout=log,
            stderr=log,
            cwd=self.tmp,
        )
        log.close()
        try:
            wait_port(self.port, timeout=15.0, proc=self.proc)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None
        if self.tmp:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = ""

    def client(self, **kwargs: Any) -> Any:
        """A redis-py client for this server (imported lazily: the testbed does not need redis-py)."""
        import redis

        return redis.Redis.from_url(self.url, **kwargs)
