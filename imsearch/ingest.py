"""Ingest: files -> pixels -> vectors -> rows, with decoding overlapped with the model and memory bounded.

Worker threads read, hash and decode files (Pillow and hashlib release the GIL) while the calling thread runs
the model on full batches and writes each batch in one transaction. At most a few batches are in flight, so
memory does not grow with the folder. An interrupted run keeps every batch it committed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Generator

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
    """Store every image under root (class = first-level sub-folder); skip unchanged files, re-embed changed ones.

    The stages: walk the folder, decode in worker threads (skipping unchanged files before decoding), embed and
    write each full batch in one transaction, and at the end report (or prune) rows whose files vanished.
    """
    started = time.perf_counter()
    root = Path(root).expanduser()
    if not root.is_dir():
        raise ImsearchError(f"{root}: not a folder")
    root = root.resolve()
    identity = embedder.identity
    if not reembed:
        store.check_model(identity, action="ingest")
    files, known, tally = _walk(store, root, identity, reembed)

    def prepare(f: ImageFile) -> _Prepared:
        data = pixels.read_file(f.path)
        sha = sha256_bytes(data)
        if known.get(str(f.path)) == (sha, identity):
            return _Prepared(f, sha, len(data), None)
        return _Prepared(f, sha, len(data), pixels.load(data, str(f.path), embedder.prep))

    batch: list[_Prepared] = []
    interrupted = False
    workers = workers or default_workers()
    with contextlib.closing(_decoded(files, prepare, workers, max(2 * batch_size, 4 * workers))) as decoded:
        for done, item in enumerate(decoded, start=1):
            if isinstance(item, BadImage):
                tally.failed.append(Failure(item.path, item.reason))
                log.info("%s", item)
            elif item.loaded is None:
                tally.skipped += 1
            else:
                batch.append(item)
            if len(batch) >= batch_size:
                _write(store, embedder, identity, batch, tally)
                batch = []
            if progress:
                progress(done, len(files))
            if stop is not None and stop.is_set():
                interrupted = True
                break
    _write(store, embedder, identity, batch, tally)

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


def _walk(store: Store, root: Path, identity: str, reembed: bool
          ) -> tuple[list[ImageFile], dict[str, tuple[str, str]], _Tally]:
    """The files to look at (with `reembed`, also stored rows of other models outside root), what is stored
    under root, and a tally holding the folders and links the walk could not follow."""
    problems: list = []
    files = list(walk(root, problems))
    tally = _Tally(failed=[Failure(p.path, p.reason) for p in problems])
    known = store.known(root)
    if reembed:
        seen = {str(f.path) for f in files}
        files += [ImageFile(Path(path), cls) for path, cls in store.other_model_rows(identity) if path not in seen]
    return files, known, tally


def _decoded(files: list[ImageFile], prepare: Callable[[ImageFile], _Prepared], workers: int, depth: int
             ) -> Generator[_Prepared | BadImage, None, None]:
    """Each file prepared by a worker thread, in order, at most `depth` in flight: memory stays flat however many
    files there are. Closing the generator cancels what has not started."""
    in_flight: deque[Future[_Prepared]] = deque()
    pending = iter(files)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="imsearch-decode") as pool:
        try:
            for f in pending:
                in_flight.append(pool.submit(prepare, f))
                if len(in_flight) >= depth:
                    yield _outcome(in_flight.popleft())
            while in_flight:
                yield _outcome(in_flight.popleft())
        finally:
            for future in in_flight:
                future.cancel()


def _outcome(future: Future[_Prepared]) -> _Prepared | BadImage:
    try:
        return future.result()
    except BadImage as exc:
        return exc


def _write(store: Store, embedder: Model, identity: str, batch: list[_Prepared], tally: _Tally) -> None:
    """Embed one batch and write its rows in one transaction."""
    if not batch:
        return
    import numpy as np

    vectors = embedder.embed(np.stack([p.loaded.pixels for p in batch if p.loaded is not None]))
    rows = [
        Row(str(p.file.path), p.file.cls, p.sha256, p.loaded.width, p.loaded.height, p.size, identity, v,
            p.loaded.phash)
        for p, v in zip(batch, vectors)
        if p.loaded is not None
    ]
    added, updated = store.upsert(rows)
    tally.added += added
    tally.updated += updated


__all__ = ["IngestResult", "Failure", "ingest", "default_workers", "DEFAULT_BATCH_SIZE"]
