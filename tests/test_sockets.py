"""freshconn._sockets.bounded on real sockets of this machine: TCP_USER_TIMEOUT set for the block, then restored."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from freshconn._sockets import _TCP_USER_TIMEOUT, bounded


@pytest.fixture
def tcp_pair() -> Iterator[socket.socket]:
    """The client side of a real loopback TCP connection."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        client = socket.create_connection(server.getsockname())
        peer, _ = server.accept()
        with client, peer:
            yield client


def user_timeout(sock: socket.socket) -> int:
    return sock.getsockopt(socket.IPPROTO_TCP, _TCP_USER_TIMEOUT)


def test_the_timeout_applies_inside_the_block_and_the_previous_value_comes_back(tcp_pair: socket.socket) -> None:
    """Inside bounded(fd, 1.5) the socket aborts after 1,500 ms unacknowledged; after it, the user's value is back."""
    tcp_pair.setsockopt(socket.IPPROTO_TCP, _TCP_USER_TIMEOUT, 7000)
    with bounded(tcp_pair.fileno(), 1.5):
        assert user_timeout(tcp_pair) == 1500
    assert user_timeout(tcp_pair) == 7000


def test_a_sub_millisecond_bound_still_sets_one_millisecond(tcp_pair: socket.socket) -> None:
    """A bound that rounds to 0 ms would mean "no timeout" to the kernel: it is raised to 1 ms instead."""
    with bounded(tcp_pair.fileno(), 0.0001):
        assert user_timeout(tcp_pair) == 1
    assert user_timeout(tcp_pair) == 0


def test_the_previous_value_comes_back_when_the_block_raises(tcp_pair: socket.socket) -> None:
    """An error inside the block (the ping failed) still restores the socket's own value."""
    with pytest.raises(ConnectionError), bounded(tcp_pair.fileno(), 2):
        raise ConnectionError("ping failed")
    assert user_timeout(tcp_pair) == 0


@pytest.mark.parametrize("fd_seconds", [(None, 1.0), (5, 0.0), (5, -1.0)])
def test_no_descriptor_or_no_bound_does_nothing(fd_seconds: tuple[int | None, float]) -> None:
    """No socket known (SQLite, a driver that hides it) or a bound of 0: the block runs untouched."""
    fd, seconds = fd_seconds
    ran = []
    with bounded(fd, seconds):
        ran.append(1)
    assert ran == [1]


def test_a_unix_socket_is_left_alone() -> None:
    """A connection over a Unix socket cannot be black-holed: the block runs, no option is touched."""
    left, right = socket.socketpair()
    with left, right, bounded(left.fileno(), 1):
        left.sendall(b"x")
        assert right.recv(1) == b"x"


def test_a_closed_descriptor_does_not_break_the_check() -> None:
    """A descriptor the driver already closed: the block still runs (its own query reports the real error)."""
    sock = socket.socket()
    fd = sock.fileno()
    sock.close()
    ran = []
    with bounded(fd, 1):
        ran.append(1)
    assert ran == [1]
