"""What each adoption shape of docs/adoption.md costs and survives, as shipped and adopted, measured.

    .venv/bin/python -m benchmarks.adoption --driver psycopg      (one driver per process; about 4 min)

It starts a throwaway server (testbed), keeps Django's default ``CONN_MAX_AGE=0`` and no health
checks, and runs every shape twice in this process: as shipped (no freshconn in the loop) and
adopted (the one line of docs/adoption.md). For each: connects and pings per 1,000 busy messages
(back to back), per idle message (one after more than CHECK_AFTER_IDLE of silence) or idle tick
(every 2 s, nothing due), and whether the first message after a KILL of every session and after a
2 s server restart succeeds. Per-hour figures are extrapolated from those windows, as the table
says. Connects are counted with Django's ``connection_created`` signal, pings with freshconn's counters.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

DRIVERS = ("mysqlclient", "pymysql", "psycopg", "psycopg2")
BUSY = 1000
IDLE_GAP = 6.0  # seconds between idle messages: above CHECK_AFTER_IDLE (5 s)
IDLE_MESSAGES = 2
TICK = 2.0
IDLE_TICKS = 5
BUSY_RATE = 100  # messages per second in a "busy hour"
IDLE_RATE = 60  # messages per "idle hour" (one a minute)


def select_driver(driver: str) -> None:
    if driver == "pymysql":
        import pymysql

        pymysql.install_as_MySQLdb()
    elif driver == "psycopg2":
        sys.modules["psycopg"] = None  # type: ignore[assignment]  # Django then falls back to psycopg2


class Counts:
    """Connections opened (any thread), from Django's connection_created signal."""

    def __init__(self) -> None:
        self.connects = 0
        self.lock = threading.Lock()

    def __call__(self, **kwargs: Any) -> None:
        with self.lock:
            self.connects += 1


def pings() -> int:
    import freshconn

    return freshconn.stats().get("default", {}).get("pings", 0)


class Shape:
    """One adoption shape: ``run(pks)`` handles messages the shape's way; ``idle()`` its idle window."""

    name = ""
    adoption = ""
    idle_unit = "message"

    def __init__(self, adopted: bool) -> None:
        self.adopted = adopted

    def run(self, pks: list[int]) -> None:
        raise NotImplementedError

    def idle(self) -> int:
        """Run the idle window; return how many idle messages (or ticks) it contained."""
        for _ in range(IDLE_MESSAGES):
            time.sleep(IDLE_GAP)
            self.run([1])
        return IDLE_MESSAGES

    def close(self) -> None:
        pass


def handle(pk: int) -> None:
    from benchmarks.models import Item

    Item.objects.get(pk=pk)


class OwnLoop(Shape):
    name = "own loop"
    adoption = "`for m in freshconn.each(source):`"

    def run(self, pks: list[int]) -> None:
        import freshconn

        source: Iterator[int] = iter(pks)
        for pk in freshconn.each(source) if self.adopted else source:
            handle(pk)


class NotOwned(Shape):
    name = "loop you don't own"
    adoption = "`FRESHCONN = {'ADOPT_CLOSE_OLD_CONNECTIONS': True}`"

    def run(self, pks: list[int]) -> None:
        from django.db import close_old_connections

        # What db_worker, Django-Q2, django_dramatiq and huey's db_task do around each job.
        for pk in pks:
            close_old_connections()
            handle(pk)
            close_old_connections()


class Framework(Shape):
    name = "framework worker (in-process model of Celery >= 5.6)"
    adoption = "a unit per task, as `freshconn.contrib.celery.install(app)` does"

    def run(self, pks: list[int]) -> None:
        from django.db import connections

        import freshconn

        for pk in pks:
            if self.adopted:
                with freshconn.unit_of_work():
                    handle(pk)
            else:
                # Celery >= 5.6 closes every initialized connection before and after each task.
                connections.close_all()
                handle(pk)
                connections.close_all()


class Pool(Shape):
    name = "thread pool (4 threads)"
    adoption = "`freshconn.ThreadPoolExecutor(4)`"

    def __init__(self, adopted: bool) -> None:
        super().__init__(adopted)
        import freshconn

        cls = freshconn.ThreadPoolExecutor if adopted else concurrent.futures.ThreadPoolExecutor
        self.pool = cls(max_workers=4)

    def run(self, pks: list[int]) -> None:
        for future in [self.pool.submit(handle, pk) for pk in pks]:
            future.result()

    def close(self) -> None:
        self.pool.shutdown()


class Tick(Pool):
    name = "tick loop (poll every 2 s, pool of 4)"
    adoption = "`with freshconn.unit_of_work():` per tick + `freshconn.ThreadPoolExecutor`"
    idle_unit = "tick"

    def tick(self, due: Callable[[], list[int]]) -> None:
        import freshconn

        if self.adopted:
            with freshconn.unit_of_work():
                pks = due()
        else:
            pks = due()
        Pool.run(self, pks)

    def run(self, pks: list[int]) -> None:
        from benchmarks.models import Item

        # One tick: ask the database what is due (here: these rows), hand each to the pool.
        self.tick(lambda: list(Item.objects.filter(pk__in=pks).values_list("pk", flat=True)))

    def idle(self) -> int:
        from benchmarks.models import Item

        for _ in range(IDLE_TICKS):
            time.sleep(TICK)
            self.tick(lambda: list(Item.objects.filter(qty__lt=0).values_list("pk", flat=True)))  # nothing due
        return IDLE_TICKS


SHAPES: list[type[Shape]] = [OwnLoop, Tick, Pool, Framework, NotOwned]


def survives(shape: Shape, fault: Callable[[], threading.Timer | None]) -> bool:
    """Whether the first messages after ``fault`` succeed (the server comes back 2 s after a restart)."""
    timer = fault()
    try:
        shape.run([1, 2, 3])
    except Exception:
        return False
    finally:
        if timer is not None:
            timer.join()
    return True


def measure(shape_cls: type[Shape], adopted: bool, server: Any, counts: Counts) -> dict[str, Any]:
    from django.db import connections
    from django.test.utils import override_settings

    import freshconn

    settings = {"ADOPT_CLOSE_OLD_CONNECTIONS": True} if adopted and shape_cls is NotOwned else {}
    with override_settings(FRESHCONN=settings):
        with contextlib.suppress(Exception):  # the previous shape may have left it broken
            connections["default"].close()
        shape = shape_cls(adopted)
        try:
            shape.run(list(range(1, 11)))  # warm: every thread connected once
            counts.connects, p0 = 0, pings()
            shape.run([1 + i % 100 for i in range(BUSY)])
            busy = (counts.connects, pings() - p0)
            counts.connects, p0 = 0, pings()
            n = shape.idle()
            idle = (counts.connects / n, (pings() - p0) / n)
            after_kill = survives(shape, lambda: kill_all(server))
            after_restart = survives(shape, lambda: restart_server(server))
        finally:
            shape.close()
            freshconn.reset_stats()
    return {"shape": shape, "busy": busy, "idle": idle, "kill": after_kill, "restart": after_restart}


def kill_all(server: Any) -> None:
    """KILL / pg_terminate_backend every session of the app user."""
    from django.db import connection

    if connection.vendor == "mysql":
        ids = server.admin_sql("SELECT ID FROM information_schema.PROCESSLIST WHERE USER = 'app'").split()
        for session in ids:
            with contextlib.suppress(Exception):  # it ended by itself meanwhile
                server.admin_sql(f"KILL {session}")
    else:
        server.admin_sql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = 'app'")
    time.sleep(0.3)  # let the FINs arrive


def restart_server(server: Any) -> threading.Timer:
    server.down()
    timer = threading.Timer(2.0, server.up)
    timer.start()
    return timer


def per_hour(shape: Shape, value: float) -> float:
    return value * (3600 / TICK if shape.idle_unit == "tick" else IDLE_RATE)


def fmt(x: float) -> str:
    return f"{x:,.0f}" if x >= 10 or x == int(x) else f"{x:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--driver", choices=DRIVERS, default="psycopg")
    args = parser.parse_args()
    select_driver(args.driver)

    import django
    from django.conf import settings
    from testbed.servers import MariaDB, PostgreSQL

    vendor = "mysql" if args.driver in ("mysqlclient", "pymysql") else "postgresql"
    server = MariaDB() if vendor == "mysql" else PostgreSQL()
    server.start()
    try:
        settings.configure(
            SECRET_KEY="benchmarks-only",
            USE_TZ=True,
            INSTALLED_APPS=["freshconn", "benchmarks"],
            # Django's defaults: a connection per request, no health checks.
            DATABASES={"default": server.django_settings(CONN_MAX_AGE=0)},
            DEFAULT_AUTO_FIELD="django.db.models.AutoField",
            LOGGING_CONFIG=None,
        )
        django.setup()
        from django.db import connection
        from django.db.backends.signals import connection_created

        from benchmarks.models import Item

        with connection.schema_editor() as editor:
            editor.create_model(Item)
        Item.objects.bulk_create([Item(pk=pk, name=f"item-{pk}", qty=pk) for pk in range(1, 101)])
        connection.close()
        counts = Counts()
        connection_created.connect(counts, weak=False)
        print(f"driver {args.driver}, Django {django.get_version()}, CONN_MAX_AGE=0, no CONN_HEALTH_CHECKS\n")
        print(
            "| shape | as shipped / adopted | connects per 1,000 busy | pings per 1,000 busy "
            f"| connects per busy hour ({BUSY_RATE}/s) | connects per idle hour | pings per idle hour "
            "| first message after KILL | after a 2 s restart |"
        )
        print("|---|---|---|---|---|---|---|---|---|")
        for shape_cls in SHAPES:
            for adopted in (False, True):
                r = measure(shape_cls, adopted, server, counts)
                busy_c, busy_p = r["busy"]
                idle_c, idle_p = r["idle"]
                label = shape_cls.adoption if adopted else "as shipped"
                print(
                    f"| {shape_cls.name} | {label} | {busy_c} | {busy_p} | {fmt(busy_c * BUSY_RATE * 3.6)} "
                    f"| {fmt(per_hour(r['shape'], idle_c))} | {fmt(per_hour(r['shape'], idle_p))} "
                    f"| {'ok' if r['kill'] else 'fails'} | {'ok' if r['restart'] else 'fails'} |",
                    flush=True,
                )
    finally:
        server.stop()


if __name__ == "__main__":
    main()
