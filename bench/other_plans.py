"""Mode other, two plans on one library: the iterative scan of the whole-table fold index (imsearch's) and a union
of per-class fold indexes, each re-ranked by the exact distance.

    DATABASE_URL=postgresql://... .venv/bin/python bench/million.py --keep      # keeps database bench_million
    DATABASE_URL=postgresql://... .venv/bin/python bench/other_plans.py

Runs on the database `bench/million.py --keep` left on that server (100k rows, a query class of 20 % by default);
it builds a class index for every class the union needs. Queries, none stored: stored rows of the query class
scaled channel by channel by 1 to 1.3 ("gen"), and the rooms test photos ("real", embedded with the stand-in
checkpoint unless IMSEARCH_WEIGHTS names one). The truth is an exact scan. Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable
from urllib.parse import urlsplit, urlunsplit

import numpy as np
import psycopg
from million import embed_photos
from pgvector import HalfVector
from pgvector.psycopg import register_vector

FOLD = "imsearch_fold(i.embedding)::halfvec(1024)"
UNIT_FOLD = "l2_normalize(imsearch_fold(i.embedding))::halfvec(1024)"
SETTINGS = {"enable_seqscan": "off", "enable_sort": "off", "hnsw.max_scan_tuples": "100000"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--query-class", default="class_000")
    ap.add_argument("--queries", type=int, default=40)
    args = ap.parse_args()
    admin = os.environ["DATABASE_URL"]
    parts = urlsplit(admin)
    url = urlunsplit((parts.scheme, parts.netloc, "/bench_million", parts.query, parts.fragment))
    with tempfile.TemporaryDirectory(prefix="imsearch-other-") as tmp:
        Path(tmp).chmod(0o711)
        real = list(embed_photos(admin, Path(tmp))[2][: args.queries])
    conn = psycopg.connect(url, autocommit=True)
    register_vector(conn)
    x = args.query_class
    rng = np.random.default_rng(5)
    rows = conn.execute("SELECT embedding FROM images WHERE class = %s ORDER BY random() LIMIT %s",
                        (x, args.queries)).fetchall()
    kinds = {"gen": [r[0].to_numpy().astype(np.float32) * (1 + 0.3 * rng.random(2048, dtype=np.float32))
                     for r in rows], "real": real}

    def exact(q: np.ndarray) -> set[int]:
        with conn.transaction():
            conn.execute("SET LOCAL enable_indexscan = off")
            return {r[0] for r in conn.execute("SELECT id FROM images WHERE class <> %s ORDER BY embedding <=> %s "
                                               "LIMIT 5", (x, HalfVector(q)))}

    truths = {kind: [exact(q) for q in qs] for kind, qs in kinds.items()}

    def measure(name: str, sql: str, settings: dict[str, str], params: Callable[[np.ndarray], tuple]) -> None:
        for kind, qs in kinds.items():
            found, ms = 0, []
            with conn.transaction():
                for key, value in {**SETTINGS, **settings}.items():
                    conn.execute("SELECT set_config(%s, %s, true)", (key, value))
                for q, want in zip(qs, truths[kind]):
                    start = time.perf_counter()
                    got = {r[0] for r in conn.execute(sql, params(q))}
                    ms.append((time.perf_counter() - start) * 1000)
                    found += len(got & want)
            print(f"{name:44} {kind:4} recall@5 {found / 5 / len(qs):.3f}  p50 {statistics.median(ms):6.1f} ms",
                  flush=True)

    iterative = ("SELECT c.id FROM (SELECT i.id, i.embedding FROM images i WHERE i.class <> %s ORDER BY " + FOLD
                 + " <=> imsearch_fold(%s)::halfvec(1024) LIMIT {depth}) c ORDER BY c.embedding <=> %s LIMIT 5")
    for ef, depth in ((100, 100), (200, 200), (800, 200)):
        measure(f"iterative, ef_search {ef}, depth {depth}", iterative.format(depth=depth),
                {"hnsw.ef_search": str(ef), "hnsw.iterative_scan": "relaxed_order"},
                lambda q: (x, HalfVector(q), HalfVector(q)))
    others = [r[0] for r in conn.execute("SELECT DISTINCT class FROM images WHERE class <> %s ORDER BY 1", (x,))]
    for cls in others:
        conn.execute("SELECT imsearch_index_class(%s)", (cls,))
    for depth in (100, 200):
        branches = " UNION ALL ".join(
            f"(SELECT i.id, i.embedding FROM images i WHERE i.class = %s ORDER BY {UNIT_FOLD} "
            f"<#> l2_normalize(imsearch_fold(%s))::halfvec(1024) LIMIT {depth})" for _ in others)
        measure(f"union of {len(others)} class indexes, depth {depth} each",
                f"SELECT c.id FROM ({branches}) c ORDER BY c.embedding <=> %s LIMIT 5",
                {"hnsw.ef_search": str(depth), "hnsw.iterative_scan": "off"},
                lambda q: (*[v for cls in others for v in (cls, HalfVector(q))], HalfVector(q)))


if __name__ == "__main__":
    main()
