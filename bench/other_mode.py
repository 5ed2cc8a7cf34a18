"""Mode other (`class <> X`) at scale: imsearch's plan against the designs it did not take, on one database.

    .venv/bin/python bench/other_mode.py                        # 100k scene-like rows (about 15 minutes here)
    .venv/bin/python bench/other_mode.py --data noise --rows 20000

Fills a fresh database as bench/search.py does (same generators, same indexes), then for queries of a common class
and of the rare class, each against an exact scan of `class <> X`:

- union: imsearch's plan (one branch per other class, each through its class index) at several ef_search
  (the session setting imsearch.branch_ef_search);
- other-class index: the partial index `WHERE class <> X` that `imsearch db index-other` builds (a 1,024-d fold of
  the embedding, migration 0006), searched by imsearch: one graph search instead of one per class, its nearest
  re-ranked by the exact distance, at several ef_search (imsearch.other_ef_search);
- the same fold in the denser graph it was first built as (m 32, ef_construction 200), searched by imsearch;
- full-width other-class index: the same partial index over the whole unit embedding, as migration 0005 built it;
- iterative: the whole-table index with `hnsw.iterative_scan = relaxed_order`, imsearch's plan when a large other
  class has no index of its own (here every large class has one, so the bench runs that query itself; the scan
  counters say whether the whole-table index served it);
- overfetch (rare X only): the whole-table index's nearest |X| + k rows, filtered afterwards; at most |X| rows of X
  can come first, so the answer is complete whenever the index search is.

The SQL of the designs not taken lives here only; imsearch's own goes through imsearch.search.run, one call of the
SQL function imsearch_search, as find does.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from collections.abc import Iterator
from typing import Any, Callable

import numpy as np
from pgvector import HalfVector
from psycopg import sql
from synthetic import COMMON, GENERATORS, RARE, bench_server, drop_database, fill, fresh_database

from imsearch import search
from imsearch.db import indexes
from imsearch.db.migrate import upgrade
from imsearch.db.store import Store
from imsearch.search import OTHER_INDEX_PREFIX

OVERFETCH = """
SELECT id FROM (SELECT id, class, embedding <=> %(q)s AS distance FROM images
                ORDER BY embedding <=> %(q)s LIMIT %(n)s) AS near
WHERE class <> %(cls)s ORDER BY distance LIMIT %(k)s
"""
EFS = (40, 100, 200, 400)
OTHER_EFS = (100, 200, 250, 400)
# The other-class index as migration 0005 built it, on the whole unit-length embedding: twice the bytes per compared
# vector of the fold that replaced it.
FULL = "l2_normalize(embedding)::halfvec(2048)"
FULL_WIDTH = f"""
SELECT id FROM images WHERE class <> %(cls)s ORDER BY {FULL} <=> %(unit)s LIMIT %(k)s
"""
# The whole-table index scanned iteratively, filtered by `class <> X`: what imsearch_search runs for mode other when
# a large other class has no index of its own (its last query, under iterative_settings).
ITERATIVE = """
SELECT id FROM images WHERE class <> %(cls)s ORDER BY embedding <=> %(q)s LIMIT %(k)s
"""


def iterative_settings(k: int) -> dict[str, str]:
    return {"hnsw.iterative_scan": "relaxed_order", "hnsw.max_scan_tuples": str(search.MAX_SCAN_TUPLES),
            "hnsw.ef_search": str(min(max(search.EF_SEARCH, 2 * k), 1000)), "enable_seqscan": "off",
            "plan_cache_mode": "force_custom_plan"}


def local_settings(conn: Any, settings: dict[str, str]) -> None:
    """Settings for the rest of the transaction (SET LOCAL): pgvector's, the planner's, or imsearch_search's own
    (imsearch.branch_ef_search, imsearch.other_ef_search), which the function reads when set."""
    for name, value in settings.items():
        conn.execute("SELECT set_config(%s, %s, true)", (name, value))


def index_scans(conn: Any) -> dict[str, int]:
    """HNSW index scans on images so far, by index name (this connection's own counted first)."""
    conn.execute("SELECT pg_stat_force_next_flush()")
    return dict(conn.execute("SELECT indexrelname, idx_scan FROM pg_stat_user_indexes WHERE relname = 'images' "
                             "AND starts_with(indexrelname, 'images_embedding_hnsw')").fetchall())


def scans(conn: Any, settings: dict[str, str], answer: Callable[[], object]) -> dict[str, int]:
    """The HNSW index scans one query makes under these settings, by index name, from the per-index scan counters
    (read outside the query's transaction, where the server has counted it)."""
    before = index_scans(conn)
    with conn.transaction():
        local_settings(conn, settings)
        answer()
    return {name: n - before.get(name, 0) for name, n in index_scans(conn).items() if n > before.get(name, 0)}


def timed(conn: Any, settings: dict[str, str], queries: np.ndarray,
          answer: Callable[[np.ndarray], list[int]]) -> tuple[list[list[int]], list[float]]:
    """Answers and seconds per query, after a warm-up pass over the same number of other queries."""
    out, seconds = [], []
    with conn.transaction():
        local_settings(conn, settings)
        for q in queries[len(queries) // 2:]:
            answer(q)
        for q in queries[:len(queries) // 2]:
            t = time.perf_counter()
            out.append(answer(q))
            seconds.append(time.perf_counter() - t)
    return out, seconds


def report(label: str, got: list[list[int]], truth: list[set[int]], seconds: list[float], k: int) -> None:
    recall = [len(set(g) & t) / len(t) for g, t in zip(got, truth)]
    short = sum(len(g) < k for g in got)
    print(f"  {label:<34} recall@{k} {statistics.mean(recall):.3f}  min {min(recall):.2f}  short {short:>2}  "
          f"p50 {np.percentile(seconds, 50) * 1000:6.1f} ms  p95 {np.percentile(seconds, 95) * 1000:6.1f} ms")


def compare(store: Store, gen: Any, cls: str, queries: int, k: int) -> None:
    conn = store.conn
    counts = dict(store.classes())
    qs = gen.vectors(cls, 2 * queries)
    truth = [{m.id for m in search.run(conn, q, "other", k=k, cls=cls, skip_sha=None, exact=True)}
             for q in qs[:queries]]
    print(f"\nother {cls}: {sum(n for c, n in counts.items() if c != cls):,} rows pass the filter")

    def imsearch(q: np.ndarray) -> list[int]:
        return [m.id for m in search.run(conn, q, "other", k=k, cls=cls, skip_sha=None)]

    for ef in EFS:
        got, seconds = timed(conn, {"imsearch.branch_ef_search": str(ef)}, qs, imsearch)
        report(f"union, ef_search {ef}" + (" (imsearch)" if ef == search.BRANCH_EF_SEARCH else ""),
               got, truth, seconds, k)

    def iterative(q: np.ndarray) -> list[int]:
        return [r[0] for r in conn.execute(ITERATIVE, {"q": HalfVector(q), "cls": cls, "k": k})]

    got, seconds = timed(conn, iterative_settings(k), qs, iterative)
    used = scans(conn, iterative_settings(k), lambda: iterative(qs[0]))
    how = "whole-table index" if "images_embedding_hnsw" in used else "planner chose exact"
    report(f"iterative scan ({how})", got, truth, seconds, k)

    if counts[cls] <= search.EXACT_MAX_ROWS:
        n = counts[cls] + k
        got, seconds = timed(conn, {"hnsw.ef_search": str(min(max(n, 40), 1000))}, qs, lambda q: [
            r[0] for r in conn.execute(OVERFETCH, {"q": HalfVector(q), "n": n, "cls": cls, "k": k})])
        report(f"overfetch {n} from the whole-table index", got, truth, seconds, k)

    conn.execute("SET maintenance_work_mem = '4GB'")
    conn.execute("SET max_parallel_maintenance_workers = 1")
    t = time.perf_counter()
    conn.execute("SELECT imsearch_index_other(%s)", (cls,))
    size = sum(n for _, n in indexes.other_indexes(store.conn))
    print(f"  other-class index: built in {time.perf_counter() - t:.1f} s, {size / 2**20:,.0f} MiB")

    def through_imsearch(label: str, efs: tuple[int, ...], ours: bool = True) -> None:
        default = search.OTHER_EF_SEARCH if ours else 0
        for ef in efs:
            got, seconds = timed(conn, {"imsearch.other_ef_search": str(ef)}, qs, imsearch)
            report(f"{label}, ef_search {ef}" + (" (imsearch)" if ef == default else ""), got, truth, seconds, k)

    try:
        through_imsearch("other-class index", OTHER_EFS)
    finally:
        indexes.drop_other_indexes(store.conn)
    # -- the same fold in the denser graph it was first built as, under the other-class index's name, so that
    # imsearch_search finds it and searches it as its own
    with scratch_index(conn, indexes.class_index_name(cls, OTHER_INDEX_PREFIX), search.FOLD, cls,
                       "folded index, m 32, ef_construction 200"):
        through_imsearch("folded m 32", (200, 250), ours=False)
    with scratch_index(conn, "other_full", FULL, cls, "full-width other-class index"):
        for ef in (200, 250, 400):  # as imsearch_search: custom plans only, and no sort in place of the index
            settings = {"hnsw.ef_search": str(ef), "enable_sort": "off", "plan_cache_mode": "force_custom_plan"}
            got, seconds = timed(conn, settings, qs, lambda q: [
                r[0] for r in conn.execute(FULL_WIDTH, {"unit": HalfVector(q / np.linalg.norm(q)), "cls": cls,
                                                        "k": k})])
            report(f"full-width index, ef_search {ef}", got, truth, seconds, k)


@contextlib.contextmanager
def scratch_index(conn: Any, name: str, expression: str, cls: str, label: str) -> Iterator[None]:
    """A partial HNSW index `WHERE class <> cls` at m 32, ef_construction 200, for as long as the block runs."""
    t = time.perf_counter()
    conn.execute(sql.SQL(f"CREATE INDEX {name} ON images USING hnsw (({expression}) halfvec_cosine_ops) "
                         "WITH (m = 32, ef_construction = 200) WHERE class <> {cls}").format(cls=sql.Literal(cls)))
    size = conn.execute("SELECT pg_relation_size(%s::regclass)", (name,)).fetchone()[0]
    print(f"  {label}: built in {time.perf_counter() - t:.1f} s, {size / 2**20:,.0f} MiB")
    try:
        yield
    finally:
        conn.execute(f"DROP INDEX {name}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--data", choices=GENERATORS, default="scenes")
    ap.add_argument("--queries", type=int, default=40, help="queries per case")
    ap.add_argument("-k", type=int, default=5)
    args = ap.parse_args()
    print(f"imsearch mode-other bench: {args.rows:,} {args.data} rows, k={args.k}, {args.queries} queries per case")
    with bench_server() as admin:
        name = f"imsearch_other_{args.data}_{args.rows}"
        url = fresh_database(admin, name)
        try:
            upgrade(url)
            gen = GENERATORS[args.data](seed=args.rows)
            fill(url, gen, args.rows)
            with Store.open(url) as store:
                print("shared_buffers", store.conn.execute("SHOW shared_buffers").fetchone()[0])
                compare(store, gen, COMMON[1], args.queries, args.k)
                compare(store, gen, RARE, args.queries, args.k)
        finally:
            drop_database(admin, name)


if __name__ == "__main__":
    main()
