"""Search at scale: recall@k and latency of imsearch's three modes on synthetic ResNet-like vectors.

    .venv/bin/python bench/search.py                  # 10k and 100k rows
    .venv/bin/python bench/search.py --full           # also 1M rows (hours of index build on 2 cores)
    .venv/bin/python bench/search.py --sizes 20000    # any sizes

Uses DATABASE_URL when set (each size gets a fresh database, dropped afterwards), else a throwaway embedded
server. Every query goes through imsearch's own planner (imsearch.search.plan / run), exactly as `find` does.
Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psycopg
from pgvector import HalfVector
from pgvector.psycopg import register_vector

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from imsearch import search  # noqa: E402
from imsearch.store import CLASS_INDEX_PREFIX, Store, upgrade  # noqa: E402

DIMS = 2048
COMMON = ["bathroom", "bedroom", "dining_room", "kitchen", "living_room"]
RARE = "wine_cellar"
RARE_SHARE = 0.005


class Generator:
    """Non-negative, sparse vectors clustered by class and by sub-cluster, with near-duplicate groups.

    Like ResNet-50 pooled features: every entry >= 0, most small, a class-specific subset of channels active.
    """

    def __init__(self, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.rng = rng
        self.classes = COMMON + [RARE]
        # Every photo shares much of its activation pattern (as ImageNet features of indoor scenes do), so classes
        # overlap: mean cosine distance about 0.28 within a class and 0.38 across (nearest
        # neighbour about 0.06, near-duplicates 0.001), the overlap kNN classifiers on ResNet-50 features live with.
        self.shared = np.maximum(rng.normal(0, 1, DIMS), 0) * (rng.random(DIMS) < 0.5) * 0.8
        self.centres = {c: np.maximum(rng.normal(0, 0.5, DIMS), 0) * (rng.random(DIMS) < 0.35) for c in self.classes}
        self.subs = {c: [np.maximum(rng.normal(0, 0.96, DIMS), 0) * (rng.random(DIMS) < 0.2) for _ in range(30)]
                     for c in self.classes}

    def vectors(self, cls: str, n: int) -> np.ndarray:
        rng = self.rng
        subs = self.subs[cls]
        pick = rng.integers(0, len(subs), n)
        base = self.shared[None, :] + self.centres[cls][None, :] + np.stack([subs[i] for i in pick])
        noise = np.maximum(rng.normal(0, 0.45, (n, DIMS)), 0) * (rng.random((n, DIMS)) < 0.3)
        out = base + noise
        dup = rng.random(n) < 0.05  # 5 % near-duplicates of the row before them: clusters that strand greedy search
        dup[0] = False
        idx = np.flatnonzero(dup)
        out[idx] = out[idx - 1] + rng.normal(0, 0.01, (len(idx), DIMS)).clip(0)
        return out.astype(np.float32)

    def class_sizes(self, rows: int) -> dict[str, int]:
        rare = max(1, int(rows * RARE_SHARE))
        each = (rows - rare) // len(COMMON)
        sizes = {c: each for c in COMMON}
        sizes[COMMON[0]] += rows - rare - each * len(COMMON)
        sizes[RARE] = rare
        return sizes


def fill(url: str, gen: Generator, rows: int) -> tuple[float, float, int]:
    """Load rows with COPY (index dropped), then rebuild the migration's HNSW index; returns timings and size."""
    with psycopg.connect(url, autocommit=True) as conn:
        register_vector(conn)
        indexdef = conn.execute("SELECT indexdef FROM pg_indexes WHERE indexname = 'images_embedding_hnsw'"
                                ).fetchone()[0]
        conn.execute("DROP INDEX images_embedding_hnsw")
        t = time.perf_counter()
        n = 0
        with conn.cursor() as cur, cur.copy(
            "COPY images (path, class, sha256, width, height, bytes, model, embedding) FROM STDIN WITH (FORMAT BINARY)"
        ) as copy:
            copy.set_types(["text", "text", "varchar", "int4", "int4", "int8", "text", "halfvec"])
            for cls, size in gen.class_sizes(rows).items():
                for start in range(0, size, 5000):
                    for v in gen.vectors(cls, min(5000, size - start)):
                        copy.write_row((f"/synthetic/{cls}/{n:08d}.jpg", cls, f"{n:064x}", 224, 224, 0,
                                        "synthetic", HalfVector(v)))
                        n += 1
        load_s = time.perf_counter() - t
        conn.execute("SET maintenance_work_mem = '4GB'")
        conn.execute("SET max_parallel_maintenance_workers = 1")  # 2 cores: the leader plus one worker
        t = time.perf_counter()
        conn.execute(indexdef)
        build_s = time.perf_counter() - t
        conn.execute("ANALYZE images")
        size = conn.execute("SELECT pg_relation_size('images_embedding_hnsw')").fetchone()[0]
    # -- per-class indexes, as `imsearch ingest` makes them after storing rows
    with Store(url) as store:
        store.conn.execute("SET maintenance_work_mem = '4GB'")
        store.conn.execute("SET max_parallel_maintenance_workers = 1")
        t = time.perf_counter()
        classes = store.ensure_class_indexes(search.EXACT_MAX_ROWS)
        class_s = time.perf_counter() - t
        class_size = store.conn.execute(
            "SELECT coalesce(sum(pg_relation_size(indexrelid)), 0) FROM pg_index JOIN pg_class c ON c.oid = indexrelid "
            "WHERE starts_with(c.relname, %s)", (CLASS_INDEX_PREFIX,)).fetchone()[0]
    return load_s, build_s, size, len(classes), class_s, class_size


def measure(store: Store, gen: Generator, queries: int, k: int) -> list[tuple]:
    """Per mode and class: recall@k against an exact scan, short answers, p50/p95 of index and exact SQL."""
    counts = dict(store.classes())
    indexed = store.indexed_classes(counts)
    cases = [("all", None), ("same", COMMON[1]), ("same", RARE), ("other", COMMON[1]), ("other", RARE)]
    out = []
    for mode, cls in cases:
        qclass = cls or COMMON[2]
        qs = gen.vectors(qclass, queries)
        filtered = None if mode == "all" else (counts[cls] if mode == "same" else
                                               sum(n for c, n in counts.items() if c != cls))
        plan = search.plan(mode, k=k, cls=cls, counts=counts, indexed=indexed, pgvector=store.pgvector)
        exact_plan = search.plan(mode, k=k, cls=cls, counts=counts, pgvector=store.pgvector, exact=True)
        recalls, short, fast, slow = [], 0, [], []
        for q in qs:
            t = time.perf_counter()
            got = search.run(store.conn, q, mode, k=k, cls=cls, skip_sha=None, query_plan=plan)
            fast.append(time.perf_counter() - t)
            t = time.perf_counter()
            truth = search.run(store.conn, q, mode, k=k, cls=cls, skip_sha=None, query_plan=exact_plan)
            slow.append(time.perf_counter() - t)
            short += len(got) < k
            recalls.append(len({m.id for m in got} & {m.id for m in truth}) / len(truth))
        node = search.explain(store.conn, qs[0], mode, k=k, cls=cls, query_plan=plan)
        scan = ("class" if "images_embedding_hnsw_c_" in node else
                "hnsw" if "Index Scan using images_embedding_hnsw" in node else "exact")
        if plan.branches:
            exact_branches = sum(e for _, e in plan.branches)
            scan = f"union: {node.count('images_embedding_hnsw_c_')} class idx, {exact_branches} exact"
        label = mode if cls is None else f"{mode} {cls} ({filtered:,} rows)"
        out.append((label, scan, statistics.mean(recalls), min(recalls), short,
                    pct(fast, 50), pct(fast, 95), pct(slow, 50)))
    return out


def pct(values: list[float], p: int) -> float:
    return float(np.percentile(values, p)) * 1000


def run_size(admin_url: str, rows: int, args: argparse.Namespace) -> None:
    name = f"imsearch_bench_{rows}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
        conn.execute(f'CREATE DATABASE "{name}"')
    url = admin_url.rsplit("/", 1)[0] + "/" + name if "?" not in admin_url else \
        admin_url.split("?")[0].rsplit("/", 1)[0] + "/" + name + "?" + admin_url.split("?", 1)[1]
    try:
        # -- schema from the migrations, rows by COPY, index rebuilt as the migration defines it
        upgrade(url)
        gen = Generator(seed=rows)
        load_s, build_s, size, n_class, class_s, class_size = fill(url, gen, rows)
        print(f"\n{rows:,} rows: COPY {load_s:.1f} s ({rows / load_s:,.0f} rows/s), HNSW build {build_s:.1f} s, "
              f"index {size / 2**20:,.0f} MiB; {n_class} class indexes {class_s:.1f} s, {class_size / 2**20:,.0f} MiB")
        # -- queries through imsearch's planner, against an exact scan
        with Store(url) as store:
            for _ in range(3):  # warm the cache
                search.run(store.conn, gen.vectors(COMMON[0], 1)[0], "all", k=args.k, cls=None, skip_sha=None,
                           query_plan=search.plan("all", k=args.k, pgvector=store.pgvector))
            rows_out = measure(store, gen, args.queries, args.k)
        head = f"{'mode':<32} {'scan':<30} {'recall@' + str(args.k):>9} {'min':>5} {'short':>5} " \
               f"{'p50 ms':>7} {'p95 ms':>7} {'exact p50 ms':>13}"
        print(head)
        for label, scan, recall, rmin, short, p50, p95, exact50 in rows_out:
            print(f"{label:<32} {scan:<30} {recall:>9.3f} {rmin:>5.2f} {short:>5} {p50:>7.1f} {p95:>7.1f} "
                  f"{exact50:>13.1f}")
    finally:
        if not args.keep:
            with psycopg.connect(admin_url, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="10000,100000", help="comma-separated row counts")
    ap.add_argument("--full", action="store_true", help="add 1,000,000 rows")
    ap.add_argument("--queries", type=int, default=50, help="queries per mode")
    ap.add_argument("-k", type=int, default=5)
    ap.add_argument("--keep", action="store_true", help="keep the bench databases")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")] + ([1_000_000] if args.full else [])
    print(f"imsearch search bench: k={args.k}, {args.queries} queries per mode, ef_search={search.EF_SEARCH}, "
          f"exact below {search.EXACT_MAX_ROWS:,} filtered rows")
    admin = os.environ.get("DATABASE_URL")
    if admin:
        for rows in sizes:
            run_size(admin, rows, args)
        return
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import pgserver

        with tempfile.TemporaryDirectory(prefix="imsearch-bench-") as tmp:
            server = pgserver.get_server(Path(tmp) / "pgdata", cleanup_mode="delete")
            try:
                for rows in sizes:
                    run_size(server.get_uri(), rows, args)
            finally:
                server.cleanup()


if __name__ == "__main__":
    main()
