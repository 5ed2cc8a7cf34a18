"""A library's own history: classes given by a later ingest of a parent folder, moved and renamed photos, rows of
files gone anywhere, and photos reached through a link that leaves the folder."""

from __future__ import annotations

import json
import shutil

import psycopg
import pytest
from PIL import Image

from imsearch import ImsearchError

from .conftest import copy_photos


def rows(url: str, sql: str, *params):
    with psycopg.connect(url) as conn:
        return conn.execute(sql, params).fetchall()


def by_path(url: str) -> dict[str, tuple]:
    """path -> (id, class, embedding as text) of every stored row."""
    return {p: (i, c, e) for i, p, c, e in rows(url, "SELECT id, path, class, embedding::text FROM images")}


def test_a_parent_ingest_gives_its_class_to_photos_a_flat_ingest_stored_without_one(app, photos, database_url):
    kitchen = photos.resolve() / "kitchen"
    assert app.ingest(kitchen).added == 4
    before = by_path(database_url)
    assert {c for _, c, _ in before.values()} == {None}

    result = app.ingest(photos)
    after = by_path(database_url)
    for path, (image_id, _, embedding) in before.items():
        assert after[path] == (image_id, "kitchen", embedding)  # the same row and vector, now with its class
    assert (result.added, result.updated, result.reclassified, result.skipped, result.moved) == (16, 0, 4, 0, 0)
    again = app.ingest(photos)
    assert (again.added, again.updated, again.reclassified, again.skipped) == (0, 0, 0, 20)


def test_reembed_with_the_same_model_gives_the_class_too(app, photos, database_url):
    assert app.ingest(photos.resolve() / "kitchen").added == 4
    result = app.ingest(photos, reembed=True)
    assert rows(database_url, "SELECT count(*) FROM images WHERE class IS NULL") == [(0,)]
    assert (result.added, result.updated, result.reclassified) == (16, 0, 4)


def test_a_sub_folder_ingest_keeps_the_classes_a_parent_ingest_gave_and_says_so_once(run, photos, database_url):
    assert run("ingest", str(photos)).exit_code == 0
    kitchen = photos.resolve() / "kitchen"
    changed = sorted(kitchen.glob("*.jpg"))[0]
    Image.open(changed).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(changed, quality=90)

    result = run("ingest", str(kitchen))
    assert result.exit_code == 0, result.output
    assert rows(database_url, "SELECT class FROM images WHERE path = %s", str(changed)) == [("kitchen",)]
    assert rows(database_url, "SELECT count(*) FROM images WHERE class = 'kitchen'") == [(4,)]
    assert result.stdout.startswith("0 added, 1 updated, 3 skipped, 0 failed")
    assert result.stderr.count("kept the classes given by an ingest of a parent folder (4 photo(s))") == 1
    summary = json.loads(run("ingest", str(kitchen), "--json").stdout)
    assert (summary["skipped"], summary["reclassified"], summary["kept_classes"]) == (4, 0, 4)


def test_a_renamed_library_keeps_its_rows_and_a_copy_of_a_moved_photo_is_added(stored, photos, database_url):
    before = by_path(database_url)
    moved = photos.parent / "renamed"
    shutil.move(photos, moved)
    original = sorted((moved / "kitchen").glob("*.jpg"))[0]
    shutil.copy(original, moved / "kitchen" / "second-copy.jpg")  # two new paths with the bytes of one row

    result = stored.ingest(moved)
    after = by_path(database_url)
    assert len(after) == 21
    assert (result.added, result.updated, result.moved, result.skipped, result.failed) == (1, 0, 20, 0, ())
    root = str(moved.resolve())
    assert all(path.startswith(root + "/") for path in after)
    old_ids = {i for i, _, _ in before.values()}
    assert {i for i, _, _ in after.values()} >= old_ids  # ids (what image_audit and /images/{id} use) are kept
    for path, (image_id, cls, embedding) in before.items():
        new_path = path.replace(str(photos.resolve()), root, 1)
        if new_path in after and after[new_path][0] == image_id:
            assert after[new_path] == (image_id, cls, embedding)
    twins = {after[str(original.resolve())][2], after[str((moved / "kitchen" / "second-copy.jpg").resolve())][2]}
    assert len(twins) == 1  # the copy was stored with the vector of the same bytes

    again = stored.ingest(moved)
    assert (again.added, again.updated, again.moved, again.skipped, again.missing) == (0, 0, 0, 21, ())


def test_a_photo_renamed_inside_the_folder_is_moved_not_reported_missing(stored, photos, database_url):
    old = sorted((photos / "bedroom").glob("*.jpg"))[0].resolve()
    image_id = rows(database_url, "SELECT id FROM images WHERE path = %s", str(old))[0][0]
    new = old.parent.parent / "kitchen" / "renamed.jpg"
    old.rename(new)
    result = stored.ingest(photos, prune=True)
    assert rows(database_url, "SELECT path, class FROM images WHERE id = %s", image_id) == [(str(new), "kitchen")]
    assert (result.added, result.moved, result.missing, result.pruned) == (0, 1, (), 0)


def test_ingest_prune_of_a_folder_that_is_gone_is_one_clear_line(run, photos):
    gone = photos.parent / "no-longer-here"
    result = run("ingest", str(gone), "--prune")
    assert result.exit_code == 1
    [line] = result.stderr.strip().splitlines()
    assert line == (f"Error: {gone}: no such folder, so nothing under it can be pruned; `imsearch prune` drops the "
                    "rows of photos that are gone anywhere in the library (a moved or deleted folder)")


def test_ingest_prune_of_an_empty_mount_point_wipes_nothing(stored, photos, database_url, tmp_path):
    for folder in list(photos.iterdir()):
        shutil.move(folder, tmp_path / folder.name)  # the drive's files are elsewhere; its mount point is empty
    with pytest.raises(ImsearchError, match="holds no image, yet 20 stored photo"):
        stored.ingest(photos, prune=True)
    assert rows(database_url, "SELECT count(*) FROM images") == [(20,)]


def test_prune_drops_rows_of_vanished_files_anywhere_but_keeps_a_root_that_is_wholly_gone(
        stored, photos, database_url, tmp_path, run):
    other = tmp_path / "other-library"
    other.mkdir()
    for src in sorted((photos / "kitchen").glob("*.jpg"))[:2]:
        Image.open(src).rotate(90).save(other / ("rotated-" + src.name))
    assert stored.ingest(other).added == 2
    gone = sorted((photos / "bedroom").glob("*.jpg"))[0].resolve()
    gone.unlink()
    shutil.rmtree(other)  # as an unmounted drive looks

    dry = run("prune", "--dry-run")
    assert dry.exit_code == 0, dry.output
    assert dry.stdout.splitlines() == [f"would drop {gone}", "1 row(s) of vanished files would be dropped (dry run)"]
    assert dry.stderr.strip() == (f"{other.resolve()}: none of its 2 stored photo(s) remain (a drive not mounted?); "
                                  "kept, `--gone-roots` drops them")
    assert rows(database_url, "SELECT count(*) FROM images") == [(22,)]

    done = json.loads(run("prune", "--json").stdout)
    assert done == {"missing": [str(gone)], "pruned": 1, "refused": [{"root": str(other.resolve()), "rows": 2}],
                    "dry_run": False}
    assert rows(database_url, "SELECT count(*) FROM images") == [(21,)]
    assert run("prune", "--gone-roots").stdout == "pruned 2 row(s) of vanished files\n"
    assert rows(database_url, "SELECT count(*) FROM images") == [(19,)]


def test_a_link_to_a_photo_outside_the_folder_is_stored_once_skipped_after_and_pruned_with_the_link(
        stored, photos, database_url, tmp_path):
    outside = copy_photos(tmp_path / "elsewhere", 1, start=10)
    link = photos / "kitchen" / "linked.jpg"
    link.symlink_to(sorted((outside / "bedroom").glob("*.jpg"))[0])
    (photos / "extra").symlink_to(outside / "living_room", target_is_directory=True)

    first = stored.ingest(photos)
    assert (first.added, first.updated, first.skipped) == (2, 0, 20)
    root = photos.resolve()
    assert rows(database_url, "SELECT path, class FROM images WHERE NOT starts_with(path, %s) ORDER BY path",
                str(root) + "/") == []
    linked_rows = rows(database_url, "SELECT path, class FROM images WHERE path LIKE %s OR class = 'extra' "
                                     "ORDER BY path", "%linked%")
    assert [(p.removeprefix(str(root)), c) for p, c in linked_rows] == [
        (f"/extra/{sorted((outside / 'living_room').glob('*.jpg'))[0].name}", "extra"),
        ("/kitchen/linked.jpg", "kitchen"),
    ]
    again = stored.ingest(photos)
    assert (again.added, again.updated, again.skipped) == (0, 0, 22)

    link.unlink()
    pruned = stored.ingest(photos, prune=True)
    assert (pruned.missing, pruned.pruned) == ((str(root / "kitchen" / "linked.jpg"),), 1)
    assert rows(database_url, "SELECT count(*) FROM images") == [(21,)]
