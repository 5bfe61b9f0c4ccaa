"""What a SQL statement does, from its first word: read, write, COMMIT or neutral. Pure."""

from __future__ import annotations

import re

__all__ = ["COMMIT", "NEUTRAL", "READ", "WRITE", "classify"]

READ, WRITE, COMMIT, NEUTRAL = "read", "write", "commit", "neutral"

_FIRST_WORD = re.compile(r"\s*(?:/\*.*?\*/\s*|--[^\n]*\n\s*|\(\s*)*([A-Za-z]+)", re.S)
_DML = re.compile(r"\b(INSERT|UPDATE|DELETE|MERGE|REPLACE)\b", re.I)
_INTO = re.compile(r"\bINTO\b", re.I)
_ANALYZE = re.compile(r"\bANALY[SZ]E\b", re.I)
_READ_WORDS = frozenset({"SELECT", "SHOW", "EXPLAIN", "DESCRIBE", "DESC", "VALUES", "TABLE"})
_NEUTRAL_WORDS = frozenset({"BEGIN", "START", "SAVEPOINT", "RELEASE", "ROLLBACK", "SET", "USE"})


def classify(sql: str) -> str:
    """READ, WRITE, COMMIT or NEUTRAL for one SQL statement; anything unrecognised is a WRITE."""
    m = _FIRST_WORD.match(sql)
    word = m.group(1).upper() if m else ""
    if word in ("SELECT", "VALUES", "TABLE"):
        # SELECT ... INTO creates a table (PostgreSQL) or writes a file or variables (MySQL).
        return WRITE if _INTO.search(sql) else READ
    if word in ("WITH", "EXPLAIN"):
        # A PostgreSQL CTE may hide data-modifying statements; EXPLAIN ANALYZE runs its statement.
        return WRITE if _DML.search(sql) and (word == "WITH" or _ANALYZE.search(sql)) else READ
    if word in _READ_WORDS:
        return READ
    if word in ("COMMIT", "END"):
        return COMMIT
    if word in _NEUTRAL_WORDS:
        return NEUTRAL
    return WRITE
