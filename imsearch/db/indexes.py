"""The HNSW indexes imsearch builds beside the migrations' own: one per large class, and on request one over each
class's others (migration 0005); their names, builds, sizes, the buffer cache they need, and the recall of the
other-class ones against an exact scan."""

from __future__ import annotations

import logging
from typing import Any, Iterable

import numpy as np
import psycopg

from .. import search
from ..errors import ImsearchError
from ..search import CLASS_INDEX_PREFIX, OTHER_INDEX_PREFIX
from ..settings import build_memory
from .connect import Where, connection, scalar
from .store import Store

log = logging.getLogger(__name__)

# An HNSW build keeps its graph in maintenance_work_mem while it fits: pgvector reported the 64 MB default full after
# 11,894 rows of a class index (m = 32), and that build of 19,900 rows took 103 s instead of 31 s (docs/scaling.md).
GRAPH_BYTES_PER_ROW = 5_700


def _size(n: int) -> str:
    return f"{n / 2**20:,.0f} MiB" if n >= 2**20 else f"{n / 2**10:,.0f} kB"


def class_index_name(cls: str, prefix: str = CLASS_INDEX_PREFIX) -> str:
    """The partial index name `imsearch_index_class(cls)` (or with OTHER_INDEX_PREFIX, `imsearch_index_other`)
    gives: the search planner's rule (search.index_name)."""
    return search.index_name(cls, prefix)


def indexed_classes(conn: psycopg.Connection[Any], classes: Iterable[str],
                    prefix: str = CLASS_INDEX_PREFIX) -> set[str]:
    """Which of these classes have their own partial HNSW index (with OTHER_INDEX_PREFIX: an other-class one)."""
    rows = conn.execute(
        "SELECT indexname FROM pg_indexes WHERE tablename = 'images' AND starts_with(indexname, %s)",
        (prefix,),
    ).fetchall()
    names = {r[0] for r in rows}
    return {c for c in classes if class_index_name(c, prefix) in names}


def ensure_class_indexes(store: Store, min_rows: int) -> list[str]:
    """Give every class with more than min_rows rows its own HNSW index, and where other-class indexes exist,
    every class that lacks one its other-class index; returns the classes indexed now."""
    counts = dict(store.classes())
    big = [c for c, n in counts.items() if n > min_rows]
    missing = sorted(set(big) - indexed_classes(store.conn, big))
    for cls in missing:
        log.info("building the HNSW index of class %r (%d rows)", cls, counts[cls])
        _build(store, "SELECT imsearch_index_class(%s)", cls, counts[cls])
    if other_indexes(store.conn):
        missing += ensure_other_indexes(store, min_rows, counts)
    return missing


def ensure_other_indexes(store: Store, min_rows: int, counts: dict[str, int] | None = None) -> list[str]:
    """Give every class whose other classes hold more than min_rows rows an HNSW index over them (migration
    0005); returns the classes indexed now."""
    counts = counts if counts is not None else dict(store.classes())
    total = sum(counts.values())
    wide = [c for c, n in counts.items() if total - n > min_rows]
    missing = sorted(set(wide) - indexed_classes(store.conn, wide, OTHER_INDEX_PREFIX))
    for cls in missing:
        log.info("building the other-class HNSW index of class %r (%d rows)", cls, total - counts[cls])
        _build(store, "SELECT imsearch_index_other(%s)", cls, total - counts[cls])
    return missing


def _build(store: Store, sql: str, cls: str, rows: int) -> None:
    """Build one index with IMSEARCH_BUILD_MEMORY as maintenance_work_mem when it is set, and warn when the
    graph will not fit: pgvector then goes on building on disk, many times slower (docs/scaling.md)."""
    memory = build_memory()
    if memory:
        try:
            store.conn.execute("SELECT set_config('maintenance_work_mem', %s, false)", (memory,))
        except psycopg.errors.InvalidParameterValue:
            raise ImsearchError(f"IMSEARCH_BUILD_MEMORY={memory!r} is not a memory size (e.g. 2GB)") from None
    have = scalar(store.conn, "SELECT pg_size_bytes(current_setting('maintenance_work_mem'))")
    if rows * GRAPH_BYTES_PER_ROW > have:
        log.warning("the index for %d rows needs about %d MB to build in memory, maintenance_work_mem is %d MB: "
                    "it will build slowly (set IMSEARCH_BUILD_MEMORY, e.g. 2GB)",
                    rows, rows * GRAPH_BYTES_PER_ROW // 2**20 + 1, have // 2**20)
    try:
        store.conn.execute(sql, (cls,))
    except psycopg.OperationalError as exc:
        raise store.lost(exc, "building an index in") from None


def other_indexes(where: Where) -> list[tuple[str, int]]:
    """The other-class indexes (`imsearch db index-other`) with their sizes in bytes."""
    return connection(where).execute(
        "SELECT c.relname::text, pg_relation_size(indexrelid) FROM pg_index "
        "JOIN pg_class c ON c.oid = indexrelid WHERE starts_with(c.relname, %s) ORDER BY 1",
        (OTHER_INDEX_PREFIX,),
    ).fetchall()


def drop_other_indexes(where: Where) -> int:
    """Drop every other-class index; mode other goes back to one search per class. Returns how many."""
    conn = connection(where)
    names = [name for name, _ in other_indexes(conn)]
    for name in names:
        conn.execute(f'DROP INDEX "{name}"')
    return len(names)


def other_recall(store: Store, *, sample: int, k: int) -> float | None:
    """Recall@k of mode other through the other-class indexes against an exact scan, with up to `sample`
    stored photos of indexed classes as queries; None without such indexes.

    Their graphs hold a fold of the embedding (migration 0006), whose recall depends on the embeddings, so it
    is measured on the library's own rather than assumed (docs/scaling.md).
    """
    counts = dict(store.classes())
    rows = store.conn.execute(
        "SELECT embedding, class, sha256 FROM images WHERE class = ANY(%s) ORDER BY random() LIMIT %s",
        (sorted(indexed_classes(store.conn, counts, OTHER_INDEX_PREFIX)), sample),
    ).fetchall()
    found = wanted = 0
    for embedding, cls, sha in rows:
        vector = np.asarray(embedding.to_numpy(), dtype=np.float32)
        answers = [{m.id for m in search.run(store.conn, vector, "other", k=k, cls=cls, skip_sha=sha, exact=exact)}
                   for exact in (False, True)]
        found += len(answers[0] & answers[1])
        wanted += len(answers[1])
    return found / wanted if wanted else None


def cache_shortfall(where: Where) -> str | None:
    """Why searches read from disk when the HNSW indexes outgrow the server's buffer cache, naming the setting
    that fixes it; None when they fit. An index search reads pages at random: at PostgreSQL's default 128 MB a
    100k-row library reads most of them from the OS cache (docs/scaling.md)."""
    indexes, buffers, prewarm = connection(where).execute(
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
