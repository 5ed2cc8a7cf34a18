"""Matches: the three search modes, planned and run in one place, the SQL function imsearch_search.

Every mode ranks rows by `embedding <=> query`, the exact cosine distance from the stored halfvec; a mode only adds
a WHERE clause. Each vector is indexed about once (migration 0013, docs/scaling.md): one whole-table HNSW index
over a 1,024-d fold of the embedding (imsearch_fold), and a partial one per class that holds a small share of the
library. An index gives the nearest RERANK_DEPTH candidates by the fold, which the exact distance ranks:

- mode all: the whole-table index; past UNION_MIN_ROWS rows in at most UNION_MAX_CLASSES classes, then the own
  indexes of the classes its answer names too, the union re-ranked (migration 0017);
- a filter that keeps at most EXACT_MAX_ROWS rows (a small class, or mode other beside a huge class): an exact
  scan through the btree on `class`;
- mode same, a class with its own index: that index, searched like an unfiltered one;
- mode other with at most UNION_MAX_CLASSES other classes: one search of each (its index, or exactly where it is
  small), the union re-ranked (migration 0015);
- modes all and other with more than UNION_MAX_CLASSES classes, where the library has its GROUPS group graphs
  (built past UNION_MIN_ROWS rows): one search of each, the query's own group in mode other scanned iteratively
  past its class, the union re-ranked (migration 0020);
- mode same for a large class without one, and mode other with more classes and no group graphs: the whole-table
  index scanned iteratively (pgvector >= 0.8) until RERANK_DEPTH rows pass the filter; exactly on older pgvector,
  and while a bulk load has the index down.

Where the candidates cannot rule out a nearer row beyond them, the search asks again deeper, up to
RERANK_MAX_DEPTH (migration 0015).

find, the web page, evaluate and the audit call `run`, which calls imsearch_search; the SQL functions
imsearch_nearest and imsearch_class_correspondence call it too. The template's second entry, imsearch_neighbours,
gives each stored image its nearest other stored images through the whole-table index: the audit and the
calibration call it through `neighbours`, and imsearch_duplicate_pairs calls it in SQL. Both, and the rule that
names a class's index (imsearch_class_index), are sql/imsearch_search.sql with the constants below filled in
(`function_sql`); a migration that changes one carries its text frozen. Every vector search of imsearch's is
written here (`<=>` appears nowhere else in the package); the perceptual-hash search is `hashes`.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import psycopg
from pgvector import HalfVector

from ..db.connect import Where, connection
from ..errors import ImsearchError
from ..modes import MAX_K, MODES
from ..vectors import DIMENSIONS

# Filtered sets up to this many rows are scanned exactly: cheaper than an index scan at that size, and exact. The
# session setting imsearch.exact_max_rows overrides it in SQL.
EXACT_MAX_ROWS = 1_000
# The vector indexes hold FOLD_DIMENSIONS-d folds of the embedding (imsearch_fold, migration 0013); a search takes an
# index's nearest RERANK_DEPTH by the fold (hnsw.ef_search as wide) and ranks them by the exact distance. The session
# setting imsearch.rerank_depth overrides it. docs/scaling.md has the measurements behind both.
FOLD_DIMENSIONS = 1024
RERANK_DEPTH = 200
# Where the k-th of the re-ranked candidates is not nearer than what a row beyond them could be (the farthest
# candidate's fold distance, less RERANK_MARGIN standard deviations of the fold's error over the candidates), the
# search asks again four times as deep, up to RERANK_MAX_DEPTH (migration 0015; imsearch.rerank_max_depth and
# imsearch.rerank_margin in SQL). Near queries settle at the first depth; a photo far from every stored one goes
# deeper. The widening stops at pgvector's largest ef_search, 1,000 (migration 0019): 4,000 before, through an
# iterative scan, found no more at a million rows in six classes and took half as long again (in 101 classes, a
# little more in mode other, both far from 0.99; docs/scaling.md). A session may set it deeper.
RERANK_MAX_DEPTH = 1000
RERANK_MARGIN = 4
MAX_SCAN_TUPLES = 50_000
# A class index is built for a class past EXACT_MAX_ROWS rows holding at most this share of the library (a larger
# one fills most of the whole-table graph, which a filtered scan then finds its rows in), so each row is in at most
# two graphs. At a million rows a class of a fifth searched through the whole-table graph lost a seventh of its top
# five (docs/scaling.md). Every graph is twice as dense as pgvector's default (m 16, ef_construction 64): the
# whole-table one since migration 0016, the class ones since 0018. At a million rows the default graphs left photos
# far from every row stranded: the whole-table graph found 0.91 of their top five in mode all (0.98 with these
# links), and the class graphs 0.956 in mode other, which searches classes the query is not in (1.000). The denser
# graph takes the same pages on disk (the fold fills them) and 2.3x the build time.
GRAPH_M = 32
GRAPH_EF_CONSTRUCTION = 128
CLASS_INDEX_MAX_SHARE = 0.5
# Mode other with at most this many other classes searches each one's index (or scans a small one exactly) and ranks
# the union (migration 0015); with more, the whole-table index is scanned iteratively past the query's own class. In
# a library past UNION_MIN_ROWS rows, mode all searches the graphs of the classes the whole-table graph's answer
# names, at most this many, too and ranks the union (migration 0017): at a million rows in six classes the
# whole-table graph found 0.978 of far queries' top five and this 0.990 (docs/scaling.md).
# imsearch.union_max_classes and imsearch.union_min_rows in SQL.
UNION_MAX_CLASSES = 8
UNION_MIN_ROWS = 250_000
# A library of more than UNION_MAX_CLASSES classes past UNION_MIN_ROWS rows gets GROUPS group graphs (migration
# 0020): each holds the rows of the classes a hash of the name puts in it, so every row is in one of them, and modes
# all and other search them all. In 101 tight classes at a million rows the whole-table graph stranded queries
# among the wrong classes (0.980 of generated queries' top five in mode all, 0.954 of real photos'; mode other
# 0.824) where the union of eight group graphs of about 125,000 rows, asked 1,000 deep, found 1.000, 0.998 and
# 1.000, at about a second a query (docs/scaling.md).
GROUPS = 8

# The whole-table index (migration 0013), and the partial ones per class (`imsearch_index_class`): the class prefix
# and the first 16 hex digits of the class's md5. Migration 0013 dropped the full-width indexes of 0003-0006, whose
# names begin with LEGACY_PREFIX.
WHOLE_INDEX = "images_fold_hnsw"
CLASS_INDEX_PREFIX = "images_fold_hnsw_c_"
GROUP_INDEX_PREFIX = "images_fold_hnsw_g"
LEGACY_PREFIX = "images_embedding_hnsw"


def fold_signs() -> tuple[list[int], list[int]]:
    """The fixed random signs imsearch_fold gives each half of the embedding: bits of SHA-256 over a counter, so
    they are the same on every machine and need no seed of a library's."""
    bits: list[int] = []
    counter = 0
    while len(bits) < 2 * FOLD_DIMENSIONS:
        for byte in hashlib.sha256(f"imsearch fold {counter}".encode()).digest():
            bits.extend(1 if byte >> j & 1 else -1 for j in range(8))
        counter += 1
    return bits[:FOLD_DIMENSIONS], bits[FOLD_DIMENSIONS:2 * FOLD_DIMENSIONS]


def fold(vector: np.ndarray) -> np.ndarray:
    """imsearch_fold in numpy (benchmarks and tests compare the two)."""
    first, second = (np.asarray(s, dtype=np.float32) for s in fold_signs())
    v = np.asarray(vector, dtype=np.float32)
    return v[..., :FOLD_DIMENSIONS] * first + v[..., FOLD_DIMENSIONS:] * second


# What imsearch_search raises for a class with no stored image (a code of its own, so callers need not read text),
# and on a sharded library for a shard that cannot answer (imsearch_shard_search, migration 0014).
UNKNOWN_CLASS_SQLSTATE = "IM001"
SHARD_DOWN_SQLSTATE = "IM002"
# Where a sharded library keeps dblink's functions: a schema of their own that PUBLIC may not use, so that a reader
# cannot open connections from the server (imsearch.db.shards).
DBLINK_SCHEMA = "imsearch_dblink"

# Each SQL function and the template file that holds it (the planner's file holds its entries and their helper).
TEMPLATES = {
    "imsearch_class_index": "imsearch_search", "imsearch_fold": "imsearch_search",
    "imsearch_index_all": "imsearch_search", "imsearch_index_class": "imsearch_search",
    "imsearch_class_group": "imsearch_search", "imsearch_index_group": "imsearch_search",
    "imsearch_search": "imsearch_search", "imsearch_shard_search": "imsearch_search",
    "imsearch_neighbours": "imsearch_search", "imsearch_nearest": "imsearch_nearest",
    "imsearch_class_correspondence": "imsearch_class_correspondence",
    "imsearch_duplicate_pairs": "imsearch_duplicate_pairs",
}
SQL_FUNCTIONS = tuple(TEMPLATES)
# imsearch_neighbours's re-ranking depth (and beam), at least four times the neighbours fetched.
NEIGHBOURS_DEPTH = 64
# pgvector's first release with iterative index scans (hnsw.iterative_scan): filtered searches of the whole-table
# index. The one check of it: `for_server` leaves their settings out of a function's SET clause before it, and
# imsearch_search reads its own SET clause to know.
ITERATIVE_PGVECTOR = (0, 8)

SEARCH = """
SELECT rank, id, path, class, distance
FROM imsearch_search(%(q)s, %(k)s::integer, %(mode)s::text, %(cls)s::text, %(skip_sha)s::text,
                     %(max_distance)s::double precision, %(exact)s::boolean)
"""


def function_sql(name: str) -> str:
    """The full text of the SQL function `name`: imsearch/search/sql/NAME.sql with the constants above filled in. A
    migration that changes a function carries this text frozen in migrations/sql, and a test checks that the
    migrated database runs exactly this."""
    from importlib.resources import files

    if name not in SQL_FUNCTIONS:
        raise ValueError(f"no SQL function {name!r}; there are {', '.join(SQL_FUNCTIONS)}")
    text = (files(__package__) / "sql" / f"{TEMPLATES[name]}.sql").read_text()
    [text] = [f for f in re.split(r"(?m)^(?=CREATE OR REPLACE FUNCTION )", text)
              if f.startswith(f"CREATE OR REPLACE FUNCTION public.{name}(")]
    first, second = fold_signs()
    values = {
        "RERANK_DEPTH": RERANK_DEPTH, "RERANK_MAX_DEPTH": RERANK_MAX_DEPTH, "RERANK_MARGIN": RERANK_MARGIN,
        "EXACT_MAX_ROWS": EXACT_MAX_ROWS, "MAX_SCAN_TUPLES": MAX_SCAN_TUPLES, "UNION_MAX_CLASSES": UNION_MAX_CLASSES,
        "UNION_MIN_ROWS": UNION_MIN_ROWS, "GROUPS": GROUPS, "GROUP_INDEX_PREFIX": GROUP_INDEX_PREFIX,
        "NEIGHBOURS_DEPTH": NEIGHBOURS_DEPTH, "CLASS_INDEX_PREFIX": CLASS_INDEX_PREFIX, "WHOLE_INDEX": WHOLE_INDEX,
        "FOLD_DIMENSIONS": FOLD_DIMENSIONS, "FOLD_SECOND": FOLD_DIMENSIONS + 1,
        "FOLD_SIGNS_1": "[" + ",".join(map(str, first)) + "]", "FOLD_SIGNS_2": "[" + ",".join(map(str, second)) + "]",
        "GRAPH_M": GRAPH_M, "GRAPH_EF_CONSTRUCTION": GRAPH_EF_CONSTRUCTION,
        "MODES": ", ".join(f"'{m}'" for m in MODES), "DIMENSIONS": DIMENSIONS, "MAX_K": MAX_K,
        "UNKNOWN_CLASS": UNKNOWN_CLASS_SQLSTATE, "SHARD_DOWN": SHARD_DOWN_SQLSTATE,
    }
    for key, value in values.items():
        text = text.replace(f"@{key}@", str(value))
    return text


ITERATIVE_SET_CLAUSE = re.compile(r'^ SET "hnsw\.(?:iterative_scan|max_scan_tuples)" TO .*\n', re.M)


def iterates(pgvector: str | tuple[int, ...] | None) -> bool:
    """Whether this pgvector (its version as pg_extension gives it, or as numbers) has iterative index scans."""
    if not isinstance(pgvector, tuple):
        pgvector = tuple(int(p) for p in re.findall(r"\d+", pgvector or "0"))
    return pgvector[:2] >= ITERATIVE_PGVECTOR


def for_server(function: str, pgvector: str | None) -> str:
    """A function's text (function_sql, or a migration's frozen one) as a server with this pgvector can create
    it: before 0.8 pgvector has no iterative index scans and refuses their settings in a SET clause."""
    return function if iterates(pgvector) else ITERATIVE_SET_CLAUSE.sub("", function)


def index_name(cls: str) -> str:
    """The name of a class's partial index: imsearch_class_index's rule, md5 of the UTF-8 class name as
    PostgreSQL's (a test holds the two equal)."""
    return CLASS_INDEX_PREFIX + hashlib.md5(cls.encode()).hexdigest()[:16]


def class_group(cls: str | None) -> int:
    """The group graph that holds a class's rows: imsearch_class_group's rule, the first 32 bits of the class's md5
    modulo GROUPS, group 0 for rows of no class (a test holds the two equal)."""
    return 0 if cls is None else int(hashlib.md5(cls.encode()).hexdigest()[:8], 16) % GROUPS


def group_index_name(group: int) -> str:
    """The name of a group graph (imsearch_index_group)."""
    return f"{GROUP_INDEX_PREFIX}{group}"


@dataclass(frozen=True)
class Match:
    """One ranked match."""

    rank: int
    id: int
    path: str
    cls: str | None
    distance: float


def check_max_distance(value: float) -> float:
    """A max_distance as find and imsearch_nearest take it: a cosine distance, at least 0 and below 2 (not NaN)."""
    if math.isnan(value) or not 0 <= value < 2:
        raise ImsearchError(f"max_distance must be a cosine distance, at least 0 and below 2, not {value}")
    return float(value)


def run(
    where: Where,
    vector: np.ndarray,
    mode: str,
    *,
    k: int,
    cls: str | None,
    skip_sha: str | None,
    max_distance: float | None = None,
    exact: bool = False,
) -> list[Match]:
    """The k stored images nearest to `vector` in one mode (class `cls` for the class modes), less those holding the
    content `skip_sha` and those farther than `max_distance`, ranked: one call of imsearch_search, which plans.
    `where` is the Store, or a connection."""
    params = {"q": HalfVector(vector), "k": k, "mode": mode, "cls": cls, "skip_sha": skip_sha,
              "max_distance": max_distance, "exact": exact}
    rows = connection(where).execute(SEARCH, params).fetchall()
    return [Match(rank=r[0], id=r[1], path=r[2], cls=r[3], distance=float(r[4])) for r in rows]


NEIGHBOURS = "SELECT id, neighbour_id, distance FROM imsearch_neighbours(%s::bigint[], %s::integer)"
DISTANCES = """
SELECT u.a, u.b, x.embedding <=> y.embedding
FROM unnest(%s::bigint[], %s::bigint[]) AS u(a, b) JOIN images x ON x.id = u.a JOIN images y ON y.id = u.b
"""


def neighbours(conn: psycopg.Connection[Any], ids: list[int], k: int) -> list[tuple[int, int, float]]:
    """Each of these stored images' k nearest other stored images, as (id, neighbour id, cosine distance), unranked:
    one call of imsearch_neighbours, the planner's second entry (the whole-table index)."""
    return conn.execute(NEIGHBOURS, (ids, k)).fetchall()


def distances(conn: psycopg.Connection[Any], pairs: list[tuple[int, int]]) -> list[tuple[int, int, float]]:
    """The cosine distance of each pair of stored images, as (id, id, distance); pairs with a deleted image drop."""
    return conn.execute(DISTANCES, ([a for a, _ in pairs], [b for _, b in pairs])).fetchall()
