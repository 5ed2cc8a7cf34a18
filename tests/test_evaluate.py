"""Evaluation: metrics on cases whose answer is known, and the report folder `imsearch evaluate` writes."""

from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import psycopg
import pytest
from pgvector import HalfVector
from pgvector.psycopg import register_vector
from PIL import Image

from imsearch.api import Embedded, FindResult
from imsearch.db.migrate import upgrade
from imsearch.evaluation import pictures
from imsearch.evaluation.metrics import (
    AVERAGE_PRECISION,
    CORRESPONDENCE,
    MEAN_DISTANCE,
    PRECISION,
    PRECISION_1,
    average_precision_at_k,
    precision_at_k,
    score,
)
from imsearch.search import Match
from imsearch.terminal import is_number

from .conftest import ROOMS, copy_photos

# -- metrics alone -----------------------------------------------------------------------------------------


def test_precision_at_k_is_the_share_of_the_top_k_in_the_class_and_counts_missing_matches_as_misses():
    assert precision_at_k([True, False, True, False, False], 5) == pytest.approx(0.4)
    assert precision_at_k([True, True], 5) == pytest.approx(0.4)
    assert precision_at_k([False, True, True], 1) == 0.0


def test_average_precision_rewards_hits_ranked_early():
    early = average_precision_at_k([True, True, False, False, False], 5, total_relevant=2)
    late = average_precision_at_k([False, False, False, True, True], 5, total_relevant=2)
    assert early == pytest.approx(1.0)
    assert late == pytest.approx((1 / 4 + 2 / 5) / 2)
    # one hit out of two relevant stored images loses half even at rank 1
    assert average_precision_at_k([True, False, False], 3, total_relevant=2) == pytest.approx(0.5)
    assert average_precision_at_k([False, False, False], 3, total_relevant=2) == 0.0


def _result(query: str, cls: str, mode: str, classes: list[str]) -> FindResult:
    matches = tuple(Match(i + 1, 100 + i, f"/base/{c}/{i}.jpg", c, 0.1 * (i + 1)) for i, c in enumerate(classes))
    return FindResult(query, cls, mode, matches)


def test_micro_averages_over_images_and_macro_over_classes():
    results = [
        _result("a1.jpg", "a", "all", ["a", "a"]),
        _result("a2.jpg", "a", "all", ["a", "a"]),
        _result("b1.jpg", "b", "all", ["a", "a"]),
    ]
    ev = score(results, k=2, stored={"a": 10, "b": 10})
    per_class = {c.cls: c.figures for c in ev.classes_of("all")}
    assert per_class["a"][PRECISION] == 1.0 and per_class["b"][PRECISION] == 0.0
    assert ev.overall["all"][PRECISION].micro == pytest.approx(2 / 3)
    assert ev.overall["all"][PRECISION].macro == pytest.approx(1 / 2)
    assert ev.overall["all"][CORRESPONDENCE].micro == pytest.approx(1 / 3)
    assert ev.overall["all"][MEAN_DISTANCE].micro == pytest.approx(0.15)


def test_correspondence_matrix_counts_and_row_normalises_the_classes_of_the_matches():
    results = [
        _result("k1.jpg", "kitchen", "other", ["dining", "dining", "bedroom"]),
        _result("k2.jpg", "kitchen", "other", ["dining", "bath", "bath"]),
        _result("b1.jpg", "bedroom", "other", ["dining", "kitchen", "kitchen"]),
    ]
    ev = score(results, k=3, stored={"kitchen": 5, "dining": 5, "bedroom": 5, "bath": 5})
    mx = ev.matrices["other"]
    assert mx.rows == ("bedroom", "kitchen")
    assert mx.columns == ("bath", "bedroom", "dining", "kitchen")
    assert mx.counts == ((0, 0, 1, 2), (2, 1, 3, 0))
    assert mx.shares[1] == pytest.approx((2 / 6, 1 / 6, 3 / 6, 0.0))
    assert "all" not in ev.matrices and PRECISION not in ev.overall["other"]


# -- hand-made vectors in PostgreSQL ------------------------------------------------------------------------


def _basis(*weights: tuple[int, float]) -> np.ndarray:
    v = np.zeros(2048, dtype=np.float32)
    for i, w in weights:
        v[i] = w
    return v


def test_metrics_on_hand_made_vectors_stored_in_postgres(app, database_url):
    """Three stored images with known classes; each query's ranking follows from its vector alone."""
    upgrade(database_url)
    stored = {
        "/base/red/r1.jpg": ("red", _basis((0, 1.0), (3, 0.1))),
        "/base/red/r2.jpg": ("red", _basis((0, 1.0), (4, 0.2))),
        "/base/blue/b1.jpg": ("blue", _basis((1, 1.0), (5, 0.1))),
        "/base/green/g1.jpg": ("green", _basis((2, 1.0))),
    }
    with psycopg.connect(database_url, autocommit=True) as conn:
        register_vector(conn)
        for i, (path, (cls, vec)) in enumerate(stored.items()):
            conn.execute(
                "INSERT INTO images (path, class, sha256, width, height, bytes, model, embedding) "
                "VALUES (%s, %s, %s, 8, 8, 100, %s, %s)",
                (path, cls, f"{i:064x}", app.embedder.identity, HalfVector(vec)),
            )
    queries = {
        "red": _basis((0, 1.0), (1, 0.05)),  # red, red, then blue
        "blue": _basis((1, 1.0), (0, 0.8)),  # blue, then the reds
        "green": _basis((2, 1.0), (0, 1.5)),  # the reds first, then green
    }
    results = [
        app.search(Embedded(f"{cls}.jpg", vec, None, None), mode, k=3, query_class=cls)
        for cls, vec in queries.items()
        for mode in ("all", "same", "other")
    ]
    ev = score(results, k=3, stored=dict(app.classes()))

    figures = {(s.cls, s.mode): s.figures for s in ev.images}
    classes = {(s.cls, s.mode): [m.cls for m in s.matches] for s in ev.images}
    assert classes[("red", "all")] == ["red", "red", "blue"]
    assert classes[("blue", "all")] == ["blue", "red", "red"]
    assert classes[("green", "all")] == ["red", "red", "green"]
    assert figures[("red", "all")][PRECISION] == pytest.approx(2 / 3)
    assert figures[("red", "all")][AVERAGE_PRECISION] == pytest.approx(1.0)
    assert figures[("blue", "all")][PRECISION_1] == 1.0
    assert figures[("green", "all")][PRECISION_1] == 0.0
    assert figures[("green", "all")][AVERAGE_PRECISION] == pytest.approx(1 / 3)
    assert ev.overall["all"][PRECISION].micro == pytest.approx(4 / 9)

    def cosine_distance(a: np.ndarray, b: np.ndarray) -> float:
        return float(1 - a @ b / np.linalg.norm(a) / np.linalg.norm(b))

    expected = np.mean([cosine_distance(queries["red"], stored[p][1]) for p in ("/base/red/r1.jpg",
                                                                                "/base/red/r2.jpg")])
    assert figures[("red", "same")][MEAN_DISTANCE] == pytest.approx(expected, abs=2e-3)

    other = ev.matrices["other"]
    shares = {row: dict(zip(other.columns, s)) for row, s in zip(other.rows, other.shares)}
    assert shares["red"] == pytest.approx({"blue": 0.5, "green": 0.5, "red": 0.0})
    assert shares["blue"] == pytest.approx({"blue": 0.0, "green": 1 / 3, "red": 2 / 3})
    assert shares["green"] == pytest.approx({"blue": 1 / 3, "green": 0.0, "red": 2 / 3})


# -- imsearch evaluate end to end ---------------------------------------------------------------------------


@pytest.fixture
def testdir(tmp_path) -> Path:
    """One unseen test photo per stored class, a class that is not stored, and a photo outside any class."""
    root = copy_photos(tmp_path / "test", 1, split="test")
    (root / "garage").mkdir()
    shutil.copy2(sorted((ROOMS / "test" / "kitchen").glob("*.jpg"))[-1], root / "garage" / "g.jpg")
    shutil.copy2(sorted((ROOMS / "test" / "bedroom").glob("*.jpg"))[-1], root / "loose.jpg")
    return root


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_evaluate_writes_a_report_that_agrees_with_find(stored, run, testdir, tmp_path):
    out = tmp_path / "report"
    result = run("evaluate", str(testdir), "--out", str(out))
    assert result.exit_code == 0, result.output
    assert "class 'garage' is not stored; its 1 image(s) are left out" in result.stderr
    assert "loose.jpg: not in a class folder" in result.stderr
    assert "mode all · class kitchen · 1 queries" in result.stdout
    assert re.search(r"^overall \(macro\)\s+5\s", result.stdout, re.M)

    summary = json.loads((out / "summary.json").read_text())
    assert summary["k"] == 5 and summary["modes"] == ["all", "same", "other"]
    assert summary["counts"]["queries"] == 5 and summary["unstored_classes"] == {"garage": 1}
    assert set(summary["all"]["per_class"]) == {"bathroom", "bedroom", "dining_room", "kitchen", "living_room"}
    assert set(summary["all"]["overall"]) >= {PRECISION, PRECISION_1, AVERAGE_PRECISION, CORRESPONDENCE}
    assert summary["same"]["overall"][MEAN_DISTANCE]["micro"] > 0
    assert len(summary["other"]["correspondence_matrix"]["rows"]) == 5

    per_image = _rows(out / "per_image.csv")
    assert len(per_image) == 15 and {r["mode"] for r in per_image} == {"all", "same", "other"}
    assert len(_rows(out / "per_class.csv")) == 15
    correspondence = _rows(out / "correspondence.csv")
    assert len(correspondence) == 10
    for row in correspondence:
        assert sum(float(row[c]) for c in summary["stored_classes"]) == pytest.approx(1.0, abs=1e-5)

    for row in per_image:
        grid = out / row["grid"]
        assert grid.parent == out / "grids" / row["mode"] / row["class"]
        assert grid.stem == Path(row["query"]).stem
        with Image.open(grid) as img:
            img.verify()
    assert len(list((out / "grids").rglob("*.png"))) == 15
    with Image.open(out / "correspondence.png") as img:
        assert img.format == "PNG" and img.width > 200

    page = (out / "report.html").read_text()
    links = re.findall(r'(?:href|src)="([^"]+)"', page)
    assert not [u for u in links if "://" in u or u.startswith("/")]
    assert all((out / unquote(u)).is_file() for u in links)
    assert {unquote(u) for u in links} >= {r["grid"] for r in per_image} | {"correspondence.png", "per_image.csv"}

    # Same queries, same order, through `imsearch find --json`: the same matches.
    matches = _rows(out / "matches.csv")
    queries = list(dict.fromkeys(r["query"] for r in per_image))
    for mode in ("all", "same", "other"):
        found = json.loads(run("find", *queries, "--mode", mode, "--json").stdout)
        for item in found:
            mine = [r for r in matches if r["mode"] == mode and r["query"] == item["query"]]
            assert [int(r["id"]) for r in mine] == [m["id"] for m in item["matches"]]
            assert [float(r["distance"]) for r in mine] == pytest.approx([m["distance"] for m in item["matches"]],
                                                                         abs=1e-5)


def test_evaluate_json_prints_summary_json(stored, run, testdir, tmp_path):
    out = tmp_path / "report"
    result = run("evaluate", str(testdir), "--out", str(out), "--mode", "all", "-k", "3", "--no-grids", "--json")
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    assert printed == json.loads((out / "summary.json").read_text())
    assert printed["modes"] == ["all"] and printed["k"] == 3
    assert not (out / "grids").exists()


def test_evaluate_before_anything_is_stored_is_a_one_line_error(run, testdir, tmp_path):
    result = run("evaluate", str(testdir), "--out", str(tmp_path / "r"))
    assert result.exit_code == 1
    assert result.stderr.strip() == "Error: no classes are stored yet: run `imsearch ingest FOLDER` first"
    assert not (tmp_path / "r").exists()


def test_find_grid_frames_matches_by_whether_their_class_is_the_querys(stored, run, photos, tmp_path):
    query = sorted(photos.glob("kitchen/*.jpg"))[0]
    grid = tmp_path / "kitchen.png"
    result = run("find", str(query), "-k", "4", "--grid", str(grid))
    assert result.exit_code == 0, result.output
    [item] = json.loads(run("find", str(query), "-k", "4", "--json").stdout)
    with Image.open(grid) as img:
        rgb = img.convert("RGB")
        for m in item["matches"]:
            x, y = pictures.frame_origin(m["rank"])
            expected = pictures.SAME if m["class"] == "kitchen" else pictures.OTHER
            assert rgb.getpixel((x + 1, y + 1)) == expected, m
        assert img.width == pictures.frame_origin(5)[0]  # the query and four matches
    assert run("find", str(query), str(query), "--grid", str(grid)).exit_code == 2


def test_preprocessing_is_part_of_the_model_identity(stored, run, photos):
    query = sorted(photos.glob("kitchen/*.jpg"))[0]
    result = run("find", str(query), "--preprocess", "square224")
    assert result.exit_code == 1
    assert "this search uses resnet50:file-" in result.stderr and ":whole224x224" in result.stderr


def test_evaluate_a_folder_of_unstored_classes_is_a_one_line_error_naming_the_stored_ones(stored, run, tmp_path):
    (tmp_path / "t" / "garage").mkdir(parents=True)
    shutil.copy2(sorted((ROOMS / "test" / "kitchen").glob("*.jpg"))[0], tmp_path / "t" / "garage" / "a.jpg")
    result = run("evaluate", str(tmp_path / "t"), "--out", str(tmp_path / "r"))
    assert result.exit_code == 1
    assert result.stderr.strip() == (f"Error: {tmp_path / 't'}: no images in a sub-folder named after a stored "
                                     "class (stored classes: bathroom, bedroom, dining_room, kitchen, living_room)")


def test_evaluation_csvs_quote_cells_a_spreadsheet_would_run_as_formulas(run, photos, tmp_path):
    (photos / "kitchen").rename(photos / "=HYPERLINK(1)")
    (photos / "bedroom").rename(photos / "@SUM(1)")
    assert run("ingest", str(photos)).exit_code == 0
    testdir = tmp_path / "test"
    (testdir / "=HYPERLINK(1)").mkdir(parents=True)
    shutil.copy2(sorted((ROOMS / "test" / "kitchen").glob("*.jpg"))[0], testdir / "=HYPERLINK(1)" / "@cmd.jpg")
    out = tmp_path / "report"
    assert run("evaluate", str(testdir), "--out", str(out), "--no-grids").exit_code == 0
    cells = [cell for name in ("per_image", "per_class", "matches", "correspondence")
             for row in csv.reader(open(out / f"{name}.csv", newline="")) for cell in row]
    assert "'=HYPERLINK(1)" in cells and "'@SUM(1)" in cells
    assert not [c for c in cells if c.startswith(("=", "+", "@")) or c.startswith("-") and not is_number(c)]



def test_report_tiles_open_only_the_accepted_formats_and_regular_files(tmp_path, monkeypatch):
    """The report's pictures read the same files a user's folders hold: no PostScript interpreter, no FIFO wait."""
    import os

    from PIL import EpsImagePlugin

    from imsearch.evaluation.pictures import thumbnail

    def ghostscript(*args, **kwargs):
        raise AssertionError("Ghostscript was called")

    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", ghostscript)
    eps = tmp_path / "drawing.jpg"
    eps.write_text("%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 64 64\nshowpage\n")
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    for source in (eps, fifo):
        tile = thumbnail(source, 40)
        assert tile.getpixel((0, 0)) == (220, 220, 220), source
