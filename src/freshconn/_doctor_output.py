"""Rendering of a doctor Report: text for people (a linter's layout), JSON for CI (schema below).

JSON schema ``freshconn.doctor/1`` is documented in docs/doctor.md; it only grows (keys are never
renamed or removed). Both renderers pass their whole output through ``_audit.scrub``.
"""

from __future__ import annotations

import json
import textwrap
from typing import Any

from django.core.exceptions import ImproperlyConfigured

from . import _audit, conf
from ._doctor import _MIB, SCHEMA, SEVERITIES, AliasReport, Report, _configured_port, _seconds, exit_code

__all__ = ["render_json", "render_text"]


def _db_json(rep: AliasReport) -> dict[str, Any]:
    db, facts, probe = rep.settings, rep.facts, rep.probe
    pool = _audit.pool_options(db)
    return {
        "alias": rep.alias,
        "vendor": rep.vendor,
        "engine": db.get("ENGINE"),
        "driver": {"name": rep.driver, "version": rep.driver_version},
        "target": {"host": db.get("HOST") or None, "port": _configured_port(rep), "name": str(db.get("NAME") or "")},
        "reachable": None if not rep.networked else facts is not None,
        "error": rep.error,
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
        },
        "django": {
            "CONN_MAX_AGE": db.get("CONN_MAX_AGE"),
            "CONN_HEALTH_CHECKS": bool(db.get("CONN_HEALTH_CHECKS")),
            "pool": pool is not None,
            "pool_check": None if pool is None else "check" in pool,
            "timeouts": _audit.timeout_options(rep.vendor, db),
        },
        "lifetime": rep.lifetime,
        "probe": None
        if probe is None
        else {
            "max_seconds": probe.max_seconds,
            "survived": None if probe.survived is None else round(probe.survived, 3),
            "died": None if probe.died is None else round(probe.died, 3),
            "limit_found": probe.limit_found,
            "rounds": probe.rounds,
            "samples": [{"idle": round(s.idle, 3), "alive": s.alive} for s in probe.samples],
        },
        "verdicts": [v.__dict__ for v in rep.verdicts],
    }


def _counts(report: Report) -> dict[str, int]:
    found = report.verdicts()
    return {f"{s}s": sum(1 for v in found if v.severity == s) for s in SEVERITIES}


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
            },
            "error": report.config_error,
        },
        "databases": [_db_json(rep) for rep in report.databases],
    }
    return _audit.scrub(json.dumps(data, indent=2, default=str), report.secrets)


def _limit_text(name: str, value: Any) -> str:
    if name == "max_allowed_packet" and isinstance(value, int):
        return f"{name} {value / _MIB:g} MiB"
    if isinstance(value, (int, float)) and name != "tcp_keepalives_count":
        return f"{name} {'off' if value == 0 else f'{value:g}s'}"
    return f"{name} {value}"


def _wrapped(prefix: str, text: str, indent: str) -> list[str]:
    return textwrap.wrap(text, width=108, initial_indent=prefix, subsequent_indent=indent) or [prefix]


def _overridden(rep: AliasReport) -> bool:
    try:
        return conf.load().max_age_override
    except ImproperlyConfigured:
        return False


def _wrapped_items(prefix: str, items: list[str], indent: str) -> list[str]:
    """Wrap a comma-separated list without ever splitting one item across lines."""
    glued = ", ".join(item.replace(" ", "\u00a0") for item in items)
    return [line.replace("\u00a0", " ") for line in _wrapped(prefix, glued, indent)]


def _db_text(rep: AliasReport) -> list[str]:
    db, facts = rep.settings, rep.facts
    where = f"{db.get('HOST') or 'localhost'}:{_configured_port(rep) or ''}/{db.get('NAME') or ''}"
    driver = f"{rep.driver} {rep.driver_version or ''}".strip()
    if not rep.networked:
        return [f"{rep.alias}  {rep.vendor}: nothing to check (no server, no network)"]
    if facts is None:
        lines = [f"{rep.alias}  {rep.vendor} via {driver} at {where}"]
    else:
        lines = [f"{rep.alias}  {facts.product} {facts.version} via {driver} at {where} (user {db.get('USER') or '-'})"]
        limits = [_limit_text(k, v) for k, v in facts.limits.items() if k != "wait_timeout_global"]
        if "wait_timeout_global" in facts.limits:
            limits[0] += f" (global {facts.limits['wait_timeout_global']}s)"
        limits += [
            f"TLS {'on' if facts.tls else 'off'}",
            f"connections {facts.connections_used}/{facts.max_connections}",
            f"connect {facts.connect_seconds * 1000:.1f} ms",
        ]
        lines += _wrapped_items("  server   ", limits, " " * 11)
        timeouts = _audit.timeout_options(rep.vendor, db)
        pool = _audit.pool_options(db)
        django = [
            f"CONN_MAX_AGE {db.get('CONN_MAX_AGE')}",
            f"CONN_HEALTH_CHECKS {bool(db.get('CONN_HEALTH_CHECKS'))}",
            "pool " + ("off" if pool is None else "on" + (" (checked)" if "check" in pool else " (no check)")),
            "timeouts " + (", ".join(f"{k}={v}" for k, v in timeouts.items()) or "none"),
        ]
        lines += _wrapped_items("  django   ", django, " " * 11)
        source = "FRESHCONN['CONN_MAX_AGE']" if _overridden(rep) else "CONN_MAX_AGE"
        lines.append(f"  units    connection lifetime {_seconds(rep.lifetime)} ({source})")
        if rep.probe is not None:
            p = rep.probe
            found = (
                f"survived {p.survived or 0:.2f}s idle, dropped after {p.died:.2f}s"
                if p.died is not None
                else f"all survived up to {p.max_seconds:g}s"
            )
            lines.append(f"  probe    {found} ({len(p.samples)} idle spans tried in {p.rounds} rounds)")
    if facts is not None and not rep.verdicts:
        lines.append("  ok       nothing to fix")
    order = {s: i for i, s in enumerate(SEVERITIES)}
    for v in sorted(rep.verdicts, key=lambda v: order[v.severity]):
        lines += _wrapped(f"  {v.severity}[{v.id}] ", v.message, "      ")
        lines += _wrapped("      fix: ", v.fix, "           ")
    return lines


def render_text(report: Report) -> str:
    cfg = report.config
    head = "freshconn doctor: " + (
        f"CHECK_AFTER_IDLE {cfg.check_after_idle:g}s, PING_TIMEOUT {cfg.ping_timeout:g}s"
        + (f", CONN_MAX_AGE {_seconds(cfg.conn_max_age)} (FRESHCONN)" if cfg.max_age_override else "")
        if cfg
        else "FRESHCONN setting invalid"
    )
    lines = [head]
    if report.config_error:
        lines += _wrapped("  error[settings-invalid] ", report.config_error, "      ")
    for rep in report.databases:
        lines += ["", *_db_text(rep)]
    counts = _counts(report)
    n = len(report.databases)
    summary = ", ".join(f"{counts[f'{s}s']} {s}{'s' if counts[f'{s}s'] != 1 else ''}" for s in SEVERITIES)
    lines += ["", f"{summary} in {n} database{'s' if n != 1 else ''} (exit {exit_code(report)})"]
    return _audit.scrub("\n".join(lines) + "\n", report.secrets)
