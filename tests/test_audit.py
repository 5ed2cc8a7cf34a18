"""imsearch audit on real photos: copies filed in a second class are found as leaks, distinct photos never pair up,
and the calibration is measured per model."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from PIL import Image

from imsearch.audit.calibration import DUPLICATE, NotCalibrated
from tests.conftest import CLASSES, copy_photos

PER_CLASS = 30
# Each kind of copy the issue names, filed under the next class; crops are reported, not required.
COPIES = ("bytes", "reencode", "half", "exif")


def _copy(src: Path, kind: str) -> bytes:
    if kind == "bytes":
        return src.read_bytes()
    img = Image.open(src).convert("RGB")
    out = io.BytesIO()
    if kind == "reencode":
        img.save(out, "JPEG", quality=55)
    elif kind == "half":
        img.resize((img.width // 2, img.height // 2), Image.Resampling.LANCZOS).save(out, "JPEG", quality=90)
    elif kind == "exif":
        exif = Image.Exif()
        exif[0x0112] = 8  # rotate 90 counter-clockwise to view: undoes the clockwise turn of the pixels
        img.transpose(Image.Transpose.ROTATE_270).save(out, "JPEG", quality=92, exif=exif)
    elif kind == "crop":
        w, h = img.size
        img.crop((round(w * 0.05), round(h * 0.05), w, h)).save(out, "JPEG", quality=92)
    return out.getvalue()


@pytest.fixture
def library(tmp_path):
    """PER_CLASS photos per class, plus copies of other photos filed under the next class: (folder, copies)."""
    root = copy_photos(tmp_path / "lib", PER_CLASS)
    copies: dict[str, tuple[str, str]] = {}  # copy path -> (original's path, kind)
    for c, cls in enumerate(CLASSES):
        target = CLASSES[(c + 1) % len(CLASSES)]
        sources = sorted((root / cls).glob(f"{cls}_*.jpg"))[:len(COPIES) + 1]
        for kind, src in zip(COPIES + ("crop",), sources):
            dest = root / target / f"copy-{kind}-{src.name}"
            dest.write_bytes(_copy(src, kind))
            copies[str(dest.resolve())] = (str(src.resolve()), kind)
    return root, copies


def test_audit_finds_copies_filed_under_another_class_and_pairs_no_distinct_photos(app, run, library, tmp_path):
    root, copies = library
    assert not app.ingest(root).failed
    result = run("audit", "--out", str(tmp_path / "report"), "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    pairs = {frozenset((f["path"], f["partner"]["path"])) for f in summary["findings"]
             if f["kind"] in ("leak", "duplicate")}
    made = {frozenset((copy, original)): kind for copy, (original, kind) in copies.items()}
    required = {p for p, kind in made.items() if kind != "crop"}
    found = required & pairs
    missed = [made[p] for p in required - pairs]
    assert len(found) >= 0.9 * len(required), (missed, summary["calibration"])
    assert pairs <= set(made), sorted(map(sorted, pairs - set(made)))  # no two distinct photos pair up
    leaks = {f["path"] for f in summary["findings"] if f["kind"] == "leak"}
    assert {c for c, (_, kind) in copies.items() if kind != "crop"} <= leaks | {
        o for o, _ in copies.values()} | leaks
    calibration = summary["calibration"]
    assert calibration["sample"] > 0 and calibration["hash_copy_bits_max"] < calibration["hash_neighbour_bits_p05"]
    for name in ("findings.csv", "per_class.csv", "confusions.csv", "calibration.csv", "summary.json", "report.html"):
        assert (tmp_path / "report" / name).is_file()
    print(json.dumps({"calibration": calibration, "found": len(found), "required": len(required),
                      "crops_found": [made[p] for p in pairs].count("crop")}, indent=1))


def test_the_calibration_is_stored_per_model_and_changes_with_it(stored, photos, database_url, weights,
                                                                 other_weights, run):
    from imsearch import Imsearch

    first = stored.calibrate(sample=10)
    with Imsearch(database_url, weights=other_weights, device="cpu") as other:
        assert other.ingest(photos, reembed=True).updated == 20
        second = other.calibrate(sample=10)
    assert first.model != second.model and first.sample == second.sample == 10
    assert first.details["variants"] != second.details["variants"]  # the model's own distances, measured again
    rows = stored.store.conn.execute("SELECT model, sample FROM model_calibration ORDER BY model").fetchall()
    assert sorted(rows) == sorted([(first.model, 10), (second.model, 10)])

    shown = run("calibrate", "--weights", other_weights, "--set-distance", "0.01")
    assert shown.exit_code == 0, shown.output
    assert "duplicates at cosine distance <= 0.0100 (set by the user" in shown.stdout
    again = run("calibrate", "--weights", other_weights, "--sample", "5", "--json")
    assert json.loads(again.stdout)["override_distance"] == 0.01  # a new measurement keeps the user's figure
    cleared = json.loads(run("calibrate", "--weights", other_weights, "--clear", "--json").stdout)
    assert cleared["override_distance"] is None and cleared["distance"] == cleared["duplicate_distance"]


def test_rows_whose_files_are_gone_are_audited_from_the_rows_and_say_so(stored, photos, run, tmp_path):
    original = sorted(photos.glob("kitchen/*.jpg"))[0].resolve()
    copy = photos / "bedroom" / "copy.jpg"
    copy.write_bytes(original.read_bytes())
    stored.ingest(photos)
    for f in photos.rglob("*.jpg"):
        f.unlink()
    result = run("audit", "--out", str(tmp_path / "report"), "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["calibration"]["sample"] == 0
    assert "no stored file could be read" in summary["calibration"]["verdict"]
    assert any("no stored file could be read" in n for n in summary["notes"])
    leaks = {(f["path"], f["partner"]["path"]) for f in summary["findings"] if f["kind"] == "leak"}
    assert leaks == {(str(copy.resolve()), str(original)), (str(original), str(copy.resolve()))}
    counted = dict(stored.store.conn.execute("SELECT kind, count(*) FROM image_audit GROUP BY kind").fetchall())
    findings = [f["kind"] for f in summary["findings"]]
    assert counted == {kind: findings.count(kind) for kind in set(findings)}
    with pytest.raises(NotCalibrated, match="no stored file could be read to calibrate it"):
        stored.max_distance(DUPLICATE)
