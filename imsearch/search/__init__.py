"""Matches: the three search modes, planned and run in one place, the SQL function imsearch_search.

Every mode orders the same rows by `embedding <=> query`; a mode only adds a WHERE clause. A filtered HNSW scan
over the whole table loses results when the filter drops the query's own neighbourhood (`class <> X` for a query
of class X: the greedy search spends itself inside X), so imsearch_search plans filtered queries per class:

- a class of at most EXACT_MAX_ROWS rows is scanned exactly through the btree on `class` (a few ms);
- a larger class has its own partial HNSW index (`imsearch_index_class`, made after ingest), which a query
  `WHERE class = c` searches like an unfiltered index;
- mode *other* searches the query class's other-class index (`imsearch db index-other`) where it has one, else the
  union of the *same* query over every other class, each branch planned as above, merged by distance.

Where a large class has no index yet, or there are more than MAX_BRANCHES classes, the whole-table index is
scanned iteratively (pgvector >= 0.8), and exactly on older pgvector. docs/scaling.md has the measurements.

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
# session setting imsearch.exact_max_rows overrides it in SQL; ingest gives larger classes their own index.
EXACT_MAX_ROWS = 1_000
EF_SEARCH = 100
# A query of class X searches the other classes' graphs from outside them, where HNSW needs a wider beam. At 100k
# scene-like rows mode other's recall@5 was 0.995-1.0 / 1.0 / 1.0 at ef_search 100 / 200 / 400, p50 20-23 / 31-37 /
# 46-58 ms (bench/other_mode.py; docs/scaling.md has the noise data's too).
BRANCH_EF_SEARCH = 200
# One graph of every other class, searched from outside it (m = 16, ef_construction = 400): at 100k scene rows
# recall@5 0.970-0.974 / 0.970 (two query classes) at ef_search 200, 0.982 / 0.978 at 250, p50 5-6 ms; 50 or 100
# candidates re-ranked made no difference (docs/scaling.md).
OTHER_EF_SEARCH = 250
OTHER_DEPTH = 50
MAX_SCAN_TUPLES = 50_000
MAX_BRANCHES = 32

# Mode other's other-class index (migrations 0005-0006) holds FOLD, a 1,024-d fold of the embedding (half the bytes
# per compared vector). Cosine on the fold, where the class indexes use `<#>` on the unit-length embedding, so
# neither kind can serve the other's query.
FOLD = "(subvector(embedding, 1, 1024) - subvector(embedding, 1025, 1024))::halfvec(1024)"

# Partial HNSW indexes per class (`imsearch_index_class`, migration 0003) and per other class (`db index-other`):
# the prefix and the first 16 hex digits of the class's md5.
CLASS_INDEX_PREFIX = "images_embedding_hnsw_c_"
OTHER_INDEX_PREFIX = "images_embedding_hnsw_o_"

# What imsearch_search raises for a class with no stored image (a code of its own, so callers need not read text).
UNKNOWN_CLASS_SQLSTATE = "IM001"

# Each SQL function and the template file that holds it (the planner's file holds its entries and their helper).
TEMPLATES = {
    "imsearch_class_index": "imsearch_search", "imsearch_search": "imsearch_search",
    "imsearch_neighbours": "imsearch_search", "imsearch_nearest": "imsearch_nearest",
    "imsearch_class_correspondence": "imsearch_class_correspondence",
    "imsearch_duplicate_pairs": "imsearch_duplicate_pairs",
}
SQL_FUNCTIONS = tuple(TEMPLATES)
# imsearch_neighbours's beam (hnsw.ef_search), at least twice the neighbours fetched: the audit's since it began.
NEIGHBOURS_EF_SEARCH = 64
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
    values = {
        "EF_SEARCH": EF_SEARCH, "BRANCH_EF_SEARCH": BRANCH_EF_SEARCH, "OTHER_EF_SEARCH": OTHER_EF_SEARCH,
        "OTHER_DEPTH": OTHER_DEPTH, "EXACT_MAX_ROWS": EXACT_MAX_ROWS, "MAX_SCAN_TUPLES": MAX_SCAN_TUPLES,
        "NEIGHBOURS_EF_SEARCH": NEIGHBOURS_EF_SEARCH,
        "MAX_BRANCHES": MAX_BRANCHES, "CLASS_INDEX_PREFIX": CLASS_INDEX_PREFIX,
        "OTHER_INDEX_PREFIX": OTHER_INDEX_PREFIX, "FOLD_ROW": FOLD.replace("embedding", "i.embedding"),
        "MODES": ", ".join(f"'{m}'" for m in MODES), "DIMENSIONS": DIMENSIONS, "MAX_K": MAX_K,
        "UNKNOWN_CLASS": UNKNOWN_CLASS_SQLSTATE,
        "FOLD_QUERY": FOLD.replace("embedding", "$1"),
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


def index_name(cls: str, prefix: str = CLASS_INDEX_PREFIX) -> str:
    """The name of a class's partial index (CLASS_INDEX_PREFIX) or of its other classes' (OTHER_INDEX_PREFIX):
    imsearch_class_index's rule, md5 of the UTF-8 class name as PostgreSQL's (a test holds the two equal)."""
    return prefix + hashlib.md5(cls.encode()).hexdigest()[:16]


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
