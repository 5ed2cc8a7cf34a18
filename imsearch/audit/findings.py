"""The audit: every stored image's neighbour lists (the pass in `neighbours`) turned into findings.

- duplicates: the same bytes, a hash within the calibrated bits, or (where the model separates copies from
  neighbours) an embedding within the calibrated distance; linked into groups, each naming one image to keep;
- leaks: such duplicates filed under different classes;
- label suspects: a vote of the K nearest that are not the image's copies, weighted by 1/distance, gives class
  scores; an image is suspect when another class outscores its own, by a margin that ranks the suspects (the
  vote is out-of-sample, as cleanlab's kNN label issues: no image votes for itself or through its copies);
- outliers: a nearest-neighbour distance beyond the library's far-out fence, Q3 + 3 x IQR (Tukey).
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import psycopg

from .. import search
from ..db.errors import translating
from ..errors import ImsearchError, ModelMismatch
from .calibration import Calibration
from .neighbours import Connect, Near, Neighbour, Progress, Rows, SameClass, linked, neighbours, read_rows, recheck

KINDS = ("label", "leak", "duplicate", "outlier")
K = 10
# Among duplicates, the one kept: the most pixels, then the largest file, then the first stored.
KEEP_RULE = ("most pixels, then largest file, then first stored; where no copy's size is known (rows loaded without "
             "sizes), the first by path")


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
    rows = read_rows(conn)
    near = neighbours(conn, rows, 2 * k, calibration.bits, progress, connect)  # room for copies left out of votes
    duplicate = _duplicate_mask(rows, calibration, near)
    if same_class is not None:
        _, suspects = _label_suspects(rows, near.nbr, near.dist, duplicate, k)
        _, alone = _outliers(rows, near.nbr, near.dist, k)
        recheck(conn, rows, near, {rows.at(f.id) for f in suspects + alone}, same_class)
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
        notes.append(f"{near.unhashed} image(s) have no perceptual hash (stored before it existed, or loaded without "
                     "one), so the hash finds none of their copies: `imsearch db backfill-hashes` computes them from "
                     "their files")
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
    rows = read_rows(conn)
    near = neighbours(conn, rows, DUPLICATE_NEIGHBOURS, calibration.bits, progress, connect)
    pairs = _pairs(conn, rows, near, _duplicate_mask(rows, calibration, near))
    nearest: dict[int, float] = {}
    for p in pairs.values():
        for i in (p.a, p.b):
            if p.distance is not None:
                nearest[i] = min(nearest.get(i, p.distance), p.distance)
    ordered = sorted((sorted(m, key=lambda i: rows.paths[i]) for m in linked((p.a, p.b) for p in pairs.values())),
                     key=lambda m: rows.paths[m[0]])
    return [DuplicateGroup(number, tuple(DuplicateImage(int(rows.ids[i]), rows.paths[i], rows.cls(i), nearest.get(i))
                                         for i in m))
            for number, m in enumerate(ordered, start=1)]


def _duplicate_mask(rows: Rows, c: Calibration, near: Near) -> np.ndarray:
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


def _pairs(conn: psycopg.Connection[Any], rows: Rows, near: Near, duplicate: np.ndarray
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


def _leaks_and_groups(rows: Rows, pairs: dict[tuple[int, int], _Pair]) -> list[Finding]:
    """Leaks (duplicates across classes, one finding per image of the pair) and duplicate groups within a class
    (linked pairs; every member but the one kept is a finding naming the kept one)."""
    findings: list[Finding] = []
    within: list[tuple[int, int]] = []
    best: dict[int, _Pair] = {}
    for p in sorted(pairs.values(), key=lambda p: (p.a, p.b)):
        if rows.classes[p.a] != rows.classes[p.b] and rows.classes[p.a] >= 0 and rows.classes[p.b] >= 0:
            for i, j in ((p.a, p.b), (p.b, p.a)):
                findings.append(Finding("leak", int(rows.ids[i]), rows.paths[i], rows.cls(i), p.score,
                                        partner=rows.neighbour(j, p.distance),
                                        hash_bits=p.bits))
        else:
            within.append((p.a, p.b))
            for i in (p.a, p.b):
                if i not in best or p.score > best[i].score:
                    best[i] = p
    groups = sorted((sorted(m, key=lambda i: rows.ids[i]) for m in linked(within)), key=lambda m: rows.ids[m[0]])
    for number, group in enumerate(groups, start=1):
        keep = _kept(rows, group)
        for i in group:
            if i == keep:
                continue
            p = best[i]
            findings.append(Finding("duplicate", int(rows.ids[i]), rows.paths[i], rows.cls(i), p.score,
                                    partner=rows.neighbour(keep, _distance_between(pairs, i, keep)),
                                    hash_bits=p.bits if keep in (p.a, p.b) else None, group=number))
    return findings


def _kept(rows: Rows, group: list[int]) -> int:
    """The copy a duplicate group keeps (KEEP_RULE): sizes decide among the copies whose size is known (-1: a row
    loaded without it); where none is, the first by path."""
    known = [i for i in group if rows.pixels[i] >= 0]
    if known:
        return max(known, key=lambda i: (rows.pixels[i], rows.bytes[i], -rows.ids[i]))
    return min(group, key=lambda i: rows.paths[i])


def _distance_between(pairs: dict[tuple[int, int], _Pair], i: int, j: int) -> float | None:
    p = pairs.get((min(i, j), max(i, j)))
    return None if p is None else p.distance


def _label_suspects(rows: Rows, nbr: np.ndarray, dist: np.ndarray, duplicate: np.ndarray, k: int
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


def _outliers(rows: Rows, nbr: np.ndarray, dist: np.ndarray, k: int) -> tuple[float | None, list[Finding]]:
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
