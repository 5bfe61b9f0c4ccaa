"""freshconn for Celery workers: every task runs as a unit of work, on persistent connections.

``freshconn.contrib.celery.install(app)`` (next to ``app = Celery(...)``) does four things:

- runs each task (prefork, threads or solo pool) inside a unit of work, from ``task_prerun`` to
  ``task_postrun``, in the thread that runs the task;
- turns off the per-task ``close_database()`` of Celery's Django fix-up, which otherwise closes every
  connection before and after every task (Celery >= 5.6: a new connection per task; older: Django's
  ``close_old_connections`` semantics). Its cache closing stays as it is;
- in each prefork child (``worker_process_init``) drops the connections inherited from the parent
  without a byte on their sockets (see ``freshconn._fork``), before Celery's own fix-up gets there;
- closes the connections of the thread that ends a prefork child or a solo worker;
- runs every write (and state read) of a django-celery-results backend as a unit: in the worker's
  MainProcess (the revoked and expired states it records, Celery #8405/#9239, and the state it reads
  before recording a ``revoke`` command) a unit of its own; the final state a
  task stores after its body returned starts a fresh unit first, so a result written after a long
  task finds a checked connection (django-celery-results PR #498);
- runs each tick of beat's scheduler (django-celery-beat's ``DatabaseScheduler`` included) and
  each of its syncs as a unit;
- gevent and eventlet pools: each task is a unit in its greenlet (Django's connections are
  per greenlet there), and the task's greenlet closes its connections when the task ends, so
  finished greenlets leave none open. At start-up the worker logs an error when psycopg2 runs
  under gevent without psycogreen (every query would block the whole hub).
- gevent, eventlet and threads pools: at start-up the worker logs a warning (``freshconn.W010``,
  ``freshconn.checks.check_concurrency``) when ``concurrency`` connections per alias would exceed
  a server's ``max_connections``.

Eager tasks (``task.apply()``, ``task_always_eager``) are left alone, like Celery's fix-up does: they
run inside their caller's own unit, if any.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from celery import Celery, signals, states
from celery.local import Proxy
from django.db import connections

from freshconn import (
    AmbiguousCommitError,
    UnitHandle,
    UnitOfWork,
    Using,
    close_thread_connections,
    forget_inherited_connections,
)
from freshconn import open_unit as _open_unit
from freshconn.checks import check_concurrency

__all__ = ["install"]

logger = logging.getLogger("freshconn")

#: The states Celery's tracer stores once the task body has returned (the unit can be renewed then).
_FINAL_STATES = states.READY_STATES | {states.RETRY}
_BACKEND_WRITES = ("store_result", "save_group", "forget", "delete_group", "cleanup")
#: Reads (``get_state``, ``get_result``... go through ``get_task_meta``): the MainProcess reads a
#: task's state before it records a revoke command, and a read on a dead connection broke that.
_BACKEND_READS = ("get_task_meta", "restore_group")


def _unwrap(app: Any) -> Any:
    """The app behind a proxy such as ``current_app``."""
    return app._get_current_object() if isinstance(app, Proxy) else app


def _keep_connections(**kwargs: Any) -> None:
    """Replaces the Django fix-up's ``close_database``: freshconn decides, per task, what to close."""


class _Integration:
    """One per installed app: its signal receivers, and the per-thread record of the unit opened."""

    def __init__(self, app: Celery, using: Using) -> None:
        self.app = app
        self.using = using
        # task_prerun and task_postrun run in the thread that runs the task, one task at a time
        # per thread: the handle opened at prerun waits here for its postrun.
        self.local = threading.local()
        #: gevent/eventlet pool: each task runs in a greenlet of its own, which ends with it.
        self.greenlets = False

    def _ours(self, task: Any) -> bool:
        if task is None or getattr(task.request, "is_eager", False):
            return False
        return _unwrap(getattr(task, "app", None)) is _unwrap(self.app)

    def on_task_prerun(self, sender: Any = None, task: Any = None, **kwargs: Any) -> None:
        task = task or sender
        if not self._ours(task):
            return
        self.local.handle = _open_unit(self.using)

    def on_task_postrun(self, sender: Any = None, task: Any = None, retval: Any = None, **kwargs: Any) -> None:
        task = task or sender
        handle: UnitHandle | None = getattr(self.local, "handle", None)
        if not self._ours(task) or handle is None:
            return
        self.local.handle = None
        try:
            # On failure Celery passes the exception as retval: a disconnect error must drop the connection.
            handle.close(retval if isinstance(retval, BaseException) else None)
        except AmbiguousCommitError as lost:
            # The task has already failed; say plainly that its transaction may have been applied.
            logger.error(
                "task %s: %s",
                getattr(task, "name", task),
                lost,
                extra={"alias": lost.alias, "reason": "ambiguous_commit"},
            )
        finally:
            if self.greenlets:
                close_thread_connections()  # this greenlet ends with its task: nobody else can close them

    def wrap_backend(self, backend: Any) -> Any:
        """Each read and write of a django-celery-results backend as a unit (see the module docstring)."""
        if not type(backend).__module__.startswith("django_celery_results") or getattr(backend, "_freshconn", False):
            return backend
        for name in (*_BACKEND_WRITES, *_BACKEND_READS):
            method = getattr(backend, name, None)
            if method is not None:
                setattr(backend, name, self._unit_write(method, name == "store_result"))
        backend._freshconn = True
        return backend

    def _unit_write(self, method: Any, stores_state: bool) -> Any:
        def write(*args: Any, **kwargs: Any) -> Any:
            handle: UnitHandle | None = getattr(self.local, "handle", None)
            if handle is None:
                with UnitOfWork(self.using):  # the MainProcess, beat, a thread of your own
                    return method(*args, **kwargs)
            state = kwargs.get("state", args[2] if len(args) > 2 else None)
            if stores_state and state in _FINAL_STATES and not _in_atomic():
                # The tracer stores the outcome after the body returned: end the task's unit and
                # begin another, whose checks see how long the connection sat idle meanwhile.
                self.local.handle = None
                handle.close(None)
                self.local.handle = _open_unit(self.using)
            return method(*args, **kwargs)

        return write

    def on_beat_init(self, sender: Any = None, **kwargs: Any) -> None:
        if _unwrap(getattr(sender, "app", None)) is not _unwrap(self.app):
            return
        scheduler = sender.scheduler
        unit = UnitOfWork(self.using)
        for name in ("tick", "_do_sync", "sync"):
            method = getattr(scheduler, name, None)
            if method is not None:
                setattr(scheduler, name, unit(method))

    def on_worker_init(self, sender: Any = None, **kwargs: Any) -> None:
        worker_app = _unwrap(getattr(sender, "app", None))
        if worker_app is not None and worker_app is not _unwrap(self.app):
            return
        pool = getattr(getattr(sender, "pool_cls", None), "__module__", "") or ""
        concurrency = int(getattr(sender, "concurrency", 0) or 0)
        if "gevent" in pool or "eventlet" in pool:
            self.greenlets = True
        if concurrency > 0 and any(kind in pool for kind in ("gevent", "eventlet", "thread")):
            _check_pool(pool, concurrency, self.using)
        for fixup in getattr(self.app, "_fixups", None) or ():
            worker_fixup = getattr(fixup, "worker_fixup", None)
            if worker_fixup is None or not hasattr(worker_fixup, "close_database"):
                continue
            # The fix-up's task_prerun/task_postrun receivers call self.close_database(): an
            # instance attribute replaces it for this worker, and its close_cache() still runs.
            worker_fixup.close_database = _keep_connections
            handler = getattr(worker_fixup, "on_worker_process_init", None)
            if handler is not None:
                # The fix-up's after-fork handler os.close()s each inherited descriptor, then calls
                # conn.close(): a second close of that number, and with PyMySQL (no fileno())
                # a COM_QUIT on the parent's session. Run it after ours, when nothing is left open.
                signals.worker_process_init.disconnect(handler)
                signals.worker_process_init.connect(handler, weak=False)

    def on_worker_process_init(self, **kwargs: Any) -> None:
        forget_inherited_connections()

    def on_thread_end(self, **kwargs: Any) -> None:
        close_thread_connections()


def _in_atomic() -> bool:
    return any(conn.in_atomic_block for conn in connections.all(initialized_only=True))


def _check_pool(pool: str, concurrency: int, using: Using) -> None:
    """At a gevent/eventlet/threads worker's start: psycopg2 without psycogreen, and connections the servers refuse."""
    aliases = [using] if isinstance(using, str) else list(using or connections)
    if "gevent" in pool:
        for alias in aliases:
            conn = connections[alias]
            if conn.vendor != "postgresql" or getattr(getattr(conn, "Database", None), "__name__", "") != "psycopg2":
                continue
            import psycopg2.extensions

            if psycopg2.extensions.get_wait_callback() is None:
                logger.error(
                    "psycopg2 under the gevent pool without psycogreen: every query blocks the whole worker "
                    "(all %d greenlets). Call psycogreen.gevent.patch_psycopg() right after gevent's "
                    "monkey-patching (pip install psycogreen), or use psycopg 3.",
                    concurrency,
                    extra={"alias": alias, "reason": "psycopg2_blocks_gevent"},
                )
    for message in check_concurrency(concurrency, databases=aliases):
        if message.is_silenced():
            continue
        name = pool.rsplit(".", 1)[-1]
        logger.warning(
            "%s pool: %s (%s) %s",
            "threads" if name == "thread" else name,  # Celery's name for it (-P threads)
            message.msg,
            message.id,
            message.hint,
            extra={"alias": _alias_of(message.obj), "reason": "concurrency_above_max_connections"},
        )


def _alias_of(obj: Any) -> str | None:
    """The alias in a check message's object, ``DATABASES['name']``."""
    text = str(obj or "")
    return text[len("DATABASES['") : -2] if text.startswith("DATABASES['") else None


def install(app: Celery, *, using: Using = None) -> None:
    """Run every task of ``app`` as a unit of work (``using``: aliases in scope, default all).

    Call it where the app is created, before the worker starts. Calling it again is harmless.
    """
    UnitOfWork(using)  # a typo'd alias fails here, at start-up
    app = _unwrap(app)
    if getattr(app, "_freshconn_integration", None) is not None:
        return
    integration = _Integration(app, using)
    app._freshconn_integration = integration
    uid = f"freshconn.contrib.celery:{id(app)}"
    signals.task_prerun.connect(integration.on_task_prerun, weak=False, dispatch_uid=uid + ":prerun")
    signals.task_postrun.connect(integration.on_task_postrun, weak=False, dispatch_uid=uid + ":postrun")
    signals.worker_init.connect(integration.on_worker_init, weak=False, dispatch_uid=uid + ":worker_init")
    signals.beat_init.connect(integration.on_beat_init, weak=False, dispatch_uid=uid + ":beat_init")
    get_backend = app._get_backend
    # Celery keeps one backend per thread unless it is thread-safe: wrap each as Celery makes it.
    app._get_backend = lambda: integration.wrap_backend(get_backend())
    signals.worker_process_init.connect(
        integration.on_worker_process_init, weak=False, dispatch_uid=uid + ":process_init"
    )
    # A prefork child ends in its main thread, which ran its tasks; a solo worker runs its tasks
    # in the main thread too. The threads pool's own threads are not reachable from here.
    signals.worker_process_shutdown.connect(integration.on_thread_end, weak=False, dispatch_uid=uid + ":process_end")
    signals.worker_shutdown.connect(integration.on_thread_end, weak=False, dispatch_uid=uid + ":worker_end")
