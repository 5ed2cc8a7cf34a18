"""An IVFFlat index over the unit fold, against the exact answer: could it serve modes all and other where the
whole-table HNSW graph misses (a million rows in 101 classes)?

    .venv/bin/python bench/million.py --rows 1000000 --classes 100 --data ~/million100     # the library, kept
    .venv/bin/python bench/ivfflat.py --rows 1000000 --classes 100 --data ~/million100 --lists 1000

Builds `bench_ivfflat` (IVFFlat, `lists` lists, over the same expression as a class graph, not partial, so no
imsearch plan takes it), asks each query's nearest `depth` from it at each `ivfflat.probes` (mode other iterating
to four times as many probes, pgvector >= 0.8), ranks them by the exact distance, and compares the top five with
an exact scan computed in numpy, for bench/million.py's generated queries and real photos; then drops the index.
Prints figures; asserts nothing, and with the stand-in weights only the speed means anything.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import psycopg
from million import Library, embed_photos, truth, write_parquet
from pgvector import HalfVector
from pgvector.psycopg import register_vector
from synthetic import database_url

from imsearch import search
from imsearch.db import embedded

UNIT_FOLD = "l2_normalize(imsearch_fold(embedding))::halfvec(1024)"
QUERY_CLASS = "class_000"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, required=True, help="as the bench/million.py run that made the library")
    ap.add_argument("--classes", type=int, required=True)
    ap.add_argument("--data", type=Path, required=True, help="that run's --data folder")
    ap.add_argument("--lists", type=int, default=1000)
    ap.add_argument("--probes", type=lambda v: [int(p) for p in v.split(",")], default=[10, 20, 40, 80])
    ap.add_argument("--depths", type=lambda v: [int(d) for d in v.split(",")], default=[200, 800])
    args = ap.parse_args()
    with contextlib.ExitStack() as stack, tempfile.TemporaryDirectory(prefix="imsearch-ivf-") as tmp:
        server = embedded.EmbeddedServer(args.data.expanduser().resolve() / "pgdata")
        stack.callback(server.stop)
        admin = server.start(tune=False)
        work = Path(tmp)
        work.chmod(0o711)
        photos, _, real = embed_photos(admin, work)
        lib = Library(photos, args.classes, seed=args.rows)
        vectors, labels = write_parquet(lib, args.rows, None)
        norms = np.concatenate([np.linalg.norm(vectors[s:s + 100_000].astype(np.float32), axis=1)
                                for s in range(0, args.rows, 100_000)])
        conn = stack.enter_context(psycopg.connect(database_url(admin, "bench_million"), autocommit=True))
        register_vector(conn)
        row_of = {p: int(p.rsplit("/", 1)[1][:-4]) for (p,) in conn.execute("SELECT path FROM images")}
        conn.execute("SET maintenance_work_mem = '2GB'")
        t = time.perf_counter()
        conn.execute(f"CREATE INDEX bench_ivfflat ON images USING ivfflat (({UNIT_FOLD}) halfvec_ip_ops) "
                     f"WITH (lists = {args.lists})")
        stack.callback(conn.execute, "DROP INDEX IF EXISTS bench_ivfflat")
        size = conn.execute("SELECT pg_relation_size('bench_ivfflat')").fetchone()[0]
        print(f"IVFFlat, {args.lists} lists: built in {time.perf_counter() - t:.0f} s, {size / 2**20:,.0f} MiB, "
              f"{size / args.rows / 1024:.2f} KiB a row", flush=True)
        print(f"{'queries':7} {'mode':5} {'depth':>5} {'probes':>6} {'recall@5':>8} {'p50 ms':>7} {'p95 ms':>7}")
        queries = {"gen": lib.draw(QUERY_CLASS, 50).astype(np.float32), "real": real}
        for kind, qs in queries.items():
            for mode in ("all", "other"):
                want = truth(vectors, norms, labels, qs, mode, QUERY_CLASS if mode == "other" else None, 5)
                where = "WHERE class <> %(c)s" if mode == "other" else ""
                for depth in args.depths:
                    for probes in args.probes:
                        hits, times = 0, []
                        for q, wanted in zip(qs, want):
                            unit = search.fold(q)
                            unit /= np.linalg.norm(unit)
                            t = time.perf_counter()
                            with conn.transaction():
                                conn.execute(f"SET LOCAL ivfflat.probes = {probes}")
                                conn.execute(f"SET LOCAL ivfflat.max_probes = {4 * probes}")
                                conn.execute("SET LOCAL ivfflat.iterative_scan = relaxed_order")
                                conn.execute("SET LOCAL enable_seqscan = off")
                                conn.execute("SET LOCAL enable_sort = off")
                                got = conn.execute(
                                    f"SELECT path FROM (SELECT path, embedding FROM images {where} "
                                    f"ORDER BY {UNIT_FOLD} <#> %(f)s LIMIT {depth}) s "
                                    "ORDER BY embedding <=> %(q)s LIMIT 5",
                                    {"f": HalfVector(unit), "q": HalfVector(q), "c": QUERY_CLASS}).fetchall()
                            times.append(1000 * (time.perf_counter() - t))
                            hits += len({row_of[p] for (p,) in got} & wanted)
                        print(f"{kind:7} {mode:5} {depth:5} {probes:6} {hits / (5 * len(qs)):8.3f} "
                              f"{statistics.median(times):7.0f} {np.percentile(times, 95):7.0f}", flush=True)


if __name__ == "__main__":
    main()
