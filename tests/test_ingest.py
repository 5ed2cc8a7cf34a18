"""Ingest: what gets stored, what is skipped, updated or refused."""

from __future__ import annotations

import shutil

import psycopg
import pytest
from PIL import Image

from imsearch import Imsearch, ModelMismatch


def rows(url: str, sql: str, *params):
    with psycopg.connect(url) as conn:
        return conn.execute(sql, params).fetchall()


def test_ingest_stores_one_row_per_photo_with_class_and_metadata(app, photos, database_url):
    result = app.ingest(photos)
    assert (result.added, result.updated, result.skipped, result.failed) == (20, 0, 0, ())
    stored = rows(database_url, "SELECT path, class, width, height, bytes, length(sha256), vector_dims(embedding), "
                                "model FROM images ORDER BY path")
    assert len(stored) == 20
    for path, cls, width, height, size, sha_len, dims, model in stored:
        assert path.startswith(str(photos.resolve()) + "/")
        assert path.split("/")[-2] == cls
        assert (width, height, sha_len, dims) == (416, 416, 64, 2048)
        assert size == (photos / cls / path.split("/")[-1]).stat().st_size
        assert model == app.embedder.identity


def test_reingest_skips_unchanged_files(stored, photos, database_url):
    before = rows(database_url, "SELECT id, ingested_at FROM images ORDER BY id")
    result = stored.ingest(photos)
    assert (result.added, result.updated, result.skipped) == (0, 0, 20)
    assert rows(database_url, "SELECT id, ingested_at FROM images ORDER BY id") == before


def test_changed_file_is_reembedded_in_place(stored, photos, database_url):
    target = sorted((photos / "kitchen").glob("*.jpg"))[0]
    old = rows(database_url, "SELECT id, sha256, embedding::text FROM images WHERE path = %s", str(target))[0]
    Image.open(target).transpose(Image.Transpose.FLIP_TOP_BOTTOM).save(target, quality=90)
    result = stored.ingest(photos)
    assert (result.added, result.updated, result.skipped) == (0, 1, 19)
    new = rows(database_url, "SELECT id, sha256, embedding::text FROM images WHERE path = %s", str(target))[0]
    assert new[0] == old[0] and new[1] != old[1] and new[2] != old[2]


def test_flat_folder_has_no_class(app, tmp_path, photos, database_url):
    flat = tmp_path / "flat"
    flat.mkdir()
    for src in sorted(photos.glob("*/*.jpg"))[:3]:
        shutil.copy(src, flat / src.name.upper().replace(".JPG", ".JPG"))
    assert app.ingest(flat).added == 3
    assert rows(database_url, "SELECT count(*) FROM images WHERE class IS NULL") == [(3,)]


def test_bad_file_is_reported_and_the_rest_stored(app, photos, database_url):
    (photos / "kitchen" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (photos / "kitchen" / "empty.png").write_bytes(b"")
    (photos / "kitchen" / "notes.txt").write_text("not an image and not an image name: ignored")
    result = app.ingest(photos)
    assert result.added == 20
    reasons = {f.path.rsplit("/", 1)[-1]: f.error for f in result.failed}
    assert set(reasons) == {"broken.jpg", "empty.png"}
    assert reasons["empty.png"] == "empty file (0 bytes)"
    assert rows(database_url, "SELECT count(*) FROM images")[0][0] == 20


def test_another_model_is_refused_and_nothing_is_mixed(stored, photos, database_url, other_weights):
    other = Imsearch(database_url, weights=other_weights, device="cpu")
    with pytest.raises(ModelMismatch, match="embedded with resnet50:file-.*--reembed"):
        other.ingest(photos)
    with pytest.raises(ModelMismatch):
        other.find(sorted(photos.glob("kitchen/*.jpg"))[0])
    assert rows(database_url, "SELECT count(DISTINCT model) FROM images") == [(1,)]
    other.close()


def test_reembed_rewrites_every_row_with_the_new_model(stored, photos, database_url, other_weights):
    with Imsearch(database_url, weights=other_weights, device="cpu") as other:
        result = other.ingest(photos, reembed=True)
        assert (result.added, result.updated) == (0, 20)
        assert rows(database_url, "SELECT DISTINCT model FROM images") == [(other.embedder.identity,)]


def test_prune_removes_rows_of_vanished_files_only_when_asked(stored, photos, database_url):
    gone = sorted((photos / "bedroom").glob("*.jpg"))[0]
    gone.unlink()
    result = stored.ingest(photos)
    assert result.missing == (str(gone),) and result.pruned == 0
    assert rows(database_url, "SELECT count(*) FROM images")[0][0] == 20
    result = stored.ingest(photos, prune=True)
    assert result.pruned == 1
    assert rows(database_url, "SELECT count(*) FROM images")[0][0] == 19
