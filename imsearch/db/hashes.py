"""Perceptual hashes for rows stored before imsearch computed them: read each file again and hash it, no model.

Ingest hashes every image it stores (imsearch.model.pixels.load); rows from an older imsearch have a NULL
`phash`. Re-embedding them would take the model and minutes per thousand photos; a hash takes a decode. Each file
is checked against its stored sha256 first: a file changed since it was stored is reported, not hashed, since its
row (vector, size) describes the old bytes.
"""

from __future__ import annotations

import contextlib
import logging
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import psycopg

from ..errors import BadImage
from ..files import sha256_bytes
from ..model import pixels
from ..model.phash import phash, to_bits
from ..workers import default_workers, in_order
from .connect import scalar
from .store import Store

log = logging.getLogger(__name__)

# Rows read per query and hashes written per UPDATE.
BATCH_SIZE = 256
CHANGED = "changed since it was stored: run `imsearch ingest` again"


@dataclass(frozen=True)
class HashFailure:
    """A row whose hash could not be computed, and why."""

    id: int
    path: str
    error: str


@dataclass(frozen=True)
class BackfillResult:
    """What `backfill_hashes` did: rows hashed, and every row it could not hash with its reason."""

    hashed: int = 0
    failed: tuple[HashFailure, ...] = ()

    def to_json(self) -> dict[str, object]:
        return {"hashed": self.hashed, "failed": [{"id": f.id, "path": f.path, "error": f.error} for f in self.failed]}


@dataclass(frozen=True)
class _Unhashed:
    id: int
    path: str
    sha256: str
    prep: pixels.Preprocess


def preprocess_of(model: str) -> pixels.Preprocess:
    """The preprocessing named in a row's model identity (`resnet50:<weights>:<prep id>[:precision]`): a JPEG
    decodes at the draft scale it sets, and the backfill decodes as ingest did so that it gets the same hash."""
    fields = model.split(":")
    for prep in pixels.PREPROCESSING.values():
        if prep.id in fields:
            return prep
    return pixels.DEFAULT_PREPROCESS


def hash_file(path: str, sha256: str, prep: pixels.Preprocess = pixels.DEFAULT_PREPROCESS) -> int:
    """The hash ingest stores for this file, if it still holds the bytes `sha256` names; BadImage otherwise."""
    data = pixels.read_file(Path(path))
    if sha256_bytes(data) != sha256:
        raise BadImage(path, CHANGED)
    img, _ = pixels.open_image(data, path, prep=prep)
    return phash(img)


def backfill_hashes(store: Store, *, workers: int | None = None, batch_size: int = BATCH_SIZE,
                    progress: Callable[[int, int], None] | None = None) -> BackfillResult:
    """Hash every row whose `phash` is NULL from its file, in worker threads, and store the hashes; no embedding.

    Rows are read and written `batch_size` at a time, with a few files per thread in flight, so memory stays
    flat. A row that a concurrent ingest rewrote meanwhile (another sha256, or already hashed) is left to it.
    """
    workers = workers or default_workers()
    try:
        total = int(scalar(store.conn, "SELECT count(*) FROM images WHERE phash IS NULL"))
    except psycopg.OperationalError as exc:
        raise store.lost(exc, "reading from") from None
    failed: list[HashFailure] = []
    done: list[tuple[_Unhashed, int]] = []
    hashed = settled = 0
    depth = 4 * workers  # files queued or decoding at once; a settled one leaves only its hash

    def settle(row: _Unhashed, future: Future[int]) -> None:
        nonlocal hashed, settled
        try:
            done.append((row, future.result()))
        except BadImage as exc:
            failed.append(HashFailure(row.id, row.path, exc.reason))
            log.info("%s", exc)
        if len(done) >= batch_size:
            hashed += _store_hashes(store, done)
            done.clear()
        settled += 1
        if progress:
            progress(settled, max(total, settled))

    def hashed_file(row: _Unhashed) -> int:
        return hash_file(row.path, row.sha256, row.prep)

    with contextlib.closing(in_order(hashed_file, _unhashed(store, batch_size), workers=workers, depth=depth,
                                     name="imsearch-hash")) as files:
        for row, future in files:
            settle(row, future)
    hashed += _store_hashes(store, done)
    return BackfillResult(hashed, tuple(failed))


def _unhashed(store: Store, batch_size: int) -> Iterator[_Unhashed]:
    """Rows without a hash in id order, read `batch_size` at a time (rows that fail keep NULL: read past, by id)."""
    last = 0
    while True:
        try:
            rows = store.conn.execute(
                "SELECT id, path, sha256, model FROM images WHERE phash IS NULL AND id > %s ORDER BY id LIMIT %s",
                (last, batch_size),
            ).fetchall()
        except psycopg.OperationalError as exc:
            raise store.lost(exc, "reading from") from None
        if not rows:
            return
        for image_id, path, sha256, model in rows:
            yield _Unhashed(image_id, path, sha256, preprocess_of(model))
        last = rows[-1][0]


def _store_hashes(store: Store, done: list[tuple[_Unhashed, int]]) -> int:
    """Write hashes in one statement, only where the row still holds the bytes that were hashed; how many."""
    if not done:
        return 0
    try:
        cur = store.conn.execute(
            """
            UPDATE images AS i SET phash = v.phash::bit(64)
            FROM unnest(%s::bigint[], %s::text[], %s::text[]) AS v(id, sha256, phash)
            WHERE i.id = v.id AND i.sha256 = v.sha256 AND i.phash IS NULL
            """,
            ([r.id for r, _ in done], [r.sha256 for r, _ in done], [to_bits(h) for _, h in done]),
        )
    except psycopg.OperationalError as exc:
        raise store.lost(exc, "writing hashes to") from None
    return cur.rowcount


__all__ = ["BackfillResult", "HashFailure", "backfill_hashes", "hash_file", "preprocess_of", "CHANGED"]
