"""The connection: opening it with pgvector's types, and one line that says why it failed."""

from __future__ import annotations

import logging
import re
import weakref
from typing import Any, Protocol, Sequence, Union

import psycopg
from pgvector.psycopg import register_vector

from ..errors import DatabaseUnavailable

log = logging.getLogger(__name__)
# The URL each open connection came from, for the messages of its errors (imsearch.db.errors).
_urls: weakref.WeakKeyDictionary[psycopg.Connection[Any], str] = weakref.WeakKeyDictionary()


def redact(url: str) -> str:
    """A URL without its password, for messages."""
    return re.sub(r"(://[^:/@]*):[^@]*@", r"\1:***@", url)


def explain_connect_error(exc: Exception, url: str) -> str:
    """One line for a failed connection: what went wrong and what to check (never the password)."""
    text = str(exc).strip().replace(url, redact(url))
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    first = next((ln for ln in lines if "FATAL" in ln or "error" in ln.lower()), lines[0] if lines else repr(exc))
    first = re.sub(r"^(connection failed|connection is bad):\s*", "", first)
    first = re.sub(r'^connection to server (at [^,]+, port \d+|on socket "[^"]+") failed:\s*', "", first)
    first = re.sub(r"^FATAL:\s*", "", first)
    if "password authentication failed" in text or "no password supplied" in text:
        hint = "wrong user or password: check them in DATABASE_URL"
    elif re.search(r'database "[^"]+" does not exist', text):
        hint = "create it, or fix the database name in DATABASE_URL"
    elif re.search(r'role "[^"]+" does not exist', text):
        hint = "no such user on that server: fix the user name in DATABASE_URL"
    elif "resolve host" in text or "Name or service not known" in text:
        hint = "unknown host name: fix the host in DATABASE_URL"
    elif "Connection refused" in text or "could not connect" in text or "No such file" in text:
        hint = "no server answers there: is it running? check host and port in DATABASE_URL"
    elif "timeout" in text.lower():
        hint = "the server did not answer in time"
    elif isinstance(exc, psycopg.ProgrammingError):
        hint = "not a valid PostgreSQL URL: postgresql://user:password@host:5432/dbname"
    else:
        hint = "check DATABASE_URL"
    return f"cannot connect to {redact(url)}: {first} ({hint})"


def connect(url: str, *, register: bool = True) -> psycopg.Connection[Any]:
    """A psycopg connection in autocommit mode, with pgvector's types registered when the extension exists."""
    try:
        conn = psycopg.connect(url, autocommit=True, connect_timeout=10)
    except (psycopg.OperationalError, psycopg.ProgrammingError) as exc:  # refused, or a malformed URL
        raise DatabaseUnavailable(explain_connect_error(exc, url)) from None
    _urls[conn] = url
    if register:
        try:
            register_vector(conn)
        except psycopg.ProgrammingError:
            pass  # no vector extension yet: the first migration creates it
    return conn


def url_of(conn: psycopg.Connection[Any]) -> str | None:
    """The URL `connect` opened `conn` with; None for a connection opened elsewhere."""
    return _urls.get(conn)


class Connected(Protocol):
    """What holds an open connection and replaces it when it breaks: the Store."""

    conn: psycopg.Connection[Any]


# What a stage function that reads or writes rows takes: the Store (the facade's way), or a bare connection (the
# SQL tests', the benchmarks', a worker thread's own).
Where = Union[psycopg.Connection[Any], Connected]


def connection(where: Where) -> psycopg.Connection[Any]:
    """The connection to use now: the one given, or the Store's current one (it may have reconnected since)."""
    return where if isinstance(where, psycopg.Connection) else where.conn


def scalar(conn: psycopg.Connection[Any], sql: str, params: Sequence[Any] = ()) -> Any:
    """The first column of the first row of a query that always returns one row."""
    row = conn.execute(sql, params).fetchone()
    assert row is not None, sql
    return row[0]


def pgvector_version(conn: psycopg.Connection[Any]) -> tuple[int, ...] | None:
    row = conn.execute("SELECT extversion FROM pg_extension WHERE extname = 'vector'").fetchone()
    if row is None:
        return None
    return tuple(int(p) for p in re.findall(r"\d+", row[0])[:3])


def update_vector(conn: psycopg.Connection[Any]) -> tuple[str, str] | None:
    """Bring the vector extension up to the version the server ships (`ALTER EXTENSION vector UPDATE`), as after a
    move to a newer embedded build or a pgvector package upgrade; returns (old, new) when it changed anything.

    The shared library is always the new one; the update brings the extension's SQL objects in line with it.
    """
    row = conn.execute(
        "SELECT e.extversion, a.default_version FROM pg_extension e "
        "JOIN pg_available_extensions a ON a.name = e.extname WHERE e.extname = 'vector'"
    ).fetchone()
    if row is None or row[0] == row[1]:
        return None
    try:
        conn.execute("ALTER EXTENSION vector UPDATE")
    except psycopg.errors.InsufficientPrivilege:
        log.warning("pgvector's SQL objects are at %s, its library at %s: ask the extension's owner to run "
                    "ALTER EXTENSION vector UPDATE", row[0], row[1])
        return None
    log.info("updated the vector extension from %s to %s", row[0], row[1])
    return row[0], row[1]
