"""The evaluation report: a folder of summary.json, CSVs, a heatmap, picture grids and one report.html.

Layout of the folder (names and columns are a contract: scripts read them):

    summary.json        every overall and per-class figure by mode, k, counts
    per_image.csv       one row per query image and mode
    per_class.csv       one row per query class and mode
    correspondence.csv  one row per query class and matrix (modes other and all), shares per stored class
    correspondence.png  the same matrices as heatmaps
    matches.csv         one row per match: the seed study's rank table
    grids/<mode>/<class>/<image-stem>.png
    report.html         one page, relative links only
"""

from __future__ import annotations

import csv
import html
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence
from urllib.parse import quote

from PIL import Image

from ..terminal import is_number, table
from . import pictures
from .metrics import (
    AVERAGE_PRECISION,
    CORRESPONDENCE,
    MEAN_DISTANCE,
    METRICS,
    PRECISION,
    PRECISION_1,
    Evaluation,
    ImageScore,
    Matrix,
)

PER_IMAGE_COLUMNS = ("mode", "class", "query", *METRICS, "match_classes", "match_distances", "grid")
PER_CLASS_COLUMNS = ("mode", "class", "images", *METRICS)
MATCH_COLUMNS = ("mode", "query", "query_class", "rank", "id", "class", "path", "distance")
# Thumbnails of stored images kept between grids: about 120 kB each at the default tile size.
MAX_CACHED_THUMBNAILS = 2000
MATRIX_TITLES = {
    "other": "mode other: classes of the top-k matches from other classes",
    "all": "mode all: classes of the top-k matches (confusion-style)",
}


def label(metric: str, k: int) -> str:
    """A metric's name as people read it."""
    return {
        PRECISION: f"precision@{k}",
        PRECISION_1: "precision@1",
        AVERAGE_PRECISION: f"AP@{k}",
        CORRESPONDENCE: f"correspondence@{k}",
        MEAN_DISTANCE: "mean distance",
    }[metric]


@dataclass
class Written:
    """What `write` produced, relative to the output folder."""

    out: Path
    files: list[str] = field(default_factory=list)
    grids: dict[tuple[str, str], str] = field(default_factory=dict)  # (mode, query) -> grids/...png


def write(evaluation: Evaluation, out: Path, *, grids: bool = True, tile: int = 200) -> Written:
    """Write every report file into out (created if needed); existing files of the same names are replaced."""
    out.mkdir(parents=True, exist_ok=True)
    written = Written(out)
    if grids:
        written.grids = write_grids(evaluation, out, tile=tile)
    write_json(out / "summary.json", evaluation.to_json())
    write_csv(out / "per_image.csv", PER_IMAGE_COLUMNS, [
        [s.mode, s.cls, s.query, *(_num(s.figures.get(n)) for n in METRICS),
         ";".join(m.cls or "" for m in s.matches), ";".join(f"{m.distance:.6f}" for m in s.matches),
         written.grids.get((s.mode, s.query), "")]
        for s in evaluation.images
    ])
    write_csv(out / "per_class.csv", PER_CLASS_COLUMNS, [
        [c.mode, c.cls, c.images, *(_num(c.figures.get(n)) for n in METRICS)] for c in evaluation.classes
    ])
    write_csv(out / "matches.csv", MATCH_COLUMNS, [
        [s.mode, s.query, s.cls, m.rank, m.id, m.cls or "", m.path, f"{m.distance:.6f}"]
        for s in evaluation.images for m in s.matches
    ])
    matrices = [evaluation.matrices[m] for m in ("other", "all") if m in evaluation.matrices]
    columns = list(dict.fromkeys(c for mx in matrices for c in mx.columns))
    write_csv(out / "correspondence.csv", ("mode", "query_class", "matches", *columns), [
        [mx.mode, row, sum(counts), *(_num(dict(zip(mx.columns, shares)).get(c, 0.0)) for c in columns)]
        for mx in matrices for row, counts, shares in zip(mx.rows, mx.counts, mx.shares)
    ])
    written.files += ["summary.json", "per_image.csv", "per_class.csv", "matches.csv", "correspondence.csv"]
    if matrices:
        heatmap(matrices).save(out / "correspondence.png")
        written.files.append("correspondence.png")
    (out / "report.html").write_text(page(evaluation, written, matrices), encoding="utf-8")
    written.files.append("report.html")
    return written


def write_grids(evaluation: Evaluation, out: Path, *, tile: int = 200) -> dict[tuple[str, str], str]:
    """grids/<mode>/<class>/<image-stem>.png for every scored query; a repeated stem gets -2, -3, ..."""
    paths: dict[tuple[str, str], str] = {}
    taken: set[str] = set()
    cache: dict[str, Image.Image] = {}
    for s in evaluation.images:
        folder = f"grids/{_safe(s.mode)}/{_safe(s.cls)}"
        stem = _safe(Path(s.query).stem)
        rel, n = f"{folder}/{stem}.png", 1
        while rel in taken:
            n += 1
            rel = f"{folder}/{stem}-{n}.png"
        taken.add(rel)
        (out / folder).mkdir(parents=True, exist_ok=True)
        pictures.grid(s.query, s.cls, s.matches, mode=s.mode, tile=tile, cache=cache).save(out / rel)
        if len(cache) > MAX_CACHED_THUMBNAILS:
            cache.clear()
        paths[(s.mode, s.query)] = rel
    return paths


def heatmap(matrices: Sequence[Matrix]) -> Image.Image:
    """correspondence.png: one heatmap per matrix, side by side."""
    return pictures.side_by_side([
        pictures.heatmap(MATRIX_TITLES.get(m.mode, f"mode {m.mode}"), m.rows, m.columns, m.shares)
        for m in matrices
    ])


# -- terminal ------------------------------------------------------------------------------------------------


def text(evaluation: Evaluation, *, ranks: bool = True) -> str:
    """What `imsearch evaluate` prints: per class the seed-style rank table, then per-class and overall figures."""
    k = evaluation.k
    parts: list[str] = []
    for mode in evaluation.modes:
        scores = evaluation.by_mode(mode)
        if ranks:
            for cls in sorted({s.cls for s in scores}):
                group = [s for s in scores if s.cls == cls]
                headers = ["query", *(str(r) for r in range(1, k + 1))]
                if mode == "all":
                    headers.append(label(PRECISION, k))
                rows = []
                for s in group:
                    cells: list[Any] = [Path(s.query).name]
                    cells += [f"{m.cls or '-'} {m.distance:.4f}" for m in s.matches]
                    cells += [None] * (k - len(s.matches))
                    if mode == "all":
                        cells.append(f"{s.figures.get(PRECISION) or 0.0:.2f}")
                    rows.append(cells)
                parts.append(f"mode {mode} · class {cls} · {len(group)} queries · rank: match class and distance")
                parts.append(table(headers, rows) + "\n")
        names = [n for n in METRICS if any(n in s.figures for s in scores)]
        headers = ["class", "images", *(label(n, k) for n in names)]
        rows = [[c.cls, c.images, *(_fmt(c.figures.get(n)) for n in names)] for c in evaluation.classes_of(mode)]
        overall = evaluation.overall.get(mode, {})
        rows.append(["overall (micro)", len(scores), *(_fmt(overall[n].micro) for n in names)])
        rows.append(["overall (macro)", len(scores), *(_fmt(overall[n].macro) for n in names)])
        parts.append(f"mode {mode} · figures per class and overall (micro: mean over images, macro: over classes)")
        parts.append(table(headers, rows) + "\n")
        if mode in evaluation.matrices:
            mx = evaluation.matrices[mode]
            parts.append(MATRIX_TITLES.get(mode, f"mode {mode}") + "; rows: query class, each row sums to 1")
            parts.append(table(["query class", *mx.columns],
                               [[r, *(f"{v:.2f}" for v in shares)] for r, shares in zip(mx.rows, mx.shares)]) + "\n")
    return "\n".join(parts).rstrip("\n")


# -- report.html ---------------------------------------------------------------------------------------------

CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1400px; padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; } h2 { margin-top: 2em; border-bottom: 1px solid #ddd; } h3 { margin-bottom: .3em; }
table { border-collapse: collapse; margin: .6em 0 1.2em; }
th, td { padding: .25em .7em; border-bottom: 1px solid #eee; text-align: left; }
td.n { text-align: right; font-variant-numeric: tabular-nums; }
.muted { color: #666; } .same { color: #1f77b4; font-weight: 600; } .other { color: #ff7f0e; font-weight: 600; }
details { margin: .4em 0; } summary { cursor: pointer; font-weight: 600; }
.grid img { display: block; max-width: 100%; margin: .4em 0 .8em; border: 1px solid #eee; }
"""


def page(evaluation: Evaluation, written: Written, matrices: Sequence[Matrix]) -> str:
    """report.html: the tables, the heatmap and the grids, one page, relative links only."""
    k = evaluation.k
    summary = evaluation.to_json()
    counts = summary["counts"]
    h: list[str] = [
        "<!doctype html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>imsearch evaluation, k={k}</title><style>{CSS}</style></head><body>",
        "<h1>imsearch evaluation</h1>",
        f"<p>{counts['queries']} query images in {counts['query_classes']} classes against "
        f"{counts['stored_images']} stored images in {counts['stored_classes']} classes; top {k} per query; "
        f"modes {', '.join(evaluation.modes)}.<br>Model: <code>{escape(evaluation.model)}</code></p>",
        "<p>Files: " + " · ".join(html_link(f, f) for f in written.files if f != "report.html") + "</p>",
    ]
    if evaluation.unstored:
        h.append("<p>Classes in the test folder that are not stored (left out of every figure): "
                 + ", ".join(f"{escape(c)} ({n} images)" for c, n in sorted(evaluation.unstored.items())) + "</p>")
    if evaluation.skipped:
        h.append("<details><summary>" + f"{len(evaluation.skipped)} file(s) skipped</summary><ul>"
                 + "".join(f"<li>{escape(p)}: {escape(r)}</li>" for p, r in evaluation.skipped) + "</ul></details>")
    h.append("<h2>Overall</h2><p class='muted'>micro: mean over query images; macro: mean over the class means. "
             f"precision@{k}: share of the top {k} in the query's class (the seed study's accuracy); "
             f"correspondence@{k} = 1 − precision@{k}; AP@{k}: average precision over the top {k}; mean distance: "
             f"mean cosine distance of the top {k}.</p>")
    rows = [[mode, label(n, k), _fmt(o.micro), _fmt(o.macro)]
            for mode in evaluation.modes for n, o in evaluation.overall.get(mode, {}).items()]
    h.append(html_table(["mode", "figure", "micro", "macro"], rows))
    h.append("<h2>Per class</h2>")
    for mode in evaluation.modes:
        names = [n for n in METRICS if any(n in c.figures for c in evaluation.classes_of(mode))]
        h.append(f"<h3>mode {escape(mode)}</h3>")
        h.append(html_table(["class", "images", *(label(n, k) for n in names)],
                            [[c.cls, c.images, *(_fmt(c.figures.get(n)) for n in names)]
                             for c in evaluation.classes_of(mode)]))
    if matrices:
        h.append("<h2>Class correspondence</h2>")
        heat = html_img("correspondence.png", "class correspondence heatmap")
        h.append(f"<p>{html_link('correspondence.png', heat)}</p>")
        for mx in matrices:
            h.append(f"<h3>{escape(MATRIX_TITLES.get(mx.mode, mx.mode))}</h3>")
            h.append(html_table(["query class", *mx.columns],
                                [[r, *(f"{v:.2f}" for v in shares)] for r, shares in zip(mx.rows, mx.shares)]))
    h.append("<h2>Per image</h2><p>Each query's matches by rank (class and cosine distance)"
             + (", then its grid: <span class='same'>blue frame</span> a match of the query's class, "
                "<span class='other'>orange frame</span> another class" if written.grids else "") + ".</p>")
    for mode in evaluation.modes:
        h.append(f"<h3>mode {escape(mode)}</h3>")
        by_class: dict[str, list[ImageScore]] = {}
        for s in evaluation.by_mode(mode):
            by_class.setdefault(s.cls, []).append(s)
        for cls, group in sorted(by_class.items()):
            h.append(f"<details><summary>{escape(cls)} ({len(group)})</summary>")
            extra = [label(PRECISION, k), label(AVERAGE_PRECISION, k)] if mode == "all" else []
            h.append(html_table(["query", *(str(r) for r in range(1, k + 1)), *extra], [
                [Path(s.query).name, *(f"{m.cls or '-'} {m.distance:.4f}" for m in s.matches),
                 *([None] * (k - len(s.matches))), *(_fmt(s.figures.get(n)) for n in (PRECISION, AVERAGE_PRECISION)
                                                     if mode == "all")]
                for s in group
            ]))
            h.append("<div class='grid'>")
            for s in group:
                rel = written.grids.get((mode, s.query))
                if rel:
                    h.append(html_link(rel, html_img(rel, f"{Path(s.query).name}, mode {mode}")))
            h.append("</div></details>")
    h.append("</body></html>")
    return "\n".join(h) + "\n"


def html_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """An HTML table, every cell escaped; numbers right-aligned, None shown as '-'."""
    head = "".join(f"<th>{escape(x)}</th>" for x in headers)
    body = "".join(
        "<tr>" + "".join(f"<td{' class=n' if is_number(v) else ''}>{escape('-' if v is None else v)}</td>" for v in row)
        + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def html_link(rel: str, inner: str) -> str:
    """A link to a path relative to the report; `inner` is text (escaped) or an html_img."""
    return f'<a href="{escape(quote(rel))}">{inner if inner.startswith("<img") else escape(inner)}</a>'


def html_img(rel: str, alt: str) -> str:
    """A lazily loaded image at a path relative to the report."""
    return f'<img src="{escape(quote(rel))}" alt="{escape(alt)}" loading="lazy">'


def escape(v: Any) -> str:
    """A value as HTML text or attribute, escaped; None as nothing (the audit's and the evaluation's pages)."""
    return html.escape("" if v is None else str(v), quote=True)


def _safe(name: str) -> str:
    """A path component that cannot climb out of the report folder or upset a browser."""
    cleaned = "".join(c if c.isalnum() or c in "-_. " else "_" for c in name).strip(". ")
    return cleaned or "_"


def _fmt(v: float | None) -> str | None:
    return None if v is None else f"{v:.4f}"


def _num(v: float | None) -> str:
    return "" if v is None else f"{v:.6f}"


def write_json(path: Path, data: Any) -> None:
    """Indented JSON, UTF-8, ending in a newline."""
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


# A spreadsheet reads a cell that starts with one of these as a formula; class and file names are anyone's text.
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def spreadsheet_safe(value: Any) -> Any:
    """A text cell a spreadsheet would run as a formula, quoted with a leading apostrophe; anything else, a
    number written as text (`-0.000000`) included, as is."""
    if isinstance(value, str) and value.startswith(FORMULA_STARTS) and not is_number(value):
        return "'" + value
    return value


def write_csv(path: Path, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """A CSV file whose text cells a spreadsheet cannot run as formulas (spreadsheet_safe)."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow([spreadsheet_safe(h) for h in headers])
        w.writerows([spreadsheet_safe(v) for v in row] for row in rows)
