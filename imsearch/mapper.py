"""The mapper stage of an ingest: file paths in, rows out, as plain Arrow batches.

It reads each file, decodes it (imsearch.model.pixels) in a few threads, and embeds the batch with one model. The
same code runs in this process (`imsearch ingest --to-parquet`) and in each actor of a Ray Data `map_batches`
pool (imsearch.cluster), so a cluster embeds exactly as one machine does. It knows no database and no Ray: the
driver turns its batches into rows for the store or part files for `imsearch load`.

A batch in is a table of `path` and `class`; a batch out holds, per path, `sha256`, `width`, `height`, `bytes`,
`phash` (64 '0'/'1' characters, as imsearch.bulk writes it), `embedding` (fixed_size_list<float32>[2048]) and
`error`: null for a row embedded, else why the file was not (its other columns then null, its embedding zeros).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generator, Protocol

import numpy as np
import pyarrow as pa

from .errors import BadImage, ModelMismatch
from .files import sha256_bytes
from .model import pixels
from .model.embed import Model, model_identity, named_weights, recipe
from .model.phash import to_bits
from .model.runtimes import cpu_threads, get_model
from .vectors import DIMENSIONS
from .workers import in_order

log = logging.getLogger(__name__)

INPUT = pa.schema([pa.field("path", pa.string(), nullable=False), pa.field("class", pa.string())])
OUTPUT = pa.schema([
    pa.field("path", pa.string(), nullable=False),
    pa.field("class", pa.string()),
    pa.field("sha256", pa.string()),
    pa.field("width", pa.int32()),
    pa.field("height", pa.int32()),
    pa.field("bytes", pa.int64()),
    pa.field("phash", pa.string()),
    pa.field("embedding", pa.list_(pa.float32(), DIMENSIONS), nullable=False),
    pa.field("error", pa.string()),
])


@dataclass(frozen=True)
class ModelSpec:
    """The choices a model is built from (as `imsearch --weights/--device/--precision/--preprocess/--backend`), so
    that another process, on this machine or a cluster's, builds the same model: same weights, same identity."""

    weights: str
    device: str = "auto"
    precision: str = "auto"
    preprocess: str = "recipe"
    backend: str = "auto"

    @classmethod
    def of(cls, weights: str, *, device: str = "auto", precision: str = "auto", preprocess: str = "recipe",
           backend: str = "auto") -> ModelSpec:
        """A spec whose weights file, if it is one, is named by its absolute path: a worker's working folder is
        not the driver's."""
        if named_weights(weights) is None:
            weights = str(Path(weights).expanduser().resolve())
        return cls(weights, device, precision, preprocess, backend)

    @property
    def prep(self) -> pixels.Preprocess:
        prep = pixels.PREPROCESSING[self.preprocess]
        return recipe(self.weights) if prep.name == "recipe" else prep

    @property
    def identity(self) -> str:
        """The identity the model will have, without loading it (the weights file is hashed)."""
        return model_identity(self.weights, self.prep, "fp32" if self.precision == "auto" else self.precision)

    def load(self, threads: int | None = None) -> Model:
        """The model, its runtime using `threads` threads (None: the CPUs this process may use)."""
        model = get_model(self.weights, device=self.device, precision=self.precision,
                          prep=pixels.PREPROCESSING[self.preprocess], backend=self.backend, threads=threads)
        if threads and model.backend == "torch" and model.device == "cpu":
            import torch

            torch.set_num_threads(threads)
        return model


@dataclass(frozen=True)
class Decoded:
    """One file read and decoded: what its row records, and the model input."""

    sha256: str
    size: int
    loaded: pixels.Loaded


def decode(path: str, prep: pixels.Preprocess, where: str | None = None) -> Decoded:
    """Read and decode one file; BadImage says why not. A file that cannot be opened is named as not readable
    `where` (e.g. "on the Ray worker 10.0.0.7"): the driver saw it, so the worker's view of the files differs."""
    try:
        data = pixels.read_file(Path(path))
    except BadImage as exc:
        if where is None or not exc.reason.startswith("cannot read"):
            raise
        raise BadImage(path, f"not readable {where} ({exc.reason}); every worker needs the driver's files at "
                             "the same path") from None
    return Decoded(sha256_bytes(data), len(data), pixels.load(data, path, prep))


class Mapper:
    """Decode and embed batches of files with one model; callable on an Arrow table of INPUT, returning OUTPUT.

    `threads` is the CPUs this mapper may use: the model's runtime gets that many threads, and as many decode at
    once before the batch goes through the model (Pillow and the model both release the GIL). Calls from several
    threads decode at once and take turns in the model."""

    def __init__(self, spec: ModelSpec, *, threads: int | None = None, where: str | None = None,
                 identity: str | None = None) -> None:
        self.spec = spec
        self.threads = threads
        self.where = where
        self.identity = identity
        self.model = spec.load(threads)
        self._model_lock = threading.Lock()

    def __call__(self, batch: pa.Table | pa.RecordBatch) -> pa.Table:
        if self.identity is not None and self.model.identity != self.identity:
            # raised by the call, not the constructor: Ray retries a constructor that fails, for minutes
            raise ModelMismatch(f"the model {self.where or 'here'} is {self.model.identity}, not {self.identity} as "
                                "on the driver: every worker needs the same weights file at the same path")
        paths = [str(p) for p in batch.column("path").to_pylist()]
        classes = batch.column("class").to_pylist()
        results: list[Decoded | BadImage] = []
        workers = max(1, min(self.threads or 2, len(paths)))
        prep = self.model.prep
        with contextlib.closing(in_order(lambda p: decode(p, prep, self.where), paths, workers=workers,
                                         depth=len(paths) or 1, name="imsearch-map")) as done:
            for _, future in done:
                try:
                    results.append(future.result())
                except BadImage as exc:
                    results.append(exc)
        good = [r for r in results if isinstance(r, Decoded)]
        vectors = np.empty((0, DIMENSIONS), np.float32)
        if good:
            with self._model_lock:
                vectors = self.model.embed(np.stack([r.loaded.pixels for r in good]))
        return table(paths, classes, results, vectors)


def table(paths: list[str], classes: list[Any], results: list[Decoded | BadImage], vectors: np.ndarray) -> pa.Table:
    """The OUTPUT batch of these files: `vectors` holds one row per Decoded result, in order."""
    matrix = np.zeros((len(paths), DIMENSIONS), np.float32)
    ok = np.array([isinstance(r, Decoded) for r in results], bool)
    if ok.any():
        matrix[ok] = vectors
    decoded = [r if isinstance(r, Decoded) else None for r in results]
    return pa.table([
        pa.array(paths, pa.string()),
        pa.array(classes, pa.string()),
        pa.array([d and d.sha256 for d in decoded], pa.string()),
        pa.array([d and d.loaded.width for d in decoded], pa.int32()),
        pa.array([d and d.loaded.height for d in decoded], pa.int32()),
        pa.array([d and d.size for d in decoded], pa.int64()),
        pa.array([d and to_bits(d.loaded.phash) for d in decoded], pa.string()),
        pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1), pa.float32()), DIMENSIONS),
        pa.array([r.reason if isinstance(r, BadImage) else None for r in results], pa.string()),
    ], schema=OUTPUT)


def files_table(files: list[tuple[str, str | None]]) -> pa.Table:
    """The INPUT batch of these (path, class) pairs."""
    return pa.table([pa.array([p for p, _ in files], pa.string()), pa.array([c for _, c in files], pa.string())],
                    schema=INPUT)


class Runner(Protocol):
    """Runs the mapper over files and streams its batches back: in this process (LocalRunner) or on a Ray cluster
    (imsearch.cluster.RayRunner). The driver (imsearch.ingest) writes what comes back."""

    spec: ModelSpec

    def map(self, files: list[tuple[str, str | None]], batch_size: int) -> Generator[pa.Table, None, None]: ...


class LocalRunner:
    """The mapper in this process, one batch after another, its threads the CPUs this process may use."""

    def __init__(self, spec: ModelSpec, *, threads: int | None = None) -> None:
        self.spec = spec
        self.threads = threads

    def map(self, files: list[tuple[str, str | None]], batch_size: int) -> Generator[pa.Table, None, None]:
        if not files:
            return
        mapper = Mapper(self.spec, threads=self.threads or cpu_threads())
        for start in range(0, len(files), batch_size):
            yield mapper(files_table(files[start:start + batch_size]))
