"""``manage.py freshconn doctor``: what your servers, proxies and settings will do to connections.

    python manage.py freshconn doctor [--database ALIAS] [--format text|json] [--probe-idle MAX_SECONDS]

Exit status: 0 healthy, 1 warnings, 2 errors (or a database unreachable). See docs/doctor.md.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import connections

from ... import _doctor, _doctor_output

_BAR = 30


class Command(BaseCommand):
    help = "Diagnose database connection settings against what the servers and proxies really do."
    requires_system_checks: list[str] = []  # the doctor reports problems itself, it must not refuse to run

    def add_arguments(self, parser: CommandParser) -> None:
        sub = parser.add_subparsers(dest="subcommand", metavar="SUBCOMMAND", required=True)
        doctor = sub.add_parser(
            "doctor",
            help="Show each database's server limits, settings and verdicts with fixes.",
            description="Exit status: 0 healthy, 1 warnings, 2 errors or a database unreachable.",
        )
        doctor.add_argument(
            "--database",
            action="append",
            dest="databases",
            metavar="ALIAS",
            help="Only this alias (repeatable). Default: every alias in DATABASES.",
        )
        doctor.add_argument("--format", choices=("text", "json"), default="text", help="Output format (default text).")
        doctor.add_argument(
            "--probe-idle",
            type=float,
            metavar="MAX_SECONDS",
            help="Measure the real end-to-end idle limit (server, proxies, NAT) by idling connections for "
            "growing spans up to MAX_SECONDS. Takes about that long, or less when a limit is found.",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        if options["subcommand"] != "doctor":  # pragma: no cover - argparse rejects anything else
            raise CommandError(f"unknown subcommand {options['subcommand']!r}")
        aliases: list[str] = options.get("databases") or list(connections)
        unknown = [a for a in aliases if a not in connections]
        if unknown:
            raise CommandError(f"unknown database alias(es): {', '.join(unknown)}; known: {', '.join(connections)}")
        probe = options.get("probe_idle")
        if probe is not None and probe <= 0:
            raise CommandError("--probe-idle needs a positive number of seconds")
        fmt = options.get("format") or "text"
        progress = self._progress_for if (probe is not None and fmt == "text") else None
        report = _doctor.build(aliases, probe, progress)
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
            if fraction < 1.0 and now - last[0] < 0.25:
                return
            last[0] = now
            done = int(_BAR * fraction)
            bar = "#" * done + "-" * (_BAR - done)
            line = f"\r{alias}: probing idle limit [{bar}] {fraction * 100:3.0f}% {label}"
            self.stderr.write(line.ljust(100), ending="\n" if fraction >= 1.0 else "")
            self.stderr.flush()

        return show
