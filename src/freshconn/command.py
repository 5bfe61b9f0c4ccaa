"""``WorkerCommand``: a base class for long-running ``manage.py`` consumers.

A subclass says where messages come from (``messages()``) and what to do with one
(``handle_message()``); the base class runs each message in its own unit of work, stops
gracefully on SIGTERM/SIGINT (the unit in progress finishes and commits, then the loop ends,
every connection is closed and the command exits 0), and logs the effective connection
policy once at start-up.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Iterable
from types import FrameType
from typing import Any

from django.core.management.base import BaseCommand
from django.db import connections

from . import _audit, _outage, conf
from ._aliases import Using
from ._errors import ReconnectStopped
from ._unit import UnitOfWork

__all__ = ["WorkerCommand", "policy_summary"]

logger = logging.getLogger("freshconn")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def _driver_name(alias: str) -> str:
    # The one name freshconn uses for a driver everywhere (its distribution's), and its version.
    name = _audit.driver_name(alias)
    version = _audit.driver_version(alias)
    return f"{name} {version}" if version else name


def _max_age_text(value: float | None) -> str:
    if value is None:
        return "None (no lifetime limit)"
    if value == 0:
        return "0 (closed after every unit)"
    return f"{value:g}s"


def policy_summary(using: Using = None) -> str:
    """One line describing the effective policy: CHECK_AFTER_IDLE, then lifetime and driver per alias.

    Reads only settings and module names: it opens no connection and prints no credential.
    """
    cfg = conf.get()
    aliases = [using] if isinstance(using, str) else sorted(using) if using is not None else list(connections.settings)
    parts = [
        f"CHECK_AFTER_IDLE={cfg.check_after_idle:g}s, RECONNECT_TIMEOUT={cfg.reconnect_timeout:g}s"
        + (", ADOPT_CLOSE_OLD_CONNECTIONS" if cfg.adopt_close_old_connections else "")
    ]
    for alias in aliases:
        settings_dict = connections.settings[alias]
        vendor = connections[alias].vendor
        if vendor == "sqlite":
            # Units skip serverless backends: nothing can drop their connections.
            parts.append(f"{alias}: sqlite via {_driver_name(alias)}, not managed (no server)")
            continue
        max_age = _max_age_text(cfg.max_age_for(settings_dict))
        parts.append(f"{alias}: {vendor} via {_driver_name(alias)}, CONN_MAX_AGE={max_age}")
    return "freshconn policy: " + "; ".join(parts)


class WorkerCommand(BaseCommand):
    """Base class for a ``manage.py`` command that consumes messages until told to stop.

    Implement ``messages()`` (an iterable; a blocking source should wake up now and then and
    return once ``should_stop()`` is true) and ``handle_message(message)``, which runs inside a
    unit of work. Override ``run()`` instead to drive another loop, e.g.
    ``freshconn.contrib.kafka.consume(consumer, self.handle_message, stop=self.should_stop)``.

    The first SIGTERM or SIGINT lets the unit in progress finish, then ends the loop; the
    command closes its connections and exits 0. A message that arrives after that signal is never
    started: it goes to ``message_not_started()`` (override it to hand the message back to its
    queue). A unit waiting for its database to come back stops waiting at once. A second signal
    stops at once (exit 128 + signal). An exception from ``handle_message`` ends the command
    with that exception.
    """

    #: The aliases each unit covers (None: every alias in DATABASES).
    using: Using = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.stop_event = threading.Event()
        self.args: tuple[Any, ...] = ()
        self.options: dict[str, Any] = {}

    def messages(self) -> Iterable[Any]:
        raise NotImplementedError("WorkerCommand subclasses implement messages() (or override run())")

    def handle_message(self, message: Any) -> None:
        raise NotImplementedError("WorkerCommand subclasses implement handle_message(message)")

    def message_not_started(self, message: Any) -> None:
        """A message fetched after the stop signal, never started. Override to requeue or nack it."""
        logger.warning(
            "stop signal received: a message fetched after it was not started (override "
            "message_not_started() to hand it back to its queue)",
            extra={"alias": None, "reason": "stop_signal"},
        )

    def should_stop(self) -> bool:
        """True once a stop signal arrived: loops and blocking sources check it to end early."""
        return self.stop_event.is_set()

    def run(self) -> None:
        """The consuming loop: each message from ``messages()`` in its own unit, until stopped."""
        unit = UnitOfWork(self.using)
        source = iter(self.messages())
        try:
            while not self.should_stop():
                try:
                    message = next(source)
                except StopIteration:
                    break
                if self.should_stop():
                    # The signal arrived while the source was blocked: never start what it returned.
                    self.message_not_started(message)
                    break
                try:
                    with unit:
                        self.handle_message(message)
                except ReconnectStopped:
                    # Stopped while waiting for the database: the message was not started.
                    self.message_not_started(message)
                    break
            if self.should_stop():
                logger.info(
                    "stop signal received: the unit in progress finished; stopping",
                    extra={"alias": None, "reason": "stop_signal"},
                )
        finally:
            close = getattr(source, "close", None)
            if callable(close):
                # A generator source gets to run its own cleanup (e.g. close a consumer).
                close()

    def handle(self, *args: Any, **options: Any) -> None:
        # Kept for messages()/handle_message(), which take no arguments of their own.
        self.args, self.options = args, options
        line = policy_summary(self.using)
        logger.info(line, extra={"alias": None, "reason": "policy"})
        if options.get("verbosity", 1) >= 1:
            self.stdout.write(line)
        _outage.clear_stop()  # a stop requested by an earlier command in this process is not ours
        previous = self._install_signal_handlers()
        try:
            self.run()
        finally:
            self._restore_signal_handlers(previous)
            connections.close_all()
        if options.get("verbosity", 1) >= 1 and self.should_stop():
            self.stdout.write("stopped: the last unit finished and connections are closed")

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        # No I/O here: the handler runs between two bytecodes of whatever the main thread was
        # doing, possibly in the middle of a write to the same stream or logging handler.
        if self.stop_event.is_set():
            raise SystemExit(128 + signum)
        self.stop_event.set()
        # A unit waiting for its database to come back (in any thread) stops waiting now.
        _outage.request_stop()

    def _install_signal_handlers(self) -> dict[int, Any]:
        if threading.current_thread() is not threading.main_thread():
            # Python only lets the main thread set handlers: the caller owns signals there.
            return {}
        return {sig: signal.signal(sig, self._on_signal) for sig in STOP_SIGNALS}

    def _restore_signal_handlers(self, previous: dict[int, Any]) -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
