"""Where the database and the weights come from: environment, defaults, and the embedded server."""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

from .errors import DatabaseUnavailable

log = logging.getLogger(__name__)

DEFAULT_WEIGHTS = "IMAGENET1K_V1"


def home() -> Path:
    """imsearch's own data folder: `IMSEARCH_HOME`, else the platform's user data folder."""
    env = os.environ.get("IMSEARCH_HOME")
    if env:
        return Path(env).expanduser().resolve()
    import platformdirs

    return Path(platformdirs.user_data_dir("imsearch", appauthor=False))


@dataclass(frozen=True)
class Settings:
    """What a run needs to know before it touches the database or the model."""

    database_url: str | None = None
    weights: str = DEFAULT_WEIGHTS

    @classmethod
    def from_env(cls, database_url: str | None = None, weights: str | None = None) -> Settings:
        return cls(
            database_url=database_url or os.environ.get("DATABASE_URL") or None,
            weights=weights or os.environ.get("IMSEARCH_WEIGHTS") or DEFAULT_WEIGHTS,
        )


def embedded_pgdata() -> Path:
    return home() / "pgdata"


def start_embedded(pgdata: Path | None = None) -> str:
    """Start (or join) the embedded PostgreSQL under IMSEARCH_HOME and return its libpq URI.

    The server is shared by every imsearch process on the same folder and stops with the last one.
    """
    pgdata = pgdata or embedded_pgdata()
    try:
        pgdata.parent.mkdir(parents=True, exist_ok=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # platformdirs warns when XDG_RUNTIME_DIR is unset
            import pgserver

            server = pgserver.get_server(pgdata)
    except Exception as exc:  # noqa: BLE001 - pgserver raises many kinds; all mean the same to a user
        raise DatabaseUnavailable(
            f"cannot start the embedded PostgreSQL in {pgdata}: {exc} "
            "(set DATABASE_URL to use another server)"
        ) from exc
    uri = str(server.get_uri())
    info = server.get_postmaster_info()
    if info.socket_dir is not None and info.port not in (None, 5432):
        uri += f"&port={info.port}"  # `imsearch db serve --port N` runs it with the socket .s.PGSQL.N
    return uri


def libpq_url(settings: Settings) -> str:
    """The libpq connection URI: DATABASE_URL as given, else the embedded server's."""
    url = settings.database_url or start_embedded()
    for prefix in ("postgresql+psycopg://", "postgres://"):
        if url.startswith(prefix):
            url = "postgresql://" + url[len(prefix):]
    return url


def sqlalchemy_url(url: str) -> str:
    """The same URI for SQLAlchemy's psycopg 3 dialect."""
    return "postgresql+psycopg://" + url.split("://", 1)[1]
