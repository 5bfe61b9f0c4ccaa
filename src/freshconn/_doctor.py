"""``manage.py freshconn doctor``: what the servers, proxies and settings will do to connections.

For each alias: the server's limits, Django's and freshconn's settings, optionally the measured
end-to-end idle limit, then verdicts, each with its fix. Verdicts are the catalogue's findings
(``_findings``), decided by the same rules as the system checks (``_judge``). A report is built
only from credential-free inputs (``_audit.AliasSettings``, failures reduced by ``_redact``), so
its renderings (``_doctor_output``) need no scrubbing and are never rewritten.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from . import _inspect, _judge, _probe, conf
from ._audit import AliasSettings, alias_settings
from ._findings import Hit
from ._redact import ConnectFailure, describe_failure

__all__ = ["SCHEMA", "SEVERITIES", "AliasReport", "Report", "build", "exit_code", "running_doctor"]

SCHEMA = "freshconn.doctor/1"
SEVERITIES = ("error", "warning", "note")


@dataclass
class AliasReport:
    settings: AliasSettings
    #: The lifetime of connections in units (None: unlimited or unknown), and where it comes from:
    #: "FRESHCONN", "CONN_MAX_AGE", "default", or None when FRESHCONN is invalid.
    lifetime: float | None = None
    lifetime_source: str | None = None
    facts: _inspect.ServerFacts | None = None
    failure: ConnectFailure | None = None
    probe: _probe.ProbeResult | None = None
    hits: list[Hit] = field(default_factory=list)

    @property
    def alias(self) -> str:
        return self.settings.alias


@dataclass
class Report:
    config: conf.Config | None
    config_error: str | None
    #: Findings about FRESHCONN itself.
    global_hits: list[Hit]
    databases: list[AliasReport]

    def hits(self) -> list[Hit]:
        return [*self.global_hits, *(h for db in self.databases for h in db.hits)]


def _lifetime(view: AliasSettings, cfg: conf.Config) -> tuple[float | None, str]:
    value = view.conn_max_age
    if cfg.max_age_override:
        return cfg.conn_max_age, "FRESHCONN"
    positive = not isinstance(value, bool) and isinstance(value, (int, float)) and value > 0
    return cfg.max_age_for({"CONN_MAX_AGE": value}), "CONN_MAX_AGE" if positive else "default"


def diagnose(alias: str, cfg: conf.Config | None, probe_max: float | None = None, progress: Any = None) -> AliasReport:
    view = alias_settings(alias)
    rep = AliasReport(settings=view, hits=_judge.settings_hits(view, cfg))
    if cfg is not None:
        rep.lifetime, rep.lifetime_source = _lifetime(view, cfg)
    if not view.networked:
        return rep
    try:
        rep.facts = _inspect.inspect(alias)
    except Exception as exc:  # noqa: BLE001 - any failure to connect is the finding itself
        rep.failure = describe_failure(exc, view.option_names)
        rep.hits.append(_judge.failure_hit(view, rep.failure))
        return rep
    if probe_max is not None:
        try:
            rep.probe = _probe.probe_idle(alias, probe_max, progress=progress)
        except Exception as exc:  # noqa: BLE001 - report it and keep the rest of the diagnosis
            rep.hits.append(_judge.probe_failure_hit(view, describe_failure(exc, view.option_names)))
    rep.hits += _judge.server_hits(view, rep.facts, probed=rep.probe is not None)
    if rep.probe is not None:
        rep.hits += _judge.probe_hits(view, cfg, rep.facts, rep.probe)
    return rep


def build(
    aliases: list[str],
    probe_max: float | None = None,
    progress: Callable[[str], Any] | None = None,
    concurrency: int | None = None,
) -> Report:
    """Diagnose ``aliases``; ``progress(alias)`` returns the probe's progress callback for that alias.

    ``concurrency``: the threads or greenlets of the workers' pool, judged against each server's
    max_connections with ``aliases`` as the aliases they use.
    """
    cfg, error = _judge.load_config()
    reports = [diagnose(alias, cfg, probe_max, progress(alias) if progress else None) for alias in aliases]
    if concurrency is not None:
        by_alias = {rep.alias: rep for rep in reports}
        inspected = [(rep.settings, rep.facts) for rep in reports if rep.facts is not None]
        for found in _judge.concurrency_hits(inspected, concurrency):
            by_alias[str(found.alias)].hits.append(found)
    return Report(config=cfg, config_error=error, global_hits=_judge.config_hits(cfg, error), databases=reports)


def exit_code(report: Report) -> int:
    """2: an error (the run could not judge something, or found it broken); 1: warnings; 0: healthy."""
    severities = {h.finding.severity for h in report.hits()}
    return 2 if "error" in severities else 1 if "warning" in severities else 0


def running_doctor(argv: list[str] | None = None) -> bool:
    """True when this process runs ``manage.py freshconn doctor`` (for ``AppConfig.ready()``).

    The doctor reports an invalid FRESHCONN itself (``settings-invalid``, exit 2): start-up
    validation must let it run instead of stopping the process with a traceback (exit 1, the
    status that means "warnings").
    """
    args = sys.argv if argv is None else argv
    return len(args) >= 3 and args[1] == "freshconn" and "doctor" in args[2:]
