"""Matches: the three search modes as SQL, and how each query is planned.

Every mode orders the same rows by `embedding <=> query`; a mode only adds a WHERE clause. A filtered HNSW scan
over the whole table loses results when the filter drops the query's own neighbourhood (`class <> X` for a query
of class X: the greedy search spends itself inside X), so filtered queries are planned per class:

- a class of at most EXACT_MAX_ROWS rows is scanned exactly through the btree on `class` (a few ms);
- a larger class has its own partial HNSW index (`imsearch_index_class`, made after ingest), which a query
  `WHERE class = c` searches like an unfiltered index;
- mode *other* is the union of the *same* query over every other class, each branch planned as above, merged by
  distance in SQL.

Where a large class has no index yet, or there are more than MAX_BRANCHES classes, the whole-table index is
scanned iteratively (pgvector >= 0.8), and exactly on older pgvector. docs/scaling.md has the measurements.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import psycopg
from pgvector import HalfVector

from ..errors import ImsearchError
from ..modes import MODES

log = logging.getLogger(__name__)


# A mode's filter lives here and nowhere else (the web page and the CLI both come through `run`).
MODE_FILTERS: dict[str, str] = {
    "all": "",
    "same": "AND class = %(cls)s",
    "other": "AND class <> %(cls)s",
}

QUERY = """
SELECT id, path, class, embedding <=> %(q)s AS distance
FROM images
WHERE sha256 IS DISTINCT FROM %(skip_sha)s {filter}
ORDER BY embedding <=> %(q)s
LIMIT %(k)s
"""

# A class with its own index (migration 0003) is searched through it: it indexes the unit-length embedding by
# inner product, which orders rows as cosine distance does; the distance reported is still `<=>`.
CLASS_QUERY = """
SELECT id, path, class, embedding <=> %(q)s AS distance
FROM images
WHERE sha256 IS DISTINCT FROM %(skip_sha)s AND class = %({cls})s
ORDER BY l2_normalize(embedding)::halfvec(2048) <#> %(unit)s
LIMIT %(k)s
"""

# Mode other through the query class's other-class index (`imsearch db index-other`, migrations 0005-0006): one
# search of a graph over every row of every other class. The graph holds FOLD, a 1,024-d fold of the embedding
# (half the bytes per compared vector); its OTHER_DEPTH nearest are ranked by the exact distance. Cosine on the
# fold, where the class indexes use `<#>` on the whole embedding, so neither kind can serve the other's query.
FOLD = "(subvector(embedding, 1, 1024) - subvector(embedding, 1025, 1024))::halfvec(1024)"
OTHER_QUERY = f"""
SELECT id, path, class, embedding <=> %(q)s AS distance
FROM (
    SELECT id, path, class, embedding
    FROM images
    WHERE sha256 IS DISTINCT FROM %(skip_sha)s AND class <> %(cls)s
    ORDER BY {FOLD} <=> %(fold)s
    LIMIT %(depth)s
) AS near
ORDER BY distance
LIMIT %(k)s
"""

# Mode other, per class: the same-class query for each other class, merged by distance. A small class is scanned
# exactly (OFFSET 0 keeps the ORDER BY from reaching an index).
BRANCH = "({query})".format(query=CLASS_QUERY.format(cls="c{i}").strip())
EXACT_BRANCH = """(SELECT * FROM (
    SELECT id, path, class, embedding <=> %(q)s AS distance FROM images
    WHERE sha256 IS DISTINCT FROM %(skip_sha)s AND class = %(c{i})s OFFSET 0) AS small
 ORDER BY distance LIMIT %(k)s)"""
UNION_TAIL = "\nORDER BY distance\nLIMIT %(k)s"

# Filtered sets up to this many rows are scanned exactly: cheaper than an index scan at that size, and exact.
EXACT_MAX_ROWS = 1_000
EF_SEARCH = 100
# A query of class X searches the other classes' graphs from outside them, where HNSW needs a wider beam. At 100k
# scene-like rows mode other's recall@5 was 0.995-1.0 / 1.0 / 1.0 at ef_search 100 / 200 / 400, p50 20-23 / 31-37 /
# 46-58 ms (bench/other_mode.py; docs/scaling.md has the noise data's too). The SQL functions take it from here
# (function_sql), as every constant below.
BRANCH_EF_SEARCH = 200
# One graph of every other class, searched from outside it (m = 16, ef_construction = 400): at 100k scene rows
# recall@5 0.970-0.974 / 0.970 (two query classes) at ef_search 200, 0.982 / 0.978 at 250, p50 5-6 ms; 50 or 100
# candidates re-ranked made no difference (docs/scaling.md). The SQL functions take both from here.
OTHER_EF_SEARCH = 250
OTHER_DEPTH = 50
MAX_SCAN_TUPLES = 50_000
MAX_BRANCHES = 32

EXACT_SETTINGS = (("enable_indexscan", "off"),)

# Partial HNSW indexes per class (`imsearch_index_class`, migration 0003) and per other class (`db index-other`):
# the prefix and the first 16 hex digits of the class's md5.
CLASS_INDEX_PREFIX = "images_embedding_hnsw_c_"
OTHER_INDEX_PREFIX = "images_embedding_hnsw_o_"

SQL_FUNCTIONS = ("imsearch_nearest", "imsearch_class_correspondence")


def function_sql(name: str) -> str:
    """The full text of the SQL function `name` as this planner plans: imsearch/search/sql/NAME.sql with the constants
    above filled in. A migration that changes a function carries this text frozen in migrations/sql, and a test
    checks that the migrated database runs exactly this, so find and the SQL functions cannot drift apart."""
    from importlib.resources import files

    if name not in SQL_FUNCTIONS:
        raise ValueError(f"no SQL function {name!r}; there are {', '.join(SQL_FUNCTIONS)}")
    text = (files(__package__) / "sql" / f"{name}.sql").read_text()
    values = {
        "EF_SEARCH": EF_SEARCH, "BRANCH_EF_SEARCH": BRANCH_EF_SEARCH, "OTHER_EF_SEARCH": OTHER_EF_SEARCH,
        "OTHER_DEPTH": OTHER_DEPTH, "EXACT_MAX_ROWS": EXACT_MAX_ROWS, "MAX_SCAN_TUPLES": MAX_SCAN_TUPLES,
        "MAX_BRANCHES": MAX_BRANCHES, "CLASS_INDEX_PREFIX": CLASS_INDEX_PREFIX,
        "OTHER_INDEX_PREFIX": OTHER_INDEX_PREFIX, "FOLD_ROW": FOLD.replace("embedding", "i.embedding"),
        "MODES": ", ".join(f"'{m}'" for m in MODES),
        "FOLD_QUERY": FOLD.replace("embedding", "q"),
    }
    for key, value in values.items():
        text = text.replace(f"@{key}@", str(value))
    return text


ITERATIVE_SET_CLAUSE = re.compile(r'^ SET "hnsw\.(?:iterative_scan|max_scan_tuples)" TO .*\n', re.M)


def for_server(function: str, pgvector: str | None) -> str:
    """A function's text (function_sql, or a migration's frozen one) as a server with this pgvector can create
    it: before 0.8 pgvector has no iterative index scans and refuses their settings in a SET clause."""
    version = tuple(int(p) for p in re.findall(r"\d+", pgvector or "0")[:2])
    return function if version >= (0, 8) else ITERATIVE_SET_CLAUSE.sub("", function)


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


def within(matches: list[Match], max_distance: float | None) -> list[Match]:
    """The ranked matches at most max_distance away (all of them with None): after ranking, so a query may get
    fewer than k; ranks are kept, since what is dropped is the tail."""
    if max_distance is None:
        return matches
    return [m for m in matches if m.distance <= max_distance]


@dataclass(frozen=True)
class Plan:
    """How one query runs: the planner settings, and for mode other the classes whose queries are merged."""

    exact: bool
    settings: tuple[tuple[str, str], ...] = ()
    branches: tuple[tuple[str, bool], ...] = ()  # (class, scanned exactly)
    class_index: bool = False  # mode same through the class's own index, mode other through its other-class index


def mode_sql(mode: str, branches: tuple[tuple[str, bool], ...] = (), class_index: bool = False) -> str:
    """The SQL of a mode; with `branches`, mode other as a union of per-class queries."""
    if mode not in MODE_FILTERS:
        raise ValueError(f"unknown mode {mode!r}; use one of {', '.join(MODES)}")
    if class_index:
        return OTHER_QUERY if mode == "other" else CLASS_QUERY.format(cls="cls")
    if branches:
        parts = [(EXACT_BRANCH if exact else BRANCH).format(i=i) for i, (_, exact) in enumerate(branches)]
        return "\nUNION ALL\n".join(parts) + UNION_TAIL
    return QUERY.format(filter=MODE_FILTERS[mode])


def plan(
    mode: str,
    *,
    k: int,
    cls: str | None = None,
    counts: dict[str, int] | None = None,
    indexed: frozenset[str] | set[str] = frozenset(),
    others_indexed: frozenset[str] | set[str] = frozenset(),
    pgvector: tuple[int, ...] = (0, 8, 0),
    exact: bool = False,
) -> Plan:
    """Choose how to run one query from the stored class sizes (`counts`) and which classes have an index
    (`indexed`: their own; `others_indexed`: one over every other class)."""
    counts = counts or {}
    if exact:
        return Plan(True, EXACT_SETTINGS)
    # A 2048-d halfvec is stored out of line (TOAST), so the table looks small to the planner and, at PostgreSQL's
    # default settings, a scan of it plus a sort looks cheaper than the index: 659 ms instead of 0.4 ms at 100k rows.
    index = (("hnsw.ef_search", str(min(max(EF_SEARCH, 2 * k), 1000))), ("plan_cache_mode", "force_custom_plan"),
             ("enable_seqscan", "off"))
    # With a class index at hand the planner still prefers the btree on class plus a sort; forbid the sort.
    class_index = index + (("enable_sort", "off"),)
    if mode == "all":
        return Plan(False, index)
    if mode == "same":
        rows = counts.get(cls or "", 0)
        if rows <= EXACT_MAX_ROWS:
            return Plan(True, EXACT_SETTINGS)
        if cls in indexed:
            return Plan(False, class_index, class_index=True)
        return _iterative(index, pgvector)
    others = sorted(c for c in counts if c != cls)
    if cls in others_indexed and sum(counts[c] for c in others) > EXACT_MAX_ROWS:
        beam = (("hnsw.ef_search", str(min(max(OTHER_EF_SEARCH, 2 * k), 1000))),) + class_index[1:]
        return Plan(False, beam, class_index=True)
    big_unindexed = [c for c in others if counts[c] > EXACT_MAX_ROWS and c not in indexed]
    if others and len(others) <= MAX_BRANCHES and not big_unindexed:
        branches = tuple((c, counts[c] <= EXACT_MAX_ROWS) for c in others)
        wide = (("hnsw.ef_search", str(max(BRANCH_EF_SEARCH, 2 * k))),) + class_index[1:]
        return Plan(all(e for _, e in branches), wide, branches)
    return _iterative(index, pgvector)


def _iterative(index: tuple[tuple[str, str], ...], pgvector: tuple[int, ...]) -> Plan:
    if pgvector < (0, 8, 0):
        log.warning("pgvector %s has no iterative index scans: this filtered search scans exactly "
                    "(upgrade pgvector to 0.8+ for fast filtered search)", ".".join(map(str, pgvector)))
        return Plan(True, EXACT_SETTINGS)
    return Plan(False, index + (("hnsw.iterative_scan", "relaxed_order"),
                                ("hnsw.max_scan_tuples", str(MAX_SCAN_TUPLES))))


def _statement(mode: str, vector: np.ndarray, k: int, cls: str | None, skip_sha: str | None,
               query_plan: Plan) -> tuple[str, dict[str, Any]]:
    params: dict[str, Any] = {"q": HalfVector(vector), "k": k, "cls": cls, "skip_sha": skip_sha}
    if query_plan.class_index and mode == "other":
        params.update(fold=HalfVector(vector[:1024] - vector[1024:]), depth=max(OTHER_DEPTH, k))
    elif query_plan.class_index or query_plan.branches:
        params["unit"] = HalfVector(vector / (np.linalg.norm(vector) or 1.0))
    params.update({f"c{i}": c for i, (c, _) in enumerate(query_plan.branches)})
    return mode_sql(mode, query_plan.branches, query_plan.class_index), params


def set_local(conn: psycopg.Connection[Any], settings: tuple[tuple[str, str], ...]) -> None:
    """Apply planner settings until the end of the current transaction (SET LOCAL), in one statement."""
    if settings:
        calls = ", ".join("set_config(%s, %s, true)" for _ in settings)
        conn.execute(f"SELECT {calls}", [part for setting in settings for part in setting])


def run(
    conn: psycopg.Connection[Any],
    vector: np.ndarray,
    mode: str,
    *,
    k: int,
    cls: str | None,
    skip_sha: str | None,
    query_plan: Plan,
    max_distance: float | None = None,
) -> list[Match]:
    """Run one mode's query with its plan's settings (SET LOCAL: they end with the transaction); with
    `max_distance`, the k nearest less those farther away (as imsearch_nearest's argument of that name)."""
    sql, params = _statement(mode, vector, k, cls, skip_sha, query_plan)
    with conn.transaction():
        set_local(conn, query_plan.settings)
        rows = conn.execute(sql, params).fetchall()
    # relaxed_order may hand back neighbours slightly out of order; ranks follow the true distances.
    rows.sort(key=lambda r: r[3])
    ranked = [Match(rank=i + 1, id=r[0], path=r[1], cls=r[2], distance=float(r[3])) for i, r in enumerate(rows)]
    return within(ranked, max_distance)


def explain(conn: psycopg.Connection[Any], vector: np.ndarray, mode: str, *, k: int, cls: str | None,
            query_plan: Plan) -> str:
    """The server's EXPLAIN for a query as `run` would send it (docs and tests check the index is used)."""
    sql, params = _statement(mode, vector, k, cls, None, query_plan)
    with conn.transaction():
        set_local(conn, query_plan.settings)
        rows = conn.execute("EXPLAIN " + sql, params).fetchall()
    return "\n".join(r[0] for r in rows)
