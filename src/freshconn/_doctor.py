"""``manage.py freshconn doctor``: what the servers, proxies and settings will do to connections.

For each alias: the server's limits, Django's and freshconn's settings, optionally the measured
end-to-end idle limit, then verdicts, each with its fix. The JSON shape is documented in
docs/doctor.md (schema ``freshconn.doctor/1``) and only grows: keys are never renamed or removed.
Every string that leaves this module goes through ``_audit.scrub`` with the settings' secrets.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from django.core.exceptions import ImproperlyConfigured
from django.db import connections

from . import _audit, _inspect, _probe, conf
from .checks import suggested_max_age

__all__ = ["SCHEMA", "AliasReport", "Report", "Verdict", "build", "exit_code"]

SCHEMA = "freshconn.doctor/1"
SEVERITIES = ("error", "warning", "note")
_DEFAULT_PORTS = {"mysql": 3306, "postgresql": 5432}
_MIB = 1024 * 1024


@dataclass(frozen=True)
class Verdict:
    id: str
    severity: str  # "error" | "warning" | "note"
    message: str
    fix: str


@dataclass
class AliasReport:
    alias: str
    vendor: str
    settings: dict[str, Any]
    driver: str = "unknown"
    driver_version: str | None = None
    facts: _inspect.ServerFacts | None = None
    error: str | None = None
    lifetime: float | None = None
    probe: _probe.ProbeResult | None = None
    verdicts: list[Verdict] = field(default_factory=list)

    @property
    def networked(self) -> bool:
        return self.vendor in _audit.NETWORK_VENDORS

    def add(self, id: str, severity: str, message: str, fix: str) -> None:
        self.verdicts.append(Verdict(id, severity, message, fix))


@dataclass
class Report:
    config: conf.Config | None
    config_error: str | None
    databases: list[AliasReport]
    secrets: set[str]

    def verdicts(self) -> list[Verdict]:
        found = [v for db in self.databases for v in db.verdicts]
        if self.config_error:
            found.append(Verdict("settings-invalid", "error", self.config_error, "Correct the FRESHCONN setting."))
        return found


def _seconds(value: float | None) -> str:
    return "unlimited" if value is None else f"{value:g}s"


def _lifetime(value: float | None) -> str:
    return "forever (CONN_MAX_AGE=None)" if value is None else f"up to {value:g}s"


def _configured_port(report: AliasReport) -> int | None:
    host, port = str(report.settings.get("HOST") or ""), str(report.settings.get("PORT") or "")
    if host.startswith("/"):
        return None  # a Unix socket: no port to compare
    try:
        return int(port) if port else _DEFAULT_PORTS.get(report.vendor)
    except ValueError:
        return None


def _judge(rep: AliasReport, cfg: conf.Config | None) -> None:
    facts, db, alias = rep.facts, rep.settings, rep.alias
    assert facts is not None
    timeouts = _audit.timeout_options(rep.vendor, db)
    limit_name = "idle_session_timeout" if rep.vendor == "postgresql" else "wait_timeout"
    setting = f"DATABASES[{alias!r}]['CONN_MAX_AGE']" + (" or FRESHCONN['CONN_MAX_AGE']" if cfg else "")
    if facts.idle_limit is not None and (rep.lifetime is None or rep.lifetime > facts.idle_limit):
        rep.add(
            "lifetime-above-idle-limit",
            "warning",
            f"Connections may live {_lifetime(rep.lifetime)} but the server drops a session idle for "
            f"{facts.idle_limit:g}s ({limit_name}). Code outside freshconn.unit_of_work() fails once on its "
            "first query after such a pause (units discard the connection without a round trip).",
            f"Set {setting} to at most {suggested_max_age(facts.idle_limit)}, or raise the server's {limit_name}.",
        )
    probe = rep.probe
    if probe is not None and probe.died is not None:
        survived = probe.survived or 0.0
        hidden = facts.idle_limit is None or probe.died < 0.9 * facts.idle_limit
        server = "no idle limit" if facts.idle_limit is None else f"an idle limit of {facts.idle_limit:g}s"
        if hidden:
            rep.add(
                "hidden-idle-limit",
                "warning",
                f"Something between this process and the server (a proxy, pooler, NAT or firewall) drops a "
                f"connection idle between {survived:.2f}s and {probe.died:.2f}s, while the server has {server}: "
                f"nothing tells Django or freshconn about this limit.",
                f"Set {setting} to at most {suggested_max_age(probe.died)} and keep FRESHCONN['CHECK_AFTER_IDLE'] "
                f"below {survived:.1f}s, send TCP "
                "keepalives more often than that (libpq keepalives_idle), or raise the proxy's idle timeout.",
            )
    elif probe is not None:
        rep.add(
            "idle-limit-measured",
            "note",
            f"No connection was dropped after idling up to {probe.max_seconds:g}s.",
            "Nothing to fix; probe longer spans to learn more.",
        )
    configured = _configured_port(rep)
    if probe is None and facts.port is not None and configured is not None and facts.port != configured:
        rep.add(
            "proxy-in-path",
            "note",
            f"This process connects to port {configured} but the server listens on {facts.port}: a proxy, "
            "pooler or port forward sits between them, with idle rules the server does not know.",
            "Measure the real idle limit: `manage.py freshconn doctor --probe-idle 3600`.",
        )
    if rep.vendor == "mysql" and "read_timeout" not in timeouts:
        rep.add(
            "no-read-timeout",
            "warning",
            "No read_timeout: a query on a connection whose packets vanish (NAT or firewall drop, failover) "
            "hangs until the kernel gives up, for hours (freshconn's own check is bounded by PING_TIMEOUT; "
            "your queries are not).",
            f"Set DATABASES[{alias!r}]['OPTIONS'] read_timeout and write_timeout (seconds, above your slowest "
            "query), e.g. {'read_timeout': 30, 'write_timeout': 30}.",
        )
    if rep.vendor == "postgresql" and not {"tcp_user_timeout", "keepalives_idle"} & timeouts.keys():
        rep.add(
            "no-read-timeout",
            "warning",
            "No tcp_user_timeout or keepalives_idle: a query on a connection whose packets vanish (NAT or "
            "firewall drop, failover) hangs until the kernel gives up, for hours (freshconn's own check is "
            "bounded by PING_TIMEOUT; your queries are not).",
            f"Set DATABASES[{alias!r}]['OPTIONS'] e.g. {{'tcp_user_timeout': 30000, 'keepalives_idle': 30, "
            "'keepalives_interval': 5, 'keepalives_count': 3}.",
        )
    if "connect_timeout" not in timeouts and rep.driver != "pymysql":  # PyMySQL defaults to 10 s
        rep.add(
            "no-connect-timeout",
            "note",
            "No connect_timeout: while the server is unreachable, each new connection waits for the kernel "
            "(about two minutes) before failing.",
            f"Set DATABASES[{alias!r}]['OPTIONS']['connect_timeout'] = 5.",
        )
    ssl_set = any(str(k).startswith("ssl") for k in (db.get("OPTIONS") or {}))
    if rep.driver == "pymysql" and not ssl_set and (facts.tls is False or rep.lifetime == 0):
        rep.add(
            "pymysql-tls-per-connect",
            "warning" if facts.tls is False else "note",
            f"PyMySQL builds a TLS context on every connect (about 16 ms; this connect took "
            f"{facts.connect_seconds * 1000:.1f} ms)"
            + (
                " although this server offers no TLS." if facts.tls is False else ", and CONN_MAX_AGE=0 connects often."
            ),
            "Set OPTIONS {'ssl_disabled': True}"
            + (
                " (the server has no TLS anyway)."
                if facts.tls is False
                else ", or pass a prebuilt ssl.SSLContext as OPTIONS['ssl']."
            ),
        )
    pool = _audit.pool_options(db)
    if rep.vendor == "postgresql" and pool is not None and "check" not in pool:
        rep.add(
            "pool-without-check",
            "warning",
            "A connection pool with no check: a connection dropped while it sat in the pool (idle limit, "
            "restart, proxy) is handed out as if alive, and the first query on it fails.",
            "Set OPTIONS {'pool': {'check': psycopg_pool.ConnectionPool.check_connection, ...}} (psycopg_pool >= 3.2).",
        )
    if facts.max_connections and facts.connections_used is not None:
        used = facts.connections_used / facts.max_connections
        if used >= 0.8:
            rep.add(
                "connections-exhausted" if used >= 0.95 else "connections-nearly-exhausted",
                "error" if used >= 0.95 else "warning",
                f"{facts.connections_used} of max_connections={facts.max_connections} are in use: new connections "
                "(and every reconnect after a drop) will soon be refused.",
                "Raise max_connections, put a pooler in front, or lower the number of worker threads/processes.",
            )
    in_tx = facts.limits.get("idle_in_transaction_session_timeout") or facts.limits.get("idle_transaction_timeout")
    if isinstance(in_tx, (int, float)) and in_tx > 0:
        rep.add(
            "idle-in-transaction-limit",
            "note",
            f"The server kills a session left idle inside a transaction for {in_tx:g}s; the next query fails "
            "as a disconnect and the transaction's writes are lost.",
            "Keep transactions short: never wait on a broker, an API or a sleep inside atomic().",
        )
    packet = facts.limits.get("max_allowed_packet")
    if isinstance(packet, int) and packet < 16 * _MIB:
        rep.add(
            "small-max-allowed-packet",
            "note",
            f"max_allowed_packet is {packet / _MIB:g} MiB: a larger statement or row makes the server drop the "
            "connection (error 2006, 'gone away'), which looks like a disconnect.",
            "Raise the server's max_allowed_packet (e.g. 64M) or send smaller batches.",
        )
    if rep.lifetime == 0:
        rep.add(
            "new-connection-per-unit",
            "note",
            f"CONN_MAX_AGE=0 opens a new connection for every unit: the connect alone took "
            f"{facts.connect_seconds * 1000:.1f} ms here, plus Django's session setup queries.",
            f"If units are frequent, set {setting} to a few minutes (below any idle limit): freshconn checks "
            "connections that sat idle anyway.",
        )


def diagnose(alias: str, cfg: conf.Config | None, probe_max: float | None = None, progress: Any = None) -> AliasReport:
    db = dict(connections[alias].settings_dict)
    rep = AliasReport(alias=alias, vendor=_audit.vendor_of(alias), settings=db)
    rep.driver, rep.driver_version = _audit.driver_name(alias), _audit.driver_version(alias)
    value = db.get("CONN_MAX_AGE", 0)
    try:
        rep.lifetime = cfg.max_age_for(db) if cfg else (None if value is None else float(value))
    except (TypeError, ValueError):
        rep.add(
            "conn-max-age-invalid",
            "error",
            f"CONN_MAX_AGE is {type(value).__name__} {value!r}, not None or a number of seconds.",
            f"Set DATABASES[{alias!r}]['CONN_MAX_AGE'] to e.g. 300, 0 or None.",
        )
        return rep
    if not rep.networked:
        return rep
    secrets = _audit.secrets_of(db)
    try:
        rep.facts = _inspect.inspect(alias)
    except Exception as exc:  # noqa: BLE001 - any failure to connect is the finding itself
        rep.error = _audit.scrub(f"{type(exc).__name__}: {exc}", secrets).strip()
        rep.add(
            "unreachable",
            "error",
            f"Cannot connect: {rep.error}",
            "Check HOST, PORT, NAME, USER and PASSWORD, that the server runs, and that a firewall lets this host in.",
        )
        return rep
    if probe_max is not None:
        try:
            rep.probe = _probe.probe_idle(alias, probe_max, progress=progress)
        except Exception as exc:  # noqa: BLE001 - report it and keep the rest of the diagnosis
            rep.add(
                "probe-failed",
                "warning",
                "The idle probe could not run: " + _audit.scrub(f"{type(exc).__name__}: {exc}", secrets).strip(),
                "Make sure a few more connections are allowed (the probe opens six at once), then run it again.",
            )
    _judge(rep, cfg)
    return rep


def build(aliases: list[str], probe_max: float | None = None, progress: Any = None) -> Report:
    """Diagnose ``aliases``; ``progress(alias)`` returns the probe's progress callback for that alias."""
    try:
        cfg: conf.Config | None = conf.load()
        error = None
    except ImproperlyConfigured as exc:
        cfg, error = None, str(exc)
    secrets: set[str] = set()
    reports = []
    for alias in aliases:
        secrets |= _audit.secrets_of(dict(connections[alias].settings_dict))
        reports.append(diagnose(alias, cfg, probe_max, progress(alias) if progress else None))
    return Report(config=cfg, config_error=error, databases=reports, secrets=secrets)


def exit_code(report: Report) -> int:
    severities = {v.severity for v in report.verdicts()}
    return 2 if "error" in severities else 1 if "warning" in severities else 0
