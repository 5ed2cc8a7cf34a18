"""Rows: connect to PostgreSQL, check pgvector and the schema revision, write and read image rows."""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import psycopg
from pgvector import HalfVector
from pgvector.psycopg import register_vector

from ..errors import DatabaseUnavailable, ImsearchError, ModelMismatch, SchemaOutdated, ServerCrashed
from ..search import CLASS_INDEX_PREFIX, OTHER_INDEX_PREFIX
from ..settings import build_memory
from ..vectors import DIMENSIONS

log = logging.getLogger(__name__)

# The Alembic head this code expects (tests check it equals migrations/versions' head).
SCHEMA_REVISION = "0010"
MIN_PGVECTOR = (0, 7, 0)
# An HNSW build keeps its graph in maintenance_work_mem while it fits: pgvector reported the 64 MB default full after
# 11,894 rows of a class index (m = 32), and that build of 19,900 rows took 103 s instead of 31 s (docs/scaling.md).
GRAPH_BYTES_PER_ROW = 5_700


def _size(n: int) -> str:
    return f"{n / 2**20:,.0f} MiB" if n >= 2**20 else f"{n / 2**10:,.0f} kB"


def class_index_name(cls: str, prefix: str = CLASS_INDEX_PREFIX) -> str:
    """The partial index name `imsearch_index_class(cls)` (or with OTHER_INDEX_PREFIX, `imsearch_index_other`)
    gives: md5 of the UTF-8 class name, as PostgreSQL's."""
    import hashlib

    return prefix + hashlib.md5(cls.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Row:
    """One image row as written by ingest."""

    path: str
    cls: str | None
    sha256: str
    width: int
    height: int
    bytes: int
    model: str
    embedding: np.ndarray
    phash: int | None = None  # 64-bit perceptual hash (imsearch.model.phash); None when not computed


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
    if register:
        try:
            register_vector(conn)
        except psycopg.ProgrammingError:
            pass  # no vector extension yet: the first migration creates it
    return conn


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


class Store:
    """A connection to one imsearch database, checked for pgvector and the schema revision."""

    def __init__(self, url: str, *, migrate: bool = True, server_log: Path | None = None,
                 upgrade_older: bool = False) -> None:
        self.url = url
        self.server_log = server_log  # the embedded server's log, read to tell a crash from a dropped connection
        self._log_start = server_log.stat().st_size if server_log is not None and server_log.exists() else 0
        conn = connect(url, register=False)
        try:
            revision = schema_revision(conn)
            has_images = scalar(conn, "SELECT to_regclass('public.images')") is not None
        finally:
            conn.close()
        older = upgrade_older and revision not in (None, SCHEMA_REVISION) and known_revision(revision)
        if migrate and (revision is None and not has_images or older):
            upgrade(url, server_log)  # first use of an empty database, or the embedded one after an update
            revision = SCHEMA_REVISION
        if revision != SCHEMA_REVISION:
            raise SchemaOutdated(schema_mismatch(redact(url), revision, has_images))
        self.conn = connect(url)
        self.backend_pid = self.conn.info.backend_pid
        version = pgvector_version(self.conn)
        if version is None:
            raise DatabaseUnavailable(f"{redact(url)}: the vector extension is missing; run `imsearch db upgrade`")
        if version < MIN_PGVECTOR:
            raise DatabaseUnavailable(
                f"{redact(url)}: pgvector {'.'.join(map(str, version))} is too old; imsearch needs 0.7 or newer"
            )
        self.pgvector = version
        column = scalar(self.conn, "SELECT format_type(atttypid, atttypmod) FROM pg_attribute "
                                   "WHERE attrelid = 'public.images'::regclass AND attname = 'embedding'")
        if column != f"halfvec({DIMENSIONS})":
            self.conn.close()
            raise ModelMismatch(
                f"{redact(url)}: images.embedding is {column}, but this imsearch stores halfvec({DIMENSIONS}) "
                "(ResNet-50 features); use another database for these vectors"
            )

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def reconnect(self) -> None:
        """Replace a broken connection (server restart, network blip)."""
        try:
            self.conn.close()
        finally:
            self.conn = connect(self.url)
            self.backend_pid = self.conn.info.backend_pid

    def crashed(self, wait: float = 2.0) -> ServerCrashed | None:
        """The crash of this connection's server process, when the embedded server's log records one.

        The server logs it once it has reaped the process, which may come a moment after the client saw the
        connection close: the log is read for up to `wait` seconds.
        """
        if self.server_log is None:
            return None
        from .embedded import crash_in_log

        deadline = time.monotonic() + wait
        while True:
            crash = crash_in_log(self.server_log, since=self._log_start, pid=self.backend_pid)
            if crash is not None:
                return ServerCrashed(f"{crash.describe()}; nothing of it was stored, and what was stored before is "
                                     f"kept (server log: {self.server_log})")
            if time.monotonic() > deadline:
                return None
            time.sleep(0.1)

    def lost(self, exc: psycopg.OperationalError, doing: str) -> ImsearchError:
        """One line for an error that ended a statement: the server's crash when its log shows one."""
        crash = self.crashed() if self.conn.closed else None
        if crash is not None:
            return crash
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return DatabaseUnavailable(f"{doing} {redact(self.url)} failed: {first}")

    # -- model identity ------------------------------------------------------------------------------------

    def check_model(self, identity: str, *, action: str) -> None:
        """Refuse to mix vectors: every stored row must come from `identity`."""
        row = self.conn.execute("SELECT model, count(*) FROM images WHERE model <> %s GROUP BY model LIMIT 1",
                                (identity,)).fetchone()
        if row is not None:
            raise ModelMismatch(
                f"the database holds {row[1]} image(s) embedded with {row[0]}, but this {action} uses {identity}; "
                "pass the same --weights as when they were stored, or run `imsearch ingest DIR --reembed` "
                "to re-embed every stored image with the new model"
            )

    # -- reads ---------------------------------------------------------------------------------------------

    def known(self, root: Path) -> dict[str, tuple[str, str]]:
        """path -> (sha256, model) for every stored image under root."""
        prefix = str(root).rstrip("/") + "/"
        rows = self.conn.execute(
            "SELECT path, sha256, model FROM images WHERE starts_with(path, %s)", (prefix,)
        ).fetchall()
        return {p: (s, m) for p, s, m in rows}

    def other_model_rows(self, identity: str) -> list[tuple[str, str | None]]:
        """(path, class) of rows embedded with another model: what --reembed redoes."""
        rows = self.conn.execute("SELECT path, class FROM images WHERE model <> %s ORDER BY path", (identity,))
        return [(p, c) for p, c in rows.fetchall()]

    def classes(self) -> list[tuple[str, int]]:
        """Stored classes with their row counts, largest first (NULL class left out)."""
        rows = self.conn.execute(
            "SELECT class, count(*) FROM images WHERE class IS NOT NULL GROUP BY class ORDER BY count(*) DESC, class"
        ).fetchall()
        return [(c, n) for c, n in rows]

    def indexed_classes(self, classes: Iterable[str], prefix: str = CLASS_INDEX_PREFIX) -> set[str]:
        """Which of these classes have their own partial HNSW index (with OTHER_INDEX_PREFIX: an other-class one)."""
        rows = self.conn.execute(
            "SELECT indexname FROM pg_indexes WHERE tablename = 'images' AND starts_with(indexname, %s)",
            (prefix,),
        ).fetchall()
        names = {r[0] for r in rows}
        return {c for c in classes if class_index_name(c, prefix) in names}

    def ensure_class_indexes(self, min_rows: int) -> list[str]:
        """Give every class with more than min_rows rows its own HNSW index, and where other-class indexes exist,
        every class that lacks one its other-class index; returns the classes indexed now."""
        counts = dict(self.classes())
        big = [c for c, n in counts.items() if n > min_rows]
        missing = sorted(set(big) - self.indexed_classes(big))
        for cls in missing:
            log.info("building the HNSW index of class %r (%d rows)", cls, counts[cls])
            self._build("SELECT imsearch_index_class(%s)", cls, counts[cls])
        if self.other_indexes():
            missing += self.ensure_other_indexes(min_rows, counts)
        return missing

    def ensure_other_indexes(self, min_rows: int, counts: dict[str, int] | None = None) -> list[str]:
        """Give every class whose other classes hold more than min_rows rows an HNSW index over them (migration
        0005); returns the classes indexed now."""
        counts = counts if counts is not None else dict(self.classes())
        total = sum(counts.values())
        wide = [c for c, n in counts.items() if total - n > min_rows]
        missing = sorted(set(wide) - self.indexed_classes(wide, OTHER_INDEX_PREFIX))
        for cls in missing:
            log.info("building the other-class HNSW index of class %r (%d rows)", cls, total - counts[cls])
            self._build("SELECT imsearch_index_other(%s)", cls, total - counts[cls])
        return missing

    def _build(self, sql: str, cls: str, rows: int) -> None:
        """Build one index with IMSEARCH_BUILD_MEMORY as maintenance_work_mem when it is set, and warn when the
        graph will not fit: pgvector then goes on building on disk, many times slower (docs/scaling.md)."""
        memory = build_memory()
        if memory:
            try:
                self.conn.execute("SELECT set_config('maintenance_work_mem', %s, false)", (memory,))
            except psycopg.errors.InvalidParameterValue:
                raise ImsearchError(f"IMSEARCH_BUILD_MEMORY={memory!r} is not a memory size (e.g. 2GB)") from None
        have = scalar(self.conn, "SELECT pg_size_bytes(current_setting('maintenance_work_mem'))")
        if rows * GRAPH_BYTES_PER_ROW > have:
            log.warning("the index for %d rows needs about %d MB to build in memory, maintenance_work_mem is %d MB: "
                        "it will build slowly (set IMSEARCH_BUILD_MEMORY, e.g. 2GB)",
                        rows, rows * GRAPH_BYTES_PER_ROW // 2**20 + 1, have // 2**20)
        try:
            self.conn.execute(sql, (cls,))
        except psycopg.OperationalError as exc:
            raise self.lost(exc, "building an index in") from None

    def other_indexes(self) -> list[tuple[str, int]]:
        """The other-class indexes (`imsearch db index-other`) with their sizes in bytes."""
        return self.conn.execute(
            "SELECT c.relname::text, pg_relation_size(indexrelid) FROM pg_index "
            "JOIN pg_class c ON c.oid = indexrelid WHERE starts_with(c.relname, %s) ORDER BY 1",
            (OTHER_INDEX_PREFIX,),
        ).fetchall()

    def cache_shortfall(self) -> str | None:
        """Why searches read from disk when the HNSW indexes outgrow the server's buffer cache, naming the setting
        that fixes it; None when they fit. An index search reads pages at random: at PostgreSQL's default 128 MB a
        100k-row library reads most of them from the OS cache (docs/scaling.md)."""
        indexes, buffers, prewarm = self.conn.execute(
            """
            SELECT coalesce(sum(pg_relation_size(x.indexrelid)), 0)::bigint,
                   pg_size_bytes(current_setting('shared_buffers'))::bigint,
                   EXISTS (SELECT FROM pg_available_extensions WHERE name = 'pg_prewarm')
            FROM pg_index x JOIN pg_class c ON c.oid = x.indexrelid JOIN pg_am a ON a.oid = c.relam
            WHERE x.indrelid = 'images'::regclass AND a.amname = 'hnsw'
            """
        ).fetchone() or (0, 0, False)
        if indexes <= buffers:
            return None
        wanted = -(-int(indexes * 1.1) // 2**26) * 64  # MB, rounded up to 64 MB, with room for the table's pages
        note = (f"the HNSW indexes take {_size(indexes)}, more than the server's shared_buffers "
                f"({_size(buffers)}): searches read index pages from the OS cache or the disk, and the "
                f"first ones after a restart are slow. Give it shared_buffers = '{wanted}MB' (ALTER SYSTEM, then a "
                "restart) if the machine has the memory")
        if prewarm:
            note += ("; pg_prewarm is available: `CREATE EXTENSION pg_prewarm` and `SELECT pg_prewarm(indexrelid) "
                     "FROM pg_index WHERE indrelid = 'images'::regclass` loads them after a restart")
        return note

    def drop_other_indexes(self) -> int:
        """Drop every other-class index; mode other goes back to one search per class. Returns how many."""
        names = [name for name, _ in self.other_indexes()]
        for name in names:
            self.conn.execute(f'DROP INDEX "{name}"')
        return len(names)

    def count(self, cls: str | None = None) -> int:
        if cls is None:
            return int(scalar(self.conn, "SELECT count(*) FROM images"))
        return int(scalar(self.conn, "SELECT count(*) FROM images WHERE class = %s", (cls,)))

    def class_of_content(self, sha256: str) -> str | None:
        """The class of a stored image with these exact bytes, if any."""
        row = self.conn.execute(
            "SELECT class FROM images WHERE sha256 = %s AND class IS NOT NULL ORDER BY id LIMIT 1", (sha256,)
        ).fetchone()
        return row[0] if row else None

    def get(self, image_id: int) -> dict[str, Any] | None:
        cur = self.conn.execute(
            "SELECT id, path, class, sha256, width, height, bytes, model, ingested_at FROM images WHERE id = %s",
            (image_id,),
        )
        row = cur.fetchone()
        if row is None:
            return None
        return dict(zip([d.name for d in cur.description or []], row))

    # -- writes --------------------------------------------------------------------------------------------

    UPSERT = """
        INSERT INTO images (path, class, sha256, width, height, bytes, model, embedding, phash)
        VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s::bit(64))
        ON CONFLICT (path) DO UPDATE SET
            class = EXCLUDED.class, sha256 = EXCLUDED.sha256, width = EXCLUDED.width,
            height = EXCLUDED.height, bytes = EXCLUDED.bytes, model = EXCLUDED.model,
            embedding = EXCLUDED.embedding, phash = EXCLUDED.phash, ingested_at = now()
        RETURNING (xmax = 0) AS inserted
    """

    def upsert(self, rows: Sequence[Row], *, retries: int = 3) -> tuple[int, int]:
        """Write a batch in one transaction; returns (added, updated). Retried after a dropped connection."""
        params = [
            (r.path, r.cls, r.sha256, r.width, r.height, r.bytes, r.model, HalfVector(r.embedding),
             None if r.phash is None else format(r.phash, "064b"))
            for r in rows
        ]
        for attempt in range(retries + 1):
            try:
                added = updated = 0
                with self.conn.transaction(), self.conn.cursor() as cur:
                    cur.executemany(self.UPSERT, params, returning=True)
                    while True:
                        for (inserted,) in cur.fetchall():
                            added += int(inserted)
                            updated += int(not inserted)
                        if not cur.nextset():
                            break
                return added, updated
            except psycopg.OperationalError as exc:
                if self.conn.closed and (crash := self.crashed()) is not None:
                    raise crash from None  # it would crash again on the same rows
                if exc.sqlstate is None and attempt > 0:
                    raise DatabaseUnavailable(
                        f"writing to {redact(self.url)} failed: the server closed the connection on this batch "
                        "twice; its process probably crashed on it (see the server's log)") from None
                if attempt == retries or not self.conn.closed and not _is_disconnect(exc):
                    raise self.lost(exc, "writing to") from None
                log.warning("database connection lost (%s); reconnecting", str(exc).splitlines()[0])
                time.sleep(min(2**attempt, 10))
                self.reconnect()
        raise AssertionError("unreachable")

    def delete_paths(self, paths: Iterable[str]) -> int:
        with self.conn.transaction():
            cur = self.conn.execute("DELETE FROM images WHERE path = ANY(%s)", (list(paths),))
            return cur.rowcount


def _is_disconnect(exc: psycopg.OperationalError) -> bool:
    return exc.sqlstate is None or exc.sqlstate.startswith("08") or exc.sqlstate in ("57P01", "57P02", "57P03")
