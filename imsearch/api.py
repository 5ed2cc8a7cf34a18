"""The library API that the CLI and the web page both stand on: open a database, ingest, find."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence, Union

import numpy as np
import psycopg
from PIL import Image

from . import search
from .audit import calibration, findings
from .audit.calibration import DUPLICATE, SAMPLE, Calibration, duplicate_distance
from .audit.findings import Audit, DuplicateGroup, stored_model
from .db import indexes
from .db.connect import connect, redact
from .db.embedded import database_url
from .db.errors import translated
from .db.hashes import BackfillResult, backfill_hashes
from .db.migrate import LOCK_TIMEOUT, upgrade
from .db.sqlaccess import Reader, grant_reader
from .db.store import Store, ensure_schema, stored_paths
from .errors import BadImage, DatabaseUnavailable, ImsearchError, UnknownClass
from .evaluation.metrics import Evaluation, score
from .evaluation.queries import evaluation_folder, find_queries
from .files import sha256_bytes
from .ingest import DEFAULT_BATCH_SIZE, IngestResult, Progress, PruneResult, ingest, prune
from .model import pixels
from .model.embed import Model
from .model.pixels import PREPROCESSING
from .model.runtimes import get_model
from .modes import MODES, check_search
from .search import Match
from .settings import Settings, server_log
from .timing import done, phase

log = logging.getLogger(__name__)

Query = Union[str, Path, bytes, Image.Image]


@dataclass(frozen=True)
class FindResult:
    """The ranked matches for one query in one mode."""

    query: str
    query_class: str | None
    mode: str
    matches: tuple[Match, ...]
    class_source: str | None = None  # given, stored copy, folder, top match (the page shows it)

    def to_json(self) -> dict[str, Any]:
        return {
            "query": self.query,
            "query_class": self.query_class,
            "mode": self.mode,
            "matches": [
                {"rank": m.rank, "id": m.id, "path": m.path, "class": m.cls, "distance": round(m.distance, 6)}
                for m in self.matches
            ],
        }


@dataclass(frozen=True)
class Embedded:
    """A query turned into a vector, with what identifies its content and suggests its class."""

    name: str
    vector: np.ndarray
    sha256: str | None
    folder: str | None


def _limit(value: float | str | None) -> float | str | None:
    """A max_distance checked: None, a cosine distance (from a number or its text), or the name DUPLICATE."""
    if isinstance(value, str):
        if value.strip() == DUPLICATE:
            return DUPLICATE
        try:
            value = float(value)
        except ValueError:
            raise ImsearchError(f"max_distance must be a cosine distance or {DUPLICATE!r}, not {value!r}") from None
    return None if value is None else search.check_max_distance(value)


@dataclass(frozen=True)
class Upgraded:
    """What `imsearch db upgrade` did: the database (its URL without a password), the revision reached, and a note
    when the server's cache is too small for the indexes."""

    where: str
    revision: str
    cache_note: str | None


class Imsearch:
    """One database and one model. Opens both lazily; safe to share between threads for `find`: every use of the
    shared connection holds `_lock`.

    Lock order: `_lock`, then the model cache's lock (imsearch.model.runtimes), never the reverse. A method may ask
    for the model while it holds `_lock`; the int8 calibration, which runtimes calls under its lock, therefore
    takes no `_lock` and reads the stored paths on a connection of its own (`_calibration`).
    """

    def __init__(
        self,
        database_url: str | None = None,
        *,
        weights: str | None = None,
        device: str = "auto",
        precision: str = "auto",
        preprocess: str = "recipe",
        backend: str | None = None,
    ) -> None:
        self.settings = Settings.from_env(database_url=database_url, weights=weights, backend=backend)
        self.device = device
        self.precision = precision
        if preprocess not in PREPROCESSING:
            raise ImsearchError(f"unknown preprocessing {preprocess!r}; use one of {', '.join(PREPROCESSING)}")
        self.prep = PREPROCESSING[preprocess]
        self._store: Store | None = None
        self._url: str | None = None  # the URL last opened, which `_calibration` reads without `_lock`
        self._lock = threading.RLock()
        self._model_loading: threading.Thread | None = None

    # -- resources -----------------------------------------------------------------------------------------

    def database_url(self) -> str:
        """The URL this library connects to: DATABASE_URL, else the embedded server's, which this starts."""
        url = database_url(self.settings)
        self._url = url
        return url

    @property
    def store(self) -> Store:
        """The open store; a connection the server closed (a restart, a terminated backend, a killed server) is
        replaced here, so that a long-lived user such as the web page recovers at its next request."""
        with self._lock:
            if self._store is None:
                url, log_path = self.database_url(), server_log(self.settings)
                # imsearch alone uses the embedded database: it is migrated as soon as imsearch is updated
                ensure_schema(url, log_path, upgrade_older=self.settings.database_url is None)
                self._store = Store(url, server_log=log_path)
            elif not self._store.alive():
                self._reconnect(self._store)
            return self._store

    def _reconnect(self, store: Store) -> None:
        """A new connection for the store. The embedded server is started again first when it no longer answers
        (its postmaster was killed): a server of one's own (DATABASE_URL) is its owner's to restart."""
        try:
            store.reconnect()
        except DatabaseUnavailable:
            if self.settings.database_url is not None:
                raise
            log.warning("the embedded PostgreSQL does not answer; starting it again")
            store.url = self.database_url()  # its socket's folder may be a new one
            store.reconnect()

    @property
    def embedder(self) -> Model:
        """The model, on the runtime `backend` picks (imsearch.model.runtimes); loaded once per process."""
        return get_model(self.settings.weights, device=self.device, precision=self.precision, prep=self.prep,
                         backend=self.settings.backend, calibration=self._calibration)

    def _calibration(self, n: int) -> np.ndarray:
        """Up to n stored photos, spread over the library, as model input: what an int8 export is calibrated on.

        Runtimes calls it under its model lock, while another thread may hold `_lock` and wait for the model: so it
        takes no `_lock`, and reads the paths on a connection of its own (see the class's lock order).
        """
        stored = stored_paths(self._url or self.database_url())
        arrays = []
        for path in stored[:: max(1, len(stored) // n)][:n]:
            try:
                arrays.append(pixels.load(pixels.read_file(Path(path)), path, self.prep).pixels)
            except BadImage:
                continue  # moved or changed since it was stored: the others calibrate
        return np.stack(arrays) if arrays else np.empty((0,))

    def _load_model_meanwhile(self) -> None:
        """Load the model in a thread while the database starts: one waits on files and ONNX Runtime, the other on
        the server, so a cold find takes the longer of the two rather than their sum. Errors surface where the
        model is used."""
        with self._lock:
            if self._model_loading is None:
                self._model_loading = threading.Thread(target=self._try_model, name="imsearch-model")
                self._model_loading.start()

    def _try_model(self) -> None:
        with contextlib.suppress(ImsearchError):
            _ = self.embedder

    def close(self) -> None:
        with self._lock:
            if self._store is not None:
                self._store.close()
                self._store = None

    def __enter__(self) -> Imsearch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the database --------------------------------------------------------------------------------------------

    def upgrade(self, *, lock_timeout: float | None = LOCK_TIMEOUT) -> Upgraded:
        """Create or migrate the schema to this imsearch's revision, waiting up to `lock_timeout` seconds (None: for
        ever) for another session's migration; whatever the database is (`imsearch db upgrade`)."""
        url = self.database_url()
        revision = upgrade(url, server_log(self.settings), lock_timeout=lock_timeout)
        with self._lock:
            return Upgraded(redact(url), revision, indexes.cache_shortfall(self.store.conn))

    def grant_reader(self, name: str, password: str | None = None) -> Reader:
        """Create or update a read-only login role for BI tools (imsearch.db.sqlaccess)."""
        with self._lock:
            return grant_reader(self.store.conn, name, password)

    def backfill_hashes(self, *, workers: int | None = None, progress: Progress | None = None) -> BackfillResult:
        """Perceptual hashes for rows stored before imsearch hashed images (imsearch.db.hashes); no model."""
        with self._lock:
            return backfill_hashes(self.store, workers=workers, progress=progress)

    # -- ingest --------------------------------------------------------------------------------------------

    def ingest(
        self,
        root: str | Path,
        *,
        batch_size: int = DEFAULT_BATCH_SIZE,
        workers: int | None = None,
        prune: bool = False,
        reembed: bool = False,
        progress: Progress | None = None,
        stop: threading.Event | None = None,
    ) -> IngestResult:
        """Store every image under root; see `imsearch.ingest.ingest`."""
        with self._lock:
            result = ingest(self.store, self.embedder, Path(root), batch_size=batch_size, workers=workers,
                            prune=prune, reembed=reembed, progress=progress, stop=stop)
            if not result.interrupted:
                # A class past the exact-scan size gets its own HNSW index (see imsearch/search/__init__.py).
                indexes.ensure_class_indexes(self.store, search.EXACT_MAX_ROWS)
            return result

    def prune(self, *, dry_run: bool = False, gone_roots: bool = False) -> PruneResult:
        """Drop the rows of photos that are gone anywhere in the library; see `imsearch.ingest.prune`."""
        with self._lock:
            return prune(self.store, dry_run=dry_run, gone_roots=gone_roots)

    def index_other_classes(self, drop: bool = False) -> list[str]:
        """Give every class an HNSW index over all the other classes, so that mode other is one index search
        rather than one per class (migration 0005; its cost is in docs/scaling.md); returns the classes indexed
        now. Ingest keeps them complete from then on. With `drop`, remove them all instead."""
        with self._lock:
            if drop:
                indexes.drop_other_indexes(self.store.conn)
                return []
            return indexes.ensure_other_indexes(self.store, search.EXACT_MAX_ROWS)

    def check_other_indexes(self, *, sample: int = 50, k: int = 5) -> float | None:
        """Recall@k of mode other through the other-class indexes against an exact scan, on up to `sample` stored
        photos; None without such indexes (imsearch.db.indexes.other_recall)."""
        with self._lock:
            return indexes.other_recall(self.store, sample=sample, k=k)

    def other_indexes(self) -> list[tuple[str, int]]:
        """The other-class indexes with their sizes in bytes."""
        with self._lock:
            return indexes.other_indexes(self.store.conn)

    # -- find ----------------------------------------------------------------------------------------------

    def embed(
        self, queries: Sequence[Query], *, names: Sequence[str] | None = None, max_decode_pixels: int | None = None
    ) -> list[Embedded]:
        """Queries (paths, bytes or PIL images) -> vectors, in one batch through the model.

        `max_decode_pixels` refuses files whose decode would hold more pixels (the web page's uploads).
        """
        loaded: list[tuple[str, np.ndarray, str | None, str | None]] = []
        started = time.perf_counter()
        for i, q in enumerate(queries):
            name = names[i] if names else None
            if isinstance(q, Image.Image):
                arr = pixels.prepare(pixels.to_rgb(q), self.prep)
                loaded.append((name or "<image>", arr, None, None))
                continue
            if isinstance(q, (str, Path)):
                path = Path(q).expanduser()
                data = pixels.read_file(path)
                name = name or str(path)
                folder = path.resolve().parent.name
            else:
                data, name, folder = q, name or "<upload>", None
            arr = pixels.load(data, name, self.prep, max_decode_pixels=max_decode_pixels).pixels
            loaded.append((name, arr, sha256_bytes(data), folder))
        done("decode", started)
        if not loaded:
            return []
        model = self.embedder
        with phase("embed"):
            vectors = model.embed(np.stack([a for _, a, _, _ in loaded]))
        return [Embedded(n, v, s, f) for (n, _, s, f), v in zip(loaded, vectors)]

    def query_class(self, query: Embedded, given: str | None = None) -> str | None:
        """The query's class: as given, else a stored image with the same bytes, else its folder if stored. Part of
        the library API for callers that embed and search in steps; `search` and `find` infer it the same way."""
        return self._class_and_source(query, given)[0]

    def _class_and_source(self, query: Embedded, given: str | None) -> tuple[str | None, str | None]:
        if given:
            return given, "given"
        with self._lock:
            store = self.store
            if query.sha256:
                cls = store.class_of_content(query.sha256)
                if cls is not None:
                    return cls, "stored copy"
            if query.folder and store.count(query.folder) > 0:
                return query.folder, "folder"
        return None, None

    def search(
        self,
        query: Embedded,
        mode: str = "all",
        *,
        k: int = 5,
        query_class: str | None = None,
        include_self: bool = False,
        exact: bool = False,
        class_from_top_match: bool = False,
        max_distance: float | str | None = None,
    ) -> FindResult:
        """Rank the stored images against one embedded query in one mode.

        The class modes need the query's class: as given, else a stored copy's, else its folder's; with
        `class_from_top_match` (an upload has no folder), else the class of the top match over all images.
        `max_distance` drops the matches farther away, after ranking (see `max_distance`).
        """
        limit = self.max_distance(max_distance)
        return self._search(query, mode, k=k, query_class=query_class, include_self=include_self, exact=exact,
                            class_from_top_match=class_from_top_match, max_distance=limit)

    def max_distance(self, value: float | str | None) -> float | None:
        """A cosine distance beyond which matches are dropped, from a number, its text, or the name DUPLICATE:
        the duplicate distance calibrated for the model in use (NotCalibrated when there is none). None: no
        limit. Resolved once per call of search or find, not per query."""
        limit = _limit(value)
        if not isinstance(limit, str):
            return limit
        identity = self.embedder.identity  # before the lock: loading the model may need the database (int8)
        with self._lock:
            return duplicate_distance(self.store.conn, identity)

    def _search(self, query: Embedded, mode: str, *, k: int, query_class: str | None, include_self: bool,
                exact: bool, class_from_top_match: bool = False, max_distance: float | None = None) -> FindResult:
        """`search` with max_distance resolved once (`max_distance`): one call of imsearch_search, which plans."""
        check_search(mode, k)
        identity = self.embedder.identity  # before the lock: loading the model may need the database (int8)
        with self._lock:
            store = self.store
            store.check_model(identity, action="search")
            cls, source = self._class_and_source(query, query_class)
            if cls is None and mode != "all" and class_from_top_match:
                top = self._search(query, "all", k=1, query_class=None, include_self=include_self, exact=exact)
                if top.matches and top.matches[0].cls is not None:
                    cls, source = top.matches[0].cls, "top match"
            if cls is None and mode != "all":
                raise UnknownClass(f"{query.name}: cannot tell the query's class for mode {mode!r}; pass --class "
                                   f"NAME, or pick one on the page (stored classes: {self._stored_classes()})")
            unknown = {search.UNKNOWN_CLASS_SQLSTATE: lambda: UnknownClass(
                f"{query.name}: class {cls!r} is not stored (stored classes: {self._stored_classes()})")}
            with translated("searching", store, refusals=unknown):
                matches = search.run(store.conn, query.vector, mode, k=k, cls=cls,
                                     skip_sha=None if include_self else query.sha256, max_distance=max_distance,
                                     exact=exact)
        return FindResult(query.name, cls, mode, tuple(matches), class_source=source)

    def _stored_classes(self) -> str:
        return ", ".join(sorted(c for c, _ in self.store.classes())) or "none stored"

    def find(
        self,
        queries: Query | Sequence[Query],
        mode: str = "all",
        *,
        k: int = 5,
        query_class: str | None = None,
        include_self: bool = False,
        exact: bool = False,
        names: Sequence[str] | None = None,
        max_distance: float | str | None = None,
    ) -> list[FindResult]:
        """The k closest stored images for each query (path, bytes or PIL image), in one mode; with
        `max_distance`, less those farther away (see `max_distance`), so a query may get fewer than k."""
        if isinstance(queries, (str, Path, bytes, Image.Image)):
            queries = [queries]
        _limit(max_distance)  # a bad value fails before the model loads
        self._load_model_meanwhile()
        with phase("database"), self._lock:
            _ = self.store  # the database first: a wrong URL fails before the model is used
            if log.isEnabledFor(logging.DEBUG) and (note := indexes.cache_shortfall(self.store.conn)) is not None:
                log.debug(note)
        embedded = self.embed(list(queries), names=names)
        with phase("search"):
            limit = self.max_distance(max_distance)  # after embed: the name needs the model's identity
            return [
                self._search(e, mode, k=k, query_class=query_class, include_self=include_self, exact=exact,
                             max_distance=limit)
                for e in embedded
            ]

    def classes(self) -> list[tuple[str, int]]:
        """Stored classes and their image counts."""
        with self._lock:
            return self.store.classes()

    def count(self) -> int:
        """How many images are stored."""
        with self._lock:
            return self.store.count()

    def image(self, image_id: int) -> dict[str, Any] | None:
        """One stored row by id (path, class, sha256, size), None when no such row: what the web page may serve."""
        with self._lock:
            return self.store.get(image_id)

    # -- evaluate ------------------------------------------------------------------------------------------

    def evaluate(
        self,
        testdir: str | Path,
        modes: Sequence[str] = MODES,
        *,
        k: int = 5,
        batch_size: int = DEFAULT_BATCH_SIZE,
        exact: bool = False,
        progress: Progress | None = None,
    ) -> Evaluation:
        """Search every image under testdir (class = its first-level sub-folder) in each mode, and score it.

        The model loads once and the queries are embedded in batches. Images of a class that is not stored are
        counted in `unstored` and left out of the figures; unreadable files and files outside a class folder are
        listed in `skipped`.
        """
        started = time.perf_counter()
        for mode in modes:
            check_search(mode, k)
        evaluation_folder(testdir)  # before the database: a wrong path fails first
        counts = dict(self.classes())
        found = find_queries(testdir, counts)
        queries, skipped = found.files, list(found.skipped)  # files that fail to decode join `skipped`
        results: list[FindResult] = []
        for start in range(0, len(queries), batch_size):
            batch = queries[start:start + batch_size]
            for f, e in zip(batch, self._embed_each([f.path for f in batch], skipped)):
                if e is not None:
                    results += [self._search(e, mode, k=k, query_class=f.cls, include_self=False, exact=exact)
                                for mode in modes]
            if progress:
                progress(start + len(batch), len(queries))
        return score(results, k=k, stored=counts, model=self.embedder.identity, unstored=found.unstored,
                     skipped=skipped, seconds=time.perf_counter() - started)

    def _embed_each(self, paths: Sequence[Path], failed: list[tuple[str, str]]) -> list[Embedded | None]:
        """Embed a batch; when a file in it is bad, embed one by one so the others still count."""
        try:
            return list(self.embed(list(paths)))
        except BadImage:
            pass
        out: list[Embedded | None] = []
        for path in paths:
            try:
                out.append(self.embed([path])[0])
            except BadImage as exc:
                failed.append((exc.path, exc.reason))
                out.append(None)
        return out



    # -- audit ---------------------------------------------------------------------------------------------

    def calibrate(self, *, sample: int = SAMPLE, progress: Progress | None = None) -> Calibration:
        """Measure and store the duplicate calibration of the stored rows' model (imsearch.audit.calibration).

        The model loads only when stored files can be read: rows alone calibrate the hash's fallback only.
        """
        with self._lock:
            return self._calibrate(stored_model(self.store.conn), sample, progress)

    def set_calibration(self, *, distance: float | None = None, hash_bits: int | None = None,
                        clear: bool = False) -> Calibration:
        """Override (or with `clear`, stop overriding) the calibrated duplicate distance and hash threshold."""
        with self._lock:
            model = stored_model(self.store.conn)
            calibration.override(self.store.conn, model, distance=distance, hash_bits=hash_bits, clear=clear)
            return calibration.load(self.store.conn, model)  # type: ignore[return-value]

    def audit(self, *, k: int = findings.K, recalibrate: bool = False, duplicate_distance: float | None = None,
              hash_bits: int | None = None, progress: Progress | None = None,
              calibrating: Progress | None = None) -> Audit:
        """Audit every stored image (imsearch.audit.findings) and replace the image_audit table with the findings.

        Calibrates first when the model was never calibrated (or with `recalibrate`); `duplicate_distance` and
        `hash_bits` override the calibration for this audit only.
        """
        with self._lock:
            measured = self._thresholds(recalibrate, duplicate_distance, hash_bits, calibrating)
            conn = self.store.conn
            result = findings.audit(conn, measured, k=k, progress=progress, files_readable=measured.sample > 0,
                                    connect=self._connector(), same_class=self._same_class())
            findings.write(conn, result)
            return result

    def duplicates(self, *, distance: float | None = None, hash_bits: int | None = None,
                   progress: Progress | None = None, calibrating: Progress | None = None
                   ) -> tuple[list[DuplicateGroup], Calibration]:
        """Groups of stored copies by the audit's copy rule, and the thresholds used (calibrated first if needed)."""
        with self._lock:
            used = self._thresholds(False, distance, hash_bits, calibrating)
            return findings.duplicate_groups(self.store.conn, used, progress, self._connector()), used

    def _connector(self) -> Callable[[], psycopg.Connection[Any]]:
        """Opens more connections to this database, for work on several at once (the audit's pass); it does not
        touch `self`, so threads may call it while the caller holds `_lock`."""
        url = self.store.url
        return lambda: connect(url)

    def _same_class(self) -> Callable[[np.ndarray, str, str, int], list[tuple[int, float]]]:
        """Mode same for stored vectors, as find searches: what the audit searches its suspects again with."""
        store = self.store

        def run(vector: np.ndarray, cls: str, sha: str, k: int) -> list[tuple[int, float]]:
            return [(m.id, m.distance) for m in search.run(store.conn, vector, "same", k=k, cls=cls, skip_sha=sha)]
        return run

    def _thresholds(self, recalibrate: bool, distance: float | None, hash_bits: int | None,
                    progress: Progress | None) -> Calibration:
        """The stored rows' calibration (measured now if missing, or with `recalibrate`), with one-off overrides."""
        calibration.check(distance, hash_bits)
        conn = self.store.conn
        model = stored_model(conn)
        measured = None if recalibrate else calibration.load(conn, model)
        if measured is None or measured.sample == 0:  # none, or none from files: they may be readable now
            measured = self._calibrate(model, SAMPLE, progress)
        if distance is not None:
            measured = dataclasses.replace(measured, override_distance=distance)
        if hash_bits is not None:
            measured = dataclasses.replace(measured, override_hash_bits=hash_bits)
        return measured

    def _calibrate(self, model: str, sample: int, progress: Progress | None) -> Calibration:
        def loaded() -> Model:
            self.store.check_model(self.embedder.identity, action="calibration")
            return self.embedder

        measured = calibration.measure(self.store.conn, model, self.prep, loaded, sample=sample, progress=progress)
        calibration.save(self.store.conn, measured)
        return calibration.load(self.store.conn, model) or measured
