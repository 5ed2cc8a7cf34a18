"""Synthetic ResNet-like vectors clustered by class, and throwaway databases to load them into (for the search
benchmarks: bench/search.py; with hashes and flipped labels for the audit: bench/audit.py).

The scripts run as `.venv/bin/python bench/NAME.py`, so this module, beside them, imports as `synthetic`.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import psycopg
from pgvector import Bit, HalfVector
from pgvector.psycopg import register_vector

from imsearch import search
from imsearch.db import embedded
from imsearch.db.indexes import ensure_class_indexes
from imsearch.db.store import Store
from imsearch.search import CLASS_INDEX_PREFIX, WHOLE_INDEX

DIMS = 2048
COMMON = ["bathroom", "bedroom", "dining_room", "kitchen", "living_room"]
RARE = "wine_cellar"
RARE_SHARE = 0.005


class Generator:
    """Non-negative, sparse vectors clustered by class; subclasses say how one photo differs from the next.

    Like ResNet-50 pooled features: every entry >= 0, many exactly 0, a shared component every indoor photo has,
    a class component, and 5 % near-duplicates of the row before them (clusters that strand greedy search).
    """

    def __init__(self, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.rng = rng
        self.classes = COMMON + [RARE]
        self.shared = np.maximum(rng.normal(0, 1, DIMS), 0) * (rng.random(DIMS) < 0.5)
        self.centres = {c: np.maximum(rng.normal(0, 0.5, DIMS), 0) * (rng.random(DIMS) < 0.35) for c in self.classes}

    def photos(self, cls: str, n: int) -> np.ndarray:
        raise NotImplementedError

    def vectors(self, cls: str, n: int) -> np.ndarray:
        return self.vectors_and_sources(cls, n)[0]

    def vectors_and_sources(self, cls: str, n: int) -> tuple[np.ndarray, np.ndarray]:
        """The vectors, and for each the row it is a near-duplicate of (-1: none). A copy that follows a copy was
        made from that row's photo before it was replaced: a copy of a photo that is not stored, so it has none."""
        out = self.photos(cls, n)
        dup = self.rng.random(n) < 0.05
        dup[0] = False
        idx = np.flatnonzero(dup)
        out[idx] = out[idx - 1] + self.rng.normal(0, 0.01, (len(idx), DIMS)).clip(0)
        source = np.full(n, -1, dtype=np.int64)
        source[idx] = np.where(dup[idx - 1], -1, idx - 1)
        return out.astype(np.float32), source

    def class_sizes(self, rows: int) -> dict[str, int]:
        rare = max(1, int(rows * RARE_SHARE))
        each = (rows - rare) // len(COMMON)
        sizes = {c: each for c in COMMON}
        sizes[COMMON[0]] += rows - rare - each * len(COMMON)
        sizes[RARE] = rare
        return sizes


class Scenes(Generator):
    """A photo is the sum of a few scene elements (objects, materials, layouts) drawn from 256 shared by all
    classes, each class preferring some of them, plus a little channel noise.

    Photos of different classes share elements, as a kitchen and a dining room share a table, so the nearest
    photo of another class is near for a reason. Its local intrinsic dimensionality (the bench's LID column) is in
    the tens, where published measurements of real embeddings lie.
    """

    def __init__(self, seed: int = 0, elements: int = 256) -> None:
        super().__init__(seed)
        rng = self.rng
        self.shared *= 1.2
        self.elements = np.maximum(rng.normal(0, 1, (elements, DIMS)), 0) * (rng.random((elements, DIMS)) < 0.08) * 0.7
        self.prefer = {c: 0.85 * rng.dirichlet(np.full(elements, 0.05)) + 0.15 / elements for c in self.classes}

    def photos(self, cls: str, n: int) -> np.ndarray:
        rng = self.rng
        out = np.empty((n, DIMS))
        for i in range(n):
            picked = rng.choice(len(self.elements), rng.integers(6, 16), replace=False, p=self.prefer[cls])
            out[i] = rng.gamma(2.0, 0.5, len(picked)) @ self.elements[picked]
        out += self.shared + self.centres[cls]
        return out + np.maximum(rng.normal(0, 0.35, (n, DIMS)), 0) * (rng.random((n, DIMS)) < 0.3)


class Noise(Generator):
    """The hard case: one of 30 sub-clusters per class plus independent noise on a third of the channels.

    Seen from another class every photo is about equally far (LID in the hundreds), so mode other's top five are
    decided by the noise: a stress test of graph search rather than a picture of real features.
    """

    def __init__(self, seed: int = 0) -> None:
        super().__init__(seed)
        rng = self.rng
        self.shared *= 0.8
        self.subs = {c: [np.maximum(rng.normal(0, 0.96, DIMS), 0) * (rng.random(DIMS) < 0.2) for _ in range(30)]
                     for c in self.classes}

    def photos(self, cls: str, n: int) -> np.ndarray:
        rng = self.rng
        subs = self.subs[cls]
        pick = rng.integers(0, len(subs), n)
        base = self.shared[None, :] + self.centres[cls][None, :] + np.stack([subs[i] for i in pick])
        return base + np.maximum(rng.normal(0, 0.45, (n, DIMS)), 0) * (rng.random((n, DIMS)) < 0.3)


GENERATORS = {"scenes": Scenes, "noise": Noise}


def fill(url: str, gen: Generator, rows: int, plain: bool = False) -> tuple[float, float, int, int, float, int]:
    """Load rows with COPY (the whole-table fold index dropped), then rebuild it as a bulk load does
    (imsearch_index_all) and build the class indexes as `imsearch ingest` does; returns timings and sizes."""
    with psycopg.connect(url, autocommit=True) as conn:
        register_vector(conn)
        conn.execute(f"DROP INDEX IF EXISTS {WHOLE_INDEX}")
        if plain:  # rows keep their vector inline instead of in the TOAST table
            conn.execute("ALTER TABLE images ALTER COLUMN embedding SET STORAGE PLAIN")
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
        conn.execute("SELECT imsearch_index_all()")
        build_s = time.perf_counter() - t
        conn.execute("ANALYZE images")
        size = conn.execute("SELECT pg_relation_size(%s::regclass)", (WHOLE_INDEX,)).fetchone()[0]
    # -- per-class indexes, as `imsearch ingest` makes them after storing rows
    with Store.open(url) as store:
        store.conn.execute("SET maintenance_work_mem = '4GB'")
        store.conn.execute("SET max_parallel_maintenance_workers = 1")
        t = time.perf_counter()
        classes = ensure_class_indexes(store, search.EXACT_MAX_ROWS)
        class_s = time.perf_counter() - t
        class_size = store.conn.execute(
            "SELECT coalesce(sum(pg_relation_size(indexrelid)), 0) FROM pg_index JOIN pg_class c ON c.oid = indexrelid "
            "WHERE starts_with(c.relname, %s)", (CLASS_INDEX_PREFIX,)).fetchone()[0]
    return load_s, build_s, size, len(classes), class_s, class_size


# -- rows for `imsearch audit` (bench/audit.py, tests/test_audit_labels.py): hashes, and labels flipped on purpose

AUDIT_MODEL = "synthetic"
FLIP_SHARE = 0.02
COPY_BITS = 2  # a near-duplicate's hash is its source's with 0 to this many bits changed
SIZES = ((640, 480), (480, 640), (1024, 768), (1600, 1200))


@dataclass(frozen=True)
class Labelled:
    """Synthetic rows loaded for `imsearch audit`, and the truth its findings are scored against."""

    rows: int
    copies: list[tuple[str, str]]  # (path, its source's path) of the near-duplicates, with their source's hash
    flipped: dict[str, str]  # path -> true class, of the rows stored under another class
    load_s: float
    build_s: float


def fill_audit(url: str, gen: Generator, rows: int, seed: int = 0, flip: float = FLIP_SHARE) -> Labelled:
    """Load `rows` synthetic rows into the imsearch database at `url` by COPY, the two whole-table HNSW indexes
    (the embedding's fold and the hash) dropped meanwhile and rebuilt as the migrations define them (the fold's by
    imsearch_index_all, as a bulk load does); an empty database gets imsearch's schema.

    Each row: path /synthetic/<stored class>/<n>.jpg (no such file: the audit works from the rows alone), a unique
    fake sha256, one model identity, a random 64-bit perceptual hash, except that the generator's near-duplicates
    carry their source's hash with 0-COPY_BITS bits changed. `flip` of the rows, picked at random, are stored under
    another class, each picked at random.
    """
    with Store.open(url):
        pass  # migrates an empty database
    rng = np.random.default_rng(seed)  # hashes, sizes and flips: the generator's own draws stay as elsewhere
    sizes = gen.class_sizes(rows)
    total = sum(sizes.values())
    picked = rng.choice(total, round(total * flip), replace=False)
    shift = dict(zip(picked.tolist(), rng.integers(1, len(gen.classes), len(picked)).tolist()))  # to another class
    flipped: dict[str, str] = {}
    copies: list[tuple[str, str]] = []
    with psycopg.connect(url, autocommit=True) as conn:
        register_vector(conn)
        phash = conn.execute("SELECT indexdef FROM pg_indexes WHERE indexname = 'images_phash_hnsw'").fetchone()[0]
        conn.execute(f"DROP INDEX IF EXISTS {WHOLE_INDEX}, images_phash_hnsw")
        t = time.perf_counter()
        n = 0
        with conn.cursor() as cur, cur.copy(
            "COPY images (path, class, sha256, width, height, bytes, model, embedding, phash) "
            "FROM STDIN WITH (FORMAT BINARY)"
        ) as copy:
            copy.set_types(["text", "text", "varchar", "int4", "int4", "int8", "text", "halfvec", "bit"])
            for c, (cls, size) in enumerate(sizes.items()):
                for start in range(0, size, 5000):
                    vectors, source = gen.vectors_and_sources(cls, min(5000, size - start))
                    hashes = [int(h) for h in rng.integers(0, 2**64, len(vectors), dtype=np.uint64)]
                    classes = [gen.classes[(c + shift[m]) % len(gen.classes)] if m in shift else cls
                               for m in range(n, n + len(vectors))]
                    paths = [f"/synthetic/{stored}/{m:08d}.jpg" for m, stored in enumerate(classes, n)]
                    for i in np.flatnonzero(source >= 0):
                        changed = rng.choice(64, rng.integers(0, COPY_BITS + 1), replace=False)
                        hashes[i] = hashes[source[i]] ^ sum(1 << int(b) for b in changed)
                        copies.append((paths[i], paths[source[i]]))
                    for v, h, stored, path in zip(vectors, hashes, classes, paths):
                        if stored != cls:
                            flipped[path] = cls
                        w, ht = SIZES[int(rng.integers(len(SIZES)))]
                        copy.write_row((path, stored, f"{n:064x}", w, ht, int(rng.integers(40_000, 400_000)),
                                        AUDIT_MODEL, HalfVector(v), Bit(h.to_bytes(8, "big"))))
                        n += 1
        load_s = time.perf_counter() - t
        conn.execute("SET maintenance_work_mem = '4GB'")
        conn.execute("SET max_parallel_maintenance_workers = 1")  # 2 cores: the leader plus one worker
        t = time.perf_counter()
        conn.execute("SELECT imsearch_index_all()")
        conn.execute(phash)
        conn.execute("ANALYZE images")
    with Store.open(url) as store:  # as `imsearch ingest` leaves a library: a class past the exact size has its index
        ensure_class_indexes(store, search.EXACT_MAX_ROWS)
    build_s = time.perf_counter() - t
    return Labelled(n, copies, flipped, load_s, build_s)


def fresh_database(admin_url: str, name: str) -> str:
    """Create (or re-create) database `name` on the server and return its URL."""
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    return database_url(admin_url, name)


def database_url(admin_url: str, name: str) -> str:
    """The URL of database `name` on the server of `admin_url`."""
    base, _, query = admin_url.partition("?")
    return base.rsplit("/", 1)[0] + "/" + name + (f"?{query}" if query else "")


def drop_database(admin_url: str, name: str) -> None:
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextlib.contextmanager
def bench_server(defaults: bool = False) -> Iterator[str]:
    """DATABASE_URL when set, else a throwaway server set up as imsearch's embedded one (with `defaults`, as
    PostgreSQL starts without tuning, like a pgvector/pgvector container); yields its admin URL."""
    admin = os.environ.get("DATABASE_URL")
    if admin:
        yield admin
        return
    with embedded.temporary(tune=not defaults) as admin:
        yield admin
