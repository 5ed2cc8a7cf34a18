"""Search at scale: recall@k and latency of imsearch's three modes on synthetic ResNet-like vectors.

    .venv/bin/python bench/search.py                  # 10k and 100k rows
    .venv/bin/python bench/search.py --full           # also 1M rows (hours of index build on 2 cores)
    .venv/bin/python bench/search.py --sizes 20000    # any sizes
    .venv/bin/python bench/search.py --depths 100,200,400  # the index pass again per re-ranking depth
    .venv/bin/python bench/search.py --server-defaults  # a server nobody tuned (shared_buffers 128 MB, ...)
    .venv/bin/python bench/search.py --plain-storage    # vectors inline in their rows instead of TOAST
    .venv/bin/python bench/search.py --sql-function     # also time imsearch_nearest() against find's own path
    .venv/bin/python bench/search.py --planner-cost     # also time find's path against the bare statement it runs

Uses DATABASE_URL when set (each size gets a fresh database, dropped afterwards), else a throwaway server set
up as imsearch's embedded one. Rows go in by COPY with the whole-table fold index (images_fold_hnsw) down, which
imsearch_index_all then builds, and the class indexes come from ensure_class_indexes, as `imsearch ingest` leaves
them (migration 0013). Every query goes through imsearch's own planner, the SQL function imsearch_search, via
imsearch.search.run, exactly as `find` does: an index's nearest imsearch.rerank_depth candidates by the fold,
ranked by the exact distance. The scan column says what it searched, read from the server's per-index scan
counters: hnsw (the whole-table index), class (the class's own index), iterative (the whole-table index scanned
with the mode's filter) or exact; class/sort and iterative/sort where imsearch_search chose that index but the
planner read the btree on class and sorted every row that passes the filter by the fold instead. `--depths`
repeats the index pass with `SET imsearch.rerank_depth` per depth, against the same exact answers. `--data noise`
swaps the default scene-like vectors for the hard case (see Noise). Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
from pgvector import HalfVector
from synthetic import COMMON, GENERATORS, RARE, Generator, bench_server, drop_database, fill, fresh_database

from imsearch import search
from imsearch.db import indexes
from imsearch.db.migrate import upgrade
from imsearch.db.store import Store
from imsearch.search import CLASS_INDEX_PREFIX, FOLD_DIMENSIONS, WHOLE_INDEX

CASES = (("all", None), ("same", COMMON[1]), ("same", RARE), ("other", COMMON[1]), ("other", RARE))


@contextmanager
def rerank_depth(store: Store, depth: int | None) -> Iterator[None]:
    """imsearch_search re-ranking `depth` candidates on the store's connection while the block runs (SET
    imsearch.rerank_depth, RESET after); None: the function's own, RERANK_DEPTH."""
    if depth is None:
        yield
        return
    store.conn.execute("SELECT set_config('imsearch.rerank_depth', %s, false)", (str(depth),))
    try:
        yield
    finally:
        store.conn.execute("RESET imsearch.rerank_depth")


def measure(store: Store, gen: Generator, queries: int, k: int, depths: list[int | None],
            cases: tuple[tuple[str, str | None], ...] = CASES) -> list[tuple]:
    """Per mode and class, and per re-ranking depth: recall@k against an exact scan, short answers, p50/p95 of the
    index and of the exact SQL.

    The exact scans run in one pass, then for each depth a warm-up pass on other queries and the index pass:
    interleaved, each exact scan would push the index pages the next query needs out of the server's cache.
    """
    counts = dict(store.classes())
    draws = {case: gen.vectors(case[1] or COMMON[2], 2 * queries) for case in cases}

    def timed(case: tuple[str, str | None], qs: np.ndarray, exact: bool = False, limit: int = k) -> tuple:
        answers, seconds = [], []
        for q in qs:
            t = time.perf_counter()
            answers.append(search.run(store.conn, q, case[0], k=limit, cls=case[1], skip_sha=None, exact=exact))
            seconds.append(time.perf_counter() - t)
        return answers, seconds

    truth = {case: timed(case, draws[case][:queries], exact=True) for case in cases}
    deep = {case: lid(timed(case, draws[case][:10], exact=True, limit=LID_K)[0]) for case in cases}
    scans = {case: scan_of(store, draws[case][0], case, k) for case in cases}
    out = []
    for depth in depths:
        with rerank_depth(store, depth):
            for case in cases:
                timed(case, draws[case][queries:])
            fast = {case: timed(case, draws[case][:queries]) for case in cases}
        for case in cases:
            mode, cls = case
            got, seconds = fast[case]
            exact, slow = truth[case]
            recalls = [len({m.id for m in g} & {m.id for m in t}) / len(t) for g, t in zip(got, exact)]
            short = sum(len(g) < k for g in got)
            filtered = None if mode == "all" else (counts[cls] if mode == "same" else
                                                   sum(n for c, n in counts.items() if c != cls))
            label = mode if cls is None else f"{mode} {cls} ({filtered:,} rows)"
            out.append((label, scans[case], depth or search.RERANK_DEPTH, deep[case], statistics.mean(recalls),
                        min(recalls), short, pct(seconds, 50), pct(seconds, 95), pct(slow, 50)))
    return out


def index_scans(conn: Any) -> dict[str, int]:
    """HNSW index scans on images so far by the fold indexes, by index name (this connection's own counted first)."""
    conn.execute("SELECT pg_stat_force_next_flush()")
    return dict(conn.execute("SELECT indexrelname, idx_scan FROM pg_stat_user_indexes WHERE relname = 'images' "
                             "AND starts_with(indexrelname, %s)", (WHOLE_INDEX,)).fetchall())


def scan_of(store: Store, q: np.ndarray, case: tuple[str, str | None], k: int) -> str:
    """What imsearch_search searched for one query, from the per-index scan counters (EXPLAIN cannot see inside
    the function): `class`, the class's own index; `hnsw`, the whole-table index (mode all); `iterative`, the
    whole-table index scanned with the mode's filter; `exact`, no index, as planned. `class/sort` and
    `iterative/sort`: the function chose that index's statement, but no HNSW index was scanned: the planner read
    the btree on class and sorted every row that passes the filter by the fold instead."""
    mode, cls = case
    before = index_scans(store.conn)
    search.run(store.conn, q, mode, k=k, cls=cls, skip_sha=None)
    used = {name for name, n in index_scans(store.conn).items() if n > before.get(name, 0)}
    if any(name.startswith(CLASS_INDEX_PREFIX) for name in used):
        return "class"
    if WHOLE_INDEX in used:
        return "hnsw" if mode == "all" else "iterative"
    if mode != "all":
        rows, exact_max, whole = store.conn.execute(
            f"SELECT count(*) FILTER (WHERE class {'=' if mode == 'same' else '<>'} %s), "
            "coalesce(nullif(current_setting('imsearch.exact_max_rows', true), '')::bigint, %s), "
            "to_regclass(%s) IS NOT NULL FROM images", (cls, search.EXACT_MAX_ROWS, WHOLE_INDEX)).fetchone()
        if rows > exact_max:
            if mode == "same" and cls in indexes.indexed_classes(store.conn, [cls]):
                return "class/sort"
            if whole and search.iterates(store.pgvector):
                return "iterative/sort"
    return "exact"


LID_K = 20


def lid(answers: list[list[search.Match]]) -> float:
    """Median local intrinsic dimensionality seen from the queries (maximum-likelihood estimate over the LID_K
    nearest, Euclidean distance between unit vectors): how hard the data is for any nearest-neighbour index."""
    values = []
    for matches in answers:
        r = np.sqrt(2 * np.maximum([m.distance for m in matches], 1e-12))
        values.append(-1 / np.mean(np.log(r / r[-1])))
    return float(np.median(values))


def pct(values: list[float], p: int) -> float:
    return float(np.percentile(values, p)) * 1000


def table(rows: list[tuple], k: int, head: bool = True) -> None:
    if head:
        print(f"{'mode':<36} {'scan':<14} {'depth':>5} {'LID':>4} {'recall@' + str(k):>9} {'min':>5} {'short':>5} "
              f"{'p50 ms':>7} {'p95 ms':>7} {'exact p50 ms':>13}")
    for label, scan, depth, dim, recall, rmin, short, p50, p95, exact50 in rows:
        print(f"{label:<36} {scan:<14} {depth:>5} {dim:>4.0f} {recall:>9.3f} {rmin:>5.2f} {short:>5} {p50:>7.1f} "
              f"{p95:>7.1f} {exact50:>13.1f}")


def sql_function(store: Store, queries: int, k: int) -> None:
    """Per mode: p50 of `imsearch_nearest(id, k, mode)`, which looks up the stored image's vector, class and content
    by id and then calls imsearch_search, against find's path (imsearch.search.run: the vector in hand, one call of
    imsearch_search), for the same stored images as queries. Both plan in imsearch_search; the difference is what
    nearest's id lookup costs per query."""
    print(f"{'mode / query class':<32} {'imsearch_nearest p50 ms':>24} {'find path p50 ms':>17} {'ratio':>6}")
    for mode, cls in CASES:
        rows = store.conn.execute(
            "SELECT id, embedding, class, sha256 FROM images WHERE %s::text IS NULL OR class = %s "
            "ORDER BY md5(id::text) LIMIT %s", (cls, cls, 2 * queries)).fetchall()
        sql_ms, find_ms = [], []
        for image_id, embedding, image_class, sha in rows:
            t = time.perf_counter()
            store.conn.execute("SELECT * FROM imsearch_nearest(%s, %s, %s)", (image_id, k, mode)).fetchall()
            sql_ms.append(time.perf_counter() - t)
            vector = np.asarray(embedding.to_numpy(), dtype=np.float32)
            t = time.perf_counter()
            search.run(store.conn, vector, mode, k=k, cls=image_class, skip_sha=sha)
            find_ms.append(time.perf_counter() - t)
        a, b = pct(sql_ms[queries:], 50), pct(find_ms[queries:], 50)  # the first half warms up
        print(f"{mode + ' ' + (cls or ''):<32} {a:>24.1f} {b:>17.1f} {a / b:>6.2f}")


# --planner-cost's baseline: the statement imsearch_search ends in for each kind of scan, sent by the client with
# the settings the function gives it (SET LOCAL in one transaction).
# Not imsearch's code path: what the planner's own work per query (counting the filter, looking up the indexes,
# building the statement) is measured against. An index's nearest `depth` by the fold, ranked by the exact distance:
FOLDED = f"imsearch_fold(embedding)::halfvec({FOLD_DIMENSIONS})"
BARE_FILTER = {"all": "", "same": " AND class = %(cls)s", "other": " AND class <> %(cls)s"}
BARE_INDEX = ("SELECT id, path, class, embedding <=> %(q)s AS distance FROM ("
              "SELECT id, path, class, embedding FROM images WHERE sha256 IS DISTINCT FROM %(skip)s{filter} "
              "ORDER BY {order} LIMIT %(depth)s) c ORDER BY 4 LIMIT %(k)s")
QUERY_FOLD = f"imsearch_fold(%(q)s::halfvec)::halfvec({FOLD_DIMENSIONS})"  # a constant: folded once, when planned
CLASS_ORDER = (f"l2_normalize(imsearch_fold(embedding))::halfvec({FOLD_DIMENSIONS}) <#> "
               f"l2_normalize({QUERY_FOLD})")
BARE_ORDER = {"hnsw": f"{FOLDED} <=> {QUERY_FOLD}", "iterative": f"{FOLDED} <=> {QUERY_FOLD}",
              "class": CLASS_ORDER}  # a scan "X/sort" is X's statement, which the planner answered by sorting
BARE_EXACT = ("SELECT id, path, class, embedding <=> %(q)s AS distance FROM images "
              "WHERE sha256 IS DISTINCT FROM %(skip)s{filter} ORDER BY 4 LIMIT %(k)s")


def bare_statement(mode: str, scan: str, depth: int, iterative: bool) -> tuple[str, dict[str, str]]:
    """The baseline statement and settings for one mode and kind of scan (the scan column of `measure`), as
    imsearch_search sets them: its SET clause, hnsw.ef_search as wide as the depth, iterative scans off but for a
    filtered scan of the whole-table index, and for an exact scan index scans off and sequential ones on."""
    settings = {"plan_cache_mode": "force_custom_plan", "enable_indexscan": "on", "enable_sort": "on",
                "enable_seqscan": "off", "hnsw.ef_search": str(depth)}
    if iterative:  # pgvector >= 0.8: the function's SET clause names them (search.for_server)
        settings |= {"hnsw.iterative_scan": "relaxed_order", "hnsw.max_scan_tuples": str(search.MAX_SCAN_TUPLES)}
    if scan == "exact":
        return (BARE_EXACT.format(filter=BARE_FILTER[mode]),
                settings | {"enable_indexscan": "off", "enable_seqscan": "on"})
    plan = scan.removesuffix("/sort")
    if iterative and plan != "iterative":
        settings["hnsw.iterative_scan"] = "off"
    return BARE_INDEX.format(filter=BARE_FILTER[mode], order=BARE_ORDER[plan]), settings


def planner_cost(store: Store, gen: Generator, queries: int, k: int,
                 cases: tuple[tuple[str, str | None], ...] = CASES) -> None:
    """Per mode and class: p50 of find's path (search.run: one call of imsearch_search, which counts, looks up the
    indexes and plans in SQL) against the bare statement it ends in with the client's SET LOCAL settings, each
    query timed both ways in turn; and how many answers were the same. At imsearch's default depth."""
    depth = min(max(search.RERANK_DEPTH, 4 * k), 1000)  # as imsearch_search bounds it
    iterative = search.iterates(store.pgvector)
    print(f"{'mode / query class':<32} {'scan':<14} {'find path p50 ms':>17} {'bare p50 ms':>12} {'ratio':>6} "
          f"{'same answers':>13}")
    for mode, cls in cases:
        qs = gen.vectors(cls or COMMON[2], 2 * queries)
        scan = scan_of(store, qs[0], (mode, cls), k)
        sql, settings = bare_statement(mode, scan, depth, iterative)
        ours, bare, same = [], [], 0
        for i, q in enumerate(qs):
            t = time.perf_counter()
            found = search.run(store.conn, q, mode, k=k, cls=cls, skip_sha=None)
            t1 = time.perf_counter()
            params = {"q": HalfVector(q), "k": k, "cls": cls, "skip": None, "depth": depth}
            with store.conn.transaction():
                store.conn.execute("SELECT " + ", ".join("set_config(%s, %s, true)" for _ in settings),
                                   [x for pair in settings.items() for x in pair])
                rows = store.conn.execute(sql, params).fetchall()
            t2 = time.perf_counter()
            if i >= queries:  # the first half warms up
                ours.append(t1 - t)
                bare.append(t2 - t1)
                same += [m.id for m in found] == [r[0] for r in sorted(rows, key=lambda r: (r[3], r[0]))]
        a, b = pct(ours, 50), pct(bare, 50)
        print(f"{mode + ' ' + (cls or ''):<32} {scan:<14} {a:>17.1f} {b:>12.1f} {a / b:>6.2f} {same:>8}/{queries}")


def run_size(admin_url: str, rows: int, args: argparse.Namespace) -> None:
    name = f"imsearch_bench_{args.data}_{rows}"
    url = fresh_database(admin_url, name)
    try:
        # -- schema from the migrations, rows by COPY, the indexes built as a bulk load and an ingest build them
        upgrade(url)
        gen = GENERATORS[args.data](seed=rows)
        load_s, build_s, size, n_class, class_s, class_size = fill(url, gen, rows, args.plain_storage)
        print(f"\n{rows:,} rows: COPY {load_s:.1f} s ({rows / load_s:,.0f} rows/s), whole-table index "
              f"({WHOLE_INDEX}) {build_s:.1f} s, {size / 2**20:,.0f} MiB; {n_class} class indexes {class_s:.1f} s, "
              f"{class_size / 2**20:,.0f} MiB")
        # -- queries through imsearch's planner, against an exact scan
        with Store.open(url) as store:
            print("shared_buffers", store.conn.execute("SHOW shared_buffers").fetchone()[0])
            for _ in range(3):  # warm the cache
                search.run(store.conn, gen.vectors(COMMON[0], 1)[0], "all", k=args.k, cls=None, skip_sha=None)
            table(measure(store, gen, args.queries, args.k, args.depths or [None]), args.k)
            if args.sql_function:
                sql_function(store, args.queries, args.k)
            if args.planner_cost:
                planner_cost(store, gen, args.queries, args.k)
    finally:
        if not args.keep:
            drop_database(admin_url, name)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="10000,100000", help="comma-separated row counts")
    ap.add_argument("--full", action="store_true", help="add 1,000,000 rows")
    ap.add_argument("--queries", type=int, default=50, help="queries per mode")
    ap.add_argument("-k", type=int, default=5)
    ap.add_argument("--data", choices=GENERATORS, default="scenes",
                    help="synthetic vectors: scenes (shared scene elements; default) or noise (the hard case)")
    ap.add_argument("--depths", type=lambda v: [int(d) for d in v.split(",") if d], default=[],
                    help="re-ranking depths (imsearch.rerank_depth), comma-separated: the index pass once per "
                         f"depth; default imsearch's own ({search.RERANK_DEPTH})")
    ap.add_argument("--keep", action="store_true", help="keep the bench databases")
    ap.add_argument("--server-defaults", action="store_true",
                    help="a throwaway server at PostgreSQL's default settings instead of the tuned embedded one")
    ap.add_argument("--plain-storage", action="store_true",
                    help="store each vector inline in its row (STORAGE PLAIN) instead of out of line (TOAST)")
    ap.add_argument("--sql-function", action="store_true",
                    help="also time imsearch_nearest() (an id lookup, then imsearch_search) against find's own path")
    ap.add_argument("--planner-cost", action="store_true",
                    help="also time find's path against the bare statement it runs, planned by the client")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")] + ([1_000_000] if args.full else [])
    print(f"imsearch search bench: {args.data} data, k={args.k}, {args.queries} queries per mode, "
          f"{FOLD_DIMENSIONS}-d fold indexes re-ranking {', '.join(map(str, args.depths or [search.RERANK_DEPTH]))} "
          f"candidates (ef_search as wide), exact below {search.EXACT_MAX_ROWS:,} filtered rows")
    with bench_server(args.server_defaults) as admin:
        for rows in sizes:
            run_size(admin, rows, args)


if __name__ == "__main__":
    main()
