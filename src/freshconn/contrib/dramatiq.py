"""freshconn for Dramatiq workers: a middleware that runs every message as a unit of work.

``broker.add_middleware(FreshconnMiddleware())`` where the broker is built (with django_dramatiq:
add ``"freshconn.contrib.dramatiq.FreshconnMiddleware"`` to ``DRAMATIQ_BROKER["MIDDLEWARE"]`` in
place of its ``DbConnectionsMiddleware``, which closes connections before and after every message).

- A unit begins in ``before_process_message`` and ends in ``after_process_message`` (with the
  actor's exception, so a disconnect drops the connection it broke) or ``after_skip_message``, in
  the worker thread that runs the message; connections persist between messages and are checked
  only after an idle spell.
- Each worker thread closes its own connections when it shuts down (and the consumer threads,
  which never run actors, close any they opened).
- A worker process forked from a parent that held connections drops them at boot, without a byte
  on their sockets.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from dramatiq.middleware import Middleware

from freshconn import (
    AmbiguousCommitError,
    UnitHandle,
    UnitOfWork,
    Using,
    close_thread_connections,
    forget_inherited_connections,
    open_unit,
)

__all__ = ["FreshconnMiddleware"]

logger = logging.getLogger("freshconn")


class FreshconnMiddleware(Middleware):
    """Each message a unit of work; ``using`` limits the aliases in scope (default: all)."""

    def __init__(self, using: Using = None) -> None:
        UnitOfWork(using)  # a typo'd alias fails here, where the broker is built
        self.using = using
        # Another middleware may raise SkipMessage before ours ran: only close a unit we opened.
        self._local = threading.local()

    def after_process_boot(self, broker: Any) -> None:
        # Dramatiq forks its worker processes (the default on Unix before Python 3.14). The parent
        # normally holds no connection; if it did, the child must not talk on it.
        forget_inherited_connections()

    def before_process_message(self, broker: Any, message: Any) -> None:
        self._local.handle = open_unit(self.using)

    def after_process_message(
        self, broker: Any, message: Any, *, result: Any = None, exception: BaseException | None = None
    ) -> None:
        self._leave(exception)

    def after_skip_message(self, broker: Any, message: Any) -> None:
        self._leave(None)

    def _leave(self, exc: BaseException | None) -> None:
        handle: UnitHandle | None = getattr(self._local, "handle", None)
        if handle is None:
            return
        self._local.handle = None
        try:
            handle.close(exc)
        except AmbiguousCommitError as lost:
            # The actor already failed: Dramatiq retries it by its own rules. Say it may be applied.
            logger.error("%s", lost, extra={"alias": lost.alias, "reason": "ambiguous_commit"})

    def before_worker_thread_shutdown(self, broker: Any, thread: Any) -> None:
        close_thread_connections()

    def before_consumer_thread_shutdown(self, broker: Any, thread: Any) -> None:
        close_thread_connections()
