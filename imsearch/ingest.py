"""Ingest: files -> pixels -> vectors -> rows, with decoding overlapped with the model and memory bounded.

Worker threads read, hash and decode files (Pillow and hashlib release the GIL) while the calling thread runs
the model on full batches and writes each batch in one transaction. At most a few batches are in flight, so
memory does not grow with the folder. An interrupted run keeps every batch it committed.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Generator

import numpy as np

from .db.store import Row, Store
from .errors import BadImage, ImsearchError
from .files import ImageFile, sha256_bytes, vanished, walk
from .model import pixels
from .model.embed import Model
from .vectors import DIMENSIONS
from .workers import default_workers, in_order

if TYPE_CHECKING:
    import pyarrow as pa

    from .mapper import Runner

log = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 32


@dataclass(frozen=True)
class Failure:
    """A file that was not stored, and why."""

    path: str
    error: str


@dataclass(frozen=True)
class IngestResult:
    """What one ingest did. `failed` lists every file not stored, with its reason.

    `updated` rows were re-embedded; `moved` rows took the new path of their file (same bytes, old path gone),
    keeping their id and vector; `reclassified` rows only changed class; `kept_classes` rows kept the class an
    ingest of a parent folder gave them rather than the one this folder would give (see `effective_class`).
    """

    added: int = 0
    updated: int = 0
    skipped: int = 0
    failed: tuple[Failure, ...] = ()
    seconds: float = 0.0
    missing: tuple[str, ...] = ()
    pruned: int = 0
    interrupted: bool = False
    moved: int = 0
    reclassified: int = 0
    kept_classes: int = 0

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
            "moved": self.moved,
            "reclassified": self.reclassified,
            "kept_classes": self.kept_classes,
        }


@dataclass
class _Prepared:
    file: ImageFile
    sha256: str
    size: int
    loaded: pixels.Loaded | None  # None: not decoded (unchanged, a new class only, or bytes already stored)
    action: str = "embed"  # embed | skip | reclassify | same-bytes (a stored photo moved or copied here)


@dataclass
class _Tally:
    added: int = 0
    updated: int = 0
    skipped: int = 0
    moved: int = 0
    reclassified: int = 0
    failed: list[Failure] = field(default_factory=list)
    moved_from: set[str] = field(default_factory=set)


Progress = Callable[[int, int], None]


def ingest(
    store: Store,
    embedder: Model | None,
    root: Path,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    workers: int | None = None,
    prune: bool = False,
    reembed: bool = False,
    progress: Progress | None = None,
    stop: threading.Event | None = None,
    runner: Runner | None = None,
) -> IngestResult:
    """Store every image under root (class = first-level sub-folder); skip unchanged files, re-embed changed ones.

    The stages: walk the folder, decode in worker threads (skipping unchanged files before decoding), embed and
    write each full batch in one transaction, and at the end report (or prune) rows whose files vanished.

    With a `runner` (a Ray cluster's, imsearch.cluster) this process only walks and hashes: the files to embed go
    to the runner's mappers, and their batches come back here to be written, so no row is written twice or half.
    """
    started = time.perf_counter()
    root = checked_root(root, prune)
    if runner is not None:
        identity = runner.spec.identity
    elif embedder is not None:
        identity = embedder.identity
    else:
        raise ValueError("ingest needs a model or a runner")
    if not reembed:
        store.check_model(identity, action="ingest")
    files, known, tally, kept = _walk(store, root, identity, reembed)
    if prune and known and not any(f.path.is_relative_to(root) for f in files):
        raise ImsearchError(
            f"{root}: holds no image, yet {len(known)} stored photo(s) lie under it (a drive not mounted?); nothing "
            "was pruned. If they were deleted on purpose, `imsearch prune --gone-roots` drops their rows")
    present = {str(f.path) for f in files}
    outside = present - known.keys()  # new paths, and with `reembed` rows of another model outside root
    hashes = store.hashes(identity) if outside else set()

    def prepare(f: ImageFile) -> _Prepared:
        stored = known.get(str(f.path))
        if runner is not None and stored is None and not (hashes and f.path.is_relative_to(root)):
            return _Prepared(f, "", 0, None)  # a new file no stored row can match: the runner hashes it
        data = pixels.read_file(f.path)
        sha = sha256_bytes(data)
        if stored is not None and stored[:2] == (sha, identity):
            return _Prepared(f, sha, len(data), None, "skip" if stored[2] == f.cls else "reclassify")
        if stored is None and sha in hashes and f.path.is_relative_to(root):
            return _Prepared(f, sha, len(data), None, "same-bytes")
        if embedder is None:
            return _Prepared(f, sha, len(data), None)
        return _Prepared(f, sha, len(data), pixels.load(data, str(f.path), embedder.prep))

    batch: list[_Prepared] = []
    classes: list[tuple[str, str | None]] = []
    to_map: list[tuple[str, str | None]] = []  # with a runner: the files it embeds
    interrupted = False
    workers = workers or default_workers()
    with contextlib.closing(_decoded(files, prepare, workers, max(2 * batch_size, 4 * workers))) as decoded:
        for done, item in enumerate(decoded, start=1):
            if isinstance(item, BadImage):
                tally.failed.append(Failure(item.path, item.reason))
                log.info("%s", item)
            elif item.action == "skip":
                tally.skipped += 1
            elif item.action == "reclassify":
                classes.append((str(item.file.path), item.file.cls))
            elif item.action == "same-bytes":
                _same_bytes(store, embedder, identity, root, item, present, batch, tally)
            else:
                batch.append(item)
            if runner is not None:
                to_map += [(str(p.file.path), p.file.cls) for p in batch]
                batch = []
            if len(batch) >= batch_size or len(classes) >= batch_size:
                _write(store, embedder, identity, batch, tally)
                tally.reclassified += store.set_classes(classes)
                batch, classes = [], []
            if progress and runner is None:
                progress(done, len(files))
            if stop is not None and stop.is_set():
                interrupted = True
                break
    _write(store, embedder, identity, batch, tally)
    tally.reclassified += store.set_classes(classes)
    if runner is not None and not interrupted:
        interrupted = _mapped(store, runner, identity, to_map, batch_size, tally, len(files) - len(to_map),
                              len(files), progress, stop)

    missing: tuple[str, ...] = ()
    pruned = 0
    if not interrupted:
        missing = tuple(sorted(p for p in known if p not in present and p not in tally.moved_from and vanished(p)))
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
        moved=tally.moved,
        reclassified=tally.reclassified,
        kept_classes=kept,
    )


def checked_root(root: Path, prune: bool = False) -> Path:
    """The folder to ingest, resolved; one that is not there refused in one line."""
    root = Path(root).expanduser()
    if not root.is_dir():
        if root.exists() or not prune:
            raise ImsearchError(f"{root}: {'not a folder' if root.exists() else 'no such folder'}")
        raise ImsearchError(f"{root}: no such folder, so nothing under it can be pruned; `imsearch prune` drops "
                            "the rows of photos that are gone anywhere in the library (a moved or deleted folder)")
    return root.resolve()


def _mapped(store: Store, runner: Runner, identity: str, files: list[tuple[str, str | None]], batch_size: int,
            tally: _Tally, done: int, total: int, progress: Progress | None, stop: threading.Event | None) -> bool:
    """Write the runner's batches as they come back, each in one transaction; True when `stop` cut it short."""
    with contextlib.closing(runner.map(files, batch_size)) as batches:
        for table in batches:
            rows, failures = rows_of(table, identity)
            tally.failed += failures
            added, updated = store.upsert(rows) if rows else (0, 0)
            tally.added += added
            tally.updated += updated
            done += table.num_rows
            if progress:
                progress(done, total)
            if stop is not None and stop.is_set():
                return True
    return False


def ingest_to_parquet(runner: Runner, root: Path, folder: Path, *, batch_size: int = DEFAULT_BATCH_SIZE,
                      progress: Progress | None = None, stop: threading.Event | None = None) -> IngestResult:
    """Embed every image under root (class = first-level sub-folder) into part files in `folder`, in the format
    `imsearch load` reads (imsearch.bulk.Parts), touching no database: every file is embedded, and a load of the
    parts into a library adds, updates or skips each row as an ingest would have."""
    from .bulk import Parts

    started = time.perf_counter()
    root = checked_root(root)
    problems: list = []
    files = [(str(f.path), f.cls) for f in walk(root, problems)]
    failed = [Failure(p.path, p.reason) for p in problems]
    added, interrupted = 0, False
    with Parts(folder, runner.spec.identity) as parts, \
            contextlib.closing(runner.map(files, batch_size)) as batches:
        for table in batches:
            failed += failures_of(table)
            added += parts.write(table)
            if progress:
                progress(len(failed) + added, len(files) + len(problems))
            if stop is not None and stop.is_set():
                interrupted = True
                break
    return IngestResult(added=added, failed=tuple(failed), seconds=time.perf_counter() - started,
                        interrupted=interrupted)


def failures_of(table: pa.Table) -> list[Failure]:
    """The files of a mapper batch (imsearch.mapper.OUTPUT) that were not embedded, with the mapper's reason."""
    errors = table.column("error").to_pylist()
    failed = [Failure(path, error) for path, error in zip(table.column("path").to_pylist(), errors) if error]
    for f in failed:
        log.info("%s: %s", f.path, f.error)
    return failed


def rows_of(table: pa.Table, identity: str) -> tuple[list[Row], list[Failure]]:
    """A mapper batch (imsearch.mapper.OUTPUT) as rows for the store, and the files it could not embed."""
    columns = {name: table.column(name).to_pylist() for name in table.column_names if name != "embedding"}
    vectors = embeddings(table)
    rows = [
        Row(path, columns["class"][i], columns["sha256"][i], columns["width"][i], columns["height"][i],
            columns["bytes"][i], identity, vectors[i], None if bits is None else int(bits, 2))
        for i, (path, bits) in enumerate(zip(columns["path"], columns["phash"])) if columns["error"][i] is None
    ]
    return rows, failures_of(table)


def embeddings(table: pa.Table) -> np.ndarray:
    """The embedding column of a mapper batch as one float32 matrix, from the Arrow buffers."""
    import pyarrow as pa

    column = table.column("embedding").combine_chunks()
    if isinstance(column.type, pa.ExtensionType):  # a tensor column, as Ray Data may hand it back
        return np.asarray(column.to_numpy_ndarray(), np.float32)  # type: ignore[attr-defined]
    return column.flatten().to_numpy(zero_copy_only=False).reshape(len(column), DIMENSIONS).astype(np.float32)


def effective_class(stored: str | None, walked: str | None, root: Path) -> str | None:
    """The class a stored photo gets from an ingest of root: the walked one (its first-level folder under root),
    unless the stored class names root or a folder above it. Such a class came from an ingest of a parent folder
    (`ingest lib` gives lib/kitchen/x.jpg the class kitchen), and a later ingest of lib/kitchen keeps it."""
    if stored is not None and stored != walked and stored in root.parts[1:]:
        return stored
    return walked


def _walk(store: Store, root: Path, identity: str, reembed: bool
          ) -> tuple[list[ImageFile], dict[str, tuple[str, str, str | None]], _Tally, int]:
    """The files to look at, each with the class it will be stored with (with `reembed`, also stored rows of
    other models outside root), what is stored under root, a tally holding the folders and links the walk could
    not follow, and how many photos keep a class given by an ingest of a parent folder."""
    problems: list = []
    walked = list(walk(root, problems))
    tally = _Tally(failed=[Failure(p.path, p.reason) for p in problems])
    known = store.known(root)
    files: list[ImageFile] = []
    kept = 0
    for f in walked:
        stored = known.get(str(f.path))
        cls = f.cls if stored is None else effective_class(stored[2], f.cls, root)
        kept += cls != f.cls
        files.append(f if cls == f.cls else ImageFile(f.path, cls))
    if reembed:
        seen = {str(f.path) for f in files}
        files += [ImageFile(Path(path), cls) for path, cls in store.other_model_rows(identity) if path not in seen]
    return files, known, tally, kept


def _same_bytes(store: Store, embedder: Model | None, identity: str, root: Path, item: _Prepared, present: set[str],
                batch: list[_Prepared], tally: _Tally) -> None:
    """A new path holding bytes already stored: a stored photo whose file is gone has moved here (its row takes
    the path, keeping its id and vector); otherwise it is a copy, added with the stored vector."""
    path, cls = str(item.file.path), item.file.cls
    rows = store.with_hash(item.sha256, identity)
    for image_id, old, old_cls in rows:
        if old not in present and old not in tally.moved_from and vanished(old):
            store.move(image_id, path, effective_class(old_cls, cls, root))
            tally.moved_from.add(old)
            tally.moved += 1
            return
    if rows and store.copy_row(rows[0][0], path, cls):
        tally.added += 1
        return
    if embedder is None:  # the stored row went meanwhile: the runner embeds the file as any new one
        batch.append(item)
        return
    from .mapper import decode

    try:
        decoded = decode(path, embedder.prep)
        batch.append(_Prepared(item.file, decoded.sha256, decoded.size, decoded.loaded))
    except BadImage as exc:
        tally.failed.append(Failure(exc.path, exc.reason))


def _decoded(files: list[ImageFile], prepare: Callable[[ImageFile], _Prepared], workers: int, depth: int
             ) -> Generator[_Prepared | BadImage, None, None]:
    """Each file prepared by a worker thread, in order, at most `depth` in flight: memory stays flat however many
    files there are. Closing the generator cancels what has not started."""
    with contextlib.closing(in_order(prepare, files, workers=workers, depth=depth, name="imsearch-decode")) as done:
        for _, future in done:
            yield _outcome(future)


def _outcome(future: Future[_Prepared]) -> _Prepared | BadImage:
    try:
        return future.result()
    except BadImage as exc:
        return exc


def _write(store: Store, embedder: Model | None, identity: str, batch: list[_Prepared], tally: _Tally) -> None:
    """Embed one batch and write its rows in one transaction."""
    if not batch or embedder is None:
        return
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


@dataclass(frozen=True)
class PruneResult:
    """What a prune of the whole library found: the rows of vanished files (dropped unless `dry_run`), and the
    ingest roots none of whose files remain, whose rows were kept (a drive not mounted looks just like that)."""

    missing: tuple[str, ...] = ()
    pruned: int = 0
    refused: tuple[tuple[str, int], ...] = ()  # (ingest root, rows kept)
    dry_run: bool = False

    def to_json(self) -> dict[str, object]:
        return {
            "missing": list(self.missing),
            "pruned": self.pruned,
            "refused": [{"root": root, "rows": n} for root, n in self.refused],
            "dry_run": self.dry_run,
        }


def ingest_root(path: str, cls: str | None) -> str:
    """The folder a stored photo was ingested from: the one above its class folder (the deepest, should the
    class name repeat along the path), or its own folder when it has no class."""
    p = Path(path)
    folders = p.parts[:-1]
    if cls is not None:
        for i in range(len(folders) - 1, 0, -1):
            if folders[i] == cls:
                return str(Path(*folders[:i]))
    return str(p.parent)


def prune(store: Store, *, dry_run: bool = False, gone_roots: bool = False) -> PruneResult:
    """Drop the rows of photos whose files are gone, anywhere in the library.

    A file that exists but cannot be read is kept (`files.vanished`). An ingest root none of whose stored files
    remain is refused and its rows kept, unless `gone_roots`: an unmounted drive or a renamed library looks the
    same as a deleted one, and ingesting the renamed folder moves its rows instead.
    """
    totals: dict[str, int] = {}
    gone: dict[str, list[str]] = {}
    for path, cls in store.paths():
        root = ingest_root(path, cls)
        totals[root] = totals.get(root, 0) + 1
        if vanished(path):
            gone.setdefault(root, []).append(path)
    missing: list[str] = []
    refused: list[tuple[str, int]] = []
    for root, paths in sorted(gone.items()):
        if len(paths) == totals[root] and not gone_roots:
            refused.append((root, totals[root]))
        else:
            missing += paths
    pruned = 0 if dry_run or not missing else store.delete_paths(missing)
    return PruneResult(tuple(sorted(missing)), pruned, tuple(refused), dry_run)


__all__ = ["IngestResult", "PruneResult", "Failure", "ingest", "ingest_to_parquet", "prune", "effective_class",
           "ingest_root", "default_workers", "DEFAULT_BATCH_SIZE"]
