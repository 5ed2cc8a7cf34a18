"""How far a harmless copy of a stored photo lands from it, for one model, against its distinct neighbours.

Distances depend on the model: a fixed duplicate distance chosen for one checkpoint is wrong for the next. The
calibration is measured on the library's own photos and stored per model identity (table model_calibration).
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import psycopg
from PIL import Image
from psycopg.types.json import Jsonb

from .. import search
from ..db.errors import translating
from ..errors import BadImage, ImsearchError, NotCalibrated
from ..files import sha256_bytes
from ..model import pixels
from ..model.embed import Model
from ..model.phash import hamming
from ..model.pixels import Preprocess
from ..search import hashes

# `find --max-distance duplicate`, the web API's max_distance and SQL's imsearch_duplicate_distance() take this name
DUPLICATE = "duplicate"


@translating("reading the calibration from")
def duplicate_distance(conn: psycopg.Connection[Any], model: str) -> float:
    """The duplicate distance for `model`: the user's override, else the calibrated one.

    Raises NotCalibrated when the model was never calibrated, or when its copies and neighbours overlap (it cannot
    tell a copy from a neighbour, and only the perceptual hash finds duplicates).
    """
    row = conn.execute(
        "SELECT coalesce(override_distance, duplicate_distance), copy_distance_p95, neighbour_distance_p05 "
        "FROM model_calibration WHERE model = %s",
        (model,),
    ).fetchone()
    if row is None:
        raise NotCalibrated(f"no duplicate distance is calibrated for model {model}: run `imsearch calibrate` "
                            "(or `imsearch audit`, which calibrates first)")
    if row[0] is None and row[1] is None:
        raise NotCalibrated(f"model {model} has no duplicate distance: no stored file could be read to calibrate it; "
                            "give a number, or set one with `imsearch calibrate --set-distance D`")
    if row[0] is None:
        raise NotCalibrated(
            f"model {model} cannot tell a copy from a neighbour: its copies land up to {row[1]:.4f} from their "
            f"originals, distinct photos from {_f(row[2])} (`imsearch calibrate` shows the figures); give a number, "
            "or set one with `imsearch calibrate --set-distance D`"
        )
    return float(row[0])


# Stored photos whose variants are embedded: 50 photos x 5 variants take a few seconds on a CPU.
SAMPLE = 50
# A copy's hash threshold when no stored file can be read to measure one: 64-bit pHash puts re-encodes and half-size
# copies of the shared room photos 0-2 bits from their originals and any two distinct ones at least 14 apart
# (docs/audit.md); halfway, rounded down.
UNMEASURED_HASH_BITS = 8
# The variants a copy may be: the model should put each near its original. Crops are measured apart: a 5 % crop
# moves the centre-crop the model sees, and pHash does not survive it at all.
COPY_VARIANTS = ("reencode", "half", "exif")
CROP_VARIANT = "crop5"


@dataclass(frozen=True)
class Calibration:
    """One model's duplicate calibration, as stored in model_calibration (see `measure`)."""

    model: str
    sample: int
    copy_distance_p95: float | None
    copy_distance_max: float | None
    crop_distance_p50: float | None
    neighbour_distance_p05: float | None
    duplicate_distance: float | None
    hash_copy_bits_max: int | None
    hash_neighbour_bits_p05: int | None
    hash_bits: int
    override_distance: float | None = None
    override_hash_bits: int | None = None
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def distance(self) -> float | None:
        """The duplicate distance in force: the user's, else the calibrated one; None: the model cannot tell."""
        return self.override_distance if self.override_distance is not None else self.duplicate_distance

    @property
    def bits(self) -> int:
        """The hash threshold in force (Hamming bits)."""
        return self.override_hash_bits if self.override_hash_bits is not None else self.hash_bits

    @property
    def separable(self) -> bool:
        return self.duplicate_distance is not None

    def verdict(self) -> str:
        """One line a person reads: what finds duplicates with this model, and why."""
        if self.sample == 0:
            return (f"no stored file could be read, so the model's distances are not calibrated: duplicates are "
                    f"found by exact content and by the perceptual hash alone (<= {self.bits} bits, pHash's usual "
                    "spacing)")
        hashing = (f"perceptual hash: copies {self.hash_copy_bits_max} bits at most, distinct photos "
                   f"{self.hash_neighbour_bits_p05} or more (5th percentile) -> duplicates at <= {self.bits} bits")
        if self.distance is None:
            return (f"this model cannot separate duplicates: copies land up to {_f(self.copy_distance_max)} from "
                    f"their originals (95 % within {_f(self.copy_distance_p95)}) and distinct neighbours from "
                    f"{_f(self.neighbour_distance_p05)} (5th percentile); the hash alone decides ({hashing})")
        source = "set by the user" if self.override_distance is not None else "calibrated"
        return (f"duplicates at cosine distance <= {self.distance:.4f} ({source}: copies up to "
                f"{_f(self.copy_distance_max)}, distinct neighbours from {_f(self.neighbour_distance_p05)}), or by "
                f"the {hashing}")

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model, "sample": self.sample,
            "copy_distance_p95": _r(self.copy_distance_p95), "copy_distance_max": _r(self.copy_distance_max),
            "crop_distance_p50": _r(self.crop_distance_p50),
            "neighbour_distance_p05": _r(self.neighbour_distance_p05),
            "duplicate_distance": _r(self.duplicate_distance), "override_distance": _r(self.override_distance),
            "distance": _r(self.distance), "separable": self.separable,
            "hash_copy_bits_max": self.hash_copy_bits_max, "hash_neighbour_bits_p05": self.hash_neighbour_bits_p05,
            "hash_bits": self.hash_bits, "override_hash_bits": self.override_hash_bits, "bits": self.bits,
            "verdict": self.verdict(), "details": self.details,
        }


def _f(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"


def _r(x: float | None) -> float | None:
    return None if x is None else round(float(x), 6)


COLUMNS = ("model", "sample", "copy_distance_p95", "copy_distance_max", "crop_distance_p50", "neighbour_distance_p05",
           "duplicate_distance", "hash_copy_bits_max", "hash_neighbour_bits_p05", "hash_bits", "override_distance",
           "override_hash_bits", "details")


@translating("reading the calibration from")
def load(conn: psycopg.Connection[Any], model: str) -> Calibration | None:
    """The stored calibration of `model`, if any."""
    row = conn.execute(f"SELECT {', '.join(COLUMNS)} FROM model_calibration WHERE model = %s", (model,)).fetchone()
    return None if row is None else Calibration(*row)


@translating("calibrating with")
def save(conn: psycopg.Connection[Any], c: Calibration) -> None:
    """Store a new measurement; the user's overrides stay."""
    conn.execute(
        """
        INSERT INTO model_calibration (model, sample, copy_distance_p95, copy_distance_max, crop_distance_p50,
            neighbour_distance_p05, duplicate_distance, hash_copy_bits_max, hash_neighbour_bits_p05, hash_bits,
            details, measured_at)
        VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, now())
        ON CONFLICT (model) DO UPDATE SET
            sample = EXCLUDED.sample, copy_distance_p95 = EXCLUDED.copy_distance_p95,
            copy_distance_max = EXCLUDED.copy_distance_max, crop_distance_p50 = EXCLUDED.crop_distance_p50,
            neighbour_distance_p05 = EXCLUDED.neighbour_distance_p05,
            duplicate_distance = EXCLUDED.duplicate_distance, hash_copy_bits_max = EXCLUDED.hash_copy_bits_max,
            hash_neighbour_bits_p05 = EXCLUDED.hash_neighbour_bits_p05, hash_bits = EXCLUDED.hash_bits,
            details = EXCLUDED.details, measured_at = now()
        """,
        (c.model, c.sample, c.copy_distance_p95, c.copy_distance_max, c.crop_distance_p50, c.neighbour_distance_p05,
         c.duplicate_distance, c.hash_copy_bits_max, c.hash_neighbour_bits_p05, c.hash_bits, Jsonb(c.details)),
    )


@translating("calibrating with")
def override(conn: psycopg.Connection[Any], model: str, *, distance: float | None = None,
             hash_bits: int | None = None, clear: bool = False) -> None:
    """Set (or with `clear`, remove) the user's duplicate distance and hash threshold for a calibrated model."""
    check(distance, hash_bits)
    cur = conn.execute(
        "UPDATE model_calibration SET override_distance = CASE WHEN %(clear)s THEN NULL "
        "ELSE coalesce(%(d)s, override_distance) END, override_hash_bits = CASE WHEN %(clear)s THEN NULL "
        "ELSE coalesce(%(b)s, override_hash_bits) END WHERE model = %(m)s",
        {"clear": clear, "d": distance, "b": hash_bits, "m": model},
    )
    if cur.rowcount == 0:
        raise NotCalibrated(f"model {model} is not calibrated yet: run `imsearch calibrate` first")


def check(distance: float | None, hash_bits: int | None) -> None:
    """Refuse a duplicate distance that is no cosine distance (NaN included) and a hash threshold beyond 64 bits."""
    if distance is not None and not (0 <= distance < 2):  # NaN fails both
        raise ImsearchError(f"the duplicate distance is a cosine distance, at least 0 and below 2, not {distance}")
    if hash_bits is not None and not 0 <= hash_bits <= 64:
        raise ImsearchError(f"the hash threshold is a number of bits from 0 to 64, not {hash_bits}")


@dataclass(frozen=True)
class _Sampled:
    id: int
    embedding: np.ndarray
    phash: int
    variants: dict[str, tuple[np.ndarray, int]]  # name -> (model input, hash)


def variants(img: Image.Image) -> dict[str, bytes]:
    """Harmless copies of an upright RGB photo, as files: what a person may store twice without meaning to."""
    w, h = img.size

    def jpeg(im: Image.Image, quality: int, exif: Image.Exif | None = None) -> bytes:
        out = io.BytesIO()
        im.save(out, "JPEG", quality=quality, **({"exif": exif} if exif is not None else {}))
        return out.getvalue()

    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to view": undoes the pixels' 90-degree turn counter-clockwise
    return {
        "reencode": jpeg(img, 70),
        "half": jpeg(img.resize((max(1, w // 2), max(1, h // 2)), Image.Resampling.LANCZOS), 90),
        "exif": jpeg(img.transpose(Image.Transpose.ROTATE_90), 90, exif),
        CROP_VARIANT: jpeg(img.crop((0, 0, max(1, round(w * 0.95)), max(1, round(h * 0.95)))), 90),
    }


@translating("calibrating with")
def measure(conn: psycopg.Connection[Any], identity: str, prep: Preprocess, model: Callable[[], Model], *,
            sample: int = SAMPLE, progress: Callable[[int, int], None] | None = None) -> Calibration:
    """Embed harmless variants of up to `sample` stored photos and set how far they land from their originals
    against how far each original's nearest distinct photo is; the same for the perceptual hash.

    A neighbour counts as distinct when its hash is further than any copy's: a library's own duplicates do not
    lower the neighbour figures. The duplicate distance is halfway between the farthest copy and the 5th
    percentile of distinct neighbours, where the first is below the second; else none (the hash alone decides).
    `model` is called only when some stored file can be read: rows alone need no model.
    """
    picked = _sample(conn, identity, prep, sample, progress)
    if not picked:
        return Calibration(identity, 0, None, None, None, None, None, None, None, UNMEASURED_HASH_BITS,
                           details={"unreadable": True})
    names = list(picked[0].variants)
    inputs = np.stack([p.variants[n][0] for p in picked for n in names])
    embedder = model()
    vectors = np.concatenate([embedder.embed(inputs[i:i + 32]) for i in range(0, len(inputs), 32)])
    distance: dict[str, list[float]] = {n: [] for n in names}
    bits: dict[str, list[int]] = {n: [] for n in names}
    for i, p in enumerate(picked):
        for j, n in enumerate(names):
            distance[n].append(_cosine_distance(p.embedding, vectors[i * len(names) + j]))
            bits[n].append(hamming(p.phash, p.variants[n][1]))
    copy_d = np.array([d for n in COPY_VARIANTS for d in distance[n]])
    copy_b = np.array([b for n in COPY_VARIANTS for b in bits[n]])
    hash_copy_max = int(copy_b.max())
    near_d, near_b = _neighbours(conn, [p.id for p in picked], hash_copy_max)
    d05 = float(np.percentile(near_d, 5)) if len(near_d) else None
    b_min = int(np.floor(np.percentile(near_b, 5))) if len(near_b) else None
    copy_max, copy_p95 = float(copy_d.max()), float(np.percentile(copy_d, 95))
    duplicate = (copy_max + d05) / 2 if d05 is not None and copy_max < d05 else None
    hash_bits = (hash_copy_max + b_min) // 2 if b_min is not None and hash_copy_max < b_min else hash_copy_max
    crop = np.array(distance[CROP_VARIANT])
    details = {
        "variants": {n: {"distance_p50": _r(np.median(distance[n])), "distance_max": _r(max(distance[n])),
                         "bits_p50": float(np.median(bits[n])), "bits_max": int(max(bits[n]))} for n in names},
        "neighbour_distance_p50": _r(np.median(near_d)) if len(near_d) else None,
        "neighbour_bits_min": int(near_b.min()) if len(near_b) else None,
        "crops_within_distance": None if duplicate is None else round(float(np.mean(crop <= duplicate)), 3),
        "crops_within_bits": round(float(np.mean(np.array(bits[CROP_VARIANT]) <= hash_bits)), 3),
        "hash_overlaps": b_min is not None and hash_copy_max >= b_min,
    }
    return Calibration(identity, len(picked), copy_p95, copy_max, float(np.median(crop)), d05, duplicate,
                       hash_copy_max, b_min, hash_bits, details=details)


def _cosine_distance(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(1.0 - a @ b / ((np.linalg.norm(a) * np.linalg.norm(b)) or 1.0))


def _sample(conn: psycopg.Connection[Any], identity: str, prep: Preprocess, n: int,
            progress: Callable[[int, int], None] | None) -> list[_Sampled]:
    """Up to n stored photos of this model whose files still hold what was stored, with their variants decoded.

    Picked in a fixed order (md5 of the content), so that a calibration measured again picks the same photos.
    """
    rows = conn.execute(
        "SELECT id, path, sha256, embedding FROM images WHERE model = %s ORDER BY md5(sha256), id LIMIT %s",
        (identity, 4 * n),
    ).fetchall()
    out: list[_Sampled] = []
    for image_id, path, sha, embedding in rows:
        if len(out) == n:
            break
        try:
            data = pixels.read_file(Path(path))
            if sha256_bytes(data) != sha:
                continue  # changed since it was stored: its row does not describe it
            original = pixels.load(data, path, prep)
            img, _ = pixels.open_image(data, path)
            loaded = {name: pixels.load(v, f"{path} ({name})", prep) for name, v in variants(img).items()}
        except BadImage:
            continue
        out.append(_Sampled(image_id, np.asarray(embedding.to_numpy(), dtype=np.float32), original.phash,
                            {name: (v.pixels, v.phash) for name, v in loaded.items()}))
        if progress:
            progress(len(out), n)
    return out


# Neighbours looked at per sampled photo for its nearest distinct one: its copies come first (the search took the
# nearest distinct among its candidates, hnsw.ef_search 40 by default, when it filtered them in SQL).
DISTINCT_DEPTH = 40


def _neighbours(conn: psycopg.Connection[Any], ids: list[int], copy_bits: int) -> tuple[np.ndarray, np.ndarray]:
    """For each of these stored images, the cosine distance to its nearest distinct stored image by the embedding,
    and the Hamming distance to its nearest distinct one by the hash: distinct meaning other content, the same
    model, and a hash further than any copy's (or none). Both searches are the audit's (search.neighbours,
    search.hashes)."""
    by_vector = search.neighbours(conn, ids, DISTINCT_DEPTH)
    by_hash = hashes.neighbours(conn, ids, DISTINCT_DEPTH)
    seen = sorted({i for r in by_vector + by_hash for i in r[:2]})
    about = {r[0]: r[1:] for r in conn.execute("SELECT id, sha256, model, phash::text FROM images WHERE id = ANY(%s)",
                                               (seen,)).fetchall()}

    def distinct(a: int, b: int) -> bool:
        (sha_a, model_a, hash_a), (sha_b, model_b, hash_b) = about[a], about[b]
        return sha_a != sha_b and model_a == model_b and (
            hash_a is None or hash_b is None or hamming(int(hash_a, 2), int(hash_b, 2)) > copy_bits)

    def nearest(found: list[Any]) -> list[Any]:
        best: dict[int, Any] = {}
        for a, b, d in found:
            if a in about and b in about and distinct(a, b) and (a not in best or d < best[a]):
                best[a] = d
        return [best[i] for i in ids if i in best]

    return np.array(nearest(by_vector), dtype=np.float64), np.array(nearest(by_hash), dtype=np.int64)
