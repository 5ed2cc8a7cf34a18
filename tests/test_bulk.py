"""imsearch export / load: Parquet out and in, the same rows back, all or nothing, refusals naming the file and
the row, and the vector indexes set aside while a large load goes in, then built again.

The rows are synthetic (no photo, no model): loaded by load itself, as a library moved between databases is.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from imsearch import Imsearch, bulk, search
from imsearch.db import bulk as db_bulk
from imsearch.db import indexes
from imsearch.db.connect import connect
from imsearch.errors import ImsearchError, ModelMismatch, RefusedFile
from imsearch.vectors import DIMENSIONS
from tests.conftest import scratch_database

MODEL = "resnet50:file-0123abcd:resize256-crop224"
OTHER = "resnet50:IMAGENET1K_V1:resize256-crop224"
CLASSES = ("bathroom", "bedroom", "kitchen")
ROWS = """SELECT path, class, sha256, width, height, bytes, model, phash::text, embedding::text
          FROM images ORDER BY path"""
VECTOR_INDEXES = """SELECT indexname FROM pg_indexes WHERE tablename = 'images'
                    AND indexdef ~ 'USING (hnsw|ivfflat)' ORDER BY 1"""


def opened(url: str) -> Imsearch:
    """The library on a migrated database; no model is ever loaded."""
    app = Imsearch(url)
    _ = app.store
    return app


@pytest.fixture
def library(database_url, monkeypatch):
    monkeypatch.setattr(Imsearch, "embedder", property(lambda self: pytest.fail("export or load loaded the model")))
    with opened(database_url) as app:
        yield app


def columns(n: int, seed: int = 0, start: int = 0) -> dict[str, Any]:
    """n synthetic rows as Parquet columns: every third without a hash, every seventh without a class."""
    rng = np.random.default_rng(seed)
    ids = range(start, start + n)
    return {
        "path": [f"/library/{CLASSES[i % 3]}/{i:05d}.jpg" for i in ids],
        "class": [None if i % 7 == 6 else CLASSES[i % 3] for i in ids],
        "sha256": [f"{i * 7919 + seed:064x}" for i in ids],
        "width": [640 + i for i in ids],
        "height": [480 + i % 5 for i in ids],
        "bytes": [50_000 + 13 * i for i in ids],
        "phash": [None if i % 3 == 2 else format(int(rng.integers(0, 2**63)), "064b") for i in ids],
        "embedding": np.maximum(rng.normal(0.2, 1, (n, DIMENSIONS)), 0).astype(np.float32),
    }


def write(path: Path, data: dict[str, Any], *, model: str | None = MODEL,
          embedding: pa.DataType | None = None) -> Path:
    """A Parquet file of these columns; the embedding a list<float32> unless `embedding` names another type."""
    arrays = {name: pa.array(values) for name, values in data.items() if name != "embedding"}
    if "embedding" in data:
        vectors = data["embedding"]
        arrays["embedding"] = pa.array(list(vectors), embedding or pa.list_(pa.float32()))
    table = pa.table(arrays)
    if model is not None:
        table = table.replace_schema_metadata({bulk.MODEL_KEY: model})
    pq.write_table(table, path)
    return path


def rows(url: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(url) as conn:
        return conn.execute(ROWS).fetchall()


def vector_indexes(url: str) -> list[str]:
    with psycopg.connect(url) as conn:
        return [r[0] for r in conn.execute(VECTOR_INDEXES).fetchall()]


# -- the round trip ----------------------------------------------------------------------------------------------


def test_export_then_load_into_an_empty_database_gives_the_same_rows(library, database_url, server_url, tmp_path):
    loaded = library.load([write(tmp_path / "in.parquet", columns(40))])
    assert (loaded.added, loaded.updated, loaded.skipped) == (40, 0, 0)
    exported = library.export(tmp_path / "out.parquet")
    assert exported.rows == 40

    file = pq.ParquetFile(tmp_path / "out.parquet")
    assert file.schema_arrow.metadata[b"imsearch:model"] == MODEL.encode()
    assert file.schema_arrow.field("embedding").type == pa.list_(pa.float32(), DIMENSIONS)
    assert file.schema_arrow.names == ["path", "class", "sha256", "width", "height", "bytes", "phash", "embedding"]
    assert not list(tmp_path.glob(".*part"))

    with scratch_database(server_url, f"imsearch_test_{os.getpid()}_bulk_copy") as url, opened(url) as copy:
        again = copy.load([tmp_path / "out.parquet"])
        assert (again.added, again.updated, again.skipped) == (40, 0, 0)
        assert rows(url) == rows(database_url)
        assert rows(url)[0][6] == MODEL


def test_export_streams_in_batches_and_keeps_the_stored_order(library, tmp_path):
    library.load([write(tmp_path / "in.parquet", columns(12))])
    with psycopg.connect(library.database_url()) as conn:
        ids = [p for (p,) in conn.execute("SELECT path FROM images ORDER BY id")]
    result = bulk.export(library.store, tmp_path / "out.parquet", batch_rows=5)
    file = pq.ParquetFile(tmp_path / "out.parquet")
    assert result.rows == 12 and file.metadata.num_row_groups == 3
    assert file.read(columns=["path"]).column("path").to_pylist() == ids


def test_a_file_without_sizes_or_hashes_loads_with_them_null(library, database_url, tmp_path):
    data = columns(5)
    for name in ("width", "height", "bytes", "phash"):
        del data[name]
    assert library.load([write(tmp_path / "bare.parquet", data)]).added == 5
    assert {r[3:6] + r[7:8] for r in rows(database_url)} == {(None, None, None, None)}
    library.export(tmp_path / "out.parquet")
    back = pq.read_table(tmp_path / "out.parquet")
    assert back.column("width").null_count == 5 and back.column("phash").null_count == 5


def test_float16_and_float64_and_fixed_size_lists_load_the_same_halfvecs(library, database_url, tmp_path):
    data = columns(6)
    library.load([write(tmp_path / "f32.parquet", data, embedding=pa.list_(pa.float32(), DIMENSIONS))])
    before = rows(database_url)
    for name, kind in (("f16", pa.list_(pa.float16())), ("f64", pa.large_list(pa.float64()))):
        values = data["embedding"].astype(np.float16 if name == "f16" else np.float64)
        result = library.load([write(tmp_path / f"{name}.parquet", {**data, "embedding": values}, embedding=kind)])
        assert (result.added, result.updated, result.skipped) == (0, 0, 6)
    assert rows(database_url) == before


# -- updates and skips -------------------------------------------------------------------------------------------


def test_a_changed_file_updates_its_rows_and_identical_rows_are_skipped(library, database_url, tmp_path):
    data = columns(10)
    library.load([write(tmp_path / "v1.parquet", data)])
    before = {r[0]: r for r in rows(database_url)}
    with psycopg.connect(database_url) as conn:
        stamps = dict(conn.execute("SELECT path, ingested_at FROM images").fetchall())
    changed = {name: list(values) for name, values in data.items()}
    changed["sha256"][0] = "f" * 64  # new bytes: re-embedded, as a re-ingest of a changed file
    changed["embedding"] = data["embedding"].copy()
    changed["embedding"][0] += 1
    changed["class"][1] = "attic"  # moved to another class
    new = columns(1, start=10)
    for name in changed:
        changed[name] = list(changed[name]) + list(new[name])
    changed["embedding"] = np.stack(changed["embedding"])

    result = library.load([write(tmp_path / "v2.parquet", changed)])
    assert (result.added, result.updated, result.skipped) == (1, 2, 8)
    after = {r[0]: r for r in rows(database_url)}
    paths = data["path"]
    assert after[paths[0]][2] == "f" * 64 and after[paths[0]][8] != before[paths[0]][8]
    assert after[paths[1]][1] == "attic"
    assert all(after[p] == before[p] for p in paths[2:])
    with psycopg.connect(database_url) as conn:
        stamps_after = dict(conn.execute("SELECT path, ingested_at FROM images").fetchall())
    assert stamps_after[paths[0]] > stamps[paths[0]] and stamps_after[paths[5]] == stamps[paths[5]]


# -- refusals: one line naming the file and the row, and nothing stored ----------------------------------------


@pytest.fixture
def stored(library, tmp_path):
    """The library holding 10 rows of MODEL; returns a function telling whether they are still exactly so."""
    library.load([write(tmp_path / "stored.parquet", columns(10, seed=1, start=100))])
    url = library.database_url()
    before = rows(url)
    return lambda: rows(url) == before


def refused(library: Imsearch, tmp_path: Path, data: dict[str, Any], bad_row: int, **kw: Any) -> RefusedFile:
    """Load a good file and then `data` in one load, 4 rows a batch: the refusal names the second file and the
    row in that file, past the first batch."""
    good = write(tmp_path / "good.parquet", columns(6, start=500))
    bad = write(tmp_path / "bad.parquet", data, **kw)
    with pytest.raises(RefusedFile) as caught:
        bulk.load(library.store, [good, bad], batch_rows=4)
    message = str(caught.value)
    assert message.startswith(f"{bad}, row {bad_row} (0-based): ") and message.endswith("; nothing was loaded")
    assert "\n" not in message
    return caught.value


def test_an_embedding_of_the_wrong_length_is_refused(library, stored, tmp_path):
    data = columns(8)
    data["embedding"] = [list(v) for v in data["embedding"]]
    data["embedding"][5] = data["embedding"][5][:2047]
    error = refused(library, tmp_path, data, 5)
    assert "an embedding of 2047 values, not 2048" in str(error)
    assert stored()


def test_nan_in_an_embedding_is_refused(library, stored, tmp_path):
    data = columns(8)
    data["embedding"][6, 100] = math.nan
    assert "NaN in its embedding" in str(refused(library, tmp_path, data, 6))
    assert stored()
    assert library.load([tmp_path / "good.parquet"]).added == 6  # the aborted COPY left the connection usable


def test_an_infinite_value_in_an_embedding_is_refused(library, stored, tmp_path):
    data = columns(8)
    data["embedding"][7, 0] = -math.inf
    assert "an infinite value in its embedding" in str(refused(library, tmp_path, data, 7))
    assert stored()


def test_a_value_beyond_halfvecs_range_is_refused(library, stored, tmp_path):
    data = columns(8)
    data["embedding"][4, 9] = 70_000.0  # finite in float32, infinite in halfvec
    assert "beyond halfvec's range" in str(refused(library, tmp_path, data, 4))
    assert stored()


@pytest.mark.parametrize("bad", ["A" * 64, "0" * 63, "g" * 64, None])
def test_a_malformed_sha256_is_refused(library, stored, tmp_path, bad):
    data = columns(8)
    data["sha256"][5] = bad
    error = refused(library, tmp_path, data, 5)
    assert ("no sha256" if bad is None else "is not 64 lowercase hex digits") in str(error)
    assert stored()


def test_a_malformed_phash_is_refused(library, stored, tmp_path):
    data = columns(8)
    data["phash"][4] = "2" * 64
    assert "is not 64 '0'/'1' characters" in str(refused(library, tmp_path, data, 4))
    assert stored()


def test_a_path_loaded_twice_is_refused(library, stored, tmp_path):
    data = columns(8, start=500)  # its row 5 is the good file's row 5 again
    error = refused(library, tmp_path, data, 0)
    assert "is loaded twice (also " in str(error) and f"{tmp_path / 'good.parquet'}, row 0)" in str(error)
    assert stored()


@pytest.mark.parametrize("column", ["path", "class", "sha256", "embedding"])
def test_a_missing_required_column_is_refused(library, stored, tmp_path, column):
    data = columns(3)
    del data[column]
    file = write(tmp_path / "bad.parquet", data)
    with pytest.raises(RefusedFile, match=f"^{file}: no column {column} "):
        library.load([file])
    assert stored()


def test_a_column_of_the_wrong_type_is_refused(library, stored, tmp_path):
    data = columns(3)
    data["sha256"] = [1, 2, 3]
    file = write(tmp_path / "bad.parquet", data)
    with pytest.raises(RefusedFile, match=f"^{file}: column sha256 is int64, not a string; nothing was loaded$"):
        library.load([file])
    assert stored()


def test_another_models_rows_are_refused(library, stored, tmp_path):
    file = write(tmp_path / "other.parquet", columns(3), model=OTHER)
    with pytest.raises(ModelMismatch) as caught:
        library.load([file])
    assert str(caught.value) == (f"{file}: its rows were embedded with {OTHER}, but the library holds 10 image(s) "
                                 f"embedded with {MODEL}; nothing was loaded (load them into another database, or "
                                 "re-embed)")
    assert stored()


def test_a_file_without_model_metadata_needs_model(library, stored, tmp_path):
    file = write(tmp_path / "anonymous.parquet", columns(3), model=None)
    with pytest.raises(RefusedFile, match=f"^{file}: no imsearch:model in its metadata: pass --model ID"):
        library.load([file])
    assert stored()
    with pytest.raises(ModelMismatch):
        library.load([file], model=OTHER)
    assert stored()
    assert library.load([file], model=MODEL).added == 3


def test_an_empty_library_takes_any_model_but_one_load_takes_one(library, database_url, tmp_path):
    first = write(tmp_path / "a.parquet", columns(3), model=OTHER)
    second = write(tmp_path / "b.parquet", columns(3, start=3), model=MODEL)
    with pytest.raises(ModelMismatch, match=f"^{second}: its rows were embedded with {MODEL}, those of {first} "):
        library.load([first, second])
    assert rows(database_url) == []
    assert library.load([first]).added == 3


# -- the vector indexes ------------------------------------------------------------------------------------------


def test_searches_answer_exactly_while_a_large_load_has_the_vector_indexes_suspended(
        library, database_url, tmp_path, monkeypatch, exact_max_rows):
    exact_max_rows(20)  # classes of more rows get an HNSW index of their own after a load, as after an ingest
    monkeypatch.setattr(indexes, "CLASS_INDEX_MAX_SHARE", 1.0)  # whatever their share of the library
    library.load([write(tmp_path / "first.parquet", columns(90))])
    indexed = vector_indexes(database_url)
    assert any(name.startswith(search.CLASS_INDEX_PREFIX) for name in indexed)
    assert {"images_fold_hnsw", "images_phash_hnsw"} <= set(indexed)

    query = columns(1, seed=7)["embedding"][0]
    seen: dict[str, Any] = {}
    restore = db_bulk.restore_vector_indexes

    def search_then_restore(where: Any, definitions: list[str]) -> list[str]:
        """Search from another session while the indexes are gone, then restore them."""
        seen["suspended"] = sorted(d.split()[2] for d in definitions)
        seen["left"] = vector_indexes(database_url)
        conn = connect(database_url)
        try:
            exact_max_rows(20, conn)
            for mode, cls in (("all", None), ("same", "kitchen"), ("other", "kitchen")):
                found = search.run(conn, query, mode, k=5, cls=cls, skip_sha=None)
                exact = search.run(conn, query, mode, k=5, cls=cls, skip_sha=None, exact=True)
                seen[mode] = [m.path for m in found] == [m.path for m in exact] and len(found) == 5
        finally:
            conn.close()
        return restore(where, definitions)

    monkeypatch.setattr(db_bulk, "restore_vector_indexes", search_then_restore)
    result = library.load([write(tmp_path / "second.parquet", columns(120, seed=2, start=90))])
    assert result.added == 120
    assert seen["suspended"] == indexed and seen["left"] == []
    assert seen["all"] and seen["same"] and seen["other"]
    assert vector_indexes(database_url) == indexed


def test_a_small_load_keeps_the_indexes(library, database_url, tmp_path, monkeypatch):
    library.load([write(tmp_path / "first.parquet", columns(20))])
    monkeypatch.setattr(db_bulk, "suspend_vector_indexes", lambda where: pytest.fail("suspended for 5 rows"))
    assert library.load([write(tmp_path / "small.parquet", columns(5, start=20))]).added == 5


def test_a_failed_merge_builds_the_indexes_again_and_stores_nothing(library, database_url, tmp_path, monkeypatch):
    before = vector_indexes(database_url)

    def fail(self: db_bulk.Staging, model: str) -> tuple[int, int]:
        raise ImsearchError("the merge failed")

    monkeypatch.setattr(db_bulk.Staging, "merge", fail)
    with pytest.raises(ImsearchError, match="the merge failed"):
        library.load([write(tmp_path / "in.parquet", columns(10))])
    assert vector_indexes(database_url) == before and rows(database_url) == []


def test_a_load_builds_the_indexes_a_killed_load_left_dropped(library, database_url, tmp_path, caplog):
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("DROP INDEX images_fold_hnsw")
    library.load([write(tmp_path / "in.parquet", columns(3))])
    assert "images_fold_hnsw" in vector_indexes(database_url)


# -- what reads the sizes and hashes -----------------------------------------------------------------------------


def test_the_audit_keeps_a_copy_by_path_where_sizes_are_unknown(library, tmp_path):
    data = columns(12)
    for name in ("width", "height", "bytes"):
        del data[name]
    data["sha256"][4] = data["sha256"][1]  # the same bytes twice, in one class: a duplicate group
    data["embedding"][4] = data["embedding"][1]
    data["path"][1], data["path"][4] = "/library/bedroom/zz.jpg", "/library/bedroom/aa.jpg"
    library.load([write(tmp_path / "in.parquet", data)])
    result = library.audit(k=3)
    [duplicate] = result.of("duplicate")
    assert duplicate.path == "/library/bedroom/zz.jpg" and duplicate.partner.path == "/library/bedroom/aa.jpg"
    assert "by path" in result.keep_rule
    assert any("no perceptual hash" in note for note in result.notes)


# -- the command line --------------------------------------------------------------------------------------------


@pytest.fixture
def invoke(library, database_url):
    from click.testing import CliRunner

    from imsearch.cli import cli

    def run(*args: str) -> Any:
        return CliRunner().invoke(cli, ["--database-url", database_url, *args], catch_exceptions=False)
    return run


def test_load_and_export_print_their_summary_as_json(invoke, tmp_path):
    file = write(tmp_path / "in.parquet", columns(7))
    loaded = invoke("load", str(file), "--json")
    assert loaded.exit_code == 0, loaded.output
    summary = json.loads(loaded.output)
    assert summary.keys() == {"added", "updated", "skipped", "seconds", "files"}
    assert (summary["added"], summary["updated"], summary["skipped"], summary["files"]) == (7, 0, 0, [str(file)])
    exported = invoke("export", str(tmp_path / "out.parquet"), "--json")
    assert exported.exit_code == 0, exported.output
    summary = json.loads(exported.output)
    assert summary.keys() == {"rows", "seconds", "file"}
    assert (summary["rows"], summary["file"]) == (7, str(tmp_path / "out.parquet"))
    again = invoke("load", str(tmp_path / "out.parquet"))
    assert again.exit_code == 0 and again.output.startswith("0 added, 0 updated, 7 skipped in ")


def test_a_refused_load_is_one_line_and_exit_1(invoke, tmp_path):
    data = columns(4)
    data["embedding"][2, 0] = math.nan
    file = write(tmp_path / "nan.parquet", data)
    result = invoke("load", str(file))
    assert result.exit_code == 1
    assert result.output == f"Error: {file}, row 2 (0-based): NaN in its embedding; nothing was loaded\n"


def test_export_of_several_models_needs_model(invoke, library, database_url, tmp_path):
    library.load([write(tmp_path / "in.parquet", columns(6))])
    with psycopg.connect(database_url) as conn:
        conn.execute("UPDATE images SET model = %s WHERE path LIKE '%%kitchen%%'", (OTHER,))
    result = invoke("export", str(tmp_path / "out.parquet"))
    assert result.exit_code == 1
    assert result.output == (f"Error: the library holds rows of 2 models ({OTHER}, {MODEL}): pass --model ID to "
                             "export one\n")
    assert not (tmp_path / "out.parquet").exists()
    picked = invoke("export", str(tmp_path / "out.parquet"), "--model", OTHER, "--json")
    assert json.loads(picked.output)["rows"] == 2
