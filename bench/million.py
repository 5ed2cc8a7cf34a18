"""A library of up to a million photos on one machine: bulk load, index builds, and every mode's recall and latency.

    .venv/bin/python bench/million.py                          # 100k rows, 6 classes (5 + a rare one)
    .venv/bin/python bench/million.py --rows 1000000 --classes 100
    .venv/bin/python bench/million.py --rows 1000000 --cache   # then again with shared_buffers to hold the indexes
    .venv/bin/python bench/million.py --rows 1000000 --data ~/million     # keep the server and its database there
    .venv/bin/python bench/million.py --rows 1000000 --data ~/million --measure-only   # measure it again

Rows are made from real photos: ../shared's rooms photos (base) are embedded with the model (the stand-in checkpoint
unless IMSEARCH_WEIGHTS names one), and each synthetic row mixes two photos of its class with noise, with a path,
hash, perceptual hash and size of its own. Classes are groups of photos (with --classes 100, eight photos each); one
extra class holds 0.5 % of the rows. The rows are written to a Parquet file (deleted afterwards) and stored with
`imsearch load`, the path embeddings computed elsewhere take, into a fresh database on a throwaway server with
PostgreSQL's default settings (what imsearch sets in its own sessions aside).

Two kinds of queries, none of them stored: rows drawn like the stored ones ("gen"), and the test photos of the
rooms set ("real"), which sit farther from every row, where graph search has it hardest. The truth is an exact
scan computed in numpy from the stored values (float16); every query goes through imsearch_search as `find`
sends it. Prints figures; asserts nothing. Only the figures' speed means anything: with the stand-in weights the
matches are chance level.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psycopg
import pyarrow as pa
import pyarrow.parquet as pq
from pgvector.psycopg import register_vector
from synthetic import database_url, drop_database, fresh_database

from imsearch import Imsearch, search
from imsearch.db import embedded
from imsearch.db.store import Store

SHARED = Path(os.environ.get("IMSEARCH_SHARED", Path(__file__).resolve().parent.parent.parent / "shared"))
ROOMS = SHARED / "datasets" / "rooms"
DIMS = 2048
RARE = "rare"
RARE_SHARE = 0.005
MODEL = "bench:rooms-mix"
BATCH = 10_000


def embed_photos(url: str, work: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The rooms photos' embeddings: base vectors, their classes, and the test photos' vectors."""
    weights = os.environ.get("IMSEARCH_WEIGHTS") or str(work / "standin.pth")
    if not os.environ.get("IMSEARCH_WEIGHTS"):
        subprocess.run([sys.executable, str(SHARED / "tools" / "make_test_weights.py"), weights], check=True,
                       capture_output=True)
    scratch = fresh_database(url, "bench_photos")
    try:
        with Imsearch(scratch, weights=weights, device="cpu") as app:
            app.ingest(ROOMS / "base")
            app.ingest(ROOMS / "test")
        with psycopg.connect(scratch) as conn:
            register_vector(conn)
            rows = conn.execute("SELECT path, class, embedding FROM images ORDER BY path").fetchall()
    finally:
        drop_database(url, "bench_photos")
    test = np.array(["/test/" in p for p, _, _ in rows])
    vectors = np.stack([e.to_numpy().astype(np.float32) for _, _, e in rows])
    classes = np.array([c for _, c, _ in rows])
    return vectors[~test], classes[~test], vectors[test]


class Library:
    """Synthetic rows made from photos: class c mixes two of its photos (weights 0.5-1 and the rest) and adds
    non-negative noise on a third of the channels, as ResNet features are non-negative and sparse."""

    def __init__(self, photos: np.ndarray, classes: int, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)
        self.photos = photos
        order = self.rng.permutation(len(photos))
        self.members = {f"class_{i:03d}": order[i::classes] for i in range(classes)}
        self.members[RARE] = self.rng.choice(len(photos), 4, replace=False)
        self.scale = float(np.abs(photos).mean())

    def sizes(self, rows: int) -> dict[str, int]:
        rare = max(1, int(rows * RARE_SHARE))
        names = [c for c in self.members if c != RARE]
        each = (rows - rare) // len(names)
        sizes = {c: each for c in names}
        sizes[names[0]] += rows - rare - each * len(names)
        sizes[RARE] = rare
        return sizes

    def draw(self, cls: str, n: int) -> np.ndarray:
        pool = self.photos[self.members[cls]]
        i, j = self.rng.integers(0, len(pool), n), self.rng.integers(0, len(pool), n)
        a = self.rng.uniform(0.5, 1.0, (n, 1)).astype(np.float32)
        v = a * pool[i] + (1 - a) * pool[j]
        noise = np.maximum(self.rng.normal(0, 0.6 * self.scale, v.shape), 0) * (self.rng.random(v.shape) < 0.3)
        return (v + noise).astype(np.float16)


def write_parquet(lib: Library, rows: int, path: Path | None) -> tuple[np.ndarray, np.ndarray]:
    """The rows as `imsearch export` writes them; returns their float16 vectors (as stored) and classes, in file
    order. With no path the same rows are made (the same draws from the seeded generator) and nothing is written:
    `--measure-only` needs the vectors of a library loaded before."""
    vectors = np.empty((rows, DIMS), dtype=np.float16)
    labels = np.empty(rows, dtype=object)
    schema = pa.schema([("path", pa.string()), ("class", pa.string()), ("sha256", pa.string()),
                        ("width", pa.int32()), ("height", pa.int32()), ("bytes", pa.int64()),
                        ("phash", pa.string()), ("embedding", pa.list_(pa.float32(), DIMS))],
                       metadata={b"imsearch:model": MODEL.encode()})
    n = 0
    with pq.ParquetWriter(path, schema) if path else contextlib.nullcontext() as writer:
        for cls, size in lib.sizes(rows).items():
            for start in range(0, size, BATCH):
                chunk = lib.draw(cls, min(BATCH, size - start))
                m = len(chunk)
                vectors[n:n + m], labels[n:n + m] = chunk, cls
                ids = range(n, n + m)
                hashes = lib.rng.integers(0, 2**63, m)
                table = pa.table({
                    "path": [f"/library/{cls}/{i:07d}.jpg" for i in ids],
                    "class": [cls] * m,
                    "sha256": [hashlib.sha256(f"row {i}".encode()).hexdigest() for i in ids],
                    "width": lib.rng.choice([640, 1024, 1600, 4032], m).astype(np.int32),
                    "height": lib.rng.choice([480, 768, 1200, 3024], m).astype(np.int32),
                    "bytes": lib.rng.integers(50_000, 5_000_000, m),
                    "phash": [format(int(h), "064b") for h in hashes],
                    "embedding": pa.FixedSizeListArray.from_arrays(pa.array(chunk.astype(np.float32).ravel()), DIMS),
                }, schema=schema)
                if writer:
                    writer.write_table(table)
                n += m
    return vectors, labels


class PeakMemory:
    """The server's peak memory: the sum of its processes' proportional set sizes (shared buffers counted once)."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            total = 0
            for pid in os.listdir("/proc"):
                if not pid.isdigit():
                    continue
                try:
                    if b"postgres" not in Path(f"/proc/{pid}/comm").read_bytes():
                        continue
                    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                        if line.startswith("Pss:"):
                            total += int(line.split()[1]) * 1024
                except OSError:
                    continue
            self.peak = max(self.peak, total)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def truth(vectors: np.ndarray, norms: np.ndarray, labels: np.ndarray, qs: np.ndarray, mode: str, cls: str | None,
          k: int) -> list[set[int]]:
    """Each query's exact top k as row numbers (file order): cosine similarity on the stored float16 values, one
    pass over them for all the queries."""
    qn = (qs / np.linalg.norm(qs, axis=1, keepdims=True)).astype(np.float32).T
    best = np.empty((len(qs), 0), dtype=np.int64)
    best_sims = np.empty((len(qs), 0), dtype=np.float32)
    for start in range(0, len(vectors), 100_000):
        sims = vectors[start:start + 100_000].astype(np.float32) @ qn / norms[start:start + 100_000, None]
        chunk = labels[start:start + 100_000]
        if mode == "same":
            sims[chunk != cls] = -np.inf
        elif mode == "other":
            sims[chunk == cls] = -np.inf
        top = np.argpartition(-sims, k, axis=0)[:k].T  # queries x k
        best = np.concatenate([best, top + start], axis=1)
        best_sims = np.concatenate([best_sims, np.take_along_axis(sims.T, top, axis=1)], axis=1)
    keep = np.argsort(-best_sims, axis=1)[:, :k]
    return [set(map(int, row)) for row in np.take_along_axis(best, keep, axis=1)]


def vector_index_bytes(conn: psycopg.Connection) -> tuple[int, int]:
    """Total size and count of the HNSW/IVFFlat indexes over embeddings (the perceptual-hash index aside)."""
    row = conn.execute(
        """
        SELECT coalesce(sum(pg_relation_size(x.indexrelid)), 0)::bigint, count(*)
        FROM pg_index x JOIN pg_class c ON c.oid = x.indexrelid JOIN pg_am a ON a.oid = c.relam
        WHERE x.indrelid = 'images'::regclass AND a.amname IN ('hnsw', 'ivfflat') AND c.relname <> 'images_phash_hnsw'
        """
    ).fetchone()
    return int(row[0]), int(row[1])


def index_scans(conn: psycopg.Connection) -> int:
    """The HNSW index scans of imsearch's vector indexes so far (this session's counts flushed first)."""
    conn.execute("SELECT pg_stat_force_next_flush()")
    return int(conn.execute("SELECT coalesce(sum(idx_scan), 0) FROM pg_stat_user_indexes "
                            "WHERE starts_with(indexrelname, %s)", (search.WHOLE_INDEX,)).fetchone()[0])


def measure(store: Store, lib: Library, vectors: np.ndarray, labels: np.ndarray, real: np.ndarray,
            queries: int, k: int, depths: list[int], max_depths: list[int], modes: list[str]) -> None:
    """recall@k, p50 and p95 per mode, query kind and re-ranking depth (imsearch.rerank_depth), each depth once as
    the only one (imsearch.rerank_max_depth at the same) and once widening to each of max_depths; the
    query classes are the first common class and the rare one (a real photo's class in modes same and other is taken
    as given, whatever it shows). Under each row: how many HNSW index scans the queries took (a widening asks the
    index again; mode other's union scans one index a class), as scans x queries (their recall)."""
    common = next(c for c in lib.members if c != RARE)
    cases = [(m, c) for m, c in (("all", None), ("same", common), ("same", RARE), ("other", common), ("other", RARE))
             if m in modes]
    ids = dict(store.conn.execute("SELECT path, id FROM images").fetchall())
    norms = np.concatenate([np.linalg.norm(vectors[s:s + 100_000].astype(np.float32), axis=1)
                            for s in range(0, len(vectors), 100_000)])
    row_id = np.array([ids[f"/library/{c}/{i:07d}.jpg"] for i, c in enumerate(labels)])
    kinds = {"gen": lambda cls: lib.draw(cls or common, queries).astype(np.float32), "real": lambda cls: real}
    print(f"{'mode':28} {'depth':>5} {'max':>5} {'queries':>7} {'recall@5':>8} {'min':>5} {'p50 ms':>7} {'p95 ms':>7}")
    for kind, make in kinds.items():
        for mode, cls in cases:
            qs = make(cls)
            wanted = [{int(row_id[i]) for i in top} for top in truth(vectors, norms, labels, qs, mode, cls, k)]
            for depth, max_depth in [(d, m) for d in depths for m in sorted({d, *max_depths})]:
                store.conn.execute("SELECT set_config('imsearch.rerank_depth', %s, false)", (str(depth),))
                store.conn.execute("SELECT set_config('imsearch.rerank_max_depth', %s, false)", (str(max_depth),))
                for q in qs[: min(10, len(qs))]:  # warm-up
                    search.run(store.conn, q, mode, k=k, cls=cls, skip_sha=None)
                recalls, seconds, scans = [], [], []
                for q, want in zip(qs, wanted):
                    before = index_scans(store.conn)
                    t = time.perf_counter()
                    got = search.run(store.conn, q, mode, k=k, cls=cls, skip_sha=None)
                    seconds.append((time.perf_counter() - t) * 1000)
                    scans.append(index_scans(store.conn) - before)
                    recalls.append(len({m.id for m in got} & want) / k)
                label = f"{kind} {mode}" + (f" {cls}" if cls else "")
                print(f"{label:28} {depth:5d} {max_depth:5d} {len(qs):7d} {statistics.mean(recalls):8.3f} "
                      f"{min(recalls):5.2f} {np.percentile(seconds, 50):7.1f} {np.percentile(seconds, 95):7.1f}",
                      flush=True)
                print(f"{'':28} scans " + "  ".join(
                    f"{n}x{scans.count(n)} ({statistics.mean(r for r, c in zip(recalls, scans) if c == n):.3f})"
                    for n in sorted(set(scans))), flush=True)
            store.conn.execute("RESET imsearch.rerank_depth")
            store.conn.execute("RESET imsearch.rerank_max_depth")


def run(admin: str, args: argparse.Namespace, work: Path) -> None:
    photos, _, real = embed_photos(admin, work)
    lib = Library(photos, args.classes, seed=args.rows)
    file = None if args.measure_only else work / "library.parquet"
    t = time.perf_counter()
    vectors, labels = write_parquet(lib, args.rows, file)
    print(f"{args.rows:,} rows in {args.classes} classes + {RARE} ({RARE_SHARE:.1%}): "
          + (f"Parquet written in {time.perf_counter() - t:.0f} s, {file.stat().st_size / 2**30:.1f} GiB"
             if file else f"made again in {time.perf_counter() - t:.0f} s"), flush=True)
    if args.measure_only:
        url = database_url(admin, "bench_million")
        with Imsearch(url) as app:
            t = time.perf_counter()
            app.upgrade()
            print(f"imsearch db upgrade (with the indexes today's rules want): {time.perf_counter() - t:.0f} s",
                  flush=True)
        with Store.open(url) as store:  # this checkout's planner, measured without a new load
            store.conn.execute(search.function_sql("imsearch_search"))
            store.conn.commit()
    else:
        url = fresh_database(admin, "bench_million")
    try:
        if file:
            with Imsearch(url) as app, PeakMemory() as memory:
                t = time.perf_counter()
                loaded = app.load([file])
                load_s = time.perf_counter() - t
            file.unlink()
            print(f"load: {load_s:.0f} s in all (rows and index builds; {loaded}); "
                  f"server peak {memory.peak / 2**30:.1f} GiB")
        with Store.open(url) as store:
            size, count = vector_index_bytes(store.conn)
            print(f"vector indexes: {count}, {size / 2**20:,.0f} MiB, {size / args.rows / 1024:.2f} KiB a row; "
                  f"shared_buffers {store.conn.execute('SHOW shared_buffers').fetchone()[0]}", flush=True)
            measure(store, lib, vectors, labels, real, args.queries, args.k, args.depths, args.max_depths,
                    args.modes)
        if args.cache:
            wanted = int(size * 1.25) // 2**20 + 256
            with psycopg.connect(admin, autocommit=True) as conn:
                conn.execute(f"ALTER SYSTEM SET shared_buffers = '{wanted}MB'")
            args.restart()
            with Store.open(url) as store:
                store.conn.execute("CREATE EXTENSION IF NOT EXISTS pg_prewarm")
                store.conn.execute("SELECT pg_prewarm(indexrelid) FROM pg_index WHERE indrelid = 'images'::regclass")
                print(f"shared_buffers {store.conn.execute('SHOW shared_buffers').fetchone()[0]}, indexes prewarmed")
                measure(store, lib, vectors, labels, real, args.queries, args.k, args.depths, args.max_depths,
                    args.modes)
    finally:
        if not args.keep:
            drop_database(admin, "bench_million")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--classes", type=int, default=5, help="common classes (the rare one comes on top)")
    ap.add_argument("--queries", type=int, default=50, help="generated queries per mode (real: the 100 test photos)")
    ap.add_argument("-k", type=int, default=5)
    ap.add_argument("--depths", type=lambda v: [int(d) for d in v.split(",")], default=[search.RERANK_DEPTH],
                    help="re-ranking depths to measure, comma-separated (imsearch.rerank_depth)")
    ap.add_argument("--max-depths", type=lambda v: [int(d) for d in v.split(",")], default=[search.RERANK_MAX_DEPTH],
                    help="how deep each depth may widen, comma-separated (imsearch.rerank_max_depth); each depth is "
                         "also measured without widening")
    ap.add_argument("--modes", type=lambda v: v.split(","), default=["all", "same", "other"],
                    help="the modes to measure, comma-separated")
    ap.add_argument("--cache", action="store_true", help="measure again with shared_buffers holding the indexes")
    ap.add_argument("--keep", action="store_true", help="keep the bench database (with DATABASE_URL or --data)")
    ap.add_argument("--data", type=Path, help="the bench server's folder, kept with its database (default: a "
                    "temporary one)")
    ap.add_argument("--measure-only", action="store_true", help="measure the database a run with --data (or "
                    "--keep) left, after `imsearch db upgrade`; the same --rows and --classes make the same rows")
    args = ap.parse_args()
    args.keep = args.keep or args.measure_only or args.data is not None
    with tempfile.TemporaryDirectory(prefix="imsearch-million-") as tmp:
        work = Path(tmp)
        work.chmod(0o711)  # the embedded server's own system user passes through to its data folder
        admin = os.environ.get("DATABASE_URL")
        if admin:
            args.restart = lambda: sys.exit("--cache needs the bench's own server (unset DATABASE_URL)")
            run(admin, args, work)
            return
        with contextlib.ExitStack() as stack:
            folder = args.data.expanduser().resolve() if args.data else work / "server"
            folder.mkdir(exist_ok=True)
            folder.chmod(0o711)
            server = embedded.EmbeddedServer(folder / "pgdata")
            stack.callback(server.stop)
            admin = server.start(tune=False)

            def restart() -> None:
                server.stop()
                server.start(tune=False)

            args.restart = restart
            run(admin, args, work)


if __name__ == "__main__":
    main()
