"""Search at scale: recall@k and latency of imsearch's three modes on synthetic ResNet-like vectors.

    .venv/bin/python bench/search.py                  # 10k and 100k rows
    .venv/bin/python bench/search.py --full           # also 1M rows (hours of index build on 2 cores)
    .venv/bin/python bench/search.py --sizes 20000    # any sizes
    .venv/bin/python bench/search.py --server-defaults  # a server nobody tuned (shared_buffers 128 MB, ...)
    .venv/bin/python bench/search.py --plain-storage    # vectors inline in their rows instead of TOAST
    .venv/bin/python bench/search.py --sql-function     # also time imsearch_nearest() against find's own path
    .venv/bin/python bench/search.py --planner-cost     # also time find's path against the bare statement it runs

Uses DATABASE_URL when set (each size gets a fresh database, dropped afterwards), else a throwaway server set
up as imsearch's embedded one. Every query goes through imsearch's own planner, the SQL function imsearch_search,
via imsearch.search.run, exactly as `find` does; the scan column says which indexes it searched, read from the
server's per-index scan counters. `--data noise` swaps the default scene-like vectors for the hard case (see Noise).
Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
from pgvector import HalfVector
from synthetic import COMMON, GENERATORS, RARE, Generator, bench_server, drop_database, fill, fresh_database

from imsearch import search
from imsearch.db import indexes
from imsearch.db.migrate import upgrade
from imsearch.db.store import Store
from imsearch.search import CLASS_INDEX_PREFIX, OTHER_INDEX_PREFIX

CASES = (("all", None), ("same", COMMON[1]), ("same", RARE), ("other", COMMON[1]), ("other", RARE))


def measure(store: Store, gen: Generator, queries: int, k: int,
            cases: tuple[tuple[str, str | None], ...] = CASES) -> list[tuple]:
    """Per mode and class: recall@k against an exact scan, short answers, p50/p95 of index and exact SQL.

    The index queries run in one pass and the exact scans in another, after a warm-up pass on other queries:
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

    for case in cases:
        timed(case, draws[case][queries:])
    fast = {case: timed(case, draws[case][:queries]) for case in cases}
    out = []
    for case in cases:
        mode, cls = case
        truth, slow = timed(case, draws[case][:queries], exact=True)
        got = fast[case][0]
        recalls = [len({m.id for m in g} & {m.id for m in t}) / len(t) for g, t in zip(got, truth)]
        short = sum(len(g) < k for g in got)
        deep, _ = timed(case, draws[case][:10], exact=True, limit=LID_K)
        filtered = None if mode == "all" else (counts[cls] if mode == "same" else
                                               sum(n for c, n in counts.items() if c != cls))
        label = mode if cls is None else f"{mode} {cls} ({filtered:,} rows)"
        scan = scan_of(store, draws[case][0], case, k, counts)
        out.append((label, scan, lid(deep), statistics.mean(recalls), min(recalls), short,
                    pct(fast[case][1], 50), pct(fast[case][1], 95), pct(slow, 50)))
    return out


def index_scans(conn: Any) -> dict[str, int]:
    """HNSW index scans on images so far, by index name (this connection's own counted first)."""
    conn.execute("SELECT pg_stat_force_next_flush()")
    return dict(conn.execute("SELECT indexrelname, idx_scan FROM pg_stat_user_indexes WHERE relname = 'images' "
                             "AND starts_with(indexrelname, 'images_embedding_hnsw')").fetchall())


def scan_of(store: Store, q: np.ndarray, case: tuple[str, str | None], k: int, counts: dict[str, int]) -> str:
    """Which indexes imsearch_search searched for one query, from the per-index scan counters (EXPLAIN cannot see
    inside the function): its class index, the other-class index, a union of one branch per other class (those
    at most EXACT_MAX_ROWS rows scanned exactly), the whole-table index, or none: an exact scan."""
    mode, cls = case
    before = index_scans(store.conn)
    search.run(store.conn, q, mode, k=k, cls=cls, skip_sha=None)
    used = {name: n - before.get(name, 0) for name, n in index_scans(store.conn).items() if n > before.get(name, 0)}
    class_scans = sum(n for name, n in used.items() if name.startswith(CLASS_INDEX_PREFIX))
    if mode == "other" and class_scans:
        small = sum(1 for c, n in counts.items() if c != cls and n <= search.EXACT_MAX_ROWS)
        return f"union: {class_scans} class idx, {small} exact"
    return ("class idx" if class_scans else
            "other-class idx" if any(name.startswith(OTHER_INDEX_PREFIX) for name in used) else
            "hnsw" if "images_embedding_hnsw" in used else "exact")


def insert_ms(store: Store, gen: Generator, rows: int = 200, batch: int = 32) -> float:
    """Milliseconds per row to insert rows of a common class in ingest-sized batches: the index upkeep an ingest
    pays on top of decoding and the model."""
    vectors = gen.vectors(COMMON[3], rows)
    first = store.conn.execute("SELECT coalesce(max(id), 0) + 1 FROM images").fetchone()[0]
    t = time.perf_counter()
    for start in range(0, rows, batch):
        with store.conn.transaction(), store.conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO images (path, class, sha256, width, height, bytes, model, embedding) "
                "VALUES (%s, %s, %s, 224, 224, 0, 'synthetic', %s)",
                [(f"/synthetic/insert/{first + i:08d}.jpg", COMMON[3], f"insert-{first + i}", HalfVector(v))
                 for i, v in enumerate(vectors[start:start + batch], start)])
    return (time.perf_counter() - t) / rows * 1000


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
        print(f"{'mode':<32} {'scan':<30} {'LID':>4} {'recall@' + str(k):>9} {'min':>5} {'short':>5} "
              f"{'p50 ms':>7} {'p95 ms':>7} {'exact p50 ms':>13}")
    for label, scan, dim, recall, rmin, short, p50, p95, exact50 in rows:
        print(f"{label:<32} {scan:<30} {dim:>4.0f} {recall:>9.3f} {rmin:>5.2f} {short:>5} {p50:>7.1f} "
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
# its settings (SET LOCAL in one transaction), as find sent it while it planned in Python (before migration 0011).
# Not imsearch's code path: what the planner's own work per query is measured against.
BARE_ROW = "SELECT id, path, class, embedding <=> %(q)s AS distance FROM images WHERE sha256 IS DISTINCT FROM %(skip)s"
BARE_CLASS = BARE_ROW + " AND class = {c} ORDER BY l2_normalize(embedding)::halfvec(2048) <#> %(unit)s LIMIT %(k)s"
BARE_EXACT = "SELECT * FROM (" + BARE_ROW + " AND class {op} {c} OFFSET 0) AS small ORDER BY distance LIMIT %(k)s"
BARE = {
    "hnsw": BARE_ROW + " ORDER BY embedding <=> %(q)s LIMIT %(k)s",
    "class idx": BARE_CLASS.format(c="%(cls)s"),
    "other-class idx": "SELECT * FROM (SELECT id, path, class, embedding <=> %(q)s AS distance FROM images "
                       f"WHERE sha256 IS DISTINCT FROM %(skip)s AND class <> %(cls)s ORDER BY {search.FOLD} <=> "
                       "%(fold)s LIMIT %(depth)s) AS near ORDER BY distance LIMIT %(k)s",
}


def bare_statement(mode: str, scan: str, cls: str | None, counts: dict[str, int],
                   k: int) -> tuple[str, dict[str, str]]:
    """The baseline statement and settings for one mode and kind of scan (the scan column of `measure`)."""
    index = {"plan_cache_mode": "force_custom_plan", "enable_seqscan": "off",
             "hnsw.ef_search": str(max(search.EF_SEARCH, 2 * k))}
    if scan == "exact":
        return BARE_EXACT.format(op="=" if mode == "same" else "<>", c="%(cls)s"), {"enable_indexscan": "off"}
    if scan.startswith("union"):
        branches = [(BARE_EXACT if n <= search.EXACT_MAX_ROWS else BARE_CLASS).format(op="=", c=f"'{c}'")
                    for c, n in sorted(counts.items()) if c != cls]
        sql = " UNION ALL ".join(f"({b})" for b in branches) + " ORDER BY distance LIMIT %(k)s"
        return sql, {**index, "enable_sort": "off", "hnsw.ef_search": str(max(search.BRANCH_EF_SEARCH, 2 * k))}
    if scan == "other-class idx":
        return BARE[scan], {**index, "enable_sort": "off", "hnsw.ef_search": str(max(search.OTHER_EF_SEARCH, 2 * k))}
    return BARE[scan], {**index, "enable_sort": "off"} if scan == "class idx" else index


def planner_cost(store: Store, gen: Generator, queries: int, k: int,
                 cases: tuple[tuple[str, str | None], ...] = CASES) -> None:
    """Per mode and class: p50 of find's path (search.run: one call of imsearch_search, which counts, looks up the
    indexes and plans in SQL) against the bare statement it ends in with the client's SET LOCAL settings, each
    query timed both ways in turn; and how many answers were the same."""
    counts = dict(store.classes())
    print(f"{'mode / query class':<32} {'scan':<30} {'find path p50 ms':>17} {'bare p50 ms':>12} {'ratio':>6} "
          f"{'same answers':>13}")
    for mode, cls in cases:
        qs = gen.vectors(cls or COMMON[2], 2 * queries)
        scan = scan_of(store, qs[0], (mode, cls), k, counts)
        sql, settings = bare_statement(mode, scan, cls, counts, k)
        ours, bare, same = [], [], 0
        for i, q in enumerate(qs):
            t = time.perf_counter()
            found = search.run(store.conn, q, mode, k=k, cls=cls, skip_sha=None)
            t1 = time.perf_counter()
            params = {"q": HalfVector(q), "unit": HalfVector(q / np.linalg.norm(q)), "k": k, "cls": cls,
                      "skip": None, "fold": HalfVector(q[:1024] - q[1024:]), "depth": max(search.OTHER_DEPTH, k)}
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
        print(f"{mode + ' ' + (cls or ''):<32} {scan:<30} {a:>17.1f} {b:>12.1f} {a / b:>6.2f} {same:>8}/{queries}")


@contextlib.contextmanager
def other_depth(store: Store, depth: int) -> Iterator[None]:
    """imsearch_search re-ranking `depth` candidates from an other-class index, for as long as the block runs: the
    depth is fixed in the function's text (no session setting), so the function is created again in the bench's
    database with OTHER_DEPTH changed, and as imsearch makes it afterwards."""
    saved = search.OTHER_DEPTH

    def create() -> None:
        store.conn.execute(search.for_server(search.function_sql("imsearch_search"),
                                             ".".join(map(str, store.pgvector or ()))))

    search.OTHER_DEPTH = depth
    try:
        create()
        yield
    finally:
        search.OTHER_DEPTH = saved
        create()


def run_size(admin_url: str, rows: int, args: argparse.Namespace) -> None:
    name = f"imsearch_bench_{args.data}_{rows}"
    url = fresh_database(admin_url, name)
    try:
        # -- schema from the migrations, rows by COPY, index rebuilt as the migration defines it
        upgrade(url)
        gen = GENERATORS[args.data](seed=rows)
        load_s, build_s, size, n_class, class_s, class_size = fill(url, gen, rows, args.plain_storage)
        print(f"\n{rows:,} rows: COPY {load_s:.1f} s ({rows / load_s:,.0f} rows/s), HNSW build {build_s:.1f} s, "
              f"index {size / 2**20:,.0f} MiB; {n_class} class indexes {class_s:.1f} s, {class_size / 2**20:,.0f} MiB")
        # -- queries through imsearch's planner, against an exact scan
        with Store.open(url) as store:
            print("shared_buffers", store.conn.execute("SHOW shared_buffers").fetchone()[0])
            for _ in range(3):  # warm the cache
                search.run(store.conn, gen.vectors(COMMON[0], 1)[0], "all", k=args.k, cls=None, skip_sha=None)
            table(measure(store, gen, args.queries, args.k), args.k)
            if args.sql_function:
                sql_function(store, args.queries, args.k)
            if args.planner_cost:
                planner_cost(store, gen, args.queries, args.k)
            if args.index_other:
                before = insert_ms(store, gen)
                # -- what `imsearch db index-other` changes: mode other through one index per query class
                store.conn.execute("SET maintenance_work_mem = '4GB'")
                store.conn.execute("SET max_parallel_maintenance_workers = 1")
                t = time.perf_counter()
                built = indexes.ensure_other_indexes(store, search.EXACT_MAX_ROWS)
                seconds = time.perf_counter() - t
                size = sum(n for _, n in indexes.other_indexes(store.conn))
                print(f"imsearch db index-other: {len(built)} other-class indexes {seconds:.1f} s, "
                      f"{size / 2**20:,.0f} MiB")
                after = insert_ms(store, gen)
                print(f"insert ({COMMON[3]}, batches of 32): {before:.1f} ms per row before, {after:.1f} ms after "
                      f"({after / before:.1f}x)")
                again = tuple(c for c in CASES if c[0] == "other" or c == ("same", COMMON[1]))  # same: still its own
                table(measure(store, gen, args.queries, args.k, again), args.k, head=False)
                if args.sql_function:
                    sql_function(store, args.queries, args.k)
                if args.planner_cost:
                    planner_cost(store, gen, args.queries, args.k, again)
                for depth in (int(d) for d in args.other_depths.split(",") if d):
                    with other_depth(store, depth):
                        print(f"mode other re-ranking {depth} candidates:")
                        table(measure(store, gen, args.queries, args.k, again[1:]), args.k, head=False)
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
    ap.add_argument("--index-other", action="store_true",
                    help="then build the other-class indexes (imsearch db index-other) and measure mode other again")
    ap.add_argument("--keep", action="store_true", help="keep the bench databases")
    ap.add_argument("--server-defaults", action="store_true",
                    help="a throwaway server at PostgreSQL's default settings instead of the tuned embedded one")
    ap.add_argument("--plain-storage", action="store_true",
                    help="store each vector inline in its row (STORAGE PLAIN) instead of out of line (TOAST)")
    ap.add_argument("--sql-function", action="store_true",
                    help="also time imsearch_nearest() (an id lookup, then imsearch_search) against find's own path")
    ap.add_argument("--planner-cost", action="store_true",
                    help="also time find's path against the bare statement it runs, planned by the client")
    ap.add_argument("--other-depths", default="",
                    help="with --index-other, also measure mode other re-ranking these numbers of candidates")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")] + ([1_000_000] if args.full else [])
    print(f"imsearch search bench: {args.data} data, k={args.k}, {args.queries} queries per mode, "
          f"ef_search={search.EF_SEARCH} (mode other's branches {search.BRANCH_EF_SEARCH}, other-class indexes "
          f"{search.OTHER_EF_SEARCH} re-ranking {search.OTHER_DEPTH}), "
          f"exact below {search.EXACT_MAX_ROWS:,} filtered rows")
    with bench_server(args.server_defaults) as admin:
        for rows in sizes:
            run_size(admin, rows, args)


if __name__ == "__main__":
    main()
