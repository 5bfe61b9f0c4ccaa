"""The soak's workers: threads that drain a Redis reliable queue, supervised like processes.

Each message is taken with ``BLMOVE jobs → processing:<worker>``, handled, then acknowledged
(removed from ``processing``) only after its transaction committed; a message whose handling
failed goes back to the head of ``jobs`` (redelivered). Its transaction: a SELECT, an INSERT
keyed by the message id (UNIQUE), a counter UPDATE, in ``transaction.atomic()``.

Two loops, the same handler:

- ``freshconn``: the README's shape, ``for m in freshconn.each(queue)`` around a handler decorated
  with ``@freshconn.unit_of_work(retries=3)``. It catches what an application must handle: an
  ``IntegrityError`` (the UNIQUE key stopped a replay: acknowledged, and counted, because with
  freshconn it must never happen) and ``AmbiguousCommitError`` (reconciled as docs/retries.md
  says: ``wait_until_settled()``, then look for the row; acknowledged if it is there, else
  redelivered).
- ``control``: the plain Django loop, no freshconn, same handler; it catches only the
  ``IntegrityError`` of a replay.

Anything else that escapes a loop ends that worker as an uncaught exception ends a process: the
supervisor counts a restart, puts its unacknowledged message back in the queue, closes its
connections (a dead process's sockets close) and starts a new worker thread after 0.1 s.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger("soak")

JOBS = "soak:jobs"
RESTART_PAUSE = 0.1


def processing_key(wid: int) -> str:
    return f"soak:processing:{wid}"


@dataclass(frozen=True)
class Message:
    raw: bytes
    msg_id: str
    bucket: int
    produced_at: float


def encode(index: int, produced_at: float) -> str:
    return f"m{index:06d}|{produced_at:.6f}"


def decode(raw: bytes) -> Message:
    from soak.models import BUCKETS

    msg_id, produced = raw.decode().split("|")
    return Message(raw, msg_id, int(msg_id[1:]) % BUCKETS, float(produced))


def backend_id(raw: Any) -> int | None:
    """The server's id of a raw connection's session, read from the driver (no round trip)."""
    for name in ("thread_id", "get_backend_pid"):  # mysqlclient and PyMySQL; psycopg2
        method = getattr(raw, name, None)
        if method is not None:
            return int(method())
    info = getattr(raw, "info", None)  # psycopg 3
    return int(info.backend_pid) if info is not None else None


def short_error(exc: BaseException) -> str:
    """A secret-free label of an exception: its class and code (never its full message)."""
    code: Any = None
    for e in (exc, exc.__cause__):
        if e is None:
            continue
        args = getattr(e, "args", ())
        if args and isinstance(args[0], int):
            code = args[0]
            break
        state = getattr(e, "sqlstate", None) or getattr(e, "pgcode", None)
        if state:
            code = state
            break
    name = type(exc).__name__
    return f"{name} {code}" if code is not None else name


@dataclass
class Ledger:
    """What the workers did, as the harness saw it. Every method is thread-safe."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    produced: dict[str, float] = field(default_factory=dict)
    first_ack: dict[str, float] = field(default_factory=dict)
    acks: int = 0
    deliveries: collections.Counter[str] = field(default_factory=collections.Counter)
    replays_stopped: list[dict[str, Any]] = field(default_factory=list)
    ambiguous: list[dict[str, Any]] = field(default_factory=list)
    restarts: list[dict[str, Any]] = field(default_factory=list)
    retries: collections.Counter[str] = field(default_factory=collections.Counter)
    redelivered: int = 0
    #: Per worker: the message it is handling and its current server session (for the injector).
    current: dict[int, str | None] = field(default_factory=dict)
    sessions: dict[int, int | None] = field(default_factory=dict)
    #: The fault in progress, set by the injector: events are attributed to it.
    fault: str = "none"

    def deliver(self, wid: int, msg: Message) -> int:
        with self.lock:
            self.deliveries[msg.msg_id] += 1
            self.current[wid] = msg.msg_id
            return self.deliveries[msg.msg_id]

    def acked(self, wid: int, msg: Message) -> None:
        now = time.monotonic()
        with self.lock:
            self.acks += 1
            self.first_ack.setdefault(msg.msg_id, now)
            self.current[wid] = None

    def event(self, bucket: list[dict[str, Any]], **info: Any) -> None:
        with self.lock:
            bucket.append({"fault": self.fault, **info})

    def retried(self) -> None:
        with self.lock:
            self.retries[self.fault.split("#")[0]] += 1

    def unique_acked(self) -> int:
        with self.lock:
            return len(self.first_ack)


class Pool:
    """``workers`` supervised worker threads running the ``mode`` loop ("freshconn" or "control")."""

    def __init__(self, redis_url: str, ledger: Ledger, mode: str, workers: int = 1) -> None:
        self.redis_url, self.ledger, self.mode, self.workers = redis_url, ledger, mode, workers
        self.stopping = threading.Event()
        self.finished = [threading.Event() for _ in range(workers)]
        self._requests: dict[int, tuple[Callable[[], Any], threading.Event, list[Any]]] = {}
        self._req_lock = threading.Lock()
        self._tls = threading.local()
        self._threads: list[threading.Thread] = []

    # -- set-up ---------------------------------------------------------------------------------

    def start(self) -> None:
        from django.db.backends.signals import connection_created

        connection_created.connect(self._on_connect, dispatch_uid="soak.sessions", weak=False)
        if self.mode == "freshconn":
            from freshconn.signals import unit_retried

            unit_retried.connect(self._on_retry, dispatch_uid="soak.retries", weak=False)
        for wid in range(self.workers):
            self.ledger.sessions[wid] = None
            self._spawn(wid)

    def _on_connect(self, sender: Any, connection: Any, **kwargs: Any) -> None:
        wid = getattr(self._tls, "wid", None)
        if wid is not None and connection.alias == "default":
            self.ledger.sessions[wid] = backend_id(connection.connection)

    def _on_retry(self, sender: Any, **kwargs: Any) -> None:
        self.ledger.retried()

    def _spawn(self, wid: int) -> None:
        thread = threading.Thread(target=self._thread_main, args=(wid,), name=f"soak-worker-{wid}", daemon=True)
        self._threads.append(thread)
        thread.start()

    # -- requests run by a worker thread between two messages --------------------------------------

    def run_in_worker(self, wid: int, fn: Callable[[], Any], timeout: float = 30.0) -> Any:
        """Run ``fn`` in worker ``wid``'s thread, between two messages (outside any unit); return its result."""
        done = threading.Event()
        box: list[Any] = []
        with self._req_lock:
            self._requests[wid] = (fn, done, box)
        if not done.wait(timeout):
            with self._req_lock:
                self._requests.pop(wid, None)
            raise TimeoutError(f"worker {wid} did not run the request within {timeout:g}s")
        if box and isinstance(box[0], BaseException):
            raise box[0]
        return box[0] if box else None

    def _run_request(self, wid: int) -> None:
        with self._req_lock:
            request = self._requests.pop(wid, None)
        if request is None:
            return
        fn, done, box = request
        try:
            box.append(fn())
        except Exception as exc:
            box.append(exc)
        finally:
            done.set()

    # -- the queue --------------------------------------------------------------------------------

    def _messages(self, wid: int, client: Any) -> Iterator[bytes]:
        key = processing_key(wid)
        while True:
            self._run_request(wid)
            raw = client.blmove(JOBS, key, 0.05, "LEFT", "RIGHT")
            if raw is None:
                if self.stopping.is_set():
                    return
                continue
            yield raw

    def _ack(self, client: Any, wid: int, msg: Message) -> None:
        client.lrem(processing_key(wid), 1, msg.raw)
        self.ledger.acked(wid, msg)

    def _redeliver(self, client: Any, wid: int, msg: Message) -> None:
        pipe = client.pipeline(transaction=True)
        pipe.lrem(processing_key(wid), 1, msg.raw)
        pipe.lpush(JOBS, msg.raw)
        pipe.execute()
        with self.ledger.lock:
            self.ledger.redelivered += 1
            self.ledger.current[wid] = None

    # -- the two loops ----------------------------------------------------------------------------

    def _loop_freshconn(self, wid: int, client: Any) -> None:
        from django.db import IntegrityError

        import freshconn
        from soak.models import Applied

        handle = freshconn.unit_of_work(retries=3)(apply)

        @freshconn.unit_of_work(retries=3)
        def is_applied(msg_id: str) -> bool:
            applied: bool = Applied.objects.filter(msg_id=msg_id).exists()
            return applied

        for raw in freshconn.each(self._messages(wid, client)):
            msg = decode(raw)
            delivery = self.ledger.deliver(wid, msg)
            try:
                handle(msg, delivery)
            except IntegrityError:
                self.ledger.event(self.ledger.replays_stopped, msg_id=msg.msg_id, delivery=delivery)
                self._ack(client, wid, msg)
            except freshconn.AmbiguousCommitError as exc:
                # docs/retries.md: wait until the old session is gone, then the outcome is final. A row
                # that is there is there for good; an absent one after a False is made safe by the key.
                started = time.monotonic()
                settled = exc.wait_until_settled(timeout=60.0)
                settle_s = time.monotonic() - started
                applied = is_applied(msg.msg_id)
                self.ledger.event(
                    self.ledger.ambiguous,
                    msg_id=msg.msg_id,
                    backend_id=exc.backend_id,
                    session_now=self.ledger.sessions.get(wid),
                    settled=settled,
                    settle_s=round(settle_s, 3),
                    applied=applied,
                    cause=short_error(exc.__cause__) if exc.__cause__ else None,
                )
                if applied:
                    self._ack(client, wid, msg)
                else:
                    self._redeliver(client, wid, msg)
            else:
                self._ack(client, wid, msg)

    def _loop_control(self, wid: int, client: Any) -> None:
        from django.db import IntegrityError

        for raw in self._messages(wid, client):
            msg = decode(raw)
            delivery = self.ledger.deliver(wid, msg)
            try:
                apply(msg, delivery)
            except IntegrityError:
                self.ledger.event(self.ledger.replays_stopped, msg_id=msg.msg_id, delivery=delivery)
                self._ack(client, wid, msg)
            else:
                self._ack(client, wid, msg)

    def _thread_main(self, wid: int) -> None:
        from django.db import connections

        import redis

        self._tls.wid = wid
        client = redis.Redis.from_url(self.redis_url)
        loop = self._loop_freshconn if self.mode == "freshconn" else self._loop_control
        try:
            loop(wid, client)
        except BaseException as exc:
            logger.error("worker %d died (%s)", wid, short_error(exc), exc_info=True)
            self.ledger.event(self.ledger.restarts, worker=wid, error=short_error(exc))
            # What a process supervisor and a reliable queue do together: the message the dead
            # worker held goes back to the queue, and a new worker starts.
            while client.lmove(processing_key(wid), JOBS, "RIGHT", "LEFT") is not None:
                pass
            with self.ledger.lock:
                self.ledger.current[wid] = None
            time.sleep(RESTART_PAUSE)
            self._spawn(wid)
            return
        finally:
            for conn in connections.all(initialized_only=True):
                with contextlib.suppress(Exception):
                    conn.close()
                conn.connection = None
            client.close()
        self.finished[wid].set()

    # -- the end ----------------------------------------------------------------------------------

    def drained(self, produced: int) -> bool:
        return self.ledger.unique_acked() >= produced

    def stop(self, timeout: float = 120.0) -> None:
        self.stopping.set()
        deadline = time.monotonic() + timeout
        for event in self.finished:
            event.wait(max(0.0, deadline - time.monotonic()))


def apply(msg: Message, delivery: int) -> None:
    """The message's transaction: a SELECT, an INSERT keyed by the message id (UNIQUE), a counter UPDATE."""
    from django.db import transaction
    from django.db.models import F

    from soak.models import Applied, Counter

    with transaction.atomic():
        Counter.objects.filter(pk=msg.bucket).values_list("n", flat=True).get()
        Applied.objects.create(msg_id=msg.msg_id, bucket=msg.bucket, delivery=delivery)
        Counter.objects.filter(pk=msg.bucket).update(n=F("n") + 1)
