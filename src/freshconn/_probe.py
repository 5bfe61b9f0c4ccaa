"""Measure the real end-to-end idle limit of an alias: server, proxies, poolers and NAT together.

A server only knows its own idle limit; a load balancer, PgBouncer or a NAT gateway in between
may drop an idle connection much sooner, and nothing reports it. The probe opens a few
connections, leaves each idle for a different span, then sends one round trip on each: the
longest span that survived and the shortest that died bracket the limit. Spans are spread
geometrically up to ``max_seconds`` in the first round, then bisected between the bracket ends.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from . import _drivers, _inspect

__all__ = ["ProbeResult", "Sample", "probe_idle"]

#: Connections held open at once (one span each per round).
PARALLEL = 6
MAX_ROUNDS = 4
FIRST_SPAN = 1.0
#: Each probe connection bounds its round trip, so a silently dropped (half-open) one fails, not hangs.
PING_GUARD_SECONDS = 5

Progress = Callable[[float, str], None]


@dataclass(frozen=True)
class Sample:
    idle: float  # seconds the connection really sat idle before the round trip
    alive: bool


@dataclass
class ProbeResult:
    max_seconds: float
    #: The longest idle span a connection survived (None: even the shortest died).
    survived: float | None = None
    #: The shortest idle span after which a connection was dead (None: all survived up to max_seconds).
    died: float | None = None
    samples: list[Sample] = field(default_factory=list)
    rounds: int = 0

    @property
    def limit_found(self) -> bool:
        return self.died is not None


def _guards(vendor: str) -> dict[str, Any]:
    if vendor == "mysql":
        return {"read_timeout": PING_GUARD_SECONDS, "write_timeout": PING_GUARD_SECONDS}
    return {"tcp_user_timeout": PING_GUARD_SECONDS * 1000}


def _first_spans(max_seconds: float) -> list[float]:
    low = min(FIRST_SPAN, max_seconds)
    if max_seconds <= low:
        return [max_seconds]
    ratio = (max_seconds / low) ** (1.0 / (PARALLEL - 1))
    return [low * ratio**i for i in range(PARALLEL - 1)] + [max_seconds]


def _between(low: float, high: float) -> list[float]:
    step = (high - low) / (PARALLEL + 1)
    return [low + step * (i + 1) for i in range(PARALLEL)]


def _precise_enough(result: ProbeResult) -> bool:
    if result.died is None:
        return True
    low = result.survived or 0.0
    return result.died - low <= max(0.25, 0.1 * low)


def _run_round(
    alias: str, vendor: str, spans: list[float], on_tick: Callable[[float], None], sleep: Callable[[float], None]
) -> list[Sample]:
    # (span, connection, driver, end of its last round trip): each one's idle time is its own.
    opened: list[tuple[float, Any, _drivers.Driver, float]] = []
    try:
        for span in sorted(spans, reverse=True):
            # Longest spans first: the short ones, opened last, start idling last.
            raw = _inspect.open_raw(alias, _guards(vendor))
            driver = _drivers.for_connection(raw)
            try:
                driver.ping(raw)  # finishes any lazy handshake: idleness starts now
            except BaseException:
                with contextlib.suppress(Exception):
                    raw.close()
                raise
            opened.append((span, raw, driver, time.monotonic()))
        opened.sort(key=lambda item: item[3] + item[0])
        longest = max(spans)
        first = min(item[3] for item in opened)
        samples: list[Sample] = []
        for span, raw, driver, since in opened:
            while (waited := time.monotonic() - since) < span:
                on_tick((time.monotonic() - first) / longest)
                sleep(min(0.2, span - waited))
            idle = time.monotonic() - since
            try:
                driver.ping(raw)
                alive = True
            except Exception:  # noqa: BLE001 - any failure of the round trip means: dropped
                alive = False
            samples.append(Sample(idle=idle, alive=alive))
            if not alive:
                break  # longer spans would only die too: stop the round early
        return samples
    finally:
        for _span, raw, _driver, _since in opened:
            with contextlib.suppress(Exception):
                raw.close()


def probe_idle(
    alias: str,
    max_seconds: float,
    *,
    progress: Progress | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> ProbeResult:
    """Bracket the idle span after which ``alias``'s connections are dropped, up to ``max_seconds``."""
    if not math.isfinite(max_seconds) or max_seconds <= 0:
        raise ValueError("max_seconds must be a positive number of seconds")
    from django.db import connections

    vendor = connections[alias].vendor
    result = ProbeResult(max_seconds=max_seconds)
    spans = _first_spans(max_seconds)
    for round_no in range(1, MAX_ROUNDS + 1):
        label = f"round {round_no}: idle up to {max(spans):.1f}s on {len(spans)} connections"

        def tick(fraction: float, label: str = label, round_no: int = round_no) -> None:
            if progress is not None:
                progress((round_no - 1 + min(fraction, 1.0)) / MAX_ROUNDS, label)

        samples = _run_round(alias, vendor, spans, tick, sleep)
        result.rounds = round_no
        result.samples.extend(samples)
        for sample in samples:
            if sample.alive:
                result.survived = max(result.survived or 0.0, sample.idle)
            elif result.died is None or sample.idle < result.died:
                result.died = sample.idle
        if _precise_enough(result):
            break
        assert result.died is not None
        spans = _between(result.survived or 0.0, result.died)
    if progress is not None:
        progress(1.0, "done")
    return result
