"""The rules that decide findings (declared in ``_findings``), shared by the system checks and the doctor.

Every rule reads only credential-free inputs: an :class:`~freshconn._audit.AliasSettings`, the
validated ``Config``, what the server said (``ServerFacts``), the probe's result, or a failure
already reduced to a code and a kind. So check and doctor cannot disagree, nor show a secret.
"""

from __future__ import annotations

import math

from django.core.exceptions import ImproperlyConfigured

from . import conf
from ._audit import AliasSettings, suggested_timeouts
from ._findings import Hit, hit
from ._inspect import ServerFacts
from ._probe import ProbeResult
from ._redact import SETTINGS_KINDS, ConnectFailure

__all__ = [
    "concurrency_hits",
    "config_hits",
    "failure_hit",
    "load_config",
    "outside_units_lifetime",
    "probe_failure_hit",
    "probe_hits",
    "server_hits",
    "settings_hits",
    "suggested_max_age",
]

_MIB = 1024 * 1024


def suggested_max_age(idle_limit: float) -> int:
    """A CONN_MAX_AGE safely below an idle limit (10 % margin, at least a second)."""
    return max(0, math.floor(idle_limit - max(1.0, 0.1 * idle_limit)))


def _db(alias: str, *keys: str) -> str:
    return f"DATABASES[{alias!r}]" + "".join(f"[{k!r}]" for k in keys)


def _valid_max_age(value: object) -> bool:
    if value is None:
        return True
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value) and value >= 0


def load_config() -> tuple[conf.Config | None, str | None]:
    """The validated FRESHCONN setting, or its validation error (which names the key)."""
    try:
        return conf.load(), None
    except ImproperlyConfigured as exc:
        return None, str(exc)


def outside_units_lifetime(s: AliasSettings) -> float | None:
    """Django's own lifetime for code outside units (None: forever); call only when CONN_MAX_AGE is valid."""
    return None if s.conn_max_age is None else float(s.conn_max_age)


def config_hits(cfg: conf.Config | None, error: str | None) -> list[Hit]:
    """Findings about FRESHCONN itself (not about one alias)."""
    if error is not None:
        return [hit("settings-invalid", None, error, "Correct the FRESHCONN setting as the message says.")]
    if cfg is not None and cfg.max_age_override and cfg.conn_max_age == 0:
        return [
            hit(
                "new-connection-per-unit",
                None,
                "FRESHCONN['CONN_MAX_AGE'] is 0: every unit opens a new connection (a connect plus Django's session "
                "setup queries) and closes it at its end.",
                "Remove FRESHCONN['CONN_MAX_AGE'] (units then keep a connection up to 1800s and replace it "
                "without a round trip once the server's idle limit has passed) or set e.g. 1800.",
            )
        ]
    return []


def settings_hits(s: AliasSettings, cfg: conf.Config | None) -> list[Hit]:
    """Findings decided from an alias's settings alone (every ``manage.py check``)."""
    found: list[Hit] = []
    alias = s.alias
    if not _valid_max_age(s.conn_max_age):
        found.append(
            hit(
                "conn-max-age-invalid",
                alias,
                f"CONN_MAX_AGE must be None or a number of seconds >= 0, got {type(s.conn_max_age).__name__} "
                f"{s.conn_max_age!r}.",
                f"Set {_db(alias, 'CONN_MAX_AGE')} to e.g. 300 (seconds), 0 (a connection per request) or None "
                "(unlimited).",
            )
        )
    if not s.networked:
        return found
    if s.invalid_timeouts:
        problems = "; ".join(f"{key} {why}" for key, why in sorted(s.invalid_timeouts.items()))
        found.append(
            hit(
                "timeout-invalid",
                alias,
                f"OPTIONS {problems}.",
                f"Set {_db(alias, 'OPTIONS')} to positive numbers of the right type, e.g. "
                f"{suggested_timeouts(s.vendor)}.",
            )
        )
    if cfg is not None:
        lifetime = cfg.max_age_for({"CONN_MAX_AGE": s.conn_max_age})
        if lifetime is not None and 0 < lifetime <= cfg.check_after_idle:
            found.append(
                hit(
                    "check-after-idle-not-below-lifetime",
                    alias,
                    f"CHECK_AFTER_IDLE ({cfg.check_after_idle:g}s) is not below the lifetime of {alias!r}'s "
                    f"connections in units ({lifetime:g}s): idle connections are replaced, never checked.",
                    "Lower FRESHCONN['CHECK_AFTER_IDLE'] or raise FRESHCONN['CONN_MAX_AGE'].",
                )
            )
    read_guard = ("read_timeout",) if s.vendor == "mysql" else ("tcp_user_timeout", "keepalives_idle")
    if not set(read_guard) & s.timeouts.keys():
        found.append(
            hit(
                "no-read-timeout",
                alias,
                f"No {' or '.join(read_guard)} in OPTIONS ({s.driver}): a query on a connection whose packets "
                "vanish (NAT or firewall drop, failover) hangs until the kernel gives up, for hours "
                "(freshconn's own check is bounded by PING_TIMEOUT; your queries are not).",
                f"Set {suggested_timeouts(s.vendor)} in {_db(alias)} (keep {read_guard[0]} above your slowest query).",
            )
        )
    if s.vendor == "postgresql" and s.pool_check:
        found.append(
            hit(
                "pool-check-option",
                alias,
                "OPTIONS['pool'] holds a 'check': Django passes check= to psycopg_pool itself, so the first "
                "connection on this alias fails with TypeError (multiple values for 'check').",
                f"Remove 'check' from {_db(alias, 'OPTIONS', 'pool')}: with freshconn installed the pool gets "
                "freshconn's check (idle-aware: no round trip for a connection used moments ago).",
            )
        )
    if multi_host(s) and "target_session_attrs" not in s.option_names:
        found.append(
            hit(
                "multi-host-without-target-session-attrs",
                alias,
                f"HOST lists {len(_hosts(s))} hosts but OPTIONS has no target_session_attrs: libpq connects to the "
                "first host that answers, whatever its role, so after a failover (or a restart of the primary) a "
                "reconnect can settle on a standby, where every write fails.",
                f"Set {_db(alias, 'OPTIONS', 'target_session_attrs')} = 'read-write' (an alias meant for reads: "
                "'prefer-standby' or 'read-only').",
            )
        )
    if "connect_timeout" not in s.timeouts and s.driver != "pymysql":  # PyMySQL defaults to 10 s
        found.append(
            hit(
                "no-connect-timeout",
                alias,
                "No connect_timeout: while the server is unreachable, each new connection waits for the kernel "
                "(about two minutes) before failing.",
                f"Set {_db(alias, 'OPTIONS', 'connect_timeout')} = 5.",
            )
        )
    return found


def _hosts(s: AliasSettings) -> list[str]:
    return [h for h in (s.host or "").split(",") if h.strip()]


def multi_host(s: AliasSettings) -> bool:
    """A PostgreSQL HOST with several comma-separated hosts (libpq tries them in turn)."""
    return s.vendor == "postgresql" and "=" not in (s.host or "") and len(_hosts(s)) > 1


_FAILURE_FIXES = {
    "authentication_failed": "Check {db}['USER'] and {db}['PASSWORD'], and that this account may log in from this "
    "host.",
    "access_denied": "Let this user connect to this database from this host (MySQL/MariaDB GRANT; PostgreSQL "
    "pg_hba.conf and the CONNECT privilege).",
    "unknown_database": "Check {db}['NAME'], or create that database.",
    "unknown_host": "Check {db}['HOST']: a host name or address (a URI or DSN does not belong there).",
    "connection_refused": "Check {db}['HOST'] and ['PORT'], and that the server runs and listens there.",
    "cannot_connect": "Check {db}['HOST'] and ['PORT'], that the server runs and listens there, and that no "
    "firewall drops the connection.",
    "timeout": "Check {db}['HOST'] and ['PORT'], and that a firewall or security group lets this host reach the "
    "server.",
    "network_unreachable": "Check {db}['HOST'] and this host's network route to the server.",
    "too_many_connections": "Raise the server's max_connections, put a pooler in front, or run fewer workers.",
    "server_unavailable": "Run again once the server has started or failed over (FRESHCONN['RECONNECT_TIMEOUT'] "
    "lets units wait for that).",
    "no_writable_host": "Check that the primary is among {db}['HOST'] and accepts connections: "
    "OPTIONS['target_session_attrs'] skips the hosts that are read-only or standbys.",
    "tls": "Check the ssl*/sslmode OPTIONS of {db} against the server's TLS setup (certificate, CA).",
    "connection_lost": "Check that {db}['HOST'] and ['PORT'] point at the database server itself, and its log.",
    "failed": "Check {db}['HOST'], ['PORT'], ['NAME'], ['USER'] and ['PASSWORD'], and the server's log.",
}


def failure_hit(s: AliasSettings, failure: ConnectFailure) -> Hit:
    """The finding for a connect that failed: a settings mistake (E005) or a server not reached (E004)."""
    db = _db(s.alias)
    if failure.kind in SETTINGS_KINDS:
        where = _db(s.alias, *failure.setting) if failure.setting else db
        return hit(
            "connect-settings-rejected",
            s.alias,
            f"Nothing was sent to the server: {failure.summary}"
            + (f"; the setting concerned is {where}." if failure.setting else "."),
            f"Correct {where} (see the driver's documentation for valid values): a settings mistake, not a "
            "network problem.",
        )
    fix = _FAILURE_FIXES[failure.kind].format(db=db)
    return hit("unreachable", s.alias, f"Cannot connect: {failure.summary}.", fix)


def probe_failure_hit(s: AliasSettings, failure: ConnectFailure) -> Hit:
    return hit(
        "probe-failed",
        s.alias,
        f"The idle probe could not run: {failure.summary}.",
        "Make sure a few more connections are allowed (the probe opens six at once), then run it again.",
    )


def _lifetime_text(value: float | None) -> str:
    return "forever (CONN_MAX_AGE=None)" if value is None else f"up to {value:g}s (CONN_MAX_AGE)"


def server_hits(s: AliasSettings, facts: ServerFacts, *, probed: bool = False) -> list[Hit]:
    """Findings that need what the server said (``check --database``, the doctor)."""
    found: list[Hit] = []
    alias, limit = s.alias, facts.idle_limit
    name = "idle_session_timeout" if s.vendor == "postgresql" else "wait_timeout"
    if limit is not None and _valid_max_age(s.conn_max_age):
        outside = outside_units_lifetime(s)
        if outside is None or outside > limit:
            most = suggested_max_age(limit)
            found.append(
                hit(
                    "lifetime-above-idle-limit",
                    alias,
                    f"Outside units, Django keeps connections {_lifetime_text(outside)}, but the server drops a "
                    f"session idle for {limit:g}s ({name}): code outside freshconn.unit_of_work() fails on its "
                    "first query after such a pause. Units are not affected: they replace such a connection "
                    "without a round trip.",
                    f"Set {_db(alias, 'CONN_MAX_AGE')} to at most {most}"
                    + (" (a connection per request)" if most == 0 else "")
                    + f", raise the server's {name}, or run that code in units.",
                )
            )
    if limit is not None and s.pool_max_idle is not None and s.pool_max_idle > limit:
        found.append(
            hit(
                "pool-max-idle-above-idle-limit",
                alias,
                f"The pool keeps an idle connection up to {s.pool_max_idle:g}s (max_idle), but the server drops a "
                f"session idle for {limit:g}s ({name}): such connections die in the pool. freshconn's check "
                "replaces each at checkout without a round trip; each costs a new connection.",
                f"Set {_db(alias, 'OPTIONS', 'pool')}['max_idle'] to at most {suggested_max_age(limit)} so the "
                "pool closes them itself, in the background.",
            )
        )
    if s.driver == "pymysql" and facts.tls is False and not s.ssl_configured:
        found.append(
            hit(
                "pymysql-tls-per-connect",
                alias,
                "PyMySQL builds a TLS context on every connect (about 16 ms) although this server offers no TLS: "
                "every new connection pays it for nothing.",
                "Set 'OPTIONS': {'ssl_disabled': True} (or enable TLS on the server and pass a prebuilt "
                "ssl.SSLContext as OPTIONS['ssl']).",
            )
        )
    if facts.max_connections and facts.connections_used is not None:
        used = facts.connections_used / facts.max_connections
        if used >= 0.8:
            found.append(
                hit(
                    "connections-exhausted" if used >= 0.95 else "connections-nearly-exhausted",
                    alias,
                    f"{facts.connections_used} of max_connections={facts.max_connections} are in use: new "
                    "connections (and every reconnect after a drop) will soon be refused.",
                    "Raise max_connections, put a pooler in front, or lower the number of worker threads/processes.",
                )
            )
    configured = s.configured_port
    if not probed and facts.port is not None and configured is not None and facts.port != configured:
        found.append(
            hit(
                "proxy-in-path",
                alias,
                f"This process connects to port {configured} but the server listens on {facts.port}: a proxy, "
                "pooler or port forward sits between them, with idle rules the server does not know.",
                "Measure the real idle limit: `manage.py freshconn doctor --probe-idle 3600`.",
            )
        )
    if facts.read_only:
        why = ", ".join(facts.read_only_because) or "read-only"
        standby = "pg_is_in_recovery()" in facts.read_only_because
        fix = f"Point {_db(alias, 'HOST')} at the primary (the writer endpoint of a cluster, not a reader or a standby)"
        if multi_host(s) and "target_session_attrs" not in s.option_names:
            fix += (
                f", and set {_db(alias, 'OPTIONS', 'target_session_attrs')} = 'read-write' so that libpq skips "
                "the hosts that refuse writes"
            )
        elif s.vendor == "mysql" and not standby:
            fix += ", or make this server writable again (SET GLOBAL read_only = OFF) if it is the primary"
        found.append(
            hit(
                "server-read-only",
                alias,
                f"The server refuses writes from this alias's sessions ({why}"
                + ("; a hot standby" if standby else "")
                + "): every INSERT, UPDATE, DELETE or DDL fails with a read-only error (freshconn discards such a "
                "connection; a unit's retries only help once the alias reaches a writable node).",
                fix + ".",
            )
        )
    in_tx = facts.limits.get("idle_in_transaction_session_timeout") or facts.limits.get("idle_transaction_timeout")
    if isinstance(in_tx, (int, float)) and in_tx > 0:
        found.append(
            hit(
                "idle-in-transaction-limit",
                alias,
                f"The server kills a session left idle inside a transaction for {in_tx:g}s; the next query fails "
                "as a disconnect and the transaction's writes are lost.",
                "Keep transactions short: never wait on a broker, an API or a sleep inside atomic().",
            )
        )
    packet = facts.limits.get("max_allowed_packet")
    if isinstance(packet, int) and packet < 16 * _MIB:
        found.append(
            hit(
                "small-max-allowed-packet",
                alias,
                f"max_allowed_packet is {packet / _MIB:g} MiB: a larger statement or row makes the server drop the "
                "connection (error 2006, 'gone away'), which looks like a disconnect.",
                "Raise the server's max_allowed_packet (e.g. 64M) or send smaller batches.",
            )
        )
    return found


def concurrency_hits(servers: list[tuple[AliasSettings, ServerFacts]], concurrency: int) -> list[Hit]:
    """A pool of ``concurrency`` threads or greenlets against each server's max_connections.

    ``servers``: the aliases in scope that were inspected, with what their server said. Each thread
    or greenlet keeps its own connection per alias, so aliases on one server (same host and port)
    add up; the finding is reported once per server, on its first alias.
    """
    groups: dict[tuple[str, int | None], list[tuple[AliasSettings, ServerFacts]]] = {}
    for view, facts in servers:
        groups.setdefault((view.host or "localhost", view.configured_port), []).append((view, facts))
    found: list[Hit] = []
    for group in groups.values():
        first, facts = group[0]
        limit, names = facts.max_connections, [view.alias for view, _ in group]
        needed = concurrency * len(names)
        if not limit or needed <= limit:
            continue
        aliases = ", ".join(repr(n) for n in names)
        found.append(
            hit(
                "concurrency-above-max-connections",
                first.alias,
                f"A pool of {concurrency} threads or greenlets keeps up to {concurrency} connections per alias: "
                f"with {len(names)} alias{'es' if len(names) != 1 else ''} on this server ({aliases}) that is "
                f"{needed}, but the server allows max_connections={limit}: under load, connects (and every "
                "reconnect after a drop) are refused.",
                f"Run at most {max(1, limit // len(names))} threads or greenlets per worker (less, with other "
                "clients on this server), raise the server's max_connections, or put a pooler (PgBouncer, "
                "ProxySQL) in front.",
            )
        )
    return found


def probe_hits(s: AliasSettings, cfg: conf.Config | None, facts: ServerFacts, probe: ProbeResult) -> list[Hit]:
    """Findings from ``doctor --probe-idle``'s measurement."""
    if probe.died is None:
        return [
            hit(
                "idle-limit-measured",
                s.alias,
                f"No connection was dropped after idling up to {probe.max_seconds:g}s.",
                "Nothing to fix; probe longer spans to learn more.",
            )
        ]
    limit = facts.idle_limit
    if limit is not None and probe.died >= 0.9 * limit:
        return []  # the server's own limit, which units already honour
    survived = probe.survived or 0.0
    server = "no idle limit" if limit is None else f"an idle limit of {limit:g}s"
    inside = (
        f"keep FRESHCONN['CHECK_AFTER_IDLE'] below {survived:.1f}s (units then check a connection idle that long "
        "and replace a dropped one) and "
        if cfg is None or cfg.check_after_idle >= survived
        else ""
    )
    most = suggested_max_age(probe.died)
    return [
        hit(
            "hidden-idle-limit",
            s.alias,
            f"Something between this process and the server (a proxy, pooler, NAT or firewall) drops a connection "
            f"idle between {survived:.2f}s and {probe.died:.2f}s, while the server has {server}: nothing tells "
            "Django or freshconn about this limit.",
            "Raise the proxy's idle timeout or send TCP keepalives more often than that (libpq keepalives_idle); "
            f"otherwise {inside}set {_db(s.alias, 'CONN_MAX_AGE')} to at most {most}"
            + (" (a connection per request)" if most == 0 else "")
            + " for code outside units"
            + (
                f", and {_db(s.alias, 'OPTIONS', 'pool')}['max_idle'] to at most {most} (the pool keeps idle "
                f"connections up to {s.pool_max_idle:g}s)."
                if s.pool_max_idle is not None and s.pool_max_idle > probe.died
                else "."
            ),
        )
    ]
