"""Freeze a worker's process group (SIGSTOP) at a moment none of its threads is inside a database exchange.

A fault injected while a worker is frozen lands "between queries" only if every thread of the
worker was stopped waiting for something other than its database: a sleep, a lock, a broker's
socket. A thread stopped running Python code may be between its loop's close_old_connections()
and the query that follows; a thread stopped waiting for a database reply has an exchange in
flight (its next query of the same iteration would meet the fault). Linux x86_64 numbers; on other
machines any system call is accepted.
"""

from __future__ import annotations

import contextlib
import os
import signal
import struct
import time
from collections.abc import Iterator
from pathlib import Path

__all__ = ["frozen_between_queries"]

_SLEEPS = {35, 61, 202, 230, 247}  # nanosleep, wait4, futex, clock_nanosleep, waitid
_READS = {0, 45, 47}  # read, recvfrom, recvmsg: the fd is the first argument
_POLLS = {7, 271}  # poll, ppoll: an array of struct pollfd
_SELECTS = {23, 270}  # select, pselect6: nfds, then the read set
_EPOLLS = {232, 281}  # epoll_wait, epoll_pwait: the epoll fd


def _group(pgid: int) -> list[int]:
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                # The fields after the command's closing parenthesis: state, ppid, pgrp...
                if int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[2]) == pgid:
                    members.append(int(entry))
    return members


def _db_fds(pid: int, port: int) -> set[int]:
    """The file descriptors of ``pid`` that are TCP sockets connected to ``port``."""
    inodes = set()
    for table in ("tcp", "tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
                fields = line.split()
                if int(fields[2].rsplit(":", 1)[1], 16) == port:
                    inodes.add(fields[9])
    fds = set()
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{pid}/fd/{fd}")[len("socket:[") : -1] in inodes:
                    fds.add(int(fd))
    return fds


def _memory(pid: int, address: int, size: int) -> bytes:
    with open(f"/proc/{pid}/mem", "rb") as mem:
        mem.seek(address)
        return mem.read(size)


def _waits_on_db(pid: int, call: int, args: list[int], db: set[int]) -> bool:
    if call in _READS:
        return args[0] in db
    if call in _POLLS:
        raw = _memory(pid, args[0], 8 * args[1])
        return any(struct.unpack_from("i", raw, 8 * i)[0] in db for i in range(args[1]))
    if call in _SELECTS:
        if not args[1]:
            return False
        bits = int.from_bytes(_memory(pid, args[1], 8 * ((args[0] + 63) // 64)), "little")
        return any(bits >> fd & 1 for fd in db)
    # epoll: the descriptors it watches are listed in its fdinfo.
    text = Path(f"/proc/{pid}/fdinfo/{args[0]}").read_text()
    return any(int(line.split()[1]) in db for line in text.splitlines() if line.startswith("tfd:"))


def _quiet(pgid: int, port: int) -> bool | None:
    """Whether every thread of the stopped group waits for something else than its database; None: not stopped yet."""
    x86 = os.uname().machine == "x86_64"
    for pid in _group(pgid):
        db = _db_fds(pid, port)
        with contextlib.suppress(OSError):
            for tid in os.listdir(f"/proc/{pid}/task"):
                try:
                    state = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()[0]
                    syscall = Path(f"/proc/{pid}/task/{tid}/syscall").read_text().split()
                except OSError:
                    continue  # the thread just ended
                if state in ("Z", "X"):
                    continue
                if state != "T":
                    return None
                if not syscall or syscall[0] in ("-1", "running"):
                    return False  # stopped in user space: running Python code
                if not x86:
                    continue
                call, args = int(syscall[0]), [int(a, 16) for a in syscall[1:7]]
                if call in _SLEEPS:
                    continue
                if call not in _READS | _POLLS | _SELECTS | _EPOLLS:
                    return False  # stopped right after doing something (a write, a send)
                if call == 7 and args[2] == 0:
                    return False  # poll() with no timeout: a check, not a wait
                try:
                    if _waits_on_db(pid, call, args, db):
                        return False
                except (OSError, ValueError, IndexError, struct.error):
                    return False
    return True


@contextlib.contextmanager
def frozen_between_queries(pgid: int, db_port: int, tries: int = 200) -> Iterator[bool]:
    """Keep process group ``pgid`` stopped, frozen when none of its threads talks to ``db_port``.

    Retries the freeze (a moment of the worker's rhythm later each time) up to ``tries`` times; yields
    whether such a moment was found (if not, the group is frozen anyway). SIGCONT at exit.
    """
    found = False
    for attempt in range(tries):
        os.killpg(pgid, signal.SIGSTOP)
        settle = time.monotonic() + 1.0
        while (quiet := _quiet(pgid, db_port)) is None and time.monotonic() < settle:
            time.sleep(0.005)  # the stop takes a moment to reach every thread
        if quiet:
            found = True
            break
        os.killpg(pgid, signal.SIGCONT)
        time.sleep(0.01 + 0.007 * (attempt % 5))
    else:
        os.killpg(pgid, signal.SIGSTOP)
    try:
        yield found
    finally:
        os.killpg(pgid, signal.SIGCONT)
