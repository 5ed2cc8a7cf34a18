"""`imsearch export` and `imsearch load`: the library as Parquet files, one row per image with its vector, for
moving a library between databases or bringing in vectors embedded elsewhere (docs/bulk.md).

Both stream: export reads the rows through a server-side cursor and writes one row group per batch; load reads
each file in record batches, checks every value (a refused file names its 0-based row), stages the rows by
binary COPY, and merges them into `images` in one transaction (imsearch.db.bulk). A batch of BATCH_ROWS rows holds
BATCH_ROWS x 8 kB of float32 vectors: 40 MB, whatever the size of the library or the files.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .db import bulk as db_bulk
from .db.indexes import index_homes
from .db.store import Store
from .errors import ImsearchError, ModelMismatch, RefusedFile
from .vectors import DIMENSIONS

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]

# The file's key-value metadata key that names the model identity of its vectors (images.model).
MODEL_KEY = "imsearch:model"
BATCH_ROWS = 5_000
PART_ROWS = 100_000  # rows per part file of `imsearch ingest --to-parquet`: 800 MB of float32 vectors
HALF_MAX = float(np.finfo(np.float16).max)  # halfvec's largest value, 65504
INT32_MAX = 2**31 - 1

# What export writes. `phash` is the 64-bit perceptual hash as PostgreSQL writes bit(64): 64 '0'/'1' characters,
# most significant bit first (imsearch.model.phash.to_bits); NULL where a row has none.
SCHEMA = pa.schema([
    pa.field("path", pa.string(), nullable=False),
    pa.field("class", pa.string()),
    pa.field("sha256", pa.string(), nullable=False),
    pa.field("width", pa.int32()),
    pa.field("height", pa.int32()),
    pa.field("bytes", pa.int64()),
    pa.field("phash", pa.string()),
    pa.field("embedding", pa.list_(pa.float32(), DIMENSIONS), nullable=False),
])
REQUIRED = ("path", "class", "sha256", "embedding")
OPTIONAL = ("width", "height", "bytes", "phash")
SHA256 = "^[0-9a-f]{64}$"
PHASH = "^[01]{64}$"


@dataclass(frozen=True)
class ExportResult:
    """What `imsearch export` wrote."""

    rows: int
    seconds: float
    file: str

    def to_json(self) -> dict[str, object]:
        return {"rows": self.rows, "seconds": round(self.seconds, 3), "file": self.file}


@dataclass(frozen=True)
class LoadResult:
    """What `imsearch load` did: rows added, updated (a stored path with other bytes, class or vector) and skipped
    (stored already, the same)."""

    added: int
    updated: int
    skipped: int
    seconds: float
    files: tuple[str, ...]

    def to_json(self) -> dict[str, object]:
        return {"added": self.added, "updated": self.updated, "skipped": self.skipped,
                "seconds": round(self.seconds, 3), "files": list(self.files)}


# -- export ------------------------------------------------------------------------------------------------------


def export(store: Store, file: Path, *, model: str | None = None, batch_rows: int = BATCH_ROWS,
           progress: Progress | None = None) -> ExportResult:
    """Write every stored row of one model to `file` (SCHEMA, the model under MODEL_KEY). A library of several
    models needs `model`. The file appears only once complete: it is written beside, then renamed."""
    started = time.perf_counter()
    models = dict(db_bulk.stored_models(store))
    if not models:
        raise ImsearchError("nothing is stored: there is nothing to export")
    if model is None:
        if len(models) > 1:
            raise ImsearchError(f"the library holds rows of {len(models)} models ({', '.join(models)}): pass "
                                "--model ID to export one")
        model = next(iter(models))
    elif model not in models:
        raise ImsearchError(f"no stored row was embedded with {model}; stored: {', '.join(models)}")
    total = models[model]
    rows = 0
    with _writer(file, model) as writer:
        for batch in db_bulk.exported(store.conn, model, batch_rows):
            writer.write_batch(_record_batch(batch, writer.schema))
            rows += len(batch.paths)
            if progress:
                progress(rows, max(rows, total))
    return ExportResult(rows, time.perf_counter() - started, str(file))


@contextlib.contextmanager
def _writer(file: Path, model: str) -> Iterator[pq.ParquetWriter]:
    """A writer of SCHEMA rows of `model` to `file`, which appears only once complete: it is written beside, then
    renamed; an error leaves no file."""
    part = file.with_name(f".{file.name}.{os.getpid()}.part")
    try:
        with pq.ParquetWriter(part, SCHEMA.with_metadata({MODEL_KEY: model}), use_dictionary=["class"]) as writer:
            yield writer
        os.replace(part, file)
    except (OSError, pa.ArrowException) as exc:
        raise ImsearchError(f"{file}: cannot write it ({_first_line(exc)})") from None
    finally:
        part.unlink(missing_ok=True)


class Parts:
    """Part files `part-00000.parquet`, ... in a folder, in the format `load` reads: what `imsearch ingest
    --to-parquet` writes, from the mapper's batches (imsearch.mapper.OUTPUT; rows with an error are left out).
    Each part holds up to `part_rows` rows and appears only once complete."""

    def __init__(self, folder: Path, model: str, *, part_rows: int = PART_ROWS) -> None:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            taken = sorted(p.name for p in folder.glob("part-*.parquet"))
        except OSError as exc:
            raise ImsearchError(f"{folder}: cannot make it ({exc.strerror or exc})") from None
        if taken:
            raise ImsearchError(f"{folder}: holds part files already ({taken[0]}...); write to an empty folder, "
                                "or load those first and remove them")
        self.folder = folder
        self.model = model
        self.part_rows = part_rows
        self.files: list[str] = []
        self._stack = contextlib.ExitStack()
        self._writer: pq.ParquetWriter | None = None
        self._rows = 0

    def write(self, batch: pa.Table) -> int:
        """Write the batch's rows that have no error; returns how many."""
        if "error" in batch.column_names:
            batch = batch.filter(pc.is_null(batch.column("error")))
        batch = batch.select(SCHEMA.names).cast(SCHEMA)
        written = 0
        while written < batch.num_rows:
            if self._writer is None:
                file = self.folder / f"part-{len(self.files):05d}.parquet"
                self._writer = self._stack.enter_context(_writer(file, self.model))
                self.files.append(str(file))
                self._rows = 0
            take = min(self.part_rows - self._rows, batch.num_rows - written)
            self._writer.write_table(batch.slice(written, take))
            written += take
            self._rows += take
            if self._rows >= self.part_rows:
                self._finish()
        return written

    def _finish(self) -> None:
        self._stack.close()
        self._writer = None

    def close(self) -> tuple[str, ...]:
        """Finish the last part; returns every part's path."""
        self._finish()
        return tuple(self.files)

    def __enter__(self) -> Parts:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
                 ) -> None:
        if kind is not None:  # a part cut short is not left behind as if complete
            self._stack.__exit__(kind, exc, tb)
            self._writer = None
        else:
            self.close()


def _record_batch(batch: db_bulk.Exported, schema: pa.Schema) -> pa.RecordBatch:
    embedding = pa.FixedSizeListArray.from_arrays(pa.array(batch.embeddings.reshape(-1), pa.float32()),
                                                  type=schema.field("embedding").type)
    return pa.record_batch([
        pa.array(batch.paths, pa.string()), pa.array(batch.classes, pa.string()), pa.array(batch.sha256, pa.string()),
        pa.array(batch.widths, pa.int32()), pa.array(batch.heights, pa.int32()), pa.array(batch.sizes, pa.int64()),
        pa.array(batch.phash, pa.string()), embedding,
    ], schema=schema)


# -- load --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Source:
    """A file to load, its header checked: the columns it has of those load reads, its model and row count."""

    path: str
    file: pq.ParquetFile
    columns: tuple[str, ...]
    model: str
    rows: int


def load(store: Store, files: Sequence[Path], *, model: str | None = None, batch_rows: int = BATCH_ROWS,
         progress: Progress | None = None) -> LoadResult:
    """Store the rows of these Parquet files, all or nothing; `model` names the identity of files without MODEL_KEY.

    A new path is added, a stored one with other bytes, class or vector updated (as a re-ingest of a changed file
    would be), the same row skipped. Every value is checked while the rows go into the staging table; a refused
    file (RefusedFile, ModelMismatch) leaves the library as it was. When the library is empty or smaller than the
    load, its vector indexes are dropped for the merge and built after it (imsearch.db.bulk).
    """
    started = time.perf_counter()
    if not files:
        raise ImsearchError("no file to load")
    sources = [_open(str(f), model) for f in files]
    identity = sources[0].model
    for s in sources[1:]:
        if s.model != identity:
            raise ModelMismatch(f"{s.path}: its rows were embedded with {s.model}, those of {sources[0].path} with "
                                f"{identity}, and a library holds one model's vectors; nothing was loaded")
    other = db_bulk.other_models(store, identity)
    if other is not None:
        raise ModelMismatch(
            f"{sources[0].path}: its rows were embedded with {identity}, but the library holds {other[1]} image(s) "
            f"embedded with {other[0]}; nothing was loaded (load them into another database, or re-embed)")
    total = sum(s.rows for s in sources)
    stored = db_bulk.count(store)
    done = 0

    def batches() -> Iterator[db_bulk.Staged]:
        nonlocal done
        for number, source in enumerate(sources):
            first = 0
            for batch in _batches(source, batch_rows):
                yield _checked(source, number, first, batch)
                first += batch.num_rows
                done += batch.num_rows
                if progress:
                    progress(done, total)

    with db_bulk.Staging(store.conn) as staging:
        staged = staging.copy(batches())
        twice = staging.duplicate()
        if twice is not None:
            raise RefusedFile(sources[twice.file_no].path, f"path {twice.path!r} is loaded twice (also "
                              f"{sources[twice.first_file].path}, row {twice.first_row})", twice.row_no)
        with index_homes(store) as homes:  # the library's own database, or each shard of a sharded one
            suspend = stored == 0 or staged > stored
            suspended = [(home, db_bulk.suspend_vector_indexes(home) if suspend else []) for home in homes]
            try:
                added, updated = staging.merge(identity)
            except BaseException:
                for home, definitions in suspended:
                    _restore_after_failure(home, definitions)
                raise
            for home, definitions in suspended:
                db_bulk.restore_vector_indexes(home, definitions)
    return LoadResult(added, updated, staged - added - updated, time.perf_counter() - started,
                      tuple(s.path for s in sources))


def _restore_after_failure(store: Store, suspended: list[str]) -> None:
    """Rebuild the suspended indexes after a failed merge, keeping the merge's own error the one reported."""
    try:
        db_bulk.restore_vector_indexes(store, suspended)
    except ImsearchError as exc:
        log.warning("the vector indexes could not be rebuilt (%s); the next imsearch load rebuilds them", exc)


def _is_string(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t) or (
        pa.types.is_dictionary(t) and (pa.types.is_string(t.value_type) or pa.types.is_large_string(t.value_type)))


def _is_embedding(t: pa.DataType) -> bool:
    return (pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)) and (
        pa.types.is_float16(t.value_type) or pa.types.is_float32(t.value_type) or pa.types.is_float64(t.value_type))


TYPES: dict[str, tuple[Callable[[pa.DataType], bool], str]] = {
    "path": (_is_string, "a string"),
    "class": (_is_string, "a string"),
    "sha256": (_is_string, "a string"),
    "embedding": (_is_embedding, f"a list of {DIMENSIONS} float32 (or float16, float64)"),
    "width": (pa.types.is_integer, "an integer"),
    "height": (pa.types.is_integer, "an integer"),
    "bytes": (pa.types.is_integer, "an integer"),
    "phash": (_is_string, "a string of 64 '0'/'1' characters"),
}


def _open(path: str, given: str | None) -> _Source:
    """The file's header checked: the required columns there and every column load reads of its type; the model
    from MODEL_KEY, else `given`.

    The file is memory-mapped: pyarrow (26) keeps every column chunk it has read from a file opened otherwise until
    the file is closed, the whole file by the end of a load; mapped, those are the kernel's page cache, which it
    reclaims, and the process's own memory stays at a batch's worth."""
    try:
        file = pq.ParquetFile(path, memory_map=True)
    except (OSError, pa.ArrowException) as exc:
        raise RefusedFile(path, f"not a readable Parquet file ({_first_line(exc)})") from None
    schema = file.schema_arrow
    missing = [c for c in REQUIRED if c not in schema.names]
    if missing:
        raise RefusedFile(path, f"no column {', '.join(missing)} (load needs {', '.join(REQUIRED)})")
    columns = tuple(c for c in REQUIRED + OPTIONAL if c in schema.names)
    for name in columns:
        check, wanted = TYPES[name]
        if not check(schema.field(name).type):
            raise RefusedFile(path, f"column {name} is {schema.field(name).type}, not {wanted}")
    stated = (schema.metadata or {}).get(MODEL_KEY.encode())
    model = stated.decode() if stated is not None else given
    if stated is not None and given is not None and model != given:
        raise ModelMismatch(f"{path}: its rows were embedded with {model} (its {MODEL_KEY} metadata), not {given} "
                            "(--model); nothing was loaded")
    if not model:
        raise RefusedFile(path, f"no {MODEL_KEY} in its metadata: pass --model ID, the model identity its "
                                "embeddings come from")
    return _Source(path, file, columns, model, file.metadata.num_rows)


def _batches(source: _Source, batch_rows: int) -> Iterator[pa.RecordBatch]:
    """The file's rows in record batches, of the columns load reads; a file damaged past its header is refused."""
    rows = 0
    batches = source.file.iter_batches(batch_size=batch_rows, columns=list(source.columns))
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except (OSError, pa.ArrowException) as exc:
            raise RefusedFile(source.path, f"cannot be read past row {rows} ({_first_line(exc)})") from None
        rows += batch.num_rows
        yield batch


def _first(mask: pa.Array | pa.ChunkedArray) -> int | None:
    """The index of the first true (or null) value of a boolean mask, None when there is none."""
    hits = np.flatnonzero(mask.fill_null(True).to_numpy(zero_copy_only=False))
    return int(hits[0]) if len(hits) else None


def _checked(source: _Source, number: int, first: int, batch: pa.RecordBatch) -> db_bulk.Staged:
    """One record batch checked and converted for the staging table; RefusedFile names the first bad row."""

    def column(name: str) -> pa.Array:
        values = batch.column(name)
        return values.dictionary_decode() if pa.types.is_dictionary(values.type) else values

    def refuse(i: int | None, reason: str) -> None:
        if i is not None:
            raise RefusedFile(source.path, reason, first + i)

    path = column("path")
    refuse(_first(pc.is_null(path)), "no path")
    refuse(_first(pc.equal(path, "")), "an empty path")
    refuse(_first(pc.match_substring(path, "\x00")), "a path holding a NUL character")
    cls = column("class")
    refuse(_first(pc.and_kleene(pc.is_valid(cls), pc.match_substring(cls, "\x00"))), "a class holding a NUL character")
    sha = column("sha256")
    refuse(_first(pc.is_null(sha)), "no sha256")
    if (i := _first(pc.invert(pc.match_substring_regex(sha, SHA256)))) is not None:
        refuse(i, f"sha256 {sha[i].as_py()!r} is not 64 lowercase hex digits")
    optional: dict[str, list[Any] | None] = {}
    for name, limit in (("width", INT32_MAX), ("height", INT32_MAX), ("bytes", 2**63 - 1)):
        if name not in source.columns:
            optional[name] = None
            continue
        values = column(name)
        if (i := _first(pc.and_kleene(pc.is_valid(values), pc.less(values, 0)))) is not None:
            refuse(i, f"{name} {values[i].as_py()} is negative")
        if (i := _first(pc.and_kleene(pc.is_valid(values), pc.greater(values, limit)))) is not None:
            refuse(i, f"{name} {values[i].as_py()} is too large")
        optional[name] = values.to_pylist()
    phash: list[str | None] | None = None
    if "phash" in source.columns:
        hashes = column("phash")
        if (i := _first(pc.and_kleene(pc.is_valid(hashes), pc.invert(pc.match_substring_regex(hashes, PHASH))))
                ) is not None:
            refuse(i, f"phash {hashes[i].as_py()!r} is not 64 '0'/'1' characters")
        phash = hashes.to_pylist()
    return db_bulk.Staged(
        file_no=number, first_row=first, paths=path.to_pylist(), classes=cls.to_pylist(), sha256=sha.to_pylist(),
        widths=optional["width"], heights=optional["height"], sizes=optional["bytes"], phash=phash,
        embeddings=_embeddings(batch.column("embedding"), refuse),
    )


def _embeddings(values: pa.Array, refuse: Callable[[int | None, str], None]) -> np.ndarray:
    """The batch's embeddings as one (rows, DIMENSIONS) float16 matrix, converted by numpy from the Arrow buffers;
    a missing, short or long embedding, a null, NaN or infinite value, or one beyond halfvec's range is refused."""
    refuse(_first(pc.is_null(values)), "no embedding")
    lengths = pc.list_value_length(values)
    if (i := _first(pc.not_equal(lengths, DIMENSIONS))) is not None:
        refuse(i, f"an embedding of {lengths[i].as_py()} values, not {DIMENSIONS}")
    flat = values.flatten()  # the batch's own values, past any slicing offset
    if flat.null_count and (i := _first(pc.is_null(flat))) is not None:
        refuse(i // DIMENSIONS, "a null value in its embedding")
    matrix = flat.to_numpy(zero_copy_only=False).reshape(len(values), DIMENSIONS)
    finite = np.isfinite(matrix).all(axis=1)
    if not finite.all():
        i = int(np.flatnonzero(~finite)[0])
        refuse(i, "NaN in its embedding" if np.isnan(matrix[i]).any() else "an infinite value in its embedding")
    beyond = (np.abs(matrix) > HALF_MAX).any(axis=1)
    if beyond.any():
        refuse(int(np.flatnonzero(beyond)[0]), f"a value beyond halfvec's range (±{HALF_MAX:.0f}) in its embedding")
    return matrix.astype(np.float16)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
