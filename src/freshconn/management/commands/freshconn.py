"""``manage.py freshconn doctor``: what your servers, proxies and settings will do to connections.

    python manage.py freshconn doctor [--database ALIAS] [--format text|json] [--probe-idle MAX_SECONDS]
                                      [--concurrency N]

Exit status, a contract CI can rely on: 0 healthy (notes allowed), 1 warnings from a completed run,
2 anything else: an error found, a database not reached, invalid settings, or bad arguments
(argparse's own status). See docs/doctor.md.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import connections

from ... import _doctor, _doctor_output

_BAR = 30
#: The progress bar is redrawn at most this often (seconds).
_REDRAW = 0.25


def _alias(value: str) -> str:
    if value not in connections:
        configured = ", ".join(connections) or "none"
        raise argparse.ArgumentTypeError(
            f"unknown database alias {value!r}: DATABASES has {configured}. Fix: pass one of them to --database."
        )
    return value


def _probe_seconds(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not math.isfinite(seconds) or seconds <= 0:
        raise argparse.ArgumentTypeError(
            f"{value!r} is not a positive number of seconds. Fix: e.g. --probe-idle 900 (the longest idle span to try)."
        )
    return seconds


def _concurrency(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise argparse.ArgumentTypeError(
            f"{value!r} is not a whole number >= 1. Fix: e.g. --concurrency 100 (the threads or greenlets of "
            "one worker's pool)."
        )
    return number


def _base_options(parser: CommandParser) -> None:
    """Django's own options, accepted after the subcommand too (``doctor --settings X``).

    ManagementUtility has already honoured --settings and --pythonpath wherever they stand;
    only the subcommand's parser would reject them. SUPPRESS keeps a value given before the
    subcommand from being overwritten by a default here.
    """
    hidden = argparse.SUPPRESS
    parser.add_argument("--settings", default=hidden, help=hidden)
    parser.add_argument("--pythonpath", default=hidden, help=hidden)
    parser.add_argument("-v", "--verbosity", type=int, choices=[0, 1, 2, 3], default=hidden, help=hidden)
    parser.add_argument("--traceback", action="store_true", default=hidden, help=hidden)
    parser.add_argument("--no-color", action="store_true", default=hidden, help=hidden)
    parser.add_argument("--force-color", action="store_true", default=hidden, help=hidden)


class Command(BaseCommand):
    help = "Diagnose database connection settings against what the servers and proxies really do."
    requires_system_checks: list[str] = []  # the doctor reports problems itself, it must not refuse to run

    def add_arguments(self, parser: CommandParser) -> None:
        sub = parser.add_subparsers(dest="subcommand", metavar="SUBCOMMAND", required=True)
        doctor = sub.add_parser(
            "doctor",
            help="Show each database's server limits, settings and verdicts with fixes.",
            description="Exit status: 0 healthy, 1 warnings, 2 errors, a database not reached, invalid settings "
            "or arguments.",
        )
        doctor.add_argument(
            "--database",
            action="append",
            dest="databases",
            metavar="ALIAS",
            type=_alias,
            help="Only this alias (repeatable). Default: every alias in DATABASES.",
        )
        doctor.add_argument("--format", choices=("text", "json"), default="text", help="Output format (default text).")
        doctor.add_argument(
            "--probe-idle",
            type=_probe_seconds,
            metavar="MAX_SECONDS",
            help="Measure the real end-to-end idle limit (server, proxies, NAT) by idling connections for "
            "growing spans up to MAX_SECONDS. Takes about that long, or less when a limit is found.",
        )
        doctor.add_argument(
            "--concurrency",
            type=_concurrency,
            metavar="N",
            help="Judge a gevent, eventlet or threads pool of N greenlets or threads (one connection each per "
            "alias) against each server's max_connections.",
        )
        _base_options(doctor)

    def handle(self, *args: Any, **options: Any) -> None:
        if options["subcommand"] != "doctor":  # pragma: no cover - argparse rejects anything else
            raise CommandError(f"unknown subcommand {options['subcommand']!r}", returncode=2)
        # Each alias once, in the order given (--database default --database default is one alias).
        aliases = list(dict.fromkeys(options.get("databases") or connections))
        probe = options.get("probe_idle")
        fmt = options.get("format") or "text"
        # Progress only for a person watching: redrawn lines would flood a redirected log.
        progress = self._progress_for if probe is not None and self.stderr.isatty() else None
        report = _doctor.build(aliases, probe, progress, options.get("concurrency"))
        self.stdout.write(
            _doctor_output.render_json(report) if fmt == "json" else _doctor_output.render_text(report),
            ending="\n" if fmt == "json" else "",
        )
        code = _doctor.exit_code(report)
        if code:
            self.stdout.flush()
            sys.exit(code)

    def _progress_for(self, alias: str) -> Callable[[float, str], None]:
        last = [0.0]

        def show(fraction: float, label: str) -> None:
            now = time.monotonic()
            if fraction < 1.0 and now - last[0] < _REDRAW:
                return
            last[0] = now
            done = int(_BAR * fraction)
            bar = "#" * done + "-" * (_BAR - done)
            line = f"\r{alias}: probing idle limit [{bar}] {fraction * 100:3.0f}% {label}"
            self.stderr.write(line.ljust(100), ending="\n" if fraction >= 1.0 else "")
            self.stderr.flush()

        return show
