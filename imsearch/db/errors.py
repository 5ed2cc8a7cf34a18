"""Driver errors become library errors here, and only here: one line that says what failed, where, and why.

Outside `imsearch.db` nothing catches a psycopg exception: code that talks to the database runs inside
`translated()` (or a function decorated with `translating()`), and the CLI and the web page see only the
`ImsearchError` family. A lost connection reads the same wherever it happens: "searching URL failed: <the
server's first line>", or the server's crash when the embedded server's log records one.
"""

from __future__ import annotations

import functools
from contextlib import contextmanager
from typing import Any, Callable, Concatenate, Iterator, Mapping, ParamSpec, Protocol, TypeVar

import psycopg

from ..errors import DatabaseUnavailable, ImsearchError
from .connect import Where, connection, redact, url_of

P = ParamSpec("P")
R = TypeVar("R")

class Lost(Protocol):
    """What knows more about a lost connection than its URL: the Store, which reads the server's log."""

    url: str

    def lost(self, exc: psycopg.OperationalError, doing: str) -> ImsearchError: ...


def first_line(exc: BaseException) -> str:
    """The server's (or the driver's) first line, or the error's type when it says nothing."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def failed(exc: BaseException, doing: str, url: str | None) -> DatabaseUnavailable:
    """The one wording of a statement the database did not finish: what was being done, where, and why."""
    where = redact(url) if url is not None else "the database"
    return DatabaseUnavailable(f"{doing} {where} failed: {first_line(exc)}")


def translate(exc: psycopg.Error, doing: str, where: psycopg.Connection[Any] | Lost | None = None,
              refusals: Mapping[str, Callable[[], ImsearchError]] | None = None) -> ImsearchError:
    """The library error for a driver error: a refusal the caller names by SQLSTATE, a value the database cannot
    take (the request's own fault), else the database failed (lost, crashed, or refused the statement)."""
    refused = (refusals or {}).get(exc.sqlstate or "")
    if refused is not None:
        return refused()
    if isinstance(exc, psycopg.DataError):
        return ImsearchError(f"the database refused a value of the request: {first_line(exc)}")
    if where is None or isinstance(where, psycopg.Connection):
        return failed(exc, doing, None if where is None else url_of(where))
    if isinstance(exc, psycopg.OperationalError):
        return where.lost(exc, doing)
    return failed(exc, doing, where.url)


@contextmanager
def translated(doing: str, where: psycopg.Connection[Any] | Lost | None = None, *,
               refusals: Mapping[str, Callable[[], ImsearchError]] | None = None) -> Iterator[None]:
    """Run a block whose driver errors come out as library errors (`translate`); `doing` is the message's verb,
    "searching" as in "searching URL failed: ...", and `where` the connection (or Store) the block uses."""
    try:
        yield
    except psycopg.Error as exc:
        raise translate(exc, doing, where, refusals) from None


def translating(doing: str) -> Callable[[Callable[Concatenate[psycopg.Connection[Any], P], R]],
                                        Callable[Concatenate[Where, P], R]]:
    """`translated(doing, conn)` around a function whose first argument is the connection it uses; callers may
    pass the Store instead, whose current connection it then gets."""
    def decorate(fn: Callable[Concatenate[psycopg.Connection[Any], P], R]) -> Callable[Concatenate[Where, P], R]:
        @functools.wraps(fn)
        def run(where: Where, /, *args: P.args, **kwargs: P.kwargs) -> R:
            conn = connection(where)
            with translated(doing, conn):
                return fn(conn, *args, **kwargs)
        return run
    return decorate
