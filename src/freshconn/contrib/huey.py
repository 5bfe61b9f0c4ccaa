"""freshconn for Huey consumers: every task runs as a unit of work.

``freshconn.contrib.huey.install(huey)`` next to ``huey = RedisHuey(...)`` (with djhuey:
``install(djhuey.HUEY)``, and plain ``@task`` / ``@periodic_task`` instead of ``@db_task``).

djhuey's ``db_task`` calls ``close_old_connections()`` before and after the task *function*: the
connection survives only as long as ``CONN_MAX_AGE`` allows, a dropped one is found by a query that
fails (or, with ``CONN_HEALTH_CHECKS``, by a ping before every task), pre/post-execute hooks run
outside that bracket, and every task must be declared with it. Here instead:

- every task of ``huey``, whatever its decorator, runs as one unit around ``Huey.execute``: the
  pre-execute hooks, the task, its retries bookkeeping and the post-execute hooks, paired on every
  path (cancelled, failed, interrupted). Connections persist and are checked only after an idle spell;
- each worker (thread, greenlet or process) closes its own connections when it shuts down;
- a worker process (``-k process``) forked from a consumer that held connections drops them when it
  starts, without a byte on their sockets.

Immediate mode (``huey.immediate = True``) runs tasks inside the caller, which keeps its own lifecycle.
"""

from __future__ import annotations

import functools
import os
import threading
from typing import Any

from freshconn import UnitOfWork, Using, close_thread_connections, forget_inherited_connections

__all__ = ["install"]

_HOOK = "freshconn"


def install(huey: Any, *, using: Using = None) -> None:
    """Run every task of ``huey`` as a unit of work (``using``: aliases in scope, default all)."""
    if getattr(huey, "_freshconn_installed", False):
        return
    unit = UnitOfWork(using)
    execute = huey.execute

    @functools.wraps(execute)
    def execute_as_unit(task: Any, timestamp: Any = None) -> Any:
        if huey.immediate:
            return execute(task, timestamp)
        with unit:
            return execute(task, timestamp)

    # An instance attribute: the consumer's workers call huey.execute(task, now) for every task,
    # periodic ones included, and Huey subclasses keep their own execute() underneath.
    huey.execute = execute_as_unit
    huey._freshconn_installed = True

    known_pid = os.getpid()
    lock = threading.Lock()

    def forget_after_fork() -> None:
        nonlocal known_pid
        # Startup hooks run in every worker. A new PID means a forked worker process, whose main
        # thread (the one running this hook) holds the consumer's connections; threads of the same
        # process find the PID already seen and leave the connections alone.
        with lock:
            if os.getpid() == known_pid:
                return
            known_pid = os.getpid()
        forget_inherited_connections()

    huey.on_startup(name=_HOOK)(forget_after_fork)
    # Shutdown hooks run in each worker thread (or process) as it stops: each closes its own.
    huey.on_shutdown(name=_HOOK)(close_thread_connections)
