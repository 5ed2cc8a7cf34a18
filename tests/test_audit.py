"""imsearch audit on real photos: copies filed in a second class are found as leaks, distinct photos never pair up,
and the calibration is measured per model."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import CLASSES, ROOMS, copy_photos

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
