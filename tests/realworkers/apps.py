"""The stats reporter: every process of a real worker writes its freshconn counters to a file."""

from __future__ import annotations

import json
import os
import sys
import threading
import time

from django.apps import AppConfig

from . import STATS_DIR_ENV

#: Held around each stats() call. A fork waits for it (see _install_fork_hooks), so that no child
#: starts life with a lock freshconn's counters need held by a thread that no longer exists.
_lock = threading.Lock()
_PERIOD = 0.1


def _report(folder: str) -> None:
    import freshconn

    pid = os.getpid()
    path = os.path.join(folder, f"{pid}.json")
    seq = 0
    while True:
        with _lock:
            if os.getpid() != pid:
                return  # a forked child: its own reporter was started by the fork hook
            row = freshconn.stats().get("default", {})
        seq += 1
        tmp = f"{path}.tmp"
        with open(tmp, "w") as out:
            json.dump({"pid": pid, "seq": seq, "stats": row}, out)
        os.replace(tmp, path)  # readers never see half a file
        time.sleep(_PERIOD)


def _start(folder: str) -> None:
    threading.Thread(target=_report, args=(folder,), name="freshconn-test-stats", daemon=True).start()


def _after_fork_in_child(folder: str) -> None:
    global _lock
    _lock = threading.Lock()
    _start(folder)


def _before_fork() -> None:
    _lock.acquire()


def _after_fork_in_parent() -> None:
    _lock.release()


class RealWorkersConfig(AppConfig):
    name = "tests.realworkers"
    label = "realworkers"

    def ready(self) -> None:
        folder = os.environ.get(STATS_DIR_ENV)
        if not folder or "rundramatiq" in sys.argv:
            # rundramatiq replaces itself (execvp) with the dramatiq CLI, which never sets Django up
            # and never touches the database: only the worker processes it forks report.
            return
        os.register_at_fork(
            before=_before_fork,
            after_in_parent=_after_fork_in_parent,
            after_in_child=lambda: _after_fork_in_child(folder),
        )
        _start(folder)
