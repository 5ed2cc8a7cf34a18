"""The library API that the CLI and the web page both stand on: open a database, ingest, find.

A thin facade: each method takes the lock, calls one stage function (model.queries, search.find, db.indexes,
evaluation.run, audit.run) with the Store, and returns its plain result."""

from __future__ import annotations

import contextlib
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np
from PIL import Image

from . import search
from .audit import findings
from .audit import run as audit_stage
from .audit.calibration import SAMPLE, Calibration
from .audit.findings import Audit, DuplicateGroup
from .db import bulk as db_bulk
from .db import indexes, shards
from .db.connect import redact
from .db.embedded import database_url
from .db.hashes import BackfillResult, backfill_hashes
from .db.migrate import LOCK_TIMEOUT, upgrade
from .db.sqlaccess import Reader, grant_reader
from .db.store import Store, ensure_schema, stored_paths
from .errors import BadImage, DatabaseUnavailable, ImsearchError
from .evaluation import run as evaluation_stage
from .evaluation.metrics import Evaluation
from .ingest import DEFAULT_BATCH_SIZE, IngestResult, Progress, PruneResult, ingest, ingest_to_parquet, prune
from .model import pixels
from .model import queries as queries_stage
from .model.embed import Model
from .model.pixels import PREPROCESSING
from .model.queries import Embedded, Query
from .model.runtimes import get_model
from .modes import MODES, check_search
from .search import find as find_stage
from .search.find import FindResult
from .settings import Settings, server_log
from .timing import phase

if TYPE_CHECKING:
    from .bulk import ExportResult, LoadResult
    from .mapper import Runner

__all__ = ["Embedded", "FindResult", "Imsearch", "Query", "Upgraded"]

log = logging.getLogger(__name__)


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

    def upgrade(self, *, lock_timeout: float | None = LOCK_TIMEOUT,
                progress: Callable[[str, int, int], None] | None = None) -> Upgraded:
        """Create or migrate the schema to this imsearch's revision, waiting up to `lock_timeout` seconds (None: for
        ever) for another session's migration; whatever the database is (`imsearch db upgrade`). `progress(index,
        rows done, rows)` hears of the index builds a migration runs."""
        url = self.database_url()
        revision = upgrade(url, server_log(self.settings), lock_timeout=lock_timeout, progress=progress)
        with self._lock:
            # the classes today's rule gives an index of their own (since schema 0015, up to half the library)
            indexes.ensure_class_indexes(self.store, search.EXACT_MAX_ROWS)
            return Upgraded(redact(url), revision, indexes.cache_shortfall(self.store))

    def grant_reader(self, name: str, password: str | None = None) -> Reader:
        """Create or update a read-only login role for BI tools (imsearch.db.sqlaccess)."""
        with self._lock:
            return grant_reader(self.store, name, password)

    def backfill_hashes(self, *, workers: int | None = None, progress: Progress | None = None) -> BackfillResult:
        """Perceptual hashes for rows stored before imsearch hashed images (imsearch.db.hashes); no model."""
        with self._lock:
            return backfill_hashes(self.store, workers=workers, progress=progress)

    # -- shards --------------------------------------------------------------------------------------------

    def add_shards(self, urls: Sequence[str], *, rebalance: bool = False,
                   progress: Callable[[str, int, int], None] | None = None) -> shards.Relaid:
        """Spread the library over these servers too (imsearch.db.shards): each URL names an empty database, given
        imsearch's schema here; rows move to their shards. A new shard's graph is built once, after its rows are in."""
        with self._lock:
            shards.refuse_known(self.store.conn, urls)
        for url in urls:
            ensure_schema(url)
            Store(url).close()  # refuses another revision, a missing pgvector, another embedding width
            shards.check_shard(url)
        with self._lock:
            store = self.store
            homes = [Store(url) for url in urls]
            try:
                suspended = [(home, db_bulk.suspend_vector_indexes(home)) for home in homes]
                relaid = shards.add(store.conn, urls, rebalance=rebalance, progress=progress)
                for home, definitions in suspended:
                    db_bulk.restore_vector_indexes(home, definitions)
            finally:
                for home in homes:
                    home.close()
            store.sharded = True
            indexes.ensure_class_indexes(store, search.EXACT_MAX_ROWS)
            return relaid

    def remove_shard(self, url: str, *, progress: Callable[[str, int, int], None] | None = None) -> shards.Relaid:
        """Take a shard out of the library, its rows moved to the others first (imsearch.db.shards.remove)."""
        with self._lock:
            relaid = shards.remove(self.store.conn, url, progress=progress)
            indexes.ensure_class_indexes(self.store, search.EXACT_MAX_ROWS)
            return relaid

    def shards(self) -> list[shards.Shard]:
        """The library's shards with their rows; none for a library on one server."""
        with self._lock:
            return shards.shards(self.store.conn, count=True)

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
        ray: str | None = None,
        to_parquet: str | Path | None = None,
    ) -> IngestResult:
        """Store every image under root; see `imsearch.ingest.ingest`.

        `ray` (an address, `auto` or `local`) embeds on a Ray cluster (imsearch.cluster); `to_parquet` writes the
        rows to part files in that folder for `imsearch load` instead of the library (`ingest_to_parquet`)."""
        runner = self.runner(ray) if ray is not None or to_parquet is not None else None
        if to_parquet is not None and runner is not None:
            if prune or reembed:
                raise ImsearchError("--to-parquet writes part files, not the library: it takes no --prune or "
                                    "--reembed (load the parts, then ingest with those)")
            return ingest_to_parquet(runner, Path(root), Path(to_parquet), batch_size=batch_size, progress=progress,
                                     stop=stop)
        with self._lock:
            result = ingest(self.store, None if runner is not None else self.embedder, Path(root),
                            batch_size=batch_size, workers=workers, prune=prune, reembed=reembed, progress=progress,
                            stop=stop, runner=runner)
            if not result.interrupted:
                # A class past the exact-scan size gets its own HNSW index (see imsearch/search/__init__.py).
                indexes.ensure_class_indexes(self.store, search.EXACT_MAX_ROWS)
            return result

    def runner(self, ray: str | None = None) -> Runner:
        """What runs the mapper (decode and embed) for this library's model: a Ray cluster's actors (`ray`: an
        address, `auto` or `local`; needs the ray extra), else this process."""
        from .mapper import LocalRunner, ModelSpec  # pyarrow loads for ingests that map, not for every find

        spec = ModelSpec.of(self.settings.weights, device=self.device, precision=self.precision,
                            preprocess=self.prep.name, backend=self.settings.backend)
        if ray is None:
            return LocalRunner(spec)
        from .cluster import RayRunner  # ray loads only when a cluster is asked for

        return RayRunner(spec, ray)

    def export(self, file: str | Path, *, model: str | None = None,
               progress: Progress | None = None) -> ExportResult:
        """Write the stored rows of one model to a Parquet file; see `imsearch.bulk.export`. No model loads."""
        from . import bulk  # pyarrow loads for these two commands only, not for every find

        with self._lock:
            return bulk.export(self.store, Path(file), model=model, progress=progress)

    def load(self, files: Sequence[str | Path], *, model: str | None = None,
             progress: Progress | None = None) -> LoadResult:
        """Store the rows of Parquet files, all or nothing; see `imsearch.bulk.load`. No model loads."""
        from . import bulk

        with self._lock:
            result = bulk.load(self.store, [Path(f) for f in files], model=model, progress=progress)
            # As after an ingest: a class past the exact-scan size gets its own HNSW index.
            indexes.ensure_class_indexes(self.store, search.EXACT_MAX_ROWS)
            return result

    def prune(self, *, dry_run: bool = False, gone_roots: bool = False) -> PruneResult:
        """Drop the rows of photos that are gone anywhere in the library; see `imsearch.ingest.prune`."""
        with self._lock:
            return prune(self.store, dry_run=dry_run, gone_roots=gone_roots)

    def check_recall(self, *, sample: int = 50, k: int = 5) -> dict[str, float | None]:
        """Recall@k of each mode through the indexes against an exact scan, on up to `sample` stored photos
        (imsearch.db.indexes.index_recall)."""
        with self._lock:
            return indexes.index_recall(self.store, sample=sample, k=k)

    # -- find ----------------------------------------------------------------------------------------------

    def embed(
        self, queries: Sequence[Query], *, names: Sequence[str] | None = None, max_decode_pixels: int | None = None
    ) -> list[Embedded]:
        """Queries (paths, bytes or PIL images) -> vectors, in one batch through the model (imsearch.model.queries).

        `max_decode_pixels` refuses files whose decode would hold more pixels (the web page's uploads).
        """
        return queries_stage.embed(queries, self.prep, lambda: self.embedder, names=names,
                                   max_decode_pixels=max_decode_pixels)

    def query_class(self, query: Embedded, given: str | None = None) -> str | None:
        """The query's class: as given, else a stored image with the same bytes, else its folder if stored. Part of
        the library API for callers that embed and search in steps; `search` and `find` infer it the same way."""
        if given:
            return given
        with self._lock:
            return find_stage.query_class(self.store, query, given)[0]

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
        checked = find_stage.limit(value)
        if not isinstance(checked, str):
            return checked
        identity = self.embedder.identity  # before the lock: loading the model may need the database (int8)
        with self._lock:
            return find_stage.max_distance(self.store, identity, checked)

    def _search(self, query: Embedded, mode: str, *, k: int, query_class: str | None, include_self: bool,
                exact: bool, class_from_top_match: bool = False, max_distance: float | None = None) -> FindResult:
        """`search` with max_distance resolved once (`max_distance`): imsearch.search.find.search."""
        check_search(mode, k)
        identity = self.embedder.identity  # before the lock: loading the model may need the database (int8)
        with self._lock:
            return find_stage.search(self.store, identity, query, mode, k=k, given=query_class,
                                     include_self=include_self, exact=exact,
                                     class_from_top_match=class_from_top_match, max_distance=max_distance)

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
        find_stage.limit(max_distance)  # a bad value fails before the model loads
        self._load_model_meanwhile()
        with phase("database"), self._lock:
            _ = self.store  # the database first: a wrong URL fails before the model is used
            if log.isEnabledFor(logging.DEBUG) and (note := indexes.cache_shortfall(self.store)) is not None:
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
        """Search every image under testdir (class = its first-level sub-folder) in each mode, and score it
        (imsearch.evaluation.run). The model loads once and the queries are embedded in batches; each search
        takes the lock on its own, so the page goes on answering during an evaluation."""
        return evaluation_stage.evaluate(
            testdir, modes, k=k, batch_size=batch_size, stored=lambda: dict(self.classes()), embed=self.embed,
            search=lambda e, mode, cls: self._search(e, mode, k=k, query_class=cls, include_self=False, exact=exact),
            identity=lambda: self.embedder.identity, progress=progress)

    # -- audit ---------------------------------------------------------------------------------------------

    def calibrate(self, *, sample: int = SAMPLE, progress: Progress | None = None) -> Calibration:
        """Measure and store the duplicate calibration of the stored rows' model (imsearch.audit.calibration).

        The model loads only when stored files can be read: rows alone calibrate the hash's fallback only.
        """
        with self._lock:
            self._on_one_server("imsearch calibrate")
            return audit_stage.calibrate(self.store, self.prep, self._model, sample=sample, progress=progress)

    def set_calibration(self, *, distance: float | None = None, hash_bits: int | None = None,
                        clear: bool = False) -> Calibration:
        """Override (or with `clear`, stop overriding) the calibrated duplicate distance and hash threshold."""
        with self._lock:
            return audit_stage.set_calibration(self.store, distance=distance, hash_bits=hash_bits, clear=clear)

    def audit(self, *, k: int = findings.K, recalibrate: bool = False, duplicate_distance: float | None = None,
              hash_bits: int | None = None, progress: Progress | None = None,
              calibrating: Progress | None = None) -> Audit:
        """Audit every stored image (imsearch.audit.findings) and replace the image_audit table with the findings.

        Calibrates first when the model was never calibrated (or with `recalibrate`); `duplicate_distance` and
        `hash_bits` override the calibration for this audit only.
        """
        with self._lock:
            self._on_one_server("imsearch audit")
            used = audit_stage.thresholds(self.store, self.prep, self._model, recalibrate=recalibrate,
                                          distance=duplicate_distance, hash_bits=hash_bits, progress=calibrating)
            return audit_stage.audit(self.store, used, k=k, progress=progress)

    def duplicates(self, *, distance: float | None = None, hash_bits: int | None = None,
                   progress: Progress | None = None, calibrating: Progress | None = None
                   ) -> tuple[list[DuplicateGroup], Calibration]:
        """Groups of stored copies by the audit's copy rule, and the thresholds used (calibrated first if needed)."""
        with self._lock:
            self._on_one_server("imsearch duplicates")
            used = audit_stage.thresholds(self.store, self.prep, self._model, recalibrate=False, distance=distance,
                                          hash_bits=hash_bits, progress=calibrating)
            return audit_stage.duplicates(self.store, used, progress), used

    def _model(self) -> Model:
        return self.embedder

    def _on_one_server(self, command: str) -> None:
        """The audit reads every image's neighbours through the whole-table index, where the rows are: on a sharded
        library that is each shard, not the coordinator (docs/scaling.md)."""
        if self.store.sharded:
            raise ImsearchError(f"{command} runs where the rows are, and this library is sharded: run it with "
                                "--database-url set to each shard (`imsearch db shard list` shows them)")
