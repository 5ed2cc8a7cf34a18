"""The audit pass: every stored image's nearest neighbours, through the indexes, turned into findings.

One pass over the table, a batch of images per statement on a few connections at once: each image's 2K nearest by
the embedding (imsearch_neighbours, the search planner's entry for stored images: the whole-table HNSW index) and
its nearest by the perceptual hash (search.hashes: HNSW on bit(64)). Only those neighbour
lists are kept (n x 2K ids and distances, 16 MB per 100k images at K = 10): never an all-pairs matrix.

- duplicates: the same bytes, a hash within the calibrated bits, or (where the model separates copies from
  neighbours) an embedding within the calibrated distance; linked into groups, each naming one image to keep;
- leaks: such duplicates filed under different classes;
- label suspects: a vote of the K nearest that are not the image's copies, weighted by 1/distance, gives class
  scores; an image is suspect when another class outscores its own, by a margin that ranks the suspects (the
  vote is out-of-sample, as cleanlab's kNN label issues: no image votes for itself or through its copies);
- outliers: a nearest-neighbour distance beyond the library's far-out fence, Q3 + 3 x IQR (Tukey).
"""

from __future__ import annotations

import os
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import psycopg

from .. import search
from ..db.errors import translating
from ..errors import ImsearchError, ModelMismatch
from ..model.phash import hamming
from ..search import hashes
from .calibration import Calibration

KINDS = ("label", "leak", "duplicate", "outlier")
K = 10
# Images per statement: one round trip per batch, short enough to show progress.
BATCH = 200
# Hash neighbours looked at per image; larger groups still join up through their members.
HASH_NEIGHBOURS = 8
# Among duplicates, the one kept: the most pixels, then the largest file, then the first stored.
KEEP_RULE = "most pixels, then largest file, then first stored"

# Connections searching at once: the server runs each search in its own process.
WORKERS = max(1, min(4, os.cpu_count() or 1))

Progress = Callable[[int, int], None]
Connect = Callable[[], psycopg.Connection[Any]]
# (embedding, class, sha256 to leave out, k) -> [(id, cosine distance)], nearest first: find's mode same.
SameClass = Callable[[np.ndarray, str, str, int], list[tuple[int, float]]]


@dataclass(frozen=True)
class Neighbour:
    id: int
    path: str
    cls: str | None
    distance: float | None  # None: not measured (a pair the hash found, deleted meanwhile)


@dataclass(frozen=True)
class Finding:
    """One problem with one stored image. `partner` is the other image of a leak or duplicate, or the nearest
    neighbour of a label suspect or an outlier; `neighbours` what the report shows beside it."""

    kind: str
    id: int
    path: str
    cls: str | None
    score: float
    suggested_class: str | None = None
    partner: Neighbour | None = None
    hash_bits: int | None = None
    group: int | None = None
    neighbours: tuple[Neighbour, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind, "id": self.id, "path": self.path, "class": self.cls, "score": round(self.score, 6),
            "suggested_class": self.suggested_class,
            "partner": None if self.partner is None else {
                "id": self.partner.id, "path": self.partner.path, "class": self.partner.cls,
                "distance": None if self.partner.distance is None else round(self.partner.distance, 6)},
            "hash_bits": self.hash_bits, "group": self.group,
        }


@dataclass(frozen=True)
class Audit:
    """What `imsearch audit` found, with the thresholds it used and where they came from."""

    model: str
    images: int
    k: int
    calibration: Calibration
    findings: tuple[Finding, ...]
    classes: dict[str, int]
    unhashed: int
    outlier_fence: float | None
    class_agreement: dict[str, float]  # per class: the share of its images whose neighbours' vote picks it
    seconds: float
    files_readable: bool = True
    agreement: float | None = None  # share of labelled images whose neighbours' vote picks their stored class
    chance: float | None = None  # the same for a vote that knew nothing: the largest class's share
    keep_rule: str = KEEP_RULE
    notes: tuple[str, ...] = field(default=())

    def of(self, kind: str) -> list[Finding]:
        return [f for f in self.findings if f.kind == kind]

    def counts(self) -> dict[str, dict[str, int]]:
        """Per class, how many of its images have a finding of each kind."""
        out: dict[str, dict[str, int]] = {c: {k: 0 for k in KINDS} for c in self.classes}
        seen: set[tuple[str, int]] = set()
        for f in self.findings:
            if f.cls is not None and (f.kind, f.id) not in seen:
                seen.add((f.kind, f.id))
                out.setdefault(f.cls, {k: 0 for k in KINDS})[f.kind] += 1
        return out

    def confusions(self) -> dict[tuple[str, str], int]:
        """(stored class, suggested class) -> label suspects."""
        return dict(Counter((f.cls, f.suggested_class) for f in self.of("label")
                            if f.cls is not None and f.suggested_class is not None))

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model, "images": self.images, "k": self.k, "seconds": round(self.seconds, 3),
            "calibration": self.calibration.to_json(),
            "thresholds": {"duplicate_distance": self.calibration.distance, "hash_bits": self.calibration.bits,
                           "outlier_distance": self.outlier_fence},
            "class_agreement": {c: round(t, 6) for c, t in self.class_agreement.items()},
            "keep_rule": self.keep_rule, "unhashed": self.unhashed, "notes": list(self.notes),
            "agreement": None if self.agreement is None else round(self.agreement, 4),
            "chance": None if self.chance is None else round(self.chance, 4),
            "counts": {kind: len({f.id for f in self.of(kind)}) for kind in KINDS},
            "per_class": self.counts(),
            "confusions": [{"class": a, "suggested_class": b, "images": n}
                           for (a, b), n in sorted(self.confusions().items())],
            "findings": [f.to_json() for f in self.findings],
        }


@translating("auditing")
def stored_model(conn: psycopg.Connection[Any]) -> str:
    """The one model identity of the stored rows; mixed models have no common distances."""
    models = [r[0] for r in conn.execute("SELECT DISTINCT model FROM images ORDER BY 1 LIMIT 3").fetchall()]
    if not models:
        raise ImsearchError("nothing is stored yet: run `imsearch ingest FOLDER` first")
    if len(models) > 1:
        raise ModelMismatch(f"the database holds images embedded with several models ({', '.join(models)}), whose "
                            "distances do not compare; run `imsearch ingest DIR --reembed` to re-embed them")
    return models[0]


@dataclass
class _Rows:
    """Per-image columns of the whole table, in id order (a few dozen bytes per image)."""

    ids: np.ndarray
    paths: list[str]
    classes: np.ndarray  # class code, -1 for none
    names: list[str]
    pixels: np.ndarray
    bytes: np.ndarray
    sha: list[str]
    phash: list[int | None]

    def at(self, image_id: int) -> int:
        return int(np.searchsorted(self.ids, image_id))

    def cls(self, i: int | np.integer) -> str | None:
        c = int(self.classes[i])
        return None if c < 0 else self.names[c]

    def neighbour(self, i: int, distance: float | None) -> Neighbour:
        return Neighbour(int(self.ids[i]), self.paths[i], self.cls(i), None if distance is None else float(distance))


def _rows(conn: psycopg.Connection[Any]) -> _Rows:
    rows = conn.execute("SELECT id, path, class, width::bigint * height, bytes, sha256, phash::text FROM images "
                        "ORDER BY id").fetchall()
    names = sorted({r[2] for r in rows if r[2] is not None})
    code = {c: i for i, c in enumerate(names)}
    return _Rows(
        ids=np.array([r[0] for r in rows], dtype=np.int64),
        paths=[r[1] for r in rows],
        classes=np.array([code.get(r[2], -1) for r in rows], dtype=np.int32),
        names=names,
        pixels=np.array([r[3] for r in rows], dtype=np.int64),
        bytes=np.array([r[4] for r in rows], dtype=np.int64),
        sha=[r[5] for r in rows],
        phash=[None if r[6] is None else int(r[6], 2) for r in rows],
    )


@translating("auditing")
def audit(conn: psycopg.Connection[Any], calibration: Calibration, *, k: int = K, progress: Progress | None = None,
          files_readable: bool = True, connect: Connect | None = None, same_class: SameClass | None = None) -> Audit:
    """Look at every stored image's neighbours and return the findings (see the module's docstring).

    `connect` opens more connections for the pass; `same_class` searches one class (find's mode same), with which
    the images that look mislabelled or alone are searched again within their own class before they are reported.
    """
    if not 1 <= k <= 100:
        raise ImsearchError(f"k must be between 1 and 100, not {k}")
    started = time.perf_counter()
    rows = _rows(conn)
    near = _neighbours(conn, rows, 2 * k, calibration.bits, progress, connect)  # room for copies left out of votes
    duplicate = _duplicate_mask(rows, calibration, near)
    if same_class is not None:
        _, suspects = _label_suspects(rows, near.nbr, near.dist, duplicate, k)
        _, alone = _outliers(rows, near.nbr, near.dist, k)
        _recheck(conn, rows, near, {rows.at(f.id) for f in suspects + alone}, same_class)
        duplicate = _duplicate_mask(rows, calibration, near)
    pairs = _pairs(conn, rows, near, duplicate)
    findings: list[Finding] = []
    findings += _leaks_and_groups(rows, pairs)
    per_class, labels = _label_suspects(rows, near.nbr, near.dist, duplicate, k)
    counts = Counter(rows.names[c] for c in rows.classes if c >= 0)
    chance = max(counts.values()) / sum(counts.values()) if counts else None
    agreement = sum(per_class[c] * counts[c] for c in per_class) / sum(counts[c] for c in per_class) \
        if per_class else None
    findings += labels
    fence, outliers = _outliers(rows, near.nbr, near.dist, k)
    findings += outliers
    notes = []
    if near.unhashed:
        notes.append(f"{near.unhashed} image(s) have no perceptual hash (stored before it existed): "
                     "`imsearch db backfill-hashes` computes them")
    if not files_readable:
        notes.append("no stored file could be read: the model's distances are not calibrated, and the audit works "
                     "from the stored rows alone (exact content and the stored hashes find duplicates)")
    if agreement is not None:
        notes.append(f"the neighbours' vote picks the stored class for {agreement:.1%} of the images (a vote that "
                     f"knew nothing: {chance:.1%}, the largest class's share); the nearer the two, the less a label "
                     "suspect means")
    return Audit(calibration.model, len(rows.ids), k, calibration, tuple(findings), dict(counts), near.unhashed,
                 fence, per_class, time.perf_counter() - started, files_readable, agreement, chance,
                 notes=tuple(notes))


@dataclass(frozen=True)
class DuplicateImage:
    id: int
    path: str
    cls: str | None
    nearest: float | None  # cosine distance to the nearest member of its group


@dataclass(frozen=True)
class DuplicateGroup:
    """Stored images linked by the copy rule (same bytes, hash or calibrated distance), across classes."""

    number: int
    images: tuple[DuplicateImage, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "group": self.number,
            "images": [{"id": i.id, "path": i.path, "class": i.cls,
                        "nearest": None if i.nearest is None else round(i.nearest, 6)} for i in self.images],
        }


# `imsearch duplicates` checks each image's this many nearest; larger groups still join up through their members.
DUPLICATE_NEIGHBOURS = 10


@translating("auditing")
def duplicate_groups(conn: psycopg.Connection[Any], calibration: Calibration,
                     progress: Progress | None = None, connect: Connect | None = None) -> list[DuplicateGroup]:
    """Groups of stored images that are copies of each other by the audit's rule, whatever their classes."""
    rows = _rows(conn)
    near = _neighbours(conn, rows, DUPLICATE_NEIGHBOURS, calibration.bits, progress, connect)
    pairs = _pairs(conn, rows, near, _duplicate_mask(rows, calibration, near))
    parent: dict[int, int] = {}
    nearest: dict[int, float] = {}
    for p in pairs.values():
        parent[_root(parent, p.a)] = _root(parent, p.b)
        for i in (p.a, p.b):
            if p.distance is not None:
                nearest[i] = min(nearest.get(i, p.distance), p.distance)
    members: dict[int, list[int]] = {}
    for i in parent:
        members.setdefault(_root(parent, i), []).append(i)
    ordered = sorted((sorted(m, key=lambda i: rows.paths[i]) for m in members.values() if len(m) > 1),
                     key=lambda m: rows.paths[m[0]])
    return [DuplicateGroup(number, tuple(DuplicateImage(int(rows.ids[i]), rows.paths[i], rows.cls(i), nearest.get(i))
                                         for i in m))
            for number, m in enumerate(ordered, start=1)]


def _root(parent: dict[int, int], x: int) -> int:
    parent.setdefault(x, x)
    while parent[x] != x:
        parent[x] = parent[parent[x]]
        x = parent[x]
    return x


@dataclass
class _Near:
    """Each image's nearest by the embedding (row indexes, -1 for none; cosine distances; Hamming distances of the
    hashes, 65 where either is missing), and the pairs the hash index found within the threshold."""

    nbr: np.ndarray
    dist: np.ndarray
    bits: np.ndarray
    hash_pairs: list[tuple[int, int, int]]
    unhashed: int


def _neighbours(conn: psycopg.Connection[Any], rows: _Rows, fetch: int, hash_bits: int,
                progress: Progress | None, connect: Connect | None = None) -> _Near:
    """One pass over the table, BATCH images per statement, through the HNSW indexes; with `connect`, on up to
    WORKERS connections at once (the server searches each in its own process)."""
    n = len(rows.ids)
    near = _Near(np.full((n, fetch), -1, dtype=np.int32), np.full((n, fetch), np.inf, dtype=np.float32),
                 np.full((n, fetch), 65, dtype=np.int16), [],
                 int(conn.execute("SELECT count(*) FROM images WHERE phash IS NULL").fetchone()[0]))  # type: ignore[index]
    hashed = near.unhashed < n
    starts = range(0, n, BATCH)
    workers = min(WORKERS, len(starts)) if connect is not None else 1
    if workers <= 1:
        batches: Iterator[tuple[int, list[Any], list[Any]]] = (
            (start, *_batch(conn, rows.ids[start:start + BATCH].tolist(), fetch, hash_bits, hashed))
            for start in starts)
        _fill(rows, near, fetch, batches, progress)
        return near
    local = threading.local()
    opened: list[psycopg.Connection[Any]] = []
    lock = threading.Lock()

    def run(start: int) -> tuple[int, list[Any], list[Any]]:
        if not hasattr(local, "conn"):
            local.conn = connect()  # type: ignore[misc]
            with lock:
                opened.append(local.conn)
        return (start, *_batch(local.conn, rows.ids[start:start + BATCH].tolist(), fetch, hash_bits, hashed))

    try:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="imsearch-audit") as pool:
            _fill(rows, near, fetch, (f.result() for f in as_completed([pool.submit(run, s) for s in starts])),
                  progress)
    finally:
        for c in opened:
            c.close()
    return near


def _batch(conn: psycopg.Connection[Any], ids: list[int], fetch: int, hash_bits: int, hashed: bool
           ) -> tuple[list[Any], list[Any]]:
    """The embedding neighbours and the hash pairs of one batch of images, in one transaction."""
    with conn.transaction():
        found = search.neighbours(conn, ids, fetch)
        pairs = hashes.neighbours(conn, ids, HASH_NEIGHBOURS, hash_bits) if hashed else []
    return found, pairs


def _fill(rows: _Rows, near: _Near, fetch: int, batches: Iterable[tuple[int, list[Any], list[Any]]],
          progress: Progress | None) -> None:
    n, done = len(rows.ids), 0
    for start, found, pairs in batches:
        near.hash_pairs += pairs
        filled: dict[int, int] = {}
        for sid, mid, d in sorted(found, key=lambda r: (r[0], r[2])):
            i, j = rows.at(sid), rows.at(mid)
            if j >= n or rows.ids[j] != mid:
                continue  # stored after the table was read
            col = filled.get(i, 0)
            if col < fetch:
                a, b = rows.phash[i], rows.phash[j]
                near.nbr[i, col], near.dist[i, col] = j, d
                near.bits[i, col] = 65 if a is None or b is None else hamming(a, b)
                filled[i] = col + 1
        done += len(rows.ids[start:start + BATCH])
        if progress:
            progress(done, n)


def _recheck(conn: psycopg.Connection[Any], rows: _Rows, near: _Near, candidates: set[int],
             same_class: SameClass) -> None:
    """Search the candidates' own class again and merge what it finds into their neighbour lists.

    One graph over the whole table can strand a search in a crowded cluster of another class: at 100k synthetic
    rows, the clean images that looked mislabelled had recall@10 0.08 against 0.97 for the rest (docs/audit.md).
    Their own class's search (its own index, or an exact scan of a small class) finds the neighbours it missed.
    """
    labelled = sorted(i for i in candidates if rows.classes[i] >= 0)
    if not labelled:
        return
    vectors = dict(conn.execute("SELECT id, embedding FROM images WHERE id = ANY(%s)",
                                ([int(rows.ids[i]) for i in labelled],)).fetchall())
    n, fetch = len(rows.ids), near.nbr.shape[1]
    for i in labelled:
        vector = vectors.get(int(rows.ids[i]))
        if vector is None:
            continue  # deleted meanwhile
        merged = {int(j): (float(d), int(b)) for j, d, b in zip(near.nbr[i], near.dist[i], near.bits[i]) if j >= 0}
        for mid, d in same_class(np.asarray(vector.to_numpy(), dtype=np.float32), rows.cls(i) or "", rows.sha[i],
                                 fetch):
            j = rows.at(mid)
            if j < n and rows.ids[j] == mid and j != i and j not in merged:
                a, b = rows.phash[i], rows.phash[j]
                merged[j] = (d, 65 if a is None or b is None else hamming(a, b))
        nearest = sorted(merged.items(), key=lambda item: item[1][0])[:fetch]
        for col, (j, (d, b)) in enumerate(nearest):
            near.nbr[i, col], near.dist[i, col], near.bits[i, col] = j, d, b


def _duplicate_mask(rows: _Rows, c: Calibration, near: _Near) -> np.ndarray:
    """Which neighbours are copies of the image: the same bytes, a hash within the bits, or (where the model
    separates copies from neighbours) an embedding within the duplicate distance. The copy rule, once."""
    same = np.zeros(near.nbr.shape, dtype=bool)
    for i, j in zip(*np.nonzero(near.nbr >= 0)):
        same[i, j] = rows.sha[int(near.nbr[i, j])] == rows.sha[i]
    out = same | (near.bits <= c.bits)
    if c.distance is not None:
        out |= near.dist <= c.distance
    return out


@dataclass
class _Pair:
    a: int
    b: int
    distance: float | None
    bits: int | None
    score: float


def _pairs(conn: psycopg.Connection[Any], rows: _Rows, near: _Near, duplicate: np.ndarray
           ) -> dict[tuple[int, int], _Pair]:
    """Duplicate pairs (row indexes, a < b) from the embedding neighbours and the hash neighbours, each with its
    cosine distance (read from the table for pairs only the hash found)."""
    out: dict[tuple[int, int], _Pair] = {}

    def add(i: int, j: int, d: float | None, b: int | None) -> None:
        key = (min(i, j), max(i, j))
        old = out.get(key)
        d = d if d is not None else (old.distance if old else None)
        b = b if b is not None and b <= 64 else (old.bits if old else None)
        score = 1.0 if rows.sha[i] == rows.sha[j] else (1.0 - b / 64 if b is not None else 1.0 - (d or 0.0))
        out[key] = _Pair(key[0], key[1], d, b, score)

    for i, j in zip(*np.nonzero(duplicate & (near.nbr >= 0))):
        add(int(i), int(near.nbr[i, j]), float(near.dist[i, j]), int(near.bits[i, j]))
    n = len(rows.ids)
    for sid, mid, b in near.hash_pairs:
        i, j = rows.at(sid), rows.at(mid)
        if i < n and j < n and rows.ids[i] == sid and rows.ids[j] == mid:
            add(i, j, None, b)
    missing = [key for key, p in out.items() if p.distance is None]
    if missing:
        for a, b, d in search.distances(conn, [(int(rows.ids[a]), int(rows.ids[b])) for a, b in missing]):
            out[(rows.at(a), rows.at(b))].distance = float(d)
    return out


def _leaks_and_groups(rows: _Rows, pairs: dict[tuple[int, int], _Pair]) -> list[Finding]:
    """Leaks (duplicates across classes, one finding per image of the pair) and duplicate groups within a class
    (linked pairs; every member but the one kept is a finding naming the kept one)."""
    findings: list[Finding] = []
    parent: dict[int, int] = {}
    best: dict[int, _Pair] = {}
    for p in sorted(pairs.values(), key=lambda p: (p.a, p.b)):
        if rows.classes[p.a] != rows.classes[p.b] and rows.classes[p.a] >= 0 and rows.classes[p.b] >= 0:
            for i, j in ((p.a, p.b), (p.b, p.a)):
                findings.append(Finding("leak", int(rows.ids[i]), rows.paths[i], rows.cls(i), p.score,
                                        partner=rows.neighbour(j, p.distance),
                                        hash_bits=p.bits))
        else:
            parent[_root(parent, p.a)] = _root(parent, p.b)
            for i in (p.a, p.b):
                if i not in best or p.score > best[i].score:
                    best[i] = p
    members: dict[int, list[int]] = {}
    for i in parent:
        members.setdefault(_root(parent, i), []).append(i)
    groups = sorted((sorted(m, key=lambda i: rows.ids[i]) for m in members.values() if len(m) > 1),
                    key=lambda m: rows.ids[m[0]])
    for number, group in enumerate(groups, start=1):
        keep = max(group, key=lambda i: (rows.pixels[i], rows.bytes[i], -rows.ids[i]))
        for i in group:
            if i == keep:
                continue
            p = best[i]
            findings.append(Finding("duplicate", int(rows.ids[i]), rows.paths[i], rows.cls(i), p.score,
                                    partner=rows.neighbour(keep, _distance_between(pairs, i, keep)),
                                    hash_bits=p.bits if keep in (p.a, p.b) else None, group=number))
    return findings


def _distance_between(pairs: dict[tuple[int, int], _Pair], i: int, j: int) -> float | None:
    p = pairs.get((min(i, j), max(i, j)))
    return None if p is None else p.distance


def _label_suspects(rows: _Rows, nbr: np.ndarray, dist: np.ndarray, duplicate: np.ndarray, k: int
                    ) -> tuple[dict[str, float], list[Finding]]:
    """Class scores from each image's k nearest that are not its copies, weighted by 1/distance and summing to 1;
    an image is suspect when another class outscores its own. Its score is the margin, from 0 to 1.

    Returns, per class, the share of its images whose vote picks it, and the findings, largest margin first.
    """
    n, c = len(rows.ids), len(rows.names)
    if c < 2 or n == 0:
        return {}, []
    voters = (nbr >= 0) & ~duplicate
    voters &= np.cumsum(voters, axis=1) <= k  # the first k that are not copies
    codes = np.where(nbr >= 0, rows.classes[np.maximum(nbr, 0)], -1)
    voters &= codes >= 0
    weight = np.where(voters, 1.0 / np.maximum(dist, 1e-6), 0.0)
    scores = np.zeros((n, c))
    for col in range(nbr.shape[1]):
        np.add.at(scores, (np.arange(n), np.maximum(codes[:, col], 0)), weight[:, col])
    total = scores.sum(axis=1, keepdims=True)
    share = np.divide(scores, total, out=np.zeros_like(scores), where=total > 0)
    labelled = (rows.classes >= 0) & (total[:, 0] > 0)
    given = np.maximum(rows.classes, 0)
    own = share[np.arange(n), given]
    rivals = share.copy()
    rivals[np.arange(n), given] = -1.0
    rival, suggested = rivals.max(axis=1), rivals.argmax(axis=1)
    findings = []
    for i in np.flatnonzero(labelled & (rival > own)):
        shown = tuple(rows.neighbour(int(x), float(d)) for x, d, v in zip(nbr[i], dist[i], voters[i]) if v)
        findings.append(Finding("label", int(rows.ids[i]), rows.paths[i], rows.cls(i), float(rival[i] - own[i]),
                                suggested_class=rows.names[int(suggested[i])], partner=shown[0] if shown else None,
                                neighbours=shown))
    findings.sort(key=lambda f: -f.score)
    picked = share.argmax(axis=1) == rows.classes
    agreement = {rows.names[j]: float(picked[labelled & (rows.classes == j)].mean())
                 for j in range(c) if np.any(labelled & (rows.classes == j))}
    return agreement, findings


def _outliers(rows: _Rows, nbr: np.ndarray, dist: np.ndarray, k: int) -> tuple[float | None, list[Finding]]:
    """Images whose nearest neighbour lies beyond Q3 + 3 x IQR of every image's nearest-neighbour distance."""
    nearest = dist[:, 0]
    known = np.isfinite(nearest)
    if known.sum() < 4:
        return None, []
    q1, q3 = np.percentile(nearest[known], [25, 75])
    fence = float(q3 + 3 * (q3 - q1))
    findings = [
        Finding("outlier", int(rows.ids[i]), rows.paths[i], rows.cls(i), float(nearest[i] / fence) if fence else 0.0,
                partner=rows.neighbour(int(nbr[i, 0]), float(nearest[i])),
                neighbours=tuple(rows.neighbour(int(x), float(d)) for x, d in zip(nbr[i, :k], dist[i, :k]) if x >= 0))
        for i in np.flatnonzero(known & (nearest > fence))
    ]
    findings.sort(key=lambda f: -f.score)
    return fence, findings


@translating("auditing")
def write(conn: psycopg.Connection[Any], result: Audit) -> int:
    """Replace image_audit with these findings in one transaction; rows deleted meanwhile are left out."""
    f = result.findings
    with conn.transaction():
        conn.execute("DELETE FROM image_audit")
        cur = conn.execute(
            """
            INSERT INTO image_audit (image_id, kind, score, suggested_class, partner_id, distance, hash_bits, model)
            SELECT u.image_id, u.kind, u.score, u.suggested, u.partner, u.distance, u.bits, %s
            FROM unnest(%s::bigint[], %s::text[], %s::float8[], %s::text[], %s::bigint[], %s::float8[], %s::int[])
                AS u(image_id, kind, score, suggested, partner, distance, bits)
            WHERE EXISTS (SELECT FROM images WHERE id = u.image_id)
              AND (u.partner IS NULL OR EXISTS (SELECT FROM images WHERE id = u.partner))
            """,
            (result.model, [x.id for x in f], [x.kind for x in f], [x.score for x in f],
             [x.suggested_class for x in f], [x.partner.id if x.partner else None for x in f],
             [x.partner.distance if x.partner else None for x in f],
             [x.hash_bits for x in f]),
        )
        return cur.rowcount
