"""Rows in and out in bulk, for imsearch.bulk: the export's server-side cursor; the load's staging table, filled by
binary COPY and merged into images in one statement; and the vector indexes set aside while a large load goes in.

A load writes nothing to `images` until its merge, one transaction: a file refused halfway leaves only the staging
table, a temporary one, which goes with the session.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import psycopg
from pgvector import HalfVector
from psycopg import sql
from sqlalchemy.dialects import postgresql
from sqlalchemy.schema import CreateIndex

from ..search import WHOLE_INDEX
from .connect import scalar
from .errors import translated, translating
from .indexes import size_build_memory
from .schema import images
from .shards import sharded

log = logging.getLogger(__name__)

# -- the vector indexes ------------------------------------------------------------------------------------------

VECTOR_INDEXES = """
SELECT n.nspname, c.relname, pg_get_indexdef(x.indexrelid)
FROM pg_index x
JOIN pg_class c ON c.oid = x.indexrelid
JOIN pg_namespace n ON n.oid = c.relnamespace
JOIN pg_am a ON a.oid = c.relam
WHERE x.indrelid = 'images'::regclass AND a.amname IN ('hnsw', 'ivfflat')
ORDER BY c.relname
"""


@translating("suspending the indexes of")
def suspend_vector_indexes(conn: psycopg.Connection[Any]) -> list[str]:
    """Drop every HNSW and IVFFlat index on images and return their definitions (pg_get_indexdef), for
    `restore_vector_indexes`: a large load then writes its rows without inserting each into the graphs, and the
    graphs are built once after it. Each drop is its own short committed transaction, so searches go on
    answering meanwhile, exactly, by sequential scan. The definitions live in this process only: a load killed
    before it restores them leaves them to be rebuilt by the next load (`restore_vector_indexes`)."""
    found = conn.execute(VECTOR_INDEXES).fetchall()
    for schema, name, _ in found:
        with conn.transaction():
            conn.execute(sql.SQL("DROP INDEX IF EXISTS {}").format(sql.Identifier(schema, name)))
    if found:
        log.info("suspended %d vector index(es) on images for the load", len(found))
    return [definition for _, _, definition in found]


@translating("rebuilding the indexes of")
def restore_vector_indexes(conn: psycopg.Connection[Any], definitions: Sequence[str]) -> list[str]:
    """Build the indexes `suspend_vector_indexes` dropped, then any the schema needs that is missing, which is what a
    load killed before its restore leaves: the perceptual-hash index (imsearch.db.schema) and the whole-table vector
    index (imsearch_index_all, migration 0013); with the memory the graphs need (indexes.size_build_memory). Class
    indexes come back as after an ingest. Returns the definitions built (one that exists again already is left)."""
    size_build_memory(conn, scalar(conn, "SELECT count(*) FROM images"))
    built = []
    for definition in definitions:
        try:
            conn.execute(definition)
        except psycopg.errors.DuplicateTable:
            continue
        built.append(definition)
    for name, definition in schema_vector_indexes():
        if scalar(conn, "SELECT to_regclass(%s)", (name,)) is None:
            log.warning("the index %s was missing (a load killed before it rebuilt it?); building it", name)
            conn.execute(definition)
            built.append(definition)
    if scalar(conn, "SELECT to_regclass(%s)", (WHOLE_INDEX,)) is None:
        log.warning("the index %s was missing (a load killed before it rebuilt it?); building it", WHOLE_INDEX)
        conn.execute("SELECT imsearch_index_all()")
        built.append(WHOLE_INDEX)
    return built


def schema_vector_indexes() -> list[tuple[str, str]]:
    """(name, CREATE INDEX) of the HNSW and IVFFlat indexes the migrations give images, from the schema's
    metadata (imsearch.db.schema, which `alembic check` holds to the migrations)."""
    return [(str(ix.name), str(CreateIndex(ix).compile(dialect=postgresql.dialect())))
            for ix in sorted(images.indexes, key=lambda ix: str(ix.name))
            if ix.dialect_options["postgresql"]["using"] in ("hnsw", "ivfflat")]


# -- export ------------------------------------------------------------------------------------------------------


@translating("reading from")
def stored_models(conn: psycopg.Connection[Any]) -> list[tuple[str, int]]:
    """(model identity, rows) of every model the stored rows come from, by identity."""
    return conn.execute("SELECT model, count(*) FROM images GROUP BY model ORDER BY model").fetchall()


EXPORT = """
SELECT path, class, sha256, width, height, bytes, phash::text, embedding
FROM images
WHERE model = %s
ORDER BY id
"""


@dataclass(frozen=True)
class Exported:
    """A batch of stored rows, columns as plain lists and the embeddings as one float32 matrix."""

    paths: list[str]
    classes: list[str | None]
    sha256: list[str]
    widths: list[int | None]
    heights: list[int | None]
    sizes: list[int | None]
    phash: list[str | None]  # 64 '0'/'1' characters, as PostgreSQL writes bit(64)
    embeddings: np.ndarray  # (rows, DIMENSIONS) float32: each halfvec widened, exactly


def exported(conn: psycopg.Connection[Any], model: str, batch_rows: int) -> Iterator[Exported]:
    """The rows of `model` in id order, `batch_rows` at a time, through a server-side cursor in one read-only
    transaction: the client holds one batch at a time, whatever the size of the library."""
    with translated("reading from", conn), conn.transaction(), \
            conn.cursor("imsearch_export", binary=True) as cur:
        cur.itersize = batch_rows
        cur.execute(EXPORT, (model,))
        while rows := cur.fetchmany(batch_rows):
            yield Exported(
                paths=[r[0] for r in rows], classes=[r[1] for r in rows], sha256=[r[2] for r in rows],
                widths=[r[3] for r in rows], heights=[r[4] for r in rows], sizes=[r[5] for r in rows],
                phash=[r[6] for r in rows],
                embeddings=np.stack([r[7].to_numpy() for r in rows]).astype(np.float32),
            )


# -- load --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Staged:
    """A checked batch of one file's rows for the staging table: `first_row` is the 0-based row in its file of
    the first; optional columns the file lacks are None (stored as NULL)."""

    file_no: int
    first_row: int
    paths: list[str]
    classes: list[str | None]
    sha256: list[str]
    widths: list[int | None] | None
    heights: list[int | None] | None
    sizes: list[int | None] | None
    phash: list[str | None] | None
    embeddings: np.ndarray  # (rows, DIMENSIONS) float16: what halfvec holds


STAGING = """
CREATE TEMP TABLE imsearch_load (
    file_no int NOT NULL,
    row_no bigint NOT NULL,
    path text NOT NULL,
    class text,
    sha256 text NOT NULL,
    width int,
    height int,
    bytes bigint,
    phash text,
    embedding halfvec NOT NULL
)
"""

COPY = """
COPY imsearch_load (file_no, row_no, path, class, sha256, width, height, bytes, phash, embedding)
FROM STDIN WITH (FORMAT BINARY)
"""
COPY_TYPES = ["int4", "int8", "text", "text", "text", "int4", "int4", "int8", "text", "halfvec"]

# The first path staged twice, with where it was staged first.
DUPLICATE = """
SELECT file_no, row_no, path, first_file, first_row
FROM (
    SELECT file_no, row_no, path,
           first_value(file_no) OVER w AS first_file, first_value(row_no) OVER w AS first_row,
           row_number() OVER w AS nth
    FROM imsearch_load
    WINDOW w AS (PARTITION BY path ORDER BY file_no, row_no)
) s
WHERE nth = 2
ORDER BY file_no, row_no
LIMIT 1
"""

# What a re-ingest of a changed file updates, for every staged row but those stored already with the same bytes,
# class and model; new paths are added in file order. Returns (added, updated).
MERGE = """
WITH merged AS (
    INSERT INTO images (path, class, sha256, width, height, bytes, model, embedding, phash)
    SELECT s.path, s.class, s.sha256, s.width, s.height, s.bytes, %(model)s, s.embedding, s.phash::bit(64)
    FROM imsearch_load s
    WHERE NOT EXISTS (SELECT FROM images i
                      WHERE i.path = s.path AND i.sha256 = s.sha256 AND i.class IS NOT DISTINCT FROM s.class
                        AND i.model = %(model)s)
    ORDER BY s.file_no, s.row_no
    ON CONFLICT (path) DO UPDATE SET
        class = EXCLUDED.class, sha256 = EXCLUDED.sha256, width = EXCLUDED.width, height = EXCLUDED.height,
        bytes = EXCLUDED.bytes, model = EXCLUDED.model, embedding = EXCLUDED.embedding, phash = EXCLUDED.phash,
        ingested_at = now()
    RETURNING (xmax = 0) AS inserted
)
SELECT count(*) FILTER (WHERE inserted), count(*) FILTER (WHERE NOT inserted) FROM merged
"""


# On a sharded library (imsearch.db.shards) postgres_fdw takes no ON CONFLICT ... DO UPDATE: the stored rows of the
# staged paths come back in one query each shard answers through its index on path; the changed ones are updated
# one by one, the new ones inserted in file order, in batches to their shards.
STORED_SHARDED = """
CREATE TEMP TABLE imsearch_load_stored ON COMMIT DROP AS
SELECT i.path, (i.sha256 = s.sha256 AND i.class IS NOT DISTINCT FROM s.class AND i.model = %(model)s) AS same
FROM images i JOIN imsearch_load s USING (path)
WHERE i.path = ANY (ARRAY(SELECT path FROM imsearch_load))
"""
UPDATE_SHARDED = """
UPDATE images SET class = s.class, sha256 = s.sha256, width = s.width, height = s.height, bytes = s.bytes,
    model = %(model)s, embedding = s.embedding, phash = s.phash::bit(64), ingested_at = now()
FROM (SELECT * FROM imsearch_load WHERE path = %(path)s) s
WHERE images.path = %(path)s
"""
INSERT_SHARDED = """
INSERT INTO images (path, class, sha256, width, height, bytes, model, embedding, phash)
SELECT s.path, s.class, s.sha256, s.width, s.height, s.bytes, %(model)s, s.embedding, s.phash::bit(64)
FROM imsearch_load s
WHERE NOT EXISTS (SELECT FROM imsearch_load_stored t WHERE t.path = s.path)
ORDER BY s.file_no, s.row_no
"""


@dataclass(frozen=True)
class Duplicate:
    """A path staged twice: where the second one is, and the first."""

    file_no: int
    row_no: int
    path: str
    first_file: int
    first_row: int


class Staging:
    """The load's temporary table on one connection: filled by binary COPY, checked, merged, dropped."""

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self.conn = conn

    def __enter__(self) -> Staging:
        with translated("loading into", self.conn):
            self.conn.execute("DROP TABLE IF EXISTS pg_temp.imsearch_load")
            self.conn.execute(STAGING)
        return self

    def __exit__(self, *exc: object) -> None:
        if not self.conn.closed and not self.conn.broken:
            with translated("loading into", self.conn):
                self.conn.execute("DROP TABLE IF EXISTS pg_temp.imsearch_load")

    def copy(self, batches: Iterable[Staged]) -> int:
        """COPY the batches in, in one statement; returns the rows staged. An error raised by the iterator (a
        refused file) aborts the COPY, and propagates."""
        rows = 0
        with translated("loading into", self.conn), self.conn.cursor() as cur, cur.copy(COPY) as copy:
            copy.set_types(COPY_TYPES)
            for b in batches:
                n = len(b.paths)
                none: list[None] = [None] * n
                for i, row in enumerate(zip(b.paths, b.classes, b.sha256, b.widths or none, b.heights or none,
                                            b.sizes or none, b.phash or none)):
                    copy.write_row((b.file_no, b.first_row + i, *row, HalfVector(b.embeddings[i])))
                rows += n
        return rows

    def duplicate(self) -> Duplicate | None:
        """The first path staged twice, if any."""
        with translated("loading into", self.conn):
            row = self.conn.execute(DUPLICATE).fetchone()
        return None if row is None else Duplicate(*row)

    def merge(self, model: str) -> tuple[int, int]:
        """Write the staged rows into images in one transaction: (added, updated); rows stored already with the
        same bytes, class and model are left alone."""
        if sharded(self.conn):
            return self._merge_sharded(model)
        with translated("loading into", self.conn), self.conn.transaction():
            added, updated = self.conn.execute(MERGE, {"model": model}).fetchone() or (0, 0)
        return int(added), int(updated)

    def _merge_sharded(self, model: str) -> tuple[int, int]:
        with translated("loading into", self.conn), self.conn.transaction():
            self.conn.execute(STORED_SHARDED, {"model": model})
            changed = [p for (p,) in self.conn.execute("SELECT path FROM imsearch_load_stored WHERE NOT same")]
            with self.conn.cursor() as cur:
                cur.executemany(UPDATE_SHARDED, [{"model": model, "path": p} for p in changed])
            added = self.conn.execute(INSERT_SHARDED, {"model": model}).rowcount
        return max(added, 0), len(changed)


@translating("reading from")
def count(conn: psycopg.Connection[Any]) -> int:
    """How many rows images holds."""
    return int(scalar(conn, "SELECT count(*) FROM images"))


@translating("reading from")
def other_models(conn: psycopg.Connection[Any], model: str) -> tuple[str, int] | None:
    """One model other than `model` that stored rows come from, with its row count; None when there is none."""
    row = conn.execute("SELECT model, count(*) FROM images WHERE model <> %s GROUP BY model ORDER BY model LIMIT 1",
                       (model,)).fetchone()
    return None if row is None else (row[0], int(row[1]))
