"""freshconn for Django's tasks framework (``django.tasks``, Django >= 6.0, or the ``django_tasks`` backport).

``freshconn.contrib.tasks.install()`` once at start-up (in an ``AppConfig.ready()``):

- every task of every backend runs as a unit of work, from ``task_started`` to ``task_finished``,
  in the thread that runs the task (both signals are sent there by Django's ``ImmediateBackend``,
  django-tasks-db's ``db_worker`` and the other workers); a failed task's exception is passed to
  the unit's end, so a disconnect drops the connection it broke at once;
- a task whose ``task_finished`` never came (a worker interrupted between the two) has its unit
  ended, in its own thread, when that thread starts its next task.

A backend's own polling loop is not a task: django-tasks-db's ``db_worker`` polls and claims
outside any task, and calls ``close_old_connections()`` around that; with
``FRESHCONN["ADOPT_CLOSE_OLD_CONNECTIONS"] = True`` those calls become unit boundaries too, so the
whole loop survives idle limits, kills and restarts (docs/tasks.md).
"""

from __future__ import annotations

import logging
import sys
import threading
from typing import Any

from freshconn import AmbiguousCommitError, UnitHandle, UnitOfWork, Using, open_unit

__all__ = ["install", "uninstall"]

logger = logging.getLogger("freshconn")

_UID = "freshconn.contrib.tasks"


def _signals() -> Any:
    import importlib

    for name in ("django.tasks.signals", "django_tasks.signals"):  # Django >= 6.0, else the backport
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    raise ImportError("freshconn.contrib.tasks needs Django >= 6.0 (django.tasks) or the django-tasks backport")


class _Units:
    def __init__(self, using: Using) -> None:
        self.using = using
        #: The handle each thread opened at task_started, waiting for its task_finished.
        self.local = threading.local()

    def started(self, sender: Any = None, **kwargs: Any) -> None:
        stale: UnitHandle | None = getattr(self.local, "handle", None)
        if stale is not None:
            # The previous task of this thread never sent task_finished: end its unit first.
            self.local.handle = None
            self._close(stale, None)
        self.local.handle = open_unit(self.using)

    def finished(self, sender: Any = None, task_result: Any = None, **kwargs: Any) -> None:
        handle: UnitHandle | None = getattr(self.local, "handle", None)
        if handle is None:
            return
        self.local.handle = None
        exc = None
        if getattr(getattr(task_result, "status", None), "name", None) == "FAILED":
            # Backends send task_finished for a failed task inside their ``except`` block.
            exc = sys.exc_info()[1]
        self._close(handle, exc)

    @staticmethod
    def _close(handle: UnitHandle, exc: BaseException | None) -> None:
        try:
            handle.close(exc)
        except AmbiguousCommitError as lost:
            # The task has already failed; say plainly that its transaction may have been applied.
            logger.error("%s", lost, extra={"alias": lost.alias, "reason": "ambiguous_commit"})


_installed: _Units | None = None


def install(*, using: Using = None) -> None:
    """Run every task of every ``django.tasks`` backend as a unit of work (``using``: aliases in scope).

    Calling it again replaces the previous scope.
    """
    global _installed
    UnitOfWork(using)  # a typo'd alias fails here, at start-up
    uninstall()  # Signal.connect keeps the first receiver of a dispatch_uid: replace it
    signals = _signals()
    _installed = units = _Units(using)
    signals.task_started.connect(units.started, weak=False, dispatch_uid=_UID + ":started")
    signals.task_finished.connect(units.finished, weak=False, dispatch_uid=_UID + ":finished")


def uninstall() -> None:
    """Disconnect the receivers ``install()`` connected (for tests)."""
    global _installed
    signals = _signals()
    signals.task_started.disconnect(dispatch_uid=_UID + ":started")
    signals.task_finished.disconnect(dispatch_uid=_UID + ":finished")
    _installed = None
