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
    size_embedded(uri)
    return uri


def quarter_of_memory_mb() -> int | None:
    """A quarter of the memory this machine (or its cgroup) has, in MB; None where it cannot be read."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None
    try:
        total = min(total, int(Path("/sys/fs/cgroup/memory.max").read_text()))
    except (OSError, ValueError):  # no cgroup v2 limit ("max" or absent)
        pass
    return total // 4 // 2**20


def shared_buffers_mb() -> int:
    """A quarter of the memory, between PostgreSQL's default 128 MB and 2 GB."""
    return max(128, min(2048, quarter_of_memory_mb() or 128))


def build_memory_mb() -> int:
    """maintenance_work_mem for index builds: a quarter of the memory, between the default 64 MB and 2 GB."""
    return max(64, min(2048, quarter_of_memory_mb() or 64))


def build_memory() -> str | None:
    """`IMSEARCH_BUILD_MEMORY` (e.g. `2GB`): maintenance_work_mem for the indexes imsearch builds, on any server."""
    return os.environ.get("IMSEARCH_BUILD_MEMORY") or None


def size_embedded(uri: str) -> None:
    """Size the embedded server's memory for HNSW indexes: its buffer cache (from its next start on) and the
    memory an index build may use (at once).

    An index search reads pages at random; at PostgreSQL's default 128 MB of shared_buffers a 100k-row library
    (1.5 GB of indexes) reads most of them from the OS cache, which made mode other 1.6x slower. An HNSW build whose
    graph outgrows maintenance_work_mem (64 MB: about 10,000 rows) goes on far slower (docs/scaling.md has both).
    Only initdb's values are replaced: a value set by anyone else (`ALTER SYSTEM`, postgresql.conf) is left alone.
    """
    import psycopg

    wanted = (("shared_buffers", 128, shared_buffers_mb()), ("maintenance_work_mem", 64, build_memory_mb()))
    try:
        with psycopg.connect(uri, autocommit=True) as conn:
            changed = False
            for name, initdb_mb, mb in wanted:
                untouched = conn.execute(
                    "SELECT pg_size_bytes(current_setting(name)) = %s * 2^20"
                    " AND coalesce(sourcefile, '') NOT LIKE '%%postgresql.auto.conf' AND NOT pending_restart"
                    " FROM pg_settings WHERE name = %s", (initdb_mb, name)).fetchone()
                if untouched and untouched[0] and mb != initdb_mb:
                    conn.execute(f"ALTER SYSTEM SET {name} = '{mb:d}MB'")
                    changed = True
            if changed:
                conn.execute("SELECT pg_reload_conf()")
    except psycopg.Error as exc:  # a tuning step never stops a command
        log.debug("could not size the embedded server's memory: %s", exc)


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
