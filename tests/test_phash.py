"""The perceptual hash: imagehash's phash bit for bit, stored at ingest, backfilled from files, ranked in SQL."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import psycopg
import pytest
from PIL import Image

from imsearch.db.hashes import CHANGED, preprocess_of
from imsearch.model import pixels
from imsearch.model.embed import model_identity
from imsearch.model.phash import from_bits, hamming, phash, to_bits

from .conftest import CLASSES, ROOMS

# A copy of a photo (same bytes, re-encoded, resized, EXIF-rotated) lands within this many bits of it.
COPY_BITS = 3
# Distinct photos stay at least this far apart (the 400 base room photos: 14 at the closest).
DISTINCT_BITS = 10
ORIENTATION = 0x0112


def rows(url: str, sql: str, *params):
    with psycopg.connect(url) as conn:
        return conn.execute(sql, params).fetchall()


def shared_photos(per_class: int) -> list[Path]:
    return [p for cls in CLASSES for p in sorted((ROOMS / "base" / cls).glob("*.jpg"))[:per_class]]


def save_jpeg(img: Image.Image, path: Path, **kwargs) -> Path:
    img.save(path, "JPEG", **kwargs)
    return path


def make_copies(original: Path, folder: Path) -> dict[str, Path]:
    """Harmless copies of one photo: the same bytes, a re-encode at quality 60, half the size, and its pixels
    turned 90 degrees with an EXIF orientation that turns them back."""
    folder.mkdir(parents=True, exist_ok=True)
    img = Image.open(original).convert("RGB")
    exif = Image.Exif()
    exif[ORIENTATION] = 6  # "rotate 90 degrees clockwise to display": undoes the counter-clockwise turn below
    copies = {
        "bytes": Path(shutil.copyfile(original, folder / "bytes.jpg")),
        "quality60": save_jpeg(img, folder / "quality60.jpg", quality=60),
        "half": save_jpeg(img.resize((img.width // 2, img.height // 2), Image.Resampling.LANCZOS),
                          folder / "half.jpg", quality=95),
        "exif_rotated": save_jpeg(img.transpose(Image.Transpose.ROTATE_90), folder / "exif_rotated.jpg",
                                  quality=95, exif=exif),
    }
    assert Image.open(copies["exif_rotated"]).getexif()[ORIENTATION] == 6
    return copies


def stored_hash(url: str, path: Path) -> int:
    value = rows(url, "SELECT phash FROM images WHERE path = %s", str(path.resolve()))[0][0]
    return from_bits(value)


def bits_apart(url: str, a: Path, b: Path) -> int:
    """Hamming distance of two stored rows' hashes, in SQL."""
    return rows(url, "SELECT bit_count(a.phash # b.phash) FROM images a, images b WHERE a.path = %s AND b.path = %s",
                str(a.resolve()), str(b.resolve()))[0][0]


# -- the hash itself -----------------------------------------------------------------------------------------


def test_hash_equals_imagehash_phash_bit_for_bit():
    import imagehash  # the test extra installs it

    photos = shared_photos(5)
    assert len(photos) >= 20
    for path in photos:
        img = Image.open(path)
        for variant in (img, img.resize((301, 187)), img.convert("L")):
            assert phash(variant) == int(str(imagehash.phash(variant)), 16), path


def test_bits_round_trip_through_the_text_bit64_takes_and_pgvector_bit():
    from pgvector import Bit

    h = phash(Image.open(shared_photos(1)[0]))
    assert len(to_bits(h)) == 64 and set(to_bits(h)) <= {"0", "1"}
    assert from_bits(to_bits(h)) == h
    assert from_bits(Bit(to_bits(h))) == h
    assert from_bits(to_bits(1 << 63)) == 1 << 63 and to_bits(1)[-1] == "1"
    assert hamming(h, h) == 0 and hamming(0, (1 << 64) - 1) == 64
    with pytest.raises(ValueError, match="unsigned 64-bit"):
        to_bits(1 << 64)
    with pytest.raises(ValueError, match="not a 64-bit"):
        from_bits("0101")


def test_backfill_decodes_with_the_preprocessing_named_in_the_rows_model():
    for prep in pixels.PREPROCESSING.values():
        assert preprocess_of(model_identity("IMAGENET1K_V1", prep)) is prep
        assert preprocess_of(model_identity("IMAGENET1K_V1", prep, "int8")) is prep
    assert preprocess_of("something else") is pixels.DEFAULT_PREPROCESS


# -- at ingest -----------------------------------------------------------------------------------------------


def test_ingest_stores_a_hash_for_every_row_as_load_computes_it(app, photos, database_url):
    assert app.ingest(photos).added == 20
    stored = rows(database_url, "SELECT path, phash FROM images ORDER BY path")
    assert len(stored) == 20
    with psycopg.connect(database_url) as conn:  # as imsearch reads it: pgvector's types registered
        from pgvector.psycopg import register_vector

        register_vector(conn)
        assert all(isinstance(v, str) for (v,) in conn.execute("SELECT phash FROM images"))
    for path, value in stored:
        loaded = pixels.load(Path(path).read_bytes(), path)
        assert from_bits(value) == loaded.phash == phash(Image.open(path))


def test_copies_land_within_a_few_bits_and_distinct_photos_far_apart(app, photos, database_url):
    original = sorted((photos / "kitchen").glob("*.jpg"))[0]
    copies = make_copies(original, photos / "copies")
    flipped = save_jpeg(Image.open(original).transpose(Image.Transpose.FLIP_LEFT_RIGHT), photos / "flipped.jpg")
    result = app.ingest(photos)
    assert result.added == 25 and not result.failed
    assert rows(database_url, "SELECT count(*) FROM images WHERE phash IS NULL") == [(0,)]

    apart = {name: bits_apart(database_url, original, copy) for name, copy in copies.items()}
    print(f"copies: bits from the original {apart}")
    assert apart["bytes"] == 0
    assert all(bits <= COPY_BITS for bits in apart.values()), apart
    assert bits_apart(database_url, original, flipped) > DISTINCT_BITS  # a flip is not a copy to the hash

    distinct = [str(p.resolve()) for p in photos.glob("*/*.jpg") if p.parent.name in CLASSES]
    assert len(distinct) == 20
    closest = rows(database_url, "SELECT min(bit_count(a.phash # b.phash)) FROM images a JOIN images b "
                                 "ON a.id < b.id WHERE a.path = ANY(%s) AND b.path = ANY(%s)", distinct, distinct)
    print(f"20 distinct photos: {closest[0][0]} bits apart at the closest")
    assert closest[0][0] >= DISTINCT_BITS


def test_sql_ranks_by_hamming_distance_through_the_index(app, photos, database_url):
    original = sorted((photos / "bedroom").glob("*.jpg"))[0]
    copies = make_copies(original, photos / "copies")
    for name in ("half", "exif_rotated"):
        copies.pop(name).unlink()  # two copies, then the nearest distinct photo
    app.ingest(photos)
    h = to_bits(stored_hash(database_url, original))
    sql = ("SELECT path, phash <~> %s::bit(64) FROM images WHERE path <> %s "
           "ORDER BY phash <~> %s::bit(64) LIMIT 3")
    params = (h, str(original.resolve()), h)
    with psycopg.connect(database_url) as conn, conn.transaction():
        conn.execute("SET LOCAL enable_seqscan = off")
        plan = "\n".join(r[0] for r in conn.execute("EXPLAIN " + sql, params))
        ranked = conn.execute(sql, params).fetchall()
    assert "images_phash_hnsw" in plan
    assert {p for p, _ in ranked[:2]} == {str(c.resolve()) for c in copies.values()}  # in either order: ties
    assert all(d <= COPY_BITS for _, d in ranked[:2]) and ranked[2][1] >= DISTINCT_BITS


# -- backfill ------------------------------------------------------------------------------------------------


def test_backfill_restores_the_hashes_ingest_stored_without_reembedding(app, photos, database_url, run):
    big = photos / "kitchen" / "big.jpg"  # decoded at a draft scale: the backfill must decode as ingest did
    save_jpeg(Image.open(sorted(photos.glob("kitchen/*.jpg"))[0]).resize((2400, 1800)), big, quality=90)
    assert app.ingest(photos).added == 21
    before = rows(database_url, "SELECT id, phash::text, embedding::text, ingested_at FROM images ORDER BY id")
    assert all(h is not None for _, h, _, _ in before)
    rows(database_url, "UPDATE images SET phash = NULL RETURNING id")

    result = run("db", "backfill-hashes")
    assert result.exit_code == 0, result.output
    assert result.stdout == "hashed 21 row(s)\n"
    assert rows(database_url, "SELECT id, phash::text, embedding::text, ingested_at FROM images ORDER BY id") == before

    again = run("db", "backfill-hashes", "--json")
    assert again.exit_code == 0 and json.loads(again.stdout) == {"hashed": 0, "failed": []}


def test_backfill_reports_missing_and_changed_files_and_exits_1(app, photos, database_url, run):
    assert app.ingest(photos).added == 20
    before = dict(rows(database_url, "SELECT path, phash::text FROM images"))
    embeddings = rows(database_url, "SELECT id, embedding::text FROM images ORDER BY id")
    removed, changed = sorted(photos.glob("bathroom/*.jpg"))[:2]
    removed.unlink()
    img = Image.open(changed)
    img.transpose(Image.Transpose.FLIP_TOP_BOTTOM).save(changed, quality=90)
    rows(database_url, "UPDATE images SET phash = NULL RETURNING id")

    result = run("db", "backfill-hashes")
    assert result.exit_code == 1
    assert result.stderr.splitlines() == [
        f"{removed.resolve()}: cannot read (No such file or directory)",
        f"{changed.resolve()}: {CHANGED}",
    ]
    assert result.stdout == "hashed 18 row(s); 2 could not be (see above)\n"
    after = dict(rows(database_url, "SELECT path, phash::text FROM images"))
    assert after == {p: (None if p in (str(removed.resolve()), str(changed.resolve())) else h)
                     for p, h in before.items()}
    assert rows(database_url, "SELECT id, embedding::text FROM images ORDER BY id") == embeddings

    again = run("db", "backfill-hashes", "--json")
    assert again.exit_code == 1
    ids = dict(rows(database_url, "SELECT path, id FROM images"))
    assert json.loads(again.stdout) == {"hashed": 0, "failed": [
        {"id": ids[str(p.resolve())], "path": str(p.resolve()), "error": error}
        for p, error in sorted([(removed, "cannot read (No such file or directory)"), (changed, CHANGED)],
                               key=lambda item: ids[str(item[0].resolve())])
    ]}

    assert app.ingest(photos).updated == 1  # ingest again: the changed file gets its vector and its hash
    assert rows(database_url, "SELECT phash IS NOT NULL FROM images WHERE path = %s", str(changed.resolve())) == [
        (True,)]


def test_copies_made_in_memory_match_what_ingest_stores(tmp_path):
    """The same copies, hashed straight from bytes, stay within COPY_BITS (no database)."""
    original = shared_photos(1)[0]
    copies = make_copies(original, tmp_path)
    h = pixels.load(original.read_bytes(), str(original)).phash
    for name, copy in copies.items():
        assert hamming(h, pixels.load(copy.read_bytes(), str(copy)).phash) <= COPY_BITS, name
    buf = io.BytesIO()
    Image.open(original).save(buf, "PNG")
    assert pixels.load(buf.getvalue(), "same.png").phash == h  # a lossless copy hashes the same

