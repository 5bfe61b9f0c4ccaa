"""Where freshconn's per-unit instructions go: its busy path, piece by piece, and the CPython operations it uses.

    python -m benchmarks.breakdown --driver D --out FILE [--n 2000]   (DATABASES entry as JSON on stdin)

Run under callgrind exactly like ``benchmarks.instructions`` (one dump per case, see ``command()``
there): each case repeats one operation ``n`` times inside ``sys.call_tracing``; the table shows
instructions per operation, minus an empty loop of the same length. Runs in the main thread, on
its own connection to the driver's server, which freshconn manages (a unit ran on it first).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import select
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

#: (case, what it measures), in the order of the table; "queries_*" cases are per query, not per loop turn.
DESCRIPTIONS: dict[str, str] = {
    "empty_loop": "an empty loop turn (subtracted from every other case)",
    "tls_read": "read an attribute of a threading.local subclass instance (as freshconn's per-thread state)",
    "tls_read_class_default": "the same, an attribute that falls back to a class-level default",
    "tls_write": "write an attribute of a threading.local subclass instance",
    "slot_read": "read a __slots__ attribute of a plain object",
    "get_ident": "threading.get_ident()",
    "monotonic": "time.monotonic()",
    "call_kwonly_defaults": "call f(x) where f has keyword-only parameters with defaults",
    "call_positional_defaults": "call f(x) where f has positional parameters with defaults",
    "new_with_init": "create a 9-slot object through a Python __init__",
    "new_without_init": "create the same with object.__new__ and 9 slot stores",
    "dict_items_loop": "for alias, conn in d.items() over one entry",
    "tuple_loop": "for conn in t over a one-element tuple",
    "getattr_default": "getattr(wrapper, name, None)",
    "attr_read": "wrapper.attribute (an instance attribute)",
    "poll_syscall": "select.poll().poll(0) on the connection's socket (user space only: the kernel is not counted)",
    "count_unit": "freshconn._stats.count_unit(None)",
    "begin": "freshconn._lifecycle.begin(None, True): start of a back-to-back unit (checks skipped)",
    "begin_poll": "the same after a pause: every connection checked, the socket polled",
    "end": "freshconn._lifecycle.end(None, None): end of a unit that raised nothing",
    "open_close": "freshconn._units.close(_open(None), None): a whole busy unit, handle included",
    "each": "for _ in freshconn.each(range(n)): a busy unit per item",
    "each_poll": "the same, the socket polled at every unit",
    "with_unit_of_work": "with unit_of_work(): pass (one UnitOfWork object)",
    "queries_no_wrapper": "one ORM primary-key get(), no execute wrapper (per query)",
    "queries_noop_wrapper": "the same with a no-op execute wrapper: Django's wrapper machinery (per query)",
    "queries_hook_as_wrapper": (
        "the same with freshconn's statement hook run by Django's machinery (as for a debug cursor, per query)"
    ),
    "queries_hook": "the same with freshconn's statement hook, as freshconn runs it (per query)",
}


def _cases(conn: Any, n: int, m: int) -> dict[str, Callable[[], None]]:
    import freshconn
    from benchmarks.models import Item
    from freshconn import _django, _lifecycle, _policy, _state, _stats, _units

    r = range(n)
    get = Item.objects.get

    class Local(threading.local):
        default = 0

        def __init__(self) -> None:
            self.value = 1

    class Slots:
        __slots__ = ("a", "b", "c", "d", "e", "f", "g", "h", "i")

        def __init__(self, a: Any, b: Any, c: Any, d: Any) -> None:
            self.a, self.b, self.c, self.d = a, b, c, d
            self.e = self.f = self.g = False
            self.h = self.i = None

    tl, sl = Local(), Slots(1, 2, 3, 4)
    new = object.__new__

    def kwonly(scope: Any, owner: Any = None, *, tracking: bool = False, acting: bool = False) -> None:
        pass

    def positional(scope: Any, owner: Any = None, tracking: bool = False, acting: bool = False) -> None:
        pass

    mono, ident = time.monotonic, threading.get_ident
    one_dict, one_tuple = {"default": conn}, (conn,)
    poller = select.poll()
    poller.register(_fd(conn), select.POLLIN)
    uow = freshconn.unit_of_work()
    lc_begin, lc_end, open_, close = _lifecycle.begin, _lifecycle.end, _units._open, _units.close

    @contextlib.contextmanager
    def hook_off(wrapper: bool = True) -> Iterator[None]:
        # freshconn's fast cursor (make_cursor) and its statement hook (the execute wrapper).
        if wrapper:
            conn.execute_wrappers.remove(_state.statement_hook)
        own = conn.__dict__.pop(_django.MAKE_CURSOR, None)
        try:
            yield
        finally:
            if wrapper:
                conn.execute_wrappers.insert(0, _state.statement_hook)
            if own is not None:
                setattr(conn, _django.MAKE_CURSOR, own)

    def noop_wrapper(execute: Any, sql: Any, params: Any, many: Any, context: Any) -> Any:
        return execute(sql, params, many, context)

    def threshold(value: float) -> Callable[[Callable[[], None]], Callable[[], None]]:
        def wrap(fn: Callable[[], None]) -> Callable[[], None]:
            def run() -> None:
                # As benchmarks.worker does: inf makes every unit back to back (both thresholds, in a
                # core that has SOCKET_CHECK_IDLE), 0 none.
                # Any: some cores have no SOCKET_CHECK_IDLE.
                policy: Any = _policy
                saved = {
                    k: getattr(policy, k) for k in ("SOCKET_CHECK_AFTER", "SOCKET_CHECK_IDLE") if hasattr(policy, k)
                }
                policy.SOCKET_CHECK_AFTER = value
                if value == math.inf and "SOCKET_CHECK_IDLE" in saved:
                    policy.SOCKET_CHECK_IDLE = value
                try:
                    fn()
                finally:
                    for k, v in saved.items():
                        setattr(policy, k, v)

            return run

        return wrap

    def empty_loop() -> None:
        for _ in r:
            pass

    def tls_read() -> None:
        for _ in r:
            tl.value  # noqa: B018

    def tls_read_class_default() -> None:
        for _ in r:
            tl.default  # noqa: B018

    def tls_write() -> None:
        for _ in r:
            tl.value = 1

    def slot_read() -> None:
        for _ in r:
            sl.a  # noqa: B018

    def get_ident() -> None:
        for _ in r:
            ident()

    def monotonic() -> None:
        for _ in r:
            mono()

    def call_kwonly_defaults() -> None:
        for _ in r:
            kwonly(None)

    def call_positional_defaults() -> None:
        for _ in r:
            positional(None)

    def new_with_init() -> None:
        for _ in r:
            Slots(None, None, True, 1)

    def new_without_init() -> None:
        for _ in r:
            h = new(Slots)
            h.a = None
            h.b = None
            h.c = True
            h.d = 1
            h.e = False
            h.f = False
            h.g = False
            h.h = None
            h.i = None

    def dict_items_loop() -> None:
        for _ in r:
            for _alias, _conn in one_dict.items():
                pass

    def tuple_loop() -> None:
        for _ in r:
            for _conn in one_tuple:
                pass

    def getattr_default() -> None:
        for _ in r:
            getattr(conn, "_freshconn_state", None)

    def attr_read() -> None:
        for _ in r:
            conn.connection  # noqa: B018

    def poll_syscall() -> None:
        for _ in r:
            poller.poll(0)

    def count_unit() -> None:
        for _ in r:
            _stats.count_unit(None)

    def marked(until: float) -> None:
        # As a previous unit's end() leaves it (older cores have no such mark: harmless there).
        thread: Any = _state.tls.ctx
        thread.clean_until, thread.clean_scope = until, None

    @threshold(math.inf)
    def begin() -> None:
        marked(math.inf)
        for _ in r:
            lc_begin(None, True)

    @threshold(0.0)
    def begin_poll() -> None:
        marked(-math.inf)
        for _ in r:
            lc_begin(None, True)

    def end() -> None:
        for _ in r:
            lc_end(None, None)

    @threshold(math.inf)
    def open_close() -> None:
        for _ in r:
            close(open_(None), None)

    @threshold(math.inf)
    def each() -> None:
        for _ in freshconn.each(r):
            pass

    @threshold(0.0)
    def each_poll() -> None:
        for _ in freshconn.each(r):
            pass

    @threshold(math.inf)
    def with_unit_of_work() -> None:
        for _ in r:
            with uow:
                pass

    def queries_no_wrapper() -> None:
        with hook_off():
            for _ in range(m):
                get(pk=1)

    def queries_noop_wrapper() -> None:
        with hook_off():
            conn.execute_wrappers.insert(0, noop_wrapper)
            try:
                for _ in range(m):
                    get(pk=1)
            finally:
                conn.execute_wrappers.remove(noop_wrapper)

    def queries_hook_as_wrapper() -> None:
        with hook_off(wrapper=False):
            for _ in range(m):
                get(pk=1)

    def queries_hook() -> None:
        for _ in range(m):
            get(pk=1)

    local_names = dict(locals())
    return {name: local_names[name] for name in DESCRIPTIONS}


def _fd(conn: Any) -> int:
    from freshconn import _drivers

    raw = conn.connection
    fd = _drivers.for_connection(raw).fileno(raw)
    if fd is None:
        raise RuntimeError("no socket to poll")
    return int(fd)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.breakdown")
    parser.add_argument("--driver", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--n", type=int, default=2000, help="operations per case")
    parser.add_argument("--queries", type=int, default=150, help="queries per query case")
    args = parser.parse_args(argv)

    from benchmarks.child import Bench, configure, select_driver

    db = json.loads(sys.stdin.read())
    select_driver(args.driver)
    configure(db)
    bench = Bench(args.driver)
    bench.create_table()

    import freshconn

    for _ in freshconn.each([1]):
        bench.Item.objects.get(pk=1)  # freshconn now manages this thread's connection
    cases = _cases(bench.conn, args.n, args.queries)
    real = sys.call_tracing
    for fn in cases.values():  # warm-up, not counted
        fn()
    order = []
    for name, fn in cases.items():
        gc.collect()
        real(fn, ())
        order.append({"case": name, "units": args.queries if name.startswith("queries") else args.n})
    bench.conn.close()
    with open(args.out, "w") as fh:
        json.dump({"driver": args.driver, "cases": order}, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
