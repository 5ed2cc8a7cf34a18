"""The schema revision: which one this code expects, which one a database has, and Alembic's upgrade to it."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import psycopg

from ..errors import DatabaseUnavailable, ServerCrashed
from .connect import connect, redact, scalar

log = logging.getLogger(__name__)

# The Alembic head this code expects (tests check it equals migrations/versions' head).
SCHEMA_REVISION = "0011"


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


def schema_revision(conn: psycopg.Connection[Any]) -> str | None:
    if scalar(conn, "SELECT to_regclass('public.alembic_version')") is None:
        return None
    row = conn.execute("SELECT version_num FROM alembic_version").fetchone()
    return row[0] if row else None


def upgrade(url: str, server_log: Path | None = None) -> str:
    """Run the Alembic migrations to head on the database at url; returns the revision reached.

    With the embedded server's log, a migration whose server process crashed says so.
    """
    from alembic import command
    from alembic.config import Config

    from ..settings import sqlalchemy_url

    conn = connect(url, register=False)
    try:
        available = conn.execute("SELECT 1 FROM pg_available_extensions WHERE name = 'vector'").fetchone()
        if available is None:
            raise DatabaseUnavailable(
                f"{redact(url)}: the pgvector extension is not installed on this server "
                "(use an image such as pgvector/pgvector, or install postgresql-NN-pgvector)"
            )
    finally:
        conn.close()
    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_folder()))
    cfg.attributes["url"] = sqlalchemy_url(url)
    log_start = server_log.stat().st_size if server_log is not None and server_log.exists() else 0
    try:
        command.upgrade(cfg, "head")
    except Exception as exc:  # noqa: BLE001 - Alembic/SQLAlchemy wrap driver errors in many types
        from .embedded import crash_in_log

        crash = crash_in_log(server_log, since=log_start) if server_log is not None else None
        if crash is not None:
            raise ServerCrashed(f"migrating {redact(url)} failed: {crash.describe()}; the migration was rolled "
                                f"back (server log: {server_log})") from None
        raise DatabaseUnavailable(f"migrating {redact(url)} failed: {str(exc).splitlines()[0]}") from None
    conn = connect(url, register=False)
    try:
        update_vector(conn)
    finally:
        conn.close()
    return SCHEMA_REVISION


def schema_mismatch(where: str, revision: str | None, has_images: bool) -> str:
    """Why this database's schema does not fit this imsearch, and what fixes it."""
    if revision is None and has_images:
        return (f"{where}: an `images` table exists but no imsearch schema revision is recorded (alembic_version "
                "is missing or empty), so it was not made by imsearch; use another database or rename that table")
    if revision is None:
        return f"{where}: no imsearch schema here; run `imsearch db upgrade`"
    if not known_revision(revision):
        return (f"{where}: schema revision {revision} is unknown to this imsearch (which needs {SCHEMA_REVISION}): "
                "a newer imsearch migrated it; upgrade imsearch")
    return (f"{where}: schema revision {revision}, this imsearch needs {SCHEMA_REVISION}; "
            "run `imsearch db upgrade`")


def known_revision(revision: str | None) -> bool:
    """Whether this imsearch's migrations include `revision` (an older schema, or the current one)."""
    from alembic.config import Config
    from alembic.script import ScriptDirectory
    from alembic.util import CommandError

    if revision is None:
        return False
    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_folder()))
    try:
        return ScriptDirectory.from_config(cfg).get_revision(revision) is not None
    except CommandError:
        return False


def migrations_folder() -> Path:
    """The Alembic scripts, whether imsearch runs from a checkout or from an installed wheel."""
    import importlib.util

    spec = importlib.util.find_spec("imsearch_migrations")
    if spec is not None and spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    return Path(__file__).resolve().parents[2] / "migrations"
