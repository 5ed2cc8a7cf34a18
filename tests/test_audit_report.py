"""The audit's report.html on real photos: the calibration, the counts, the confusions and each finding's picture,
relative links only, every name escaped, and a stored file that can no longer be read drawn as a placeholder."""

from __future__ import annotations

import csv
import html
import io
import json
import shutil
from collections import Counter
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
from PIL import Image

from imsearch.audit.findings import KINDS
from imsearch.audit.report import SHOWN, TITLES, write

# A class name that is markup, with an ampersand and quotes: a folder may be called that, and so a class.
ODD = '<b>x & "y"'


class Links(HTMLParser):
    """Every href and src of a page, and its text."""

    def __init__(self) -> None:
        super().__init__()
        self.links: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.links += [v for k, v in attrs if k in ("href", "src") and v is not None]

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def parse(page: str) -> Links:
    p = Links()
    p.feed(page)
    return p


@pytest.fixture
def library(photos):
    """The 20 photos, plus a byte copy and a re-encoded copy of one kitchen photo filed under the class ODD, and a
    half-size copy of a bedroom photo filed beside it (a duplicate within bedroom)."""
    kitchen = sorted((photos / "kitchen").glob("*.jpg"))[0]
    (photos / ODD).mkdir()
    shutil.copy2(kitchen, photos / ODD / "byte-copy.jpg")
    out = io.BytesIO()
    Image.open(kitchen).convert("RGB").save(out, "JPEG", quality=60)
    (photos / ODD / "reencoded.jpg").write_bytes(out.getvalue())
    bedroom = sorted((photos / "bedroom").glob("*.jpg"))[0]
    img = Image.open(bedroom).convert("RGB")
    img.resize((img.width // 2, img.height // 2), Image.Resampling.LANCZOS).save(photos / "bedroom" / "half.jpg",
                                                                                   quality=90)
    return photos


@pytest.fixture
def audited(app, library, run, tmp_path):
    """The library ingested, the byte copy then deleted, and `imsearch audit --out report` run: the report folder."""
    result = app.ingest(library)
    assert result.added == 23 and not result.failed
    (library / ODD / "byte-copy.jpg").unlink()
    out = tmp_path / "report"
    done = run("audit", "--out", str(out))
    assert done.exit_code == 0, done.output
    return out


def findings(out: Path) -> list[dict[str, str]]:
    with open(out / "findings.csv", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_report_links_only_relative_files_that_exist_and_draws_the_top_findings(audited):
    page = (audited / "report.html").read_text(encoding="utf-8")
    links = parse(page).links
    assert links
    for link in links:
        parts = urlsplit(link)
        assert not parts.scheme and not parts.netloc and not link.startswith("/"), link
        assert (audited / unquote(parts.path)).is_file(), link
    drawn = sorted(p.relative_to(audited).as_posix() for p in (audited / "pictures").rglob("*.png"))
    assert {link for link in links if link.startswith("pictures/")} == set(drawn)
    per_kind = Counter(f["kind"] for f in findings(audited))
    assert len(drawn) == sum(min(SHOWN, n) for n in per_kind.values())
    for f in findings(audited):
        assert f"pictures/{f['kind']}/{f['id']}.png" in drawn


def test_report_names_each_kinds_count_and_finds_the_copies_filed_under_another_class(audited, library):
    page = (audited / "report.html").read_text(encoding="utf-8")
    per_kind = Counter(f["kind"] for f in findings(audited))
    for kind in KINDS:
        assert f"{TITLES[kind]} ({per_kind[kind]})" in page
    bedroom = sorted((library / "bedroom").glob("*.jpg"))[0].name
    leaks = [f for f in findings(audited) if f["kind"] == "leak"]
    assert {f["class"] for f in leaks} == {"kitchen", ODD}
    assert any(f["path"].endswith("byte-copy.jpg") for f in leaks)
    duplicates = [f for f in findings(audited) if f["kind"] == "duplicate"]
    # the half-size copy beside its original, and the re-encoded copy beside the byte copy (the larger file)
    assert sorted((Path(f["path"]).name, f["class"], Path(f["partner_path"]).name) for f in duplicates) == sorted(
        [("half.jpg", "bedroom", bedroom), ("reencoded.jpg", ODD, "byte-copy.jpg")])
    for f in duplicates:
        assert f"<b>keep</b> #{f['partner_id']}" in page


def test_report_shows_the_calibration_and_the_confusions_table(audited):
    page = (audited / "report.html").read_text(encoding="utf-8")
    summary = json.loads((audited / "summary.json").read_text(encoding="utf-8"))
    assert html.escape(summary["calibration"]["verdict"], quote=True) in page
    assert "Can the model separate duplicates?" in page
    for variant in summary["calibration"]["details"]["variants"]:
        assert f"<td>{variant}</td>" in page
    assert "<h2>Suspected confusions</h2>" in page
    with open(audited / "confusions.csv", newline="", encoding="utf-8") as f:
        confusions = list(csv.DictReader(f))
    if confusions:  # stored class rows x suggested class columns, each count in its cell
        table = page.split("<h2>Suspected confusions</h2>")[1].split("</table>")[0]
        suggested = sorted({c["suggested_class"] for c in confusions})
        assert f"<th>stored \\ suggested</th>{''.join(f'<th>{html.escape(s)}</th>' for s in suggested)}" in table
        for c in confusions:
            row = table.split(f"<tr><td>{html.escape(c['class'])}</td>")[1].split("</tr>")[0]
            cells = row.replace("<td class=n>", "<td>").split("<td>")[1:]
            assert cells[suggested.index(c["suggested_class"])] == f"{c['images']}</td>"
    else:
        assert "No label suspects." in page


def test_report_escapes_class_names_and_paths(audited):
    page = (audited / "report.html").read_text(encoding="utf-8")
    assert ODD not in page and "<b>x" not in page
    assert html.escape(ODD, quote=True) in page
    assert ODD in "".join(parse(page).text)  # read back as text, not as markup


def test_a_stored_file_that_can_no_longer_be_read_is_drawn_as_a_placeholder(audited):
    [gone] = [f for f in findings(audited) if f["kind"] == "leak" and f["path"].endswith("byte-copy.jpg")]
    picture = Image.open(audited / "pictures" / "leak" / f"{gone['id']}.png").convert("RGB")
    # the first tile, inside its frame: the grey of the placeholder, where the photo would be
    assert picture.getpixel((12 + 5 + 3, 30 + 5 + 3)) == (220, 220, 220)


def test_no_pictures_writes_the_report_without_any_and_write_counts_what_it_draws(app, library, run, tmp_path):
    assert not app.ingest(library).failed
    out = tmp_path / "report"
    done = run("audit", "--out", str(out), "--no-pictures")
    assert done.exit_code == 0, done.output
    assert not (out / "pictures").exists() and not list(out.rglob("*.png"))
    page = (out / "report.html").read_text(encoding="utf-8")
    assert "<img" not in page and "Leaks between classes (" in page
    written = write(app.audit(), tmp_path / "again")  # the library call: pictures by default, counted
    assert written.pictures == len(list((tmp_path / "again" / "pictures").rglob("*.png"))) > 0
    assert written.html == tmp_path / "again" / "report.html"


def test_when_no_stored_file_can_be_read_the_report_says_so_and_draws_placeholders(stored, photos, run, tmp_path):
    shutil.rmtree(photos)
    out = tmp_path / "report"
    done = run("audit", "--out", str(out))
    assert done.exit_code == 0, done.output
    page = (out / "report.html").read_text(encoding="utf-8")
    assert "<li>note: no stored file could be read" in page
    assert "Not measured: no stored file could be read." in page
    for link in parse(page).links:
        assert (out / unquote(link)).is_file(), link
