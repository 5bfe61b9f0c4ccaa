"""freshconn for Celery workers: every task runs as a unit of work, on persistent connections.

``freshconn.contrib.celery.install(app)`` (next to ``app = Celery(...)``) does four things:

- runs each task (prefork, threads or solo pool) inside a unit of work, from ``task_prerun`` to
  ``task_postrun``, in the thread that runs the task;
- turns off the per-task ``close_database()`` of Celery's Django fix-up, which otherwise closes every
  connection before and after every task (Celery >= 5.6: a new connection per task; older: Django's
  ``close_old_connections`` semantics). Its cache closing stays as it is;
- in each prefork child (``worker_process_init``) drops the connections inherited from the parent
  without a byte on their sockets (see ``freshconn._fork``), before Celery's own fix-up gets there;
- closes the connections of the thread that ends a prefork child or a solo worker.

Eager tasks (``task.apply()``, ``task_always_eager``) are left alone, like Celery's fix-up does: they
run inside their caller's own unit, if any.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from celery import Celery, signals
from celery.local import Proxy

from freshconn import (
    AmbiguousCommitError,
    UnitHandle,
    UnitOfWork,
    Using,
    close_thread_connections,
    forget_inherited_connections,
)
from freshconn import open_unit as _open_unit

__all__ = ["install"]

logger = logging.getLogger("freshconn")


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

    def on_worker_init(self, sender: Any = None, **kwargs: Any) -> None:
        worker_app = _unwrap(getattr(sender, "app", None))
        if worker_app is not None and worker_app is not _unwrap(self.app):
            return
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
    signals.worker_process_init.connect(
        integration.on_worker_process_init, weak=False, dispatch_uid=uid + ":process_init"
    )
    # A prefork child ends in its main thread, which ran its tasks; a solo worker runs its tasks
    # in the main thread too. The threads pool's own threads are not reachable from here.
    signals.worker_process_shutdown.connect(integration.on_thread_end, weak=False, dispatch_uid=uid + ":process_end")
    signals.worker_shutdown.connect(integration.on_thread_end, weak=False, dispatch_uid=uid + ":worker_end")
