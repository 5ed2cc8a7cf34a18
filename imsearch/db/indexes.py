"""The vector indexes imsearch builds beside the migrations' own: a partial one per class that holds a small share of
the library (migration 0013), and the group graphs of a large library of many classes (migration 0020); their names,
builds, sizes, the buffer cache they need, and the recall of every mode through them against an exact scan."""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Iterable, Iterator

import numpy as np
import psycopg

from .. import search
from ..errors import ImsearchError
from ..modes import MODES
from ..search import (
    CLASS_INDEX_MAX_SHARE,
    CLASS_INDEX_PREFIX,
    GROUP_INDEX_PREFIX,
    GROUPS,
    UNION_MAX_CLASSES,
    UNION_MIN_ROWS,
)
from ..settings import build_memory, quarter_of_memory_mb
from .connect import Where, connection, scalar
from .shards import shard_urls
from .store import Store

log = logging.getLogger(__name__)

# An HNSW build keeps its graph in maintenance_work_mem while it fits, and goes on many times slower on disk after
# (docs/scaling.md). A fold's graph at m = 32 (every graph's since migration 0018) takes about 3.3 kB a row:
# pgvector 0.8's notice of where 32 MB ran out, 10,241 rows (12,136 at pgvector's default m = 16).
GRAPH_BYTES_PER_ROW = 3_300


def _size(n: int) -> str:
    return f"{n / 2**20:,.0f} MiB" if n >= 2**20 else f"{n / 2**10:,.0f} kB"


def class_index_name(cls: str) -> str:
    """The partial index name `imsearch_index_class(cls)` gives: the search planner's rule (search.index_name)."""
    return search.index_name(cls)


def index_names(conn: psycopg.Connection[Any], prefix: str) -> set[str]:
    """The names of the indexes on images that begin with `prefix`."""
    rows = conn.execute(
        "SELECT indexname FROM pg_indexes WHERE tablename = 'images' AND starts_with(indexname, %s)", (prefix,)
    ).fetchall()
    return {r[0] for r in rows}


def indexed_classes(conn: psycopg.Connection[Any], classes: Iterable[str]) -> set[str]:
    """Which of these classes have their own partial HNSW index."""
    names = index_names(conn, CLASS_INDEX_PREFIX)
    return {c for c in classes if class_index_name(c) in names}


def wanted_class_indexes(counts: dict[str, int], min_rows: int) -> list[str]:
    """The classes that should have an index of their own: past min_rows rows, holding at most
    CLASS_INDEX_MAX_SHARE of the library. A larger class fills so much of the whole-table graph that a filtered
    scan of it finds its rows at once (docs/scaling.md)."""
    total = sum(counts.values())
    return sorted(c for c, n in counts.items() if n > min_rows and n <= CLASS_INDEX_MAX_SHARE * total)


@contextlib.contextmanager
def index_homes(store: Store) -> Iterator[list[Store]]:
    """The databases whose `images` tables hold the rows and their indexes: the library's own, or on a sharded
    library each shard's (imsearch.db.shards), opened here and closed after."""
    if not store.sharded:
        yield [store]
        return
    opened: list[Store] = []
    try:
        for _, url in shard_urls(store.conn):
            opened.append(Store(url))
        yield opened
    finally:
        for home in opened:
            home.close()


def ensure_class_indexes(store: Store, min_rows: int) -> list[str]:
    """Give every class that wants one (wanted_class_indexes) its own HNSW index; returns the classes indexed now.
    An index stays when its class grows past the share: it still serves. A sharded library's shards decide each
    for its own rows."""
    if store.sharded:
        with index_homes(store) as homes:
            return sorted({cls for home in homes for cls in ensure_class_indexes(home, min_rows)})
    counts = dict(store.classes())
    missing = sorted(set(wanted_class_indexes(counts, min_rows)) - indexed_classes(store.conn, counts))
    for cls in missing:
        log.info("building the HNSW index of class %r (%d rows)", cls, counts[cls])
        _build(store, "SELECT imsearch_index_class(%s)", cls, counts[cls])
    ensure_group_indexes(store, counts)
    return missing


def ensure_group_indexes(store: Store, counts: dict[str, int], *, min_rows: int = UNION_MIN_ROWS,
                         max_classes: int = UNION_MAX_CLASSES) -> list[str]:
    """Build the GROUPS group graphs (imsearch_index_group, migration 0020) of a library past min_rows rows in more
    than max_classes classes (`counts`: rows by class), where the whole-table graph strands queries among tight
    classes; returns the graphs built now. Each group's rows are its classes' (search.class_group), so a new class
    goes into its group's graph as its rows come; built, a graph stays."""
    if sum(counts.values()) <= min_rows or len(counts) <= max_classes:
        return []
    have = index_names(store.conn, GROUP_INDEX_PREFIX)
    built = []
    for group in range(GROUPS):
        name = search.group_index_name(group)
        if name in have:
            continue
        rows = sum(n for cls, n in counts.items() if search.class_group(cls) == group)
        log.info("building the HNSW index of group %d (%d rows)", group, rows)
        _build(store, "SELECT imsearch_index_group(%s)", group, rows)
        built.append(name)
    return built


def size_build_memory(conn: psycopg.Connection[Any], rows: int, *, per_row: int | None = None) -> None:
    """Give this session's index builds enough maintenance_work_mem for a graph of `rows` rows of `per_row` bytes
    (GRAPH_BYTES_PER_ROW unless said): IMSEARCH_BUILD_MEMORY when it is set, else the graph's size up to a quarter
    of this machine's memory, where the server's own setting is smaller (PostgreSQL's default, 64 MB, holds about
    20,000 rows). A graph that does not fit goes on building on disk, many times slower; that is said once
    (docs/scaling.md)."""
    memory = build_memory()
    if memory:
        try:
            conn.execute("SELECT set_config('maintenance_work_mem', %s, false)", (memory,))
        except psycopg.errors.InvalidParameterValue:
            raise ImsearchError(f"IMSEARCH_BUILD_MEMORY={memory!r} is not a memory size (e.g. 2GB)") from None
    have = scalar(conn, "SELECT pg_size_bytes(current_setting('maintenance_work_mem'))")
    wanted = int(rows * (per_row or GRAPH_BYTES_PER_ROW) * 1.1)
    if not memory and wanted > have:
        have = max(have, min(wanted, (quarter_of_memory_mb() or 64) * 2**20))
        conn.execute("SELECT set_config('maintenance_work_mem', %s, false)", (f"{have // 2**20}MB",))
    if wanted > have:
        log.warning("the index for %d rows needs about %d MB to build in memory, maintenance_work_mem is %d MB: "
                    "it will build slowly (set IMSEARCH_BUILD_MEMORY, e.g. 2GB)",
                    rows, wanted // 2**20 + 1, have // 2**20)


def _build(store: Store, sql: str, which: str | int, rows: int) -> None:
    """Build one class or group index with the memory its graph needs (size_build_memory)."""
    size_build_memory(store.conn, rows)
    try:
        store.conn.execute(sql, (which,))
    except psycopg.OperationalError as exc:
        raise store.lost(exc, "building an index in") from None


def index_recall(store: Store, *, sample: int, k: int) -> dict[str, float | None]:
    """Recall@k of each mode through the indexes against an exact scan of the same filter, with up to `sample`
    stored photos as queries (their own content left out); None for a mode nothing could be asked of.

    The indexes hold a fold of the embedding, whose recall depends on the embeddings, so it is measured on the
    library's own rather than assumed (`imsearch db check-recall`, and after a load or a migration)."""
    rows = store.conn.execute(
        "SELECT embedding, class, sha256 FROM images ORDER BY random() LIMIT %s", (sample,)).fetchall()
    recall: dict[str, float | None] = {}
    for mode in MODES:
        found = wanted = 0
        for embedding, cls, sha in rows:
            if mode != "all" and cls is None:
                continue
            vector = np.asarray(embedding.to_numpy(), dtype=np.float32)
            answers = [{m.id for m in search.run(store.conn, vector, mode, k=k, cls=cls, skip_sha=sha, exact=exact)}
                       for exact in (False, True)]
            found += len(answers[0] & answers[1])
            wanted += len(answers[1])
        recall[mode] = found / wanted if wanted else None
    return recall


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
