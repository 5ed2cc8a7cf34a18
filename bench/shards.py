"""The same library on one server and over three shards: load time, exact answers, recall and latency per mode, and
the two ways a coordinator can ask its shards at once.

    .venv/bin/python bench/shards.py                 # 300k rows, 5 classes + a rare one, 3 shards
    .venv/bin/python bench/shards.py --rows 30000 --shards 2

Five throwaway embedded servers on this machine, PostgreSQL's default settings: one holds the library alone, one
is the coordinator of the others (`imsearch db shard add`, before the load, so the shards share the hash space
equally). Rows and queries are bench/million.py's: photo mixtures from ../shared's rooms photos through the model
(the stand-in checkpoint unless IMSEARCH_WEIGHTS names one), written to Parquet and stored with `imsearch load`;
queries drawn like the rows ("gen") and the rooms test photos ("real"). The truth is an exact scan in numpy.

Then mode all is asked three more ways on the coordinator: a plain ORDER BY ... LIMIT over the partitioned table
(the shards one after another), a UNION ALL of per-shard ORDER BY ... LIMIT subqueries (async foreign scans, exact
on each shard), and imsearch_search (each shard's own imsearch_search through dblink, what imsearch uses). Prints
figures and the union's EXPLAIN; asserts nothing. On a 2-core machine the shards share the same two cores, so
this measures the layout's overhead, not what more machines would add.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from million import RARE, Library, embed_photos, truth, write_parquet
from pgvector import HalfVector

from imsearch import Imsearch, search
from imsearch.db import embedded, shards
from imsearch.db.store import Store


def timed(store: Store, qs: np.ndarray, mode: str, cls: str | None, k: int, *, exact: bool = False
          ) -> tuple[list[list[str]], list[float]]:
    """Each query's top-k paths through imsearch_search, and the milliseconds each took (after a warm-up)."""
    for q in qs[:5]:
        search.run(store.conn, q, mode, k=k, cls=cls, skip_sha=None, exact=exact)
    paths, seconds = [], []
    for q in qs:
        t = time.perf_counter()
        got = search.run(store.conn, q, mode, k=k, cls=cls, skip_sha=None, exact=exact)
        seconds.append((time.perf_counter() - t) * 1000)
        paths.append([m.path for m in got])
    return paths, seconds


def plain_sql(store: Store, qs: np.ndarray, k: int, sql: str) -> tuple[list[list[str]], list[float]]:
    """Mode all as one SQL statement on the coordinator: its top-k paths per query and milliseconds."""
    paths, seconds = [], []
    for q in qs:
        t = time.perf_counter()
        rows = store.conn.execute(sql, {"q": HalfVector(q), "k": k}).fetchall()
        seconds.append((time.perf_counter() - t) * 1000)
        paths.append([r[0] for r in rows])
    return paths, seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=300_000)
    ap.add_argument("--classes", type=int, default=5, help="common classes (the rare one comes on top)")
    ap.add_argument("--shards", type=int, default=3)
    ap.add_argument("--queries", type=int, default=50, help="generated queries per mode (real: the 100 test photos)")
    ap.add_argument("-k", type=int, default=5)
    args = ap.parse_args()

    with contextlib.ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="imsearch-bench-")))
        work.chmod(0o711)
        # -- servers: one alone, a coordinator, its shards
        one, coordinator, *shard_urls = (stack.enter_context(embedded.temporary()) for _ in range(2 + args.shards))

        # -- rows: photo mixtures, as bench/million.py makes them
        photos, _, real = embed_photos(one, work)
        lib = Library(photos, args.classes, seed=args.rows)
        file = work / "library.parquet"
        vectors, labels = write_parquet(lib, args.rows, file)
        print(f"{args.rows:,} rows in {args.classes} classes + {RARE}; {args.shards} shards", flush=True)

        # -- the same load into one server and into the sharded library
        with Imsearch(coordinator) as app:
            t = time.perf_counter()
            app.add_shards(shard_urls)
            print(f"shard add (empty library): {time.perf_counter() - t:.1f} s")
        stores = {}
        for name, url in (("one server", one), ("sharded", coordinator)):
            with Imsearch(url) as app:
                t = time.perf_counter()
                loaded = app.load([file])
                print(f"{name}: load {time.perf_counter() - t:.0f} s (rows and index builds; {loaded})", flush=True)
            stores[name] = stack.enter_context(Store(url))
        layout = shards.shards(stores["sharded"].conn, count=True)
        print("shards: " + ", ".join(f"{s.server} {s.rows:,} rows (1/{s.modulus})" for s in layout))

        # -- every mode: exact answers equal, recall against numpy, latency
        common = next(c for c in lib.members if c != RARE)
        cases = (("all", None), ("same", common), ("same", RARE), ("other", common), ("other", RARE))
        path_of = np.array([f"/library/{c}/{i:07d}.jpg" for i, c in enumerate(labels)])
        norms = np.linalg.norm(vectors.astype(np.float32), axis=1)
        print(f"{'queries':28} {'exact equal':>11} | {'one: recall':>11} {'p50':>6} {'p95':>6} | "
              f"{'sharded: recall':>15} {'p50':>6} {'p95':>6}")
        for kind in ("gen", "real"):
            for mode, cls in cases:
                qs = lib.draw(cls or common, args.queries).astype(np.float32) if kind == "gen" else real
                wanted = [set(path_of[list(t)]) for t in truth(vectors, norms, labels, qs, mode, cls, args.k)]
                exact = {n: timed(s, qs, mode, cls, args.k, exact=True)[0] for n, s in stores.items()}
                equal = np.mean([a == b for a, b in zip(exact["one server"], exact["sharded"])])
                line = f"{kind + ' ' + mode + (' ' + cls if cls else ''):28} {equal:11.3f}"
                for name, store in stores.items():
                    paths, ms = timed(store, qs, mode, cls, args.k)
                    recall = statistics.mean(len(set(p) & w) / args.k for p, w in zip(paths, wanted))
                    width = 11 if name == "one server" else 15
                    line += f" | {recall:{width}.3f} {np.percentile(ms, 50):6.1f} {np.percentile(ms, 95):6.1f}"
                print(line, flush=True)

        # -- mode all, three ways of asking the shards
        store = stores["sharded"]
        parts = [s.server.replace(shards.SERVER_PREFIX, shards.PARTITION_PREFIX) for s in layout]
        union = " UNION ALL ".join(
            f"(SELECT path, embedding <=> %(q)s AS d FROM {p} ORDER BY embedding <=> %(q)s LIMIT %(k)s)" for p in parts)
        ways = {
            "ORDER BY over the partitioned table": "SELECT path FROM images ORDER BY embedding <=> %(q)s LIMIT %(k)s",
            "UNION ALL, async, exact per shard": f"SELECT path FROM ({union} OFFSET 0) u ORDER BY d LIMIT %(k)s",
        }
        qs = real[:30]
        wanted = [set(path_of[list(t)]) for t in truth(vectors, norms, labels, qs, "all", None, args.k)]
        print(f"\nmode all on the coordinator, {len(qs)} real photos: {'recall':>6} {'p50 ms':>7} {'p95 ms':>7}")
        for name, sql in ways.items():
            paths, ms = plain_sql(store, qs, args.k, sql)
            recall = statistics.mean(len(set(p) & w) / args.k for p, w in zip(paths, wanted))
            print(f"  {name:40} {recall:6.3f} {np.percentile(ms, 50):7.1f} {np.percentile(ms, 95):7.1f}")
        paths, ms = timed(store, qs, "all", None, args.k)
        recall = statistics.mean(len(set(p) & w) / args.k for p, w in zip(paths, wanted))
        print(f"  {'imsearch_search (dblink, each shard plans)':40} {recall:6.3f} {np.percentile(ms, 50):7.1f} "
              f"{np.percentile(ms, 95):7.1f}")
        plan = store.conn.execute("EXPLAIN (VERBOSE, COSTS OFF) " + ways["UNION ALL, async, exact per shard"],
                                  {"q": HalfVector(qs[0]), "k": args.k}).fetchall()
        print("\nEXPLAIN of the union (vectors cut):")
        for (line,) in plan:
            print("  " + (line if len(line) < 160 else line[:100] + " ... " + line[-50:]))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
