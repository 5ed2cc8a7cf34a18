"""Where the database and the weights come from: environment and defaults."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

DEFAULT_WEIGHTS = "IMAGENET1K_V1"


ROOT_HOME = Path("/var/lib/imsearch")
# How long a migration waits for the migration lock by default (`db upgrade --lock-timeout`): long enough for another
# imsearch process's usual migration, short enough that a session holding it for ever (any login may take an
# advisory lock) is an error, not a hang. Here, not in db/, so that the CLI shows it without loading a driver.
LOCK_TIMEOUT = 60  # seconds


def home() -> Path:
    """imsearch's own data folder: `IMSEARCH_HOME`, else the platform's user data folder.

    For root, /var/lib/imsearch: the embedded server then runs as a system user, which cannot pass root's 0700 home
    folder, and imsearch widens no folder for it. A library that earlier builds made in root's home stays there.
    """
    env = os.environ.get("IMSEARCH_HOME")
    if env:
        return Path(env).expanduser().resolve()
    import platformdirs

    user = Path(platformdirs.user_data_dir("imsearch", appauthor=False))
    if os.name == "posix" and os.geteuid() == 0 and not (user / "pgdata" / "PG_VERSION").exists():
        return ROOT_HOME
    return user


@dataclass(frozen=True)
class Settings:
    """What a run needs to know before it touches the database or the model."""

    database_url: str | None = None
    weights: str = DEFAULT_WEIGHTS
    backend: str = "auto"

    @classmethod
    def from_env(cls, database_url: str | None = None, weights: str | None = None,
                 backend: str | None = None) -> Settings:
        return cls(
            database_url=database_url or os.environ.get("DATABASE_URL") or None,
            weights=weights or os.environ.get("IMSEARCH_WEIGHTS") or DEFAULT_WEIGHTS,
            backend=backend or os.environ.get("IMSEARCH_BACKEND") or "auto",
        )


def embedded_pgdata() -> Path:
    return home() / "pgdata"


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


def server_log(settings: Settings) -> Path | None:
    """The embedded server's log when imsearch runs on it (None for DATABASE_URL: its log is the server's own)."""
    return None if settings.database_url else embedded_pgdata() / "log"


def libpq_url(url: str) -> str:
    """The same URI in libpq's form: `postgres://` and SQLAlchemy's `postgresql+psycopg://` become `postgresql://`.
    Starts nothing: imsearch.db.embedded.database_url gives the URL to connect to."""
    for prefix in ("postgresql+psycopg://", "postgres://"):
        if url.startswith(prefix):
            url = "postgresql://" + url[len(prefix):]
    return url


def sqlalchemy_url(url: str) -> str:
    """The same URI for SQLAlchemy's psycopg 3 dialect."""
    return "postgresql+psycopg://" + url.split("://", 1)[1]
