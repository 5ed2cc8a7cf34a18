"""The schema revision: which one this code expects, which one a database has, and Alembic's upgrade to it."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import psycopg

from ..errors import DatabaseUnavailable, ServerCrashed
from ..settings import LOCK_TIMEOUT
from .connect import connect, redact, scalar, update_vector
from .serverlog import crash_in_log

log = logging.getLogger(__name__)

# The Alembic head this code expects (tests check it equals migrations/versions' head).
SCHEMA_REVISION = "0020"
# Any number fixed for imsearch: concurrent first runs wait for each other instead of racing on CREATE TABLE.
MIGRATION_LOCK = 7_284_519_311
LOCK_POLL = 0.2  # seconds between tries
# How long a migration waits in silence before it says who holds the lock: another imsearch migrating is given
# longer (its usual migration is over by then, so two commands started together stay quiet).
SAY_AFTER = 2.0
SAY_AFTER_IMSEARCH = 15.0
# What imsearch's migrating connection calls itself in pg_stat_activity, so that a waiting one can say who it waits on.
APPLICATION_NAME = "imsearch migration"
# Migrations that rebuild the vector indexes read every stored vector: past this many rows only `imsearch db upgrade`
# runs them (with a progress bar), where other commands would silently stall for minutes.
REBUILDS = ("0013", "0016", "0018")
LONG_MIGRATION_ROWS = 20_000
# Index builds in progress, as PostgreSQL reports them to any session (pgvector counts tuples as it adds them).
BUILDS = """
SELECT coalesce(i.relname, 'an index'), p.tuples_done, greatest(t.reltuples, 0)::bigint
FROM pg_stat_progress_create_index p
JOIN pg_class t ON t.oid = p.relid
LEFT JOIN pg_class i ON i.oid = p.index_relid
WHERE p.datid = (SELECT oid FROM pg_database WHERE datname = current_database())
"""


class MigrationLocked(DatabaseUnavailable):
    """Another session held the migration lock for longer than the migration would wait."""


@dataclass(frozen=True)
class LockHolder:
    """A session holding the migration lock, as pg_locks and pg_stat_activity tell it."""

    pid: int
    user: str | None
    application: str | None

    def quiet_for(self) -> float:
        """Seconds to wait before saying who holds the lock."""
        return SAY_AFTER_IMSEARCH if self.application == APPLICATION_NAME else SAY_AFTER

    def describe(self) -> str:
        app = f", application {self.application!r}" if self.application else ""
        return f"process {self.pid} (user {self.user or '?'}{app})"


def lock_holder(conn: Any) -> LockHolder | None:
    """Who holds the migration lock in this database (an SQLAlchemy or psycopg connection), else None."""
    from sqlalchemy import text

    row = conn.execute(text(
        "SELECT l.pid, a.usename, a.application_name FROM pg_locks l "
        "LEFT JOIN pg_stat_activity a ON a.pid = l.pid "
        "WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1 "
        "AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) "
        "AND l.classid::bigint = :hi AND l.objid::bigint = :lo AND l.pid <> pg_backend_pid() LIMIT 1"),
        {"hi": MIGRATION_LOCK >> 32, "lo": MIGRATION_LOCK & 0xFFFFFFFF}).fetchone()
    return None if row is None else LockHolder(int(row[0]), row[1], row[2] or None)


def take_lock(conn: Any, timeout: float | None = LOCK_TIMEOUT, *,
              waiting: Callable[[LockHolder], None] | None = None) -> None:
    """Take the migration lock on an SQLAlchemy connection, waiting up to `timeout` seconds (None: for ever).

    Once it has waited a while (SAY_AFTER) it says who holds the lock, once per holder. Past the timeout it raises
    MigrationLocked naming them. A session that is not imsearch may take the lock too (readers can call
    pg_advisory_lock).
    """
    from sqlalchemy import text

    started = time.monotonic()
    deadline = None if timeout is None else started + timeout
    said: LockHolder | None = None
    while True:
        if conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": MIGRATION_LOCK}).scalar():
            return
        holder = lock_holder(conn)
        if holder is not None and holder != said and time.monotonic() - started >= holder.quiet_for():
            said = holder
            (waiting or _say_waiting)(holder)
        if deadline is not None and time.monotonic() >= deadline:
            who = holder.describe() if holder is not None else "another session (gone by now)"
            raise MigrationLocked(
                f"the migration lock of this database is held by {who}: waited {timeout:g} s. If that is another "
                f"imsearch migrating, wait longer (`imsearch db upgrade --lock-timeout SECONDS`); otherwise end "
                f"that session (SELECT pg_terminate_backend({holder.pid if holder else 'PID'}))")
        time.sleep(LOCK_POLL)


def _say_waiting(holder: LockHolder) -> None:
    log.warning("waiting for the migration lock, held by %s", holder.describe())


def schema_revision(conn: psycopg.Connection[Any]) -> str | None:
    if scalar(conn, "SELECT to_regclass('public.alembic_version')") is None:
        return None
    row = conn.execute("SELECT version_num FROM alembic_version").fetchone()
    return row[0] if row else None


def upgrade(url: str, server_log: Path | None = None, *, lock_timeout: float | None = LOCK_TIMEOUT,
            progress: Callable[[str, int, int], None] | None = None) -> str:
    """Run the Alembic migrations to head on the database at url; returns the revision reached.

    The migration waits up to `lock_timeout` seconds (None: for ever) for another session's migration lock.
    With the embedded server's log, a migration whose server process crashed says so. `progress(index, rows done,
    rows in the table)` hears of each index build, read from another session every half second.
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
    for _, shard in _shards(url):  # a sharded library's shards first: the coordinator's functions call theirs
        upgrade(shard, lock_timeout=lock_timeout, progress=progress)
    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_folder()))
    cfg.attributes["url"] = sqlalchemy_url(url)
    cfg.attributes["lock_timeout"] = lock_timeout
    log_start = server_log.stat().st_size if server_log is not None and server_log.exists() else 0
    try:
        with watching_builds(url, progress):
            command.upgrade(cfg, "head")
    except MigrationLocked:
        raise
    except Exception as exc:  # noqa: BLE001 - Alembic/SQLAlchemy wrap driver errors in many types
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


def _shards(url: str) -> list[tuple[str, str]]:
    """(server, URL) of the shards of a sharded library's coordinator; none for any other database."""
    from .shards import shard_urls

    conn = connect(url, register=False)
    try:
        return shard_urls(conn) if scalar(conn, "SELECT to_regclass('public.images')") is not None else []
    finally:
        conn.close()


@contextlib.contextmanager
def watching_builds(url: str, progress: Callable[[str, int, int], None] | None) -> Iterator[None]:
    """Report the database's index builds to `progress` from a thread of its own while the body runs."""
    if progress is None:
        yield
        return
    done = threading.Event()

    def watch() -> None:
        try:
            conn = connect(url, register=False)
        except Exception:  # noqa: BLE001 - a progress bar is not worth failing a migration for
            return
        with conn:
            while not done.wait(0.5):
                for name, rows, total in conn.execute(BUILDS).fetchall():
                    progress(name, rows, total)

    thread = threading.Thread(target=watch, name="imsearch-build-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join(timeout=5)


def long_migration(conn: psycopg.Connection[Any], revision: str | None) -> str | None:
    """Why migrating this database from `revision` should run only through `imsearch db upgrade`: a pending
    revision rebuilds the vector indexes of a large library. None when it is quick."""
    if revision is None or revision >= max(REBUILDS) or not known_revision(revision):
        return None
    rows = scalar(conn, "SELECT count(*) FROM (SELECT FROM images LIMIT %s) r", (LONG_MIGRATION_ROWS + 1,))
    if rows <= LONG_MIGRATION_ROWS:
        return None
    return (f"schema revision {revision}, this imsearch needs {SCHEMA_REVISION}, which rebuilds the vector indexes "
            f"of more than {LONG_MIGRATION_ROWS:,} stored images (minutes): "
            "run `imsearch db upgrade`")


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
