"""freshconn for RQ workers: every job runs as a unit of work.

``rq worker --worker-class freshconn.contrib.rq.FreshconnWorker`` (or ``FreshconnSimpleWorker``;
with django-rq: ``manage.py rqworker --worker-class ...``).

- ``FreshconnWorker`` (RQ's forking worker): the work horse is a fork of the worker, so it starts
  by dropping the connections it inherited, without a byte on their sockets (``freshconn._fork``):
  the worker's own sessions stay intact, and the job opens its own. The job runs as a unit, and the
  horse closes its connections before it exits (RQ ends it with ``os._exit``, which skips every
  cleanup).
- ``FreshconnSimpleWorker`` (jobs in the worker's own process): each job runs as a unit on the
  worker's persistent connections, which are checked only after an idle spell.
- ``FreshconnWorkerMixin`` puts the same behaviour on any other ``rq.Worker`` subclass.

Both close the worker's connections when its work loop ends. ``freshconn_using`` (a class
attribute) limits the aliases in scope, as ``unit_of_work(using=...)`` does.
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar

from rq.worker import SimpleWorker, Worker

from freshconn import AmbiguousCommitError, Using, close_thread_connections, forget_inherited_connections, open_unit

__all__ = ["FreshconnSimpleWorker", "FreshconnWorker", "FreshconnWorkerMixin"]

logger = logging.getLogger("freshconn")


class FreshconnWorkerMixin:
    """Runs each job as a unit of work; put it before the RQ worker class in the bases."""

    freshconn_using: ClassVar[Using] = None
    _freshconn_exc: BaseException | None = None

    def main_work_horse(self, *args: Any, **kwargs: Any) -> None:
        # First thing in the forked horse, before any job code can touch the ORM.
        forget_inherited_connections()
        super().main_work_horse(*args, **kwargs)  # type: ignore[misc]

    def perform_job(self, *args: Any, **kwargs: Any) -> bool:
        self._freshconn_exc = None
        handle = open_unit(self.freshconn_using)
        try:
            result: bool = super().perform_job(*args, **kwargs)  # type: ignore[misc]
        except BaseException as exc:
            handle.close(exc)
            raise
        else:
            # RQ catches the job's exception inside perform_job (handle_exception saw it): pass it
            # on, so that a disconnect error drops the connection it broke.
            try:
                handle.close(self._freshconn_exc)
            except AmbiguousCommitError as lost:
                logger.error("%s", lost, extra={"alias": lost.alias, "reason": "ambiguous_commit"})
        finally:
            self._freshconn_exc = None
            if getattr(self, "_is_horse", False):
                # The horse exits with os._exit() next: say goodbye to the server properly.
                close_thread_connections()
        return result

    def handle_exception(self, job: Any, *exc_info: Any) -> Any:
        if len(exc_info) > 1 and isinstance(exc_info[1], BaseException):
            self._freshconn_exc = exc_info[1]
        return super().handle_exception(job, *exc_info)  # type: ignore[misc]

    def teardown(self, *args: Any, **kwargs: Any) -> Any:
        try:
            parent = getattr(super(), "teardown", None)
            return parent(*args, **kwargs) if parent is not None else None
        finally:
            close_thread_connections()


class FreshconnWorker(FreshconnWorkerMixin, Worker):
    """RQ's forking worker; each job runs as a unit in a horse that never uses an inherited socket."""


class FreshconnSimpleWorker(FreshconnWorkerMixin, SimpleWorker):
    """RQ's same-process worker; each job runs as a unit on the worker's persistent connections."""
