"""Redaction by construction: what may be shown about an alias's location and about a failed connect.

Nothing here masks finished text. Locations (HOST, NAME) are parsed and rebuilt from the parts
that are not credentials; a driver's error message, which may echo a password (a server quotes
the unknown database name, a resolver the host string, Django the NAME it found too long), is
never shown: it is reduced to a code (MySQL errno, SQLSTATE) and a kind whose summary we wrote.
The message text is read only to choose between our own summaries.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlencode

from django.core.exceptions import ImproperlyConfigured

from . import _errors
from ._errors import MYSQL_MODULES

__all__ = ["ConnectFailure", "ParamsError", "describe_failure", "safe_location"]

#: Location parts that are never credentials; everything else in a URI or conninfo string is dropped.
_SHOWN_KEYS = frozenset(
    {"host", "hostaddr", "port", "dbname", "user", "sslmode", "connect_timeout", "target_session_attrs"}
)
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_CONNINFO_PLACEHOLDER = "<connection string>"


class ParamsError(Exception):
    """Django could not turn the alias's settings into driver parameters (raised from its error)."""


def _safe_uri(text: str) -> str:
    scheme, _, rest = text.partition("://")
    # A password may hold unencoded '@', '/', '?' or '#': only the last '@' can end the user info.
    userinfo, at, hostpart = rest.rpartition("@")
    user = userinfo.partition(":")[0] if at else ""
    hostpart, _, _fragment = hostpart.partition("#")
    base, question, query = hostpart.partition("?")
    shown = f"{scheme}://" + (f"{user}@" if user else "") + base
    if question:
        pairs = [(k, v) for k, v in parse_qsl(query, keep_blank_values=True) if k in _SHOWN_KEYS]
        if pairs:
            shown += "?" + urlencode(pairs)
    return shown


def _conninfo_pairs(text: str) -> list[tuple[str, str]] | None:
    """libpq ``key = value`` pairs (values quoted with '...' and backslash escapes), or None if malformed."""
    pairs: list[tuple[str, str]] = []
    i, n = 0, len(text)
    while True:
        while i < n and text[i].isspace():
            i += 1
        if i == n:
            return pairs
        start = i
        while i < n and (text[i].isalnum() or text[i] == "_"):
            i += 1
        key = text[start:i]
        while i < n and text[i].isspace():
            i += 1
        if not key or i == n or text[i] != "=":
            return None
        i += 1
        while i < n and text[i].isspace():
            i += 1
        quoted = i < n and text[i] == "'"
        i += quoted
        value: list[str] = []
        while i < n and (quoted or not text[i].isspace()):
            if text[i] == "\\" and i + 1 < n:
                value.append(text[i + 1])
                i += 2
                continue
            if quoted and text[i] == "'":
                break
            value.append(text[i])
            i += 1
        if quoted:
            if i == n:
                return None  # unterminated quote
            i += 1
        pairs.append((key, "".join(value)))


def _quote_conninfo(value: str) -> str:
    if value and not any(c.isspace() or c in "'\\" for c in value):
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def safe_location(value: object) -> str | None:
    """HOST or NAME as it may be shown: a URI or libpq conninfo string loses every credential.

    A plain host or database name is returned as is. A connection string that cannot be parsed is
    shown as a placeholder, never as its raw text.
    """
    if value is None:
        return None
    text = str(value)
    if _URI.match(text):
        return _safe_uri(text)
    if "=" in text:
        pairs = _conninfo_pairs(text)
        if pairs is None:
            return _CONNINFO_PLACEHOLDER
        return " ".join(f"{k}={_quote_conninfo(v)}" for k, v in pairs if k in _SHOWN_KEYS) or _CONNINFO_PLACEHOLDER
    return text


#: Kind of failure -> our own summary of it. Kinds are stable tokens (doctor JSON ``error_kind``).
SUMMARIES: dict[str, str] = {
    "authentication_failed": "the server rejected the user name or password",
    "access_denied": "this user may not connect to this database, or not from this host",
    "unknown_database": "the database does not exist on that server",
    "unknown_host": "the host name does not resolve",
    "connection_refused": "nothing accepts connections at that host and port",
    "cannot_connect": "nothing answered at that host and port: refused, or timed out",
    "timeout": "connecting timed out (no answer from that host and port)",
    "network_unreachable": "there is no network route to that host",
    "too_many_connections": "the server refuses new connections: too many are open",
    "server_unavailable": "the server is starting up, shutting down or in recovery",
    "no_writable_host": "no host offered the session target_session_attrs asks for (e.g. all read-only)",
    "tls": "the TLS handshake or certificate check failed",
    "connection_lost": "the server (or something in between) closed the connection",
    "options_rejected": "the driver rejected the connection options before connecting",
    "settings_rejected": "Django rejected the database settings before connecting",
    "encoding": "a setting holds characters the driver cannot encode (PASSWORD, USER or NAME)",
    "failed": "the connection failed",
}
#: Kinds that are mistakes in the settings themselves: nothing was sent to the server.
SETTINGS_KINDS = frozenset({"options_rejected", "settings_rejected", "encoding"})
#: Kinds where the server answered and refused this client: waiting for it cannot help. A TLS
#: failure is one (TLS required but not offered, an untrusted or mismatched certificate: MySQL 2026,
#: libpq's wording); a TLS session cut short (EOF, SSL SYSCALL) is "connection_lost" instead.
REFUSAL_KINDS = frozenset({"authentication_failed", "access_denied", "unknown_database", "tls"}) | SETTINGS_KINDS


@dataclass(frozen=True)
class ConnectFailure:
    kind: str
    #: MySQL error number, SQLSTATE, or None; always ours to show.
    code: str | None
    #: "MySQL error 1045", "SQLSTATE 28P01" or the exception's module and class.
    source: str
    #: The setting the failure is about, when the message names one we know: ("OPTIONS", "sslmode"), ("PORT",).
    setting: tuple[str, ...] | None = None
    #: For settings_rejected: what Django refused, in our words.
    detail: str | None = None

    @property
    def summary(self) -> str:
        text = SUMMARIES[self.kind] + (f": {self.detail}" if self.detail else "")
        return f"{text} ({self.source})"


# MySQL/MariaDB server and client error numbers met while connecting.
_MYSQL_KINDS = {
    1045: "authentication_failed",
    1698: "authentication_failed",
    1862: "authentication_failed",  # password expired
    3118: "authentication_failed",  # account locked
    4151: "authentication_failed",  # account locked (MariaDB)
    1044: "access_denied",
    1130: "access_denied",
    1049: "unknown_database",
    1040: "too_many_connections",
    1203: "too_many_connections",
    1053: "server_unavailable",
    2005: "unknown_host",
    2006: "connection_lost",
    2013: "connection_lost",
    2026: "tls",
}
# OS errno of a failed TCP connect, as PyMySQL ("[Errno 111]") and libmariadb ("(111)") quote it.
_ERRNO_KINDS = {
    111: "connection_refused",
    110: "timeout",
    113: "network_unreachable",
    101: "network_unreachable",
    -2: "unknown_host",
    -3: "unknown_host",
    -5: "unknown_host",
}
# The OS errno as each driver quotes it: PyMySQL "[Errno 111]", libmariadb "(111)" at the end,
# mysql-connector-python "(Errno 111: Connection refused)". Matched against the lower-cased text.
_ERRNO = re.compile(r"\[errno (-?\d+)\]|\((-?\d+)\)\s*$|\(errno (-?\d+):")

_PG_SQLSTATES = {
    "28P01": "authentication_failed",
    "28000": "authentication_failed",
    "3D000": "unknown_database",
    "42501": "access_denied",
    "53300": "too_many_connections",
    "57P03": "server_unavailable",
}
# libpq/psycopg connection errors carry no SQLSTATE: their (English) wording is all there is.
# First match wins, so option errors come before anything that merely mentions "ssl".
_PG_MESSAGES: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(pattern), kind)
    for pattern, kind in (
        (r"invalid connection option|invalid dsn|invalid uri|missing \"=\"|unterminated quoted", "options_rejected"),
        (r"invalid \w+ value|invalid integer value|invalid value for|invalid port", "options_rejected"),
        (r"authentication failed|no password supplied|fe_sendauth", "authentication_failed"),
        (r"role \".*\" does not exist", "authentication_failed"),
        (r"database \".*\" does not exist", "unknown_database"),
        (r"pg_hba\.conf|permission denied for database|not permitted to log in", "access_denied"),
        (r"too many clients|remaining connection slots|too many connections", "too_many_connections"),
        (r"starting up|shutting down|in recovery mode|not yet accepting connections", "server_unavailable"),
        # libpq's target_session_attrs found no host of the wanted kind: a failover may still promote one.
        (
            r"session is read-only|session is not read-only|server is in hot standby|server is not in hot standby",
            "no_writable_host",
        ),
        (r"translate host name|resolve host|name or service not known|name resolution|nodename", "unknown_host"),
        (r"connection refused", "connection_refused"),
        (r"timeout expired|timed out", "timeout"),
        (r"no route to host|network is unreachable", "network_unreachable"),
        (r"ssl syscall error|eof detected|ssl connection has been closed unexpectedly", "connection_lost"),
        (r"ssl|certificate|tls", "tls"),
        (r"server closed the connection|could not receive data|could not send data|terminating", "connection_lost"),
    )
)

_DJANGO_REFUSALS: tuple[tuple[str, str], ...] = (
    ("longer than postgresql's limit", "NAME is longer than PostgreSQL's limit of 63 characters"),
    ("supply the name", "NAME (or OPTIONS['service']) is missing"),
    ("persistent connections", "a pool ('pool' in OPTIONS) needs CONN_MAX_AGE = 0"),
    ("pooling requires", "a pool ('pool' in OPTIONS) needs psycopg 3 and psycopg_pool"),
)


def _source(exc: BaseException) -> str:
    return f"{type(exc).__module__.split('.')[0]} {type(exc).__name__}"


def _named_setting(message: str, option_names: frozenset[str]) -> tuple[str, ...] | None:
    # Only names we already hold are returned: a key of the alias's OPTIONS, or PORT/HOST.
    for key in sorted(option_names, key=len, reverse=True):
        if re.search(rf"(?<![A-Za-z0-9_]){re.escape(key.lower())}(?![A-Za-z0-9_])", message):
            return ("OPTIONS", key)
    for word in ("port", "host"):
        if re.search(rf"\binvalid {word}\b|\b{word} number\b", message):
            return (word.upper(),)
    return None


def _mysql_kind(code: int, message: str) -> str:
    if code in _MYSQL_KINDS:
        return _MYSQL_KINDS[code]
    if code in (2002, 2003):
        match = _ERRNO.search(message)
        errno = int(next(g for g in match.groups() if g is not None)) if match else None
        if "timed out" in message:
            return "timeout"
        return _ERRNO_KINDS.get(errno, "cannot_connect") if errno is not None else "cannot_connect"
    return "failed"


def _refused_by_django(cause: BaseException) -> ConnectFailure:
    text = str(cause).lower()
    detail = next((ours for needle, ours in _DJANGO_REFUSALS if needle in text), None)
    if detail is None and not isinstance(cause, ImproperlyConfigured):
        detail = "HOST, PORT, NAME, USER or an OPTIONS value has the wrong type"
    return ConnectFailure("settings_rejected", None, _source(cause), detail=detail)


def _by_sqlstate_or_wording(exc: BaseException, message: str, option_names: frozenset[str]) -> ConnectFailure:
    sqlstate = getattr(exc, "sqlstate", None) or getattr(exc, "pgcode", None)
    if isinstance(sqlstate, str) and sqlstate in _PG_SQLSTATES:
        return ConnectFailure(_PG_SQLSTATES[sqlstate], sqlstate, f"SQLSTATE {sqlstate}")
    kind = next((k for pattern, k in _PG_MESSAGES if pattern.search(message)), "failed")
    setting = _named_setting(message, option_names) if kind == "options_rejected" else None
    code = sqlstate if isinstance(sqlstate, str) and sqlstate else None
    return ConnectFailure(kind, code, f"SQLSTATE {code}" if code else _source(exc), setting=setting)


def refused_login(exc: BaseException) -> bool:
    """True when a failed connect means the server refused these credentials or this database.

    psycopg 3 raises such errors without a SQLSTATE and on a connection libpq marks bad, which
    otherwise reads as a disconnect; a worker must not wait RECONNECT_TIMEOUT on a wrong password.
    """
    return any(describe_failure(e).kind in REFUSAL_KINDS for e in _errors.chain(exc))


def describe_failure(exc: BaseException, option_names: frozenset[str] = frozenset()) -> ConnectFailure:
    """Reduce a failed connect to a code and a kind; the exception's text never leaves this function."""
    if isinstance(exc, ParamsError):
        return _refused_by_django(exc.__cause__ or exc)
    if isinstance(exc, UnicodeError):
        return ConnectFailure("encoding", None, _source(exc))
    message = str(exc).lower()
    code = exc.args[0] if exc.args else None
    if type(exc).__module__.split(".")[0] in MYSQL_MODULES and isinstance(code, int) and not isinstance(code, bool):
        return ConnectFailure(_mysql_kind(code, message), str(code), f"MySQL error {code}")
    if isinstance(exc, OSError) and exc.errno in _ERRNO_KINDS:  # a socket error no driver wrapped
        return ConnectFailure(_ERRNO_KINDS[exc.errno], None, _source(exc))
    if isinstance(exc, (TypeError, ValueError, AttributeError)) or type(exc).__name__ in (
        "ProgrammingError",
        "NotSupportedError",
    ):
        # Raised by the driver before any I/O: an unknown keyword (AttributeError in
        # mysql-connector-python), a value of the wrong type or range.
        return ConnectFailure("options_rejected", None, _source(exc), setting=_named_setting(message, option_names))
    return _by_sqlstate_or_wording(exc, message, option_names)
