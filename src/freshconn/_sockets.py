"""Bounding a liveness check on a TCP socket the driver owns, whatever timeouts the user configured.

A ping on a connection whose path silently drops packets (a NAT or firewall that forgot the flow)
would wait forever: the request is never acknowledged and no error ever arrives. Linux's
TCP_USER_TIMEOUT makes the kernel abort the connection once sent data has stayed unacknowledged
that long, which turns the hang into an ordinary error inside the driver's own read or write.
It is set only for the duration of the check and restored afterwards, so the user's own query
semantics are untouched.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator

_TCP_USER_TIMEOUT = getattr(socket, "TCP_USER_TIMEOUT", 18)  # 18 on Linux


@contextlib.contextmanager
def bounded(fd: int | None, seconds: float) -> Iterator[None]:
    """Within the block, unacknowledged data on ``fd`` aborts the connection after ``seconds``."""
    if fd is None or seconds <= 0:
        yield
        return
    try:
        # fromfd() duplicates the descriptor: closing our object leaves the driver's socket open,
        # and socket options set through the duplicate apply to the one shared socket.
        sock = socket.fromfd(fd, socket.AF_INET, socket.SOCK_STREAM)
    except OSError:
        yield
        return
    with sock:
        previous: int | None = None
        try:
            # fromfd() above states AF_INET, so sock.family always says so: only the kernel can tell a
            # Unix socket, by refusing TCP options with an OSError.
            previous = sock.getsockopt(socket.IPPROTO_TCP, _TCP_USER_TIMEOUT)
            sock.setsockopt(socket.IPPROTO_TCP, _TCP_USER_TIMEOUT, max(1, int(seconds * 1000)))
        except OSError:
            previous = None  # a Unix socket, or no TCP_USER_TIMEOUT here: nothing can black-hole it
        try:
            yield
        finally:
            if previous is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.IPPROTO_TCP, _TCP_USER_TIMEOUT, previous)
