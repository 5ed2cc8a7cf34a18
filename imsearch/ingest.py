"""Ingest: files -> pixels -> vectors -> rows, with decoding overlapped with the model and memory bounded.

Worker threads read, hash and decode files (Pillow and hashlib release the GIL) while the calling thread runs
the model on full batches and writes each batch in one transaction. At most a few batches are in flight, so
memory does not grow with the folder. An interrupted run keeps every batch it committed.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .db.store import Row, Store
from .errors import BadImage, ImsearchError
from .files import ImageFile, sha256_bytes, vanished, walk
from .model import pixels
from .model.embed import Model

log = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 32


def default_workers() -> int:
    """Decoding threads: enough to keep the model fed without starving it of cores."""
    return max(2, min(8, (os.cpu_count() or 2)))


@dataclass(frozen=True)
class Failure:
    """A file that was not stored, and why."""

    path: str
    error: str


@dataclass(frozen=True)
class IngestResult:
    """What one ingest did. `failed` lists every file not stored, with its reason."""

    added: int = 0
    updated: int = 0
    skipped: int = 0
    failed: tuple[Failure, ...] = ()
    seconds: float = 0.0
    missing: tuple[str, ...] = ()
    pruned: int = 0
    interrupted: bool = False

    def to_json(self) -> dict[str, object]:
        return {
            "added": self.added,
            "updated": self.updated,
            "skipped": self.skipped,
            "failed": [{"path": f.path, "error": f.error} for f in self.failed],
            "seconds": round(self.seconds, 3),
            "missing": list(self.missing),
            "pruned": self.pruned,
            "interrupted": self.interrupted,
        }


@dataclass
class _Prepared:
    file: ImageFile
    sha256: str
    size: int
    loaded: pixels.Loaded | None  # None: unchanged, skipped before decoding


@dataclass
class _Tally:
    added: int = 0
    updated: int = 0
    skipped: int = 0
    failed: list[Failure] = field(default_factory=list)


Progress = Callable[[int, int], None]


def ingest(
    store: Store,
    embedder: Model,
    root: Path,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    workers: int | None = None,
    prune: bool = False,
    reembed: bool = False,
    progress: Progress | None = None,
    stop: threading.Event | None = None,
) -> IngestResult:
    """Store every image under root (class = first-level sub-folder); skip unchanged files, re-embed changed ones."""
    started = time.perf_counter()
    root = Path(root).expanduser()
    if not root.is_dir():
        raise ImsearchError(f"{root}: not a folder")
    root = root.resolve()
    identity = embedder.identity
    if not reembed:
        store.check_model(identity, action="ingest")

    problems: list = []
    files = list(walk(root, problems))
    tally = _Tally(failed=[Failure(p.path, p.reason) for p in problems])
    known = store.known(root)
    if reembed:
        seen = {str(f.path) for f in files}
        for path, cls in store.other_model_rows(identity):
            if path not in seen:
                files.append(ImageFile(Path(path), cls))

    def prepare(f: ImageFile) -> _Prepared:
        data = pixels.read_file(f.path)
        sha = sha256_bytes(data)
        if known.get(str(f.path)) == (sha, identity):
            return _Prepared(f, sha, len(data), None)
        return _Prepared(f, sha, len(data), pixels.load(data, str(f.path), embedder.prep))

    batch: list[_Prepared] = []
    done = 0

    def flush() -> None:
        if not batch:
            return
        import numpy as np

        vectors = embedder.embed(np.stack([p.loaded.pixels for p in batch if p.loaded is not None]))
        rows = [
            Row(str(p.file.path), p.file.cls, p.sha256, p.loaded.width, p.loaded.height, p.size, identity, v)
            for p, v in zip(batch, vectors)
            if p.loaded is not None
        ]
        added, updated = store.upsert(rows)
        tally.added += added
        tally.updated += updated
        batch.clear()

    interrupted = False
    workers = workers or default_workers()
    in_flight: deque[Future[_Prepared]] = deque()
    depth = max(2 * batch_size, 4 * workers)  # bounded queue: memory stays flat however many files there are
    pending = iter(files)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="imsearch-decode") as pool:
        exhausted = False
        while True:
            while not exhausted and len(in_flight) < depth:
                nxt = next(pending, None)
                if nxt is None:
                    exhausted = True
                else:
                    in_flight.append(pool.submit(prepare, nxt))
            if not in_flight:
                break
            fut = in_flight.popleft()
            try:
                item = fut.result()
            except BadImage as exc:
                tally.failed.append(Failure(exc.path, exc.reason))
                log.info("%s", exc)
            else:
                if item.loaded is None:
                    tally.skipped += 1
                else:
                    batch.append(item)
            done += 1
            if len(batch) >= batch_size:
                flush()
            if progress:
                progress(done, len(files))
            if stop is not None and stop.is_set():
                interrupted = True
                for f in in_flight:
                    f.cancel()
                break
        flush()

    missing: tuple[str, ...] = ()
    pruned = 0
    if not interrupted:
        present = {str(f.path) for f in files}
        missing = tuple(sorted(p for p in known if p not in present and vanished(p)))
        if prune and missing:
            pruned = store.delete_paths(missing)
    return IngestResult(
        added=tally.added,
        updated=tally.updated,
        skipped=tally.skipped,
        failed=tuple(tally.failed),
        seconds=time.perf_counter() - started,
        missing=missing,
        pruned=pruned,
        interrupted=interrupted,
    )


__all__ = ["IngestResult", "Failure", "ingest", "default_workers", "DEFAULT_BATCH_SIZE"]
