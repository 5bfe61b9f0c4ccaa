"""Rendering of a doctor Report: text for people (a linter's layout), JSON for CI.

JSON schema ``freshconn.doctor/1`` is documented in docs/doctor.md; it only grows (keys are never
renamed or removed). Both renderers only lay out the report: it holds no credential to hide.
"""

from __future__ import annotations

import json
import textwrap
from typing import Any

from ._doctor import SCHEMA, SEVERITIES, AliasReport, Report, exit_code
from ._findings import Hit

__all__ = ["render_json", "render_text"]

_MIB = 1024 * 1024


def _verdict(h: Hit) -> dict[str, Any]:
    f = h.finding
    return {"id": f.doctor_id, "check_id": f.check_id, "severity": f.severity, "message": h.message, "fix": h.fix}


def _db_json(rep: AliasReport) -> dict[str, Any]:
    s, facts, probe, failure = rep.settings, rep.facts, rep.probe, rep.failure
    return {
        "alias": s.alias,
        "vendor": s.vendor,
        "engine": s.engine,
        "driver": {"name": s.driver, "version": s.driver_version},
        "target": {"host": s.host, "port": s.configured_port, "name": s.name or ""},
        "reachable": None if not s.networked else facts is not None,
        "error": None if failure is None else failure.summary,
        "error_kind": None if failure is None else failure.kind,
        "error_code": None if failure is None else failure.code,
        "server": None
        if facts is None
        else {
            "product": facts.product,
            "version": facts.version,
            "port": facts.port,
            "tls": facts.tls,
            "connect_ms": round(facts.connect_seconds * 1000, 2),
            "idle_limit": facts.idle_limit,
            "max_connections": facts.max_connections,
            "connections_used": facts.connections_used,
            "limits": facts.limits,
            "read_only": facts.read_only,
            "read_only_because": facts.read_only_because,
        },
        "django": {
            "CONN_MAX_AGE": s.conn_max_age,
            "CONN_HEALTH_CHECKS": s.health_checks,
            "pool": s.pool,
            "pool_check": s.pool_check,
            "pool_max_idle": s.pool_max_idle,
            "timeouts": s.timeouts,
        },
        "lifetime": rep.lifetime,
        "lifetime_source": rep.lifetime_source,
        "probe": None
        if probe is None
        else {
            "max_seconds": probe.max_seconds,
            "survived": None if probe.survived is None else round(probe.survived, 3),
            "died": None if probe.died is None else round(probe.died, 3),
            "limit_found": probe.limit_found,
            "rounds": probe.rounds,
            "samples": [{"idle": round(x.idle, 3), "alive": x.alive} for x in probe.samples],
        },
        "verdicts": [_verdict(h) for h in rep.hits],
    }


def _counts(report: Report) -> dict[str, int]:
    found = report.hits()
    return {f"{sev}s": sum(1 for h in found if h.finding.severity == sev) for sev in SEVERITIES}


def render_json(report: Report) -> str:
    from . import __version__

    cfg = report.config
    data = {
        "schema": SCHEMA,
        "status": ("ok", "warning", "error")[exit_code(report)],
        "exit_code": exit_code(report),
        "summary": _counts(report),
        "freshconn": {
            "version": __version__,
            "settings": None
            if cfg is None
            else {
                "CHECK_AFTER_IDLE": cfg.check_after_idle,
                "CONN_MAX_AGE": cfg.conn_max_age if cfg.max_age_override else None,
                "CONN_MAX_AGE_set": cfg.max_age_override,
                "PING_TIMEOUT": cfg.ping_timeout,
                "RECONNECT_TIMEOUT": cfg.reconnect_timeout,
                "ADOPT_CLOSE_OLD_CONNECTIONS": cfg.adopt_close_old_connections,
                "STATS_LOG_INTERVAL": cfg.stats_log_interval,
            },
            "error": report.config_error,
            "verdicts": [_verdict(h) for h in report.global_hits],
        },
        "databases": [_db_json(rep) for rep in report.databases],
    }
    # default=str: a setting of an unexpected type (e.g. CONN_MAX_AGE="60") is shown, not a crash.
    return json.dumps(data, indent=2, default=str)


def _seconds(value: float | None) -> str:
    return "unlimited" if value is None else f"{value:g}s"


def _limit_text(name: str, value: Any) -> str:
    if name == "max_allowed_packet" and isinstance(value, int):
        return f"{name} {value / _MIB:g} MiB"
    if isinstance(value, (int, float)) and name != "tcp_keepalives_count":
        return f"{name} {'off' if value == 0 else f'{value:g}s'}"
    return f"{name} {value}"


def _wrapped(prefix: str, text: str, indent: str) -> list[str]:
    return textwrap.wrap(text, width=108, initial_indent=prefix, subsequent_indent=indent) or [prefix]


def _wrapped_items(prefix: str, items: list[str], indent: str) -> list[str]:
    """Wrap a comma-separated list without ever splitting one item across lines."""
    glued = ", ".join(item.replace(" ", "\u00a0") for item in items)
    return [line.replace("\u00a0", " ") for line in _wrapped(prefix, glued, indent)]


_SOURCES = {
    "FRESHCONN": "FRESHCONN['CONN_MAX_AGE']",
    "CONN_MAX_AGE": "CONN_MAX_AGE",
    "default": "freshconn's default",
}


def _hit_lines(h: Hit) -> list[str]:
    f = h.finding
    return [
        *_wrapped(f"  {f.severity}[{f.doctor_id}] ({f.check_id}) ", h.message, "      "),
        *_wrapped("      fix: ", h.fix, "           "),
    ]


def _db_text(rep: AliasReport) -> list[str]:
    s, facts = rep.settings, rep.facts
    where = f"{s.host or 'localhost'}:{s.configured_port or ''}/{s.name or ''}"
    driver = f"{s.driver} {s.driver_version or ''}".strip()
    if not s.networked:
        lines = [f"{s.alias}  {s.vendor}: nothing to check (no server, no network)"]
    elif facts is None:
        lines = [f"{s.alias}  {s.vendor} via {driver} at {where} (user {s.user or '-'})"]
    else:
        lines = [f"{s.alias}  {facts.product} {facts.version} via {driver} at {where} (user {s.user or '-'})"]
        limits = [_limit_text(k, v) for k, v in facts.limits.items() if k != "wait_timeout_global"]
        if "wait_timeout_global" in facts.limits:
            limits[0] += f" (global {facts.limits['wait_timeout_global']}s)"
        limits += [
            f"TLS {'on' if facts.tls else 'off'}",
            *([f"writes refused ({', '.join(facts.read_only_because)})"] if facts.read_only else []),
            f"connections {facts.connections_used}/{facts.max_connections}",
            f"connect {facts.connect_seconds * 1000:.1f} ms",
        ]
        lines += _wrapped_items("  server   ", limits, " " * 11)
        django = [
            f"CONN_MAX_AGE {s.conn_max_age!r}",
            f"CONN_HEALTH_CHECKS {s.health_checks}",
            "pool "
            + ("off" if not s.pool else "on" + (" (a check in OPTIONS)" if s.pool_check else " (freshconn's check)")),
            "timeouts " + (", ".join(f"{k}={v!r}" for k, v in s.timeouts.items()) or "none"),
        ]
        lines += _wrapped_items("  django   ", django, " " * 11)
        source = _SOURCES.get(rep.lifetime_source or "", "FRESHCONN invalid")
        lifetime = _seconds(rep.lifetime) if rep.lifetime_source else "unknown"
        lines.append(f"  units    connection lifetime {lifetime} ({source})")
        if rep.probe is not None:
            p = rep.probe
            found = (
                f"survived {p.survived or 0:.2f}s idle, dropped after {p.died:.2f}s"
                if p.died is not None
                else f"all survived up to {p.max_seconds:g}s"
            )
            lines.append(f"  probe    {found} ({len(p.samples)} idle spans tried in {p.rounds} rounds)")
    if facts is not None and not rep.hits:
        lines.append("  ok       nothing to fix")
    order = {sev: i for i, sev in enumerate(SEVERITIES)}
    for h in sorted(rep.hits, key=lambda h: order[h.finding.severity]):
        lines += _hit_lines(h)
    return lines


def render_text(report: Report) -> str:
    cfg = report.config
    if cfg is None:
        head = "freshconn doctor: FRESHCONN setting invalid"
    else:
        head = (
            f"freshconn doctor: CHECK_AFTER_IDLE {cfg.check_after_idle:g}s, PING_TIMEOUT {cfg.ping_timeout:g}s, "
            f"RECONNECT_TIMEOUT {cfg.reconnect_timeout:g}s"
            + (f", CONN_MAX_AGE {_seconds(cfg.conn_max_age)} (FRESHCONN)" if cfg.max_age_override else "")
        )
    lines = [head]
    for h in report.global_hits:
        lines += _hit_lines(h)
    for rep in report.databases:
        lines += ["", *_db_text(rep)]
    counts = _counts(report)
    n = len(report.databases)
    summary = ", ".join(f"{counts[f'{s}s']} {s}{'s' if counts[f'{s}s'] != 1 else ''}" for s in SEVERITIES)
    lines += ["", f"{summary} in {n} database{'s' if n != 1 else ''} (exit {exit_code(report)})"]
    return "\n".join(lines) + "\n"
