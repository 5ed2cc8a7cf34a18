"""Rows: open one imsearch database, checked for pgvector, the schema revision and the embedding column; read
and write image rows, reconnecting after a dropped connection and telling a server crash from it."""

from __future__ import annotations

import logging
import select
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import psycopg
from pgvector import HalfVector

from ..errors import DatabaseUnavailable, ImsearchError, ModelMismatch, SchemaOutdated, ServerCrashed
from ..search import iterates
from ..vectors import DIMENSIONS
from .connect import connect, pgvector_version, redact, scalar
from .errors import failed
from .migrate import SCHEMA_REVISION, known_revision, long_migration, schema_mismatch, schema_revision, upgrade
from .serverlog import crash_in_log
from .shards import sharded

log = logging.getLogger(__name__)

MIN_PGVECTOR = (0, 7, 0)


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


class Store:
    """A connection to one imsearch database, checked for pgvector and the schema revision."""

    def __init__(self, url: str, *, server_log: Path | None = None) -> None:
        """Connect and check; a database without this imsearch's schema revision is refused (SchemaOutdated).
        Creating or migrating the schema is a step of its own, `ensure_schema`, taken first (or `Store.open`)."""
        self.url = url
        self.server_log = server_log  # the embedded server's log, read to tell a crash from a dropped connection
        self._log_start = server_log.stat().st_size if server_log is not None and server_log.exists() else 0
        self.conn = connect(url)
        revision, has_images = _schema_state(self.conn)
        if revision != SCHEMA_REVISION:
            self.conn.close()
            raise SchemaOutdated(schema_mismatch(redact(url), revision, has_images))
        self.backend_pid = self.conn.info.backend_pid
        version = pgvector_version(self.conn)
        if version is None:
            raise DatabaseUnavailable(f"{redact(url)}: the vector extension is missing; run `imsearch db upgrade`")
        if version < MIN_PGVECTOR:
            raise DatabaseUnavailable(
                f"{redact(url)}: pgvector {'.'.join(map(str, version))} is too old; imsearch needs 0.7 or newer"
            )
        self.pgvector = version
        # a sharded library's coordinator: ON CONFLICT cannot reach the shards' unique index on path (UPSERT_SHARDED)
        self.sharded = sharded(self.conn)
        if not iterates(version):
            log.warning("pgvector %s has no iterative index scans: filtered searches of large classes without their "
                        "own index scan exactly (upgrade pgvector to 0.8+ for fast filtered search)",
                        ".".join(map(str, version)))
        column = scalar(self.conn, "SELECT format_type(atttypid, atttypmod) FROM pg_attribute "
                                   "WHERE attrelid = 'public.images'::regclass AND attname = 'embedding'")
        if column != f"halfvec({DIMENSIONS})":
            self.conn.close()
            raise ModelMismatch(
                f"{redact(url)}: images.embedding is {column}, but this imsearch stores halfvec({DIMENSIONS}) "
                "(ResNet-50 features); use another database for these vectors"
            )

    @classmethod
    def open(cls, url: str, *, server_log: Path | None = None, upgrade_older: bool = False) -> Store:
        """`ensure_schema`, then the checked store: what a first use of a database does."""
        ensure_schema(url, server_log, upgrade_older=upgrade_older)
        return cls(url, server_log=server_log)

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

    def alive(self) -> bool:
        """False when the server has closed this idle connection (a terminated backend, a killed server), seen
        without a round trip: an idle connection has nothing to read unless the server is closing it (its last
        words, then the end of the stream)."""
        if self.conn.closed:
            return False
        try:
            readable, _, _ = select.select([self.conn.fileno()], [], [], 0)
        except (OSError, ValueError):
            return False
        return not readable

    def crashed(self, wait: float = 2.0) -> ServerCrashed | None:
        """The crash of this connection's server process, when the embedded server's log records one.

        The server logs it once it has reaped the process, which may come a moment after the client saw the
        connection close: the log is read for up to `wait` seconds.
        """
        if self.server_log is None:
            return None
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
        return failed(exc, doing, self.url)

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

    def known(self, root: Path) -> dict[str, tuple[str, str, str | None]]:
        """path -> (sha256, model, class) for every stored image under root."""
        prefix = str(root).rstrip("/") + "/"
        rows = self.conn.execute(
            'SELECT path, sha256, model, class FROM images WHERE starts_with(path, %s)', (prefix,)
        ).fetchall()
        return {p: (s, m, c) for p, s, m, c in rows}

    def hashes(self, model: str) -> set[str]:
        """The sha256 of every row embedded with `model`: which new paths may be stored photos moved there."""
        rows = self.conn.execute("SELECT DISTINCT sha256 FROM images WHERE model = %s", (model,))
        return {s for (s,) in rows.fetchall()}

    def with_hash(self, sha256: str, model: str) -> list[tuple[int, str, str | None]]:
        """(id, path, class) of the rows of these bytes embedded with `model`, oldest first."""
        rows = self.conn.execute(
            "SELECT id, path, class FROM images WHERE sha256 = %s AND model = %s ORDER BY id", (sha256, model)
        )
        return [(i, p, c) for i, p, c in rows.fetchall()]

    def paths(self) -> list[tuple[str, str | None]]:
        """(path, class) of every stored image, by path."""
        rows = self.conn.execute("SELECT path, class FROM images ORDER BY path")
        return [(p, c) for p, c in rows.fetchall()]

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
        VALUES (%(path)s, %(cls)s, %(sha256)s, %(width)s, %(height)s, %(bytes)s, %(model)s, %(embedding)s,
                %(phash)s::bit(64))
        ON CONFLICT (path) DO UPDATE SET
            class = EXCLUDED.class, sha256 = EXCLUDED.sha256, width = EXCLUDED.width,
            height = EXCLUDED.height, bytes = EXCLUDED.bytes, model = EXCLUDED.model,
            embedding = EXCLUDED.embedding, phash = EXCLUDED.phash, ingested_at = now()
        RETURNING (xmax = 0) AS inserted
    """

    # On a sharded library: postgres_fdw takes no ON CONFLICT ... DO UPDATE, so the row is updated where its path is
    # stored and inserted where it is not. Two writers inserting one new path meet at the shard's unique index on
    # path (one shard holds every path of its hash): the later one's batch fails and is written again, updating.
    UPSERT_SHARDED = """
        WITH updated AS (
            UPDATE images SET class = %(cls)s, sha256 = %(sha256)s, width = %(width)s, height = %(height)s,
                bytes = %(bytes)s, model = %(model)s, embedding = %(embedding)s, phash = %(phash)s::bit(64),
                ingested_at = now()
            WHERE path = %(path)s
            RETURNING 1
        ), inserted AS (
            INSERT INTO images (path, class, sha256, width, height, bytes, model, embedding, phash)
            SELECT %(path)s, %(cls)s, %(sha256)s, %(width)s, %(height)s, %(bytes)s, %(model)s, %(embedding)s,
                   %(phash)s::bit(64)
            WHERE NOT EXISTS (SELECT FROM updated)
            RETURNING 1
        )
        SELECT EXISTS (SELECT FROM inserted) AS inserted
    """

    def upsert(self, rows: Sequence[Row], *, retries: int = 3) -> tuple[int, int]:
        """Write a batch in one transaction; returns (added, updated). Retried after a dropped connection, and on a
        sharded library after another writer stored one of its new paths first."""
        params = [
            {"path": r.path, "cls": r.cls, "sha256": r.sha256, "width": r.width, "height": r.height,
             "bytes": r.bytes, "model": r.model, "embedding": HalfVector(r.embedding),
             "phash": None if r.phash is None else format(r.phash, "064b")}
            for r in rows
        ]
        for attempt in range(retries + 1):
            try:
                added = updated = 0
                with self.conn.transaction(), self.conn.cursor() as cur:
                    cur.executemany(self.UPSERT_SHARDED if self.sharded else self.UPSERT, params, returning=True)
                    while True:
                        for (inserted,) in cur.fetchall():
                            added += int(inserted)
                            updated += int(not inserted)
                        if not cur.nextset():
                            break
                return added, updated
            except psycopg.errors.UniqueViolation:
                if not self.sharded or attempt == retries:
                    raise
                log.info("another writer stored a path of this batch first; writing the batch again")
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

    def move(self, image_id: int, path: str, cls: str | None) -> None:
        """Give a stored row the new path (and class) of its file: its id, vector and audit findings stay."""
        with self.conn.transaction():
            self.conn.execute(self.MOVE_SHARDED if self.sharded else self.MOVE,
                              {"path": path, "cls": cls, "id": image_id})

    MOVE = "UPDATE images SET path = %(path)s, class = %(cls)s WHERE id = %(id)s"
    # An UPDATE of path would stay on the row's old shard (postgres_fdw runs it there): the row moves to the shard
    # of its new path as a delete and an insert that keeps its id, in one transaction.
    MOVE_SHARDED = """
        WITH gone AS (DELETE FROM images WHERE id = %(id)s RETURNING *)
        INSERT INTO images (id, path, class, sha256, width, height, bytes, model, embedding, phash, ingested_at)
        SELECT id, %(path)s, %(cls)s, sha256, width, height, bytes, model, embedding, phash, ingested_at FROM gone
    """

    def copy_row(self, image_id: int, path: str, cls: str | None) -> bool:
        """Store a new path holding the same bytes as row `image_id` with that row's vector (same bytes, same
        model: the same vector), without decoding or embedding; False when the path was stored meanwhile."""
        with self.conn.transaction():
            cur = self.conn.execute(
                """INSERT INTO images (path, class, sha256, width, height, bytes, model, embedding, phash)
                   SELECT %s, %s, sha256, width, height, bytes, model, embedding, phash FROM images WHERE id = %s
                   ON CONFLICT DO NOTHING""",
                (path, cls, image_id),
            )
            return cur.rowcount == 1

    def set_classes(self, changes: Sequence[tuple[str, str | None]]) -> int:
        """Set the class of stored paths, (path, class) each, in one transaction; returns the rows changed."""
        if not changes:
            return 0
        with self.conn.transaction(), self.conn.cursor() as cur:
            cur.executemany('UPDATE images SET class = %s WHERE path = %s AND class IS DISTINCT FROM %s',
                            [(c, p, c) for p, c in changes], returning=False)
            return max(cur.rowcount, 0)

    def delete_paths(self, paths: Iterable[str]) -> int:
        with self.conn.transaction():
            cur = self.conn.execute("DELETE FROM images WHERE path = ANY(%s)", (list(paths),))
            return cur.rowcount


def _schema_state(conn: psycopg.Connection[Any]) -> tuple[str | None, bool]:
    """The database's schema revision, and whether it has an `images` table (made by imsearch or not)."""
    return schema_revision(conn), scalar(conn, "SELECT to_regclass('public.images')") is not None


def ensure_schema(url: str, server_log: Path | None = None, *, upgrade_older: bool = False) -> None:
    """Create the schema on the first use of an empty database; with `upgrade_older` (the embedded database, which
    imsearch alone uses), migrate an older revision too. Any other mismatch is left for `Store` to refuse."""
    conn = connect(url, register=False)
    try:
        revision, has_images = _schema_state(conn)
    finally:
        conn.close()
    older = upgrade_older and revision not in (None, SCHEMA_REVISION) and known_revision(revision)
    if older:
        conn = connect(url, register=False)
        try:
            why = long_migration(conn, revision)
        finally:
            conn.close()
        if why is not None:
            raise SchemaOutdated(f"{redact(url)}: {why}")
    if revision is None and not has_images or older:
        upgrade(url, server_log)


def stored_paths(url: str) -> list[str]:
    """Every stored absolute path, sorted, read on a connection of its own: for a caller that must not wait for the
    shared one (the int8 calibration, under the model lock); none before the schema exists."""
    conn = connect(url, register=False)
    try:
        if scalar(conn, "SELECT to_regclass('public.images')") is None:
            return []
        return sorted(p for (p,) in conn.execute("SELECT path FROM images WHERE starts_with(path, '/')"))
    finally:
        conn.close()


def _is_disconnect(exc: psycopg.OperationalError) -> bool:
    return exc.sqlstate is None or exc.sqlstate.startswith("08") or exc.sqlstate in ("57P01", "57P02", "57P03")
