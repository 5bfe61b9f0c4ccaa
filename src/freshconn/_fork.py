"""Dropping the database connections a forked child inherited, without a byte on their sockets.

After ``fork()`` the child holds copies of the parent's sockets: both processes now own the same
server session. If the child queries on it, the two interleave on one protocol stream; if the child
*closes* it the usual way, the driver sends COM_QUIT / Terminate and the server ends the session
the parent is still using. Closing the file descriptor number instead (what Celery does) leaves
the driver object pointing at a number the child may reuse for something else, which the driver
then closes a second time when it is garbage-collected.

So, in the child: point the driver's descriptor at /dev/null with ``dup2()`` (the parent's socket
stays open in the parent, untouched), let the driver close its connection (whatever it writes goes
to /dev/null and fails harmlessly: no network I/O), and forget it in Django's wrapper. Each
descriptor number is closed once, by its owner.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Any

from django.db import connections

from . import _drivers, _pool, _state, _stats

__all__ = ["forget_inherited_connections"]

logger = logging.getLogger("freshconn")

# Driver connections whose socket could not be found (an unknown driver): never closed and never
# garbage-collected, since a driver's close or finalizer would talk to the parent's session.
_unclosable: list[Any] = []


def forget_inherited_connections(*, reset_stats: bool = True) -> int:
    """In a child right after ``fork()``: drop the connections inherited from the parent; return how many.

    Only the current thread's connections are looked at: after a fork the child runs only the
    thread that called ``fork()``, and Django keeps connections per thread. Call it first thing in
    the child (Celery's ``worker_process_init``, RQ's work horse...), before any query, and never
    in a process that did not just fork: it would drop that process's own live connections.

    No network I/O happens, so the parent's sessions carry on undisturbed. The child's next query
    opens its own connection through Django (with Django's usual session setup). With
    ``reset_stats`` (the default) the counters start again from zero, so that ``freshconn.stats()``
    in the child describes the child only.
    """
    dropped = 0
    devnull = -1
    try:
        for conn in connections.all(initialized_only=True):
            raw = conn.connection
            if raw is None:
                continue
            if devnull < 0:
                devnull = os.open(os.devnull, os.O_RDWR)
            _neutralize(raw, devnull)
            conn.connection = None
            conn.run_on_commit = []
            if conn.in_atomic_block:
                # What Django's own close() records: a child forked inside a transaction leaves
                # its atomic blocks without committing (nor rolling back) the parent's transaction.
                conn.closed_in_transaction = True
                conn.needs_rollback = True
            dropped += 1
    finally:
        if devnull >= 0:
            os.close(devnull)
    # Django's connection pools are per process, in a class attribute: the child gets its own.
    pools = _pool.forget_inherited_pools(_unclosable, _state.raw_state)
    if reset_stats:
        _stats.reset_stats()
    if dropped or pools:
        logger.debug(
            "dropped %d connection(s) and %d pool(s) inherited from the parent process",
            dropped,
            pools,
            extra={"alias": None, "reason": "fork"},
        )
    return dropped


def _neutralize(raw: Any, devnull: int) -> None:
    fd = _drivers.for_connection(raw).fileno(raw)
    if fd is None or fd < 0:
        # No descriptor to redirect: keep the object alive for good rather than let its close or
        # finalizer speak on the parent's session. It leaks one descriptor in this child.
        _unclosable.append(raw)
        return
    # dup2 atomically replaces the child's copy of the socket with /dev/null: the same number stays
    # open (nothing else can be given it), the parent's copy is unaffected.
    os.dup2(devnull, fd)
    # The driver's close now sends its quit message to /dev/null (a write succeeds there, a send()
    # fails with ENOTSOCK, which drivers ignore while closing): nothing reaches the network. Then it
    # closes the descriptor number it owns: once, here, rather than at some later garbage collection.
    with contextlib.suppress(Exception):
        raw.close()
