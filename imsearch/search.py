"""Matches: the three search modes as one SQL query each, and how each query is planned.

Every mode is the same ordered query; a mode only adds a WHERE clause. Filtered HNSW scans can come back
short (the index yields ef_search candidates, then the filter drops most of them), so a filtered query either
scans the index iteratively (pgvector >= 0.8) or, when the filtered set is small, scans it exactly.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import psycopg
from pgvector import HalfVector

log = logging.getLogger(__name__)

Mode = Literal["all", "same", "other"]
MODES: tuple[Mode, ...] = ("all", "same", "other")

# A mode's filter lives here and nowhere else (the web page and the CLI both come through `search`).
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

# Filtered sets up to this many rows are scanned exactly: cheaper than an iterative index scan, and exact.
EXACT_MAX_ROWS = 5_000
EF_SEARCH = 64
MAX_SCAN_TUPLES = 50_000


@dataclass(frozen=True)
class Match:
    """One ranked match."""

    rank: int
    id: int
    path: str
    cls: str | None
    distance: float


@dataclass(frozen=True)
class Plan:
    """How one query is run: index or exact scan, and the planner settings used."""

    exact: bool
    settings: tuple[tuple[str, str], ...] = ()


def mode_sql(mode: str) -> str:
    if mode not in MODE_FILTERS:
        raise ValueError(f"unknown mode {mode!r}; use one of {', '.join(MODES)}")
    return QUERY.format(filter=MODE_FILTERS[mode])


def plan(
    mode: str, *, k: int, filtered_rows: int | None, pgvector: tuple[int, ...], exact: bool = False
) -> Plan:
    """Choose index or exact scan for one query.

    `filtered_rows` is how many rows pass the mode's filter (None for mode all).
    """
    if exact:
        return Plan(True, (("enable_indexscan", "off"),))
    if filtered_rows is not None and filtered_rows <= EXACT_MAX_ROWS:
        return Plan(True, (("enable_indexscan", "off"),))
    ef = max(EF_SEARCH, 2 * k)
    settings: list[tuple[str, str]] = [("hnsw.ef_search", str(min(ef, 1000)))]
    if filtered_rows is not None:
        if pgvector < (0, 8, 0):
            log.warning("pgvector %s has no iterative index scans: filtered search scans exactly "
                        "(upgrade pgvector to 0.8+ for fast filtered search)", ".".join(map(str, pgvector)))
            return Plan(True, (("enable_indexscan", "off"),))
        settings += [("hnsw.iterative_scan", "relaxed_order"), ("hnsw.max_scan_tuples", str(MAX_SCAN_TUPLES))]
    return Plan(False, tuple(settings))


def run(
    conn: psycopg.Connection[Any],
    vector: np.ndarray,
    mode: str,
    *,
    k: int,
    cls: str | None,
    skip_sha: str | None,
    query_plan: Plan,
) -> list[Match]:
    """Run one mode's query with its plan's settings (SET LOCAL: they end with the transaction)."""
    sql = mode_sql(mode)
    params = {"q": HalfVector(vector), "k": k, "cls": cls, "skip_sha": skip_sha}
    with conn.transaction():
        for name, value in query_plan.settings:
            conn.execute("SELECT set_config(%s, %s, true)", (name, value))
        rows = conn.execute(sql, params).fetchall()
    # relaxed_order may hand back neighbours slightly out of order; ranks follow the true distances.
    rows.sort(key=lambda r: r[3])
    return [Match(rank=i + 1, id=r[0], path=r[1], cls=r[2], distance=float(r[3])) for i, r in enumerate(rows)]


def explain(conn: psycopg.Connection[Any], vector: np.ndarray, mode: str, *, k: int, cls: str | None,
            query_plan: Plan) -> str:
    """The server's EXPLAIN for a query as `run` would send it (docs and tests check the index is used)."""
    params = {"q": HalfVector(vector), "k": k, "cls": cls, "skip_sha": None}
    with conn.transaction():
        for name, value in query_plan.settings:
            conn.execute("SELECT set_config(%s, %s, true)", (name, value))
        rows = conn.execute("EXPLAIN " + mode_sql(mode), params).fetchall()
    return "\n".join(r[0] for r in rows)
