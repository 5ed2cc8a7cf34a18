"""The audit report: findings.csv and its companions, summary.json and report.html in one folder.

Layout of the folder (names and columns are a contract: scripts read them):

    summary.json      thresholds, calibration, counts, every finding
    findings.csv      one row per finding (FINDING_COLUMNS)
    per_class.csv     per class: images, and how many have a finding of each kind
    confusions.csv    stored class x suggested class: label suspects
    calibration.csv   the calibration, one row per variant of a copy
    pictures/<kind>/<id>.png   a finding's image beside its neighbours or its partner (the top SHOWN of each kind)
    report.html       one page, relative links only
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from ..evaluation import pictures as drawing
from ..evaluation.report import (
    CSS,
    MAX_CACHED_THUMBNAILS,
    escape,
    html_img,
    html_link,
    html_table,
    write_csv,
    write_json,
)
from ..search import Match
from ..terminal import table
from .calibration import COPY_VARIANTS, CROP_VARIANT, Calibration
from .findings import KINDS, Audit, Finding

FINDING_COLUMNS = ("kind", "id", "class", "path", "score", "suggested_class", "partner_id", "partner_class",
                   "partner_path", "distance", "hash_bits", "group")
PER_CLASS_COLUMNS = ("class", "images", *KINDS)
CONFUSION_COLUMNS = ("class", "suggested_class", "images")
CALIBRATION_COLUMNS = ("variant", "distance_p50", "distance_max", "bits_p50", "bits_max")
# Findings of each kind drawn in report.html; findings.csv holds them all.
SHOWN = 50
# Thumbnail size in the pictures, pixels: one size, so that the cache serves every picture.
TILE = 180
FILES = ("summary.json", "findings.csv", "per_class.csv", "confusions.csv", "calibration.csv")
TITLES = {"label": "Label suspects", "leak": "Leaks between classes", "duplicate": "Duplicates within a class",
          "outlier": "Outliers"}
# The caption of the flagged image's tile in its picture.
SUBJECTS = {"label": "suspect", "leak": "leak", "duplicate": "copy", "outlier": "outlier"}


@dataclass(frozen=True)
class Written:
    folder: Path
    html: Path
    pictures: int


def finding_row(f: Finding) -> tuple[Any, ...]:
    p = f.partner
    return (f.kind, f.id, f.cls, f.path, round(f.score, 6), f.suggested_class, p and p.id, p and p.cls, p and p.path,
            None if p is None or p.distance is None else round(p.distance, 6), f.hash_bits, f.group)


def write(result: Audit, out: Path, *, pictures: bool = True) -> Written:
    """Write the report folder (pictures of the top SHOWN findings of each kind unless `pictures` is False);
    returns where report.html is and how many pictures were drawn."""
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "summary.json", result.to_json())
    write_csv(out / "findings.csv", FINDING_COLUMNS, [finding_row(f) for f in result.findings])
    counts = result.counts()
    write_csv(out / "per_class.csv", PER_CLASS_COLUMNS,
              [(c, n, *(counts.get(c, {}).get(k, 0) for k in KINDS)) for c, n in sorted(result.classes.items())])
    write_csv(out / "confusions.csv", CONFUSION_COLUMNS,
              [(a, b, n) for (a, b), n in sorted(result.confusions().items())])
    variants = result.calibration.details.get("variants", {})
    write_csv(out / "calibration.csv", CALIBRATION_COLUMNS,
              [(name, v.get("distance_p50"), v.get("distance_max"), v.get("bits_p50"), v.get("bits_max"))
               for name, v in variants.items()])
    drawn = _pictures(result, out) if pictures else {}
    page = out / "report.html"
    page.write_text(_page(result, drawn), encoding="utf-8")
    return Written(out, page, len(drawn))


def calibration_text(c: Calibration) -> str:
    """The calibration as a person reads it: one row per variant, then the verdict."""
    variants = c.details.get("variants", {})
    rows = [(name, v.get("distance_p50"), v.get("distance_max"), v.get("bits_p50"), v.get("bits_max"))
            for name, v in variants.items()]
    lines = [f"model {c.model}: {c.sample} stored photo(s) sampled"]
    if rows:
        lines.append(table(("copy", "distance p50", "distance max", "hash bits p50", "hash bits max"), rows))
        lines.append(f"nearest distinct photo: cosine distance p05 {_n(c.neighbour_distance_p05)}, "
                     f"p50 {_n(c.details.get('neighbour_distance_p50'))}; hash bits p05 "
                     f"{c.hash_neighbour_bits_p05}")
    lines.append(c.verdict())
    return "\n".join(lines)


def text(result: Audit) -> str:
    """The terminal summary: thresholds, counts per kind and class, the top findings of each kind."""
    lines = [calibration_text(result.calibration), ""]
    lines.append(f"{result.images} image(s) audited, {result.k} neighbours each, in {result.seconds:.1f} s")
    for note in result.notes:
        lines.append(f"note: {note}")
    counts = result.counts()
    lines.append("")
    lines.append(table(("class", "images", *KINDS),
                       [(c, n, *(counts.get(c, {}).get(k, 0) for k in KINDS)) for c, n in
                        sorted(result.classes.items())]))
    for kind in KINDS:
        found = result.of(kind)
        if not found:
            continue
        lines.append(f"\n{kind}: {len(found)} finding(s); the first {min(10, len(found))}")
        lines.append(table(("score", "id", "class", "suggested", "partner class", "distance", "path"),
                           [(f"{f.score:.3f}", f.id, f.cls, f.suggested_class, f.partner and f.partner.cls,
                             _n(f.partner.distance if f.partner else None), f.path) for f in found[:10]]))
    return "\n".join(lines)


def _n(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"


def shown(result: Audit, kind: str) -> list[Finding]:
    """The findings of a kind that report.html draws: the top SHOWN by score."""
    return sorted(result.of(kind), key=lambda f: -f.score)[:SHOWN]


# -- pictures ------------------------------------------------------------------------------------------------


def _pictures(result: Audit, out: Path) -> dict[tuple[str, int, int], str]:
    """pictures/<kind>/<id>.png for the shown findings (a second finding of one image gets <id>-2.png):
    (kind, id, n-th finding of that image) -> the picture's path relative to out."""
    drawn: dict[tuple[str, int, int], str] = {}
    cache: dict[str, Image.Image] = {}
    for kind in KINDS:
        found = shown(result, kind)
        if found:
            (out / "pictures" / kind).mkdir(parents=True, exist_ok=True)
        seen: dict[int, int] = {}
        for f in found:
            n = seen[f.id] = seen.get(f.id, 0) + 1
            rel = f"pictures/{kind}/{f.id}.png" if n == 1 else f"pictures/{kind}/{f.id}-{n}.png"
            _picture(f, cache).save(out / rel)
            if len(cache) > MAX_CACHED_THUMBNAILS:
                cache.clear()
            drawn[(kind, f.id, n)] = rel
    return drawn


def _picture(f: Finding, cache: dict[str, Image.Image]) -> Image.Image:
    """The image beside its neighbours (label suspects, outliers) or its partner (leaks, duplicates)."""
    if f.path not in cache:
        cache[f.path] = drawing.thumbnail(f.path, TILE)  # a grey tile saying why when the file cannot be read
    name = Path(f.path).name
    if f.kind in ("leak", "duplicate") and f.partner is not None:
        p = f.partner
        role = "kept" if f.kind == "duplicate" else "partner"
        others = [p]
        captions = [(f"{role} · {p.cls or 'no class'}", f"distance {_n(p.distance)} · {_bits(f.hash_bits)}")]
        title = f"group {f.group}  ·  {name}" if f.group is not None else name
    else:
        others = list(f.neighbours) or ([f.partner] if f.partner is not None else [])
        captions = [(f"#{i} {n.cls or 'no class'}", f"distance {_n(n.distance)}") for i, n in enumerate(others, 1)]
        title = f"{name}  ·  suggests {f.suggested_class}" if f.suggested_class is not None else name
    matches = [Match(i, n.id, n.path, n.cls, float("nan") if n.distance is None else n.distance)
               for i, n in enumerate(others, 1)]
    return drawing.grid(cache[f.path], f.cls, matches, mode=None, title=title, tile=TILE, cache=cache,
                        subject=SUBJECTS[f.kind], captions=captions)


def _bits(bits: int | None) -> str:
    return "hash -" if bits is None else f"{bits} bits"


# -- report.html ---------------------------------------------------------------------------------------------

PAGE_CSS = CSS + """
.finding { display: inline-block; vertical-align: top; margin: .4em 1em .8em 0; max-width: 100%; }
.finding p { margin: .2em 0; max-width: 60em; overflow-wrap: anywhere; }
.finding img { display: block; max-width: 100%; border: 1px solid #eee; }
.verdict { font-size: 1.05em; padding: .5em .8em; background: #f5f7fa; border-left: 4px solid #1f77b4; }
.notes li { color: #a04000; }
"""


def _page(result: Audit, drawn: dict[tuple[str, int, int], str]) -> str:
    """report.html: calibration, counts, confusions, then each kind's top findings with their pictures."""
    counts = {kind: len({f.id for f in result.of(kind)}) for kind in KINDS}  # images, as summary.json counts
    h: list[str] = [
        "<!doctype html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>imsearch audit</title><style>{PAGE_CSS}</style></head><body>",
        "<h1>imsearch audit</h1>",
        f"<p>{result.images} stored images in {len(result.classes)} classes, {result.k} neighbours each, "
        f"in {result.seconds:.2f} s.<br>Model: <code>{escape(result.model)}</code></p>",
        "<p>" + " · ".join(f"{TITLES[k].lower()}: <b>{len(result.of(k))}</b>"
                           + ("" if counts[k] == len(result.of(k)) else f" ({counts[k]} images)") for k in KINDS)
        + "</p>",
        "<p>Files: " + " · ".join(html_link(f, f) for f in FILES) + " (findings.csv holds every finding)</p>",
    ]
    if result.notes:
        h.append("<ul class='notes'>" + "".join(f"<li>note: {escape(n)}</li>" for n in result.notes) + "</ul>")
    h += _calibration(result)
    h.append("<h2>Findings per class</h2><p class='muted'>Images of each class with a finding of each kind.</p>")
    per_class = result.counts()
    h.append(html_table(("class", "images", *(TITLES[k].lower() for k in KINDS)),
                        [(cls, n, *(per_class.get(cls, {}).get(k, 0) for k in KINDS))
                         for cls, n in sorted(result.classes.items())]
                        + [("all", result.images, *(counts[k] for k in KINDS))]))
    h += _confusions(result)
    if drawn:
        h.append("<p class='muted'>In each picture the image comes first, framed in black; then its neighbours or "
                 "its partner, framed <span class='same'>blue</span> when of its class, <span class='other'>orange"
                 "</span> when of another. A grey tile marks a stored file that can no longer be read.</p>")
    for kind in KINDS:
        h += _kind(result, kind, drawn)
    h.append("</body></html>")
    return "\n".join(h) + "\n"


def _calibration(result: Audit) -> list[str]:
    c = result.calibration
    d = c.details
    h = ["<h2>Calibration</h2>", f"<p class='verdict'>{escape(c.verdict())}</p>"]
    if c.sample == 0:
        h.append("<p><b>Can the model separate duplicates?</b> Not measured: no stored file could be read.</p>")
    elif c.separable:
        h.append(f"<p><b>Can the model separate duplicates?</b> Yes: harmless copies land at most "
                 f"{_n(c.copy_distance_max)} from their originals, distinct photos from "
                 f"{_n(c.neighbour_distance_p05)} (5th percentile).</p>")
    else:
        h.append(f"<p><b>Can the model separate duplicates?</b> No: copies land up to {_n(c.copy_distance_max)} "
                 f"from their originals, distinct photos from {_n(c.neighbour_distance_p05)} (5th percentile); the "
                 "perceptual hash alone decides.</p>")
    variants = d.get("variants", {})
    if variants:
        h.append(f"<h3>Copies of {c.sample} stored photos</h3><p class='muted'>Cosine distance and perceptual-hash "
                 "bits from each copy to its original; crop5 (5 % cropped) is measured apart, not a copy.</p>")
        h.append(html_table(("copy", "distance p50", "distance max", "hash bits p50", "hash bits max"),
                            [(name, _n(v.get("distance_p50")), _n(v.get("distance_max")), v.get("bits_p50"),
                              v.get("bits_max")) for name, v in sorted(variants.items(), key=_variant_order)]))
    source = "set by the user" if c.override_distance is not None else "calibrated"
    bits_source = "set by the user" if c.override_hash_bits is not None else "calibrated"
    rows: list[tuple[str, Any]] = [
        ("nearest distinct photo: distance p05", _n(c.neighbour_distance_p05)),
        ("nearest distinct photo: distance p50", _n(d.get("neighbour_distance_p50"))),
        ("nearest distinct photo: hash bits p05", c.hash_neighbour_bits_p05),
        ("nearest distinct photo: hash bits min", d.get("neighbour_bits_min")),
        ("copies: distance p95 / max", f"{_n(c.copy_distance_p95)} / {_n(c.copy_distance_max)}"),
        ("copies: hash bits max", c.hash_copy_bits_max),
        ("crops within the duplicate distance", d.get("crops_within_distance")),
        ("crops within the hash bits", d.get("crops_within_bits")),
        ("duplicate distance in force", "none: the hash alone decides" if c.distance is None
         else f"{c.distance:.4f} ({source})"),
        ("hash bits in force", f"{c.bits} ({bits_source})"),
        ("outlier fence (nearest distance, Q3 + 3 × IQR)", _n(result.outlier_fence)),
    ]
    h.append("<h3>Figures</h3>")
    h.append(html_table(("figure", "value"), rows))
    return h


def _variant_order(item: tuple[str, Any]) -> tuple[int, str]:
    """The copies in the calibration's order, the crop (measured apart) last."""
    name = item[0]
    return (COPY_VARIANTS.index(name) if name in COPY_VARIANTS else len(COPY_VARIANTS) + (name == CROP_VARIANT), name)


def _confusions(result: Audit) -> list[str]:
    confusions = result.confusions()
    h = ["<h2>Suspected confusions</h2>"]
    if not confusions:
        return h + ["<p>No label suspects.</p>"]
    h.append("<p class='muted'>Label suspects by stored class (rows) and the class their neighbours suggest "
             "(columns).</p>")
    stored = sorted({a for a, _ in confusions})
    suggested = sorted({b for _, b in confusions})
    h.append(html_table(("stored \\ suggested", *suggested, "all"),
                        [(a, *(confusions.get((a, b)) for b in suggested),
                          sum(n for (x, _), n in confusions.items() if x == a)) for a in stored]))
    return h


def _kind(result: Audit, kind: str, drawn: dict[tuple[str, int, int], str]) -> list[str]:
    found = result.of(kind)
    top = shown(result, kind)
    h = [f"<h2 id='{kind}'>{TITLES[kind]} ({len(found)})</h2>", f"<p class='muted'>{escape(_explain(result, kind))}"]
    if len(found) > len(top):
        h[-1] += f" The top {len(top)} of {len(found)} by score; findings.csv has them all."
    h[-1] += "</p>"
    if not found:
        return h + ["<p>None found.</p>"]
    seen: dict[int, int] = {}
    for f in top:
        n = seen[f.id] = seen.get(f.id, 0) + 1
        rel = drawn.get((kind, f.id, n))
        block = (f"<div class='finding'><p><b>{escape(Path(f.path).name)}</b> <span class='muted'>#{f.id} · "
                 f"{escape(f.path)}</span><br>{_describe(result, f)}</p>")
        if rel:
            block += html_link(rel, html_img(rel, f"{Path(f.path).name}: {TITLES[kind].lower()}"))
        h.append(block + "</div>")
    return h


def _explain(result: Audit, kind: str) -> str:
    c = result.calibration
    copy = (f"the same bytes or a perceptual hash within {c.bits} bits" if c.distance is None else
            f"the same bytes, a perceptual hash within {c.bits} bits or a cosine distance within {c.distance:.4f}")
    return {
        "label": f"The distance-weighted vote of each image's {result.k} nearest neighbours (its copies left out) "
                 "puts it in another class, above that class's own threshold. Score: the winning class's share "
                 "minus the image's own class's share.",
        "leak": f"The same photo ({copy}) stored under two classes: each image of the pair is listed, beside its "
                "partner, with their cosine distance and hash bits.",
        "duplicate": f"Copies ({copy}) within a class, linked into groups; each group keeps one image "
                     f"({result.keep_rule}), and every other member is listed beside the kept one.",
        "outlier": "An image whose nearest neighbour lies beyond the fence Q3 + 3 × IQR of every image's nearest "
                   f"distance ({_n(result.outlier_fence)}). Score: its nearest distance over the fence.",
    }[kind]


def _describe(result: Audit, f: Finding) -> str:
    """One finding in words, escaped."""
    cls = escape(f.cls or "no class")
    p = f.partner
    if f.kind == "label":
        near = ", ".join(f"{escape(n.cls or 'no class')} {_n(n.distance)}" for n in f.neighbours)
        return (f"filed under <b>{cls}</b>; its neighbours suggest <b>{escape(f.suggested_class)}</b> "
                f"(score {f.score:.3f}).<br><span class='muted'>neighbours: {near}</span>")
    if f.kind == "outlier":
        return (f"class <b>{cls}</b>; nearest neighbour at distance {_n(p.distance if p else None)}, "
                f"{f.score:.2f} × the fence.")
    if p is None:
        return f"class <b>{cls}</b>."
    pair = (f"#{p.id} {escape(p.path)} in <b>{escape(p.cls or 'no class')}</b>: distance {_n(p.distance)}, "
            f"{escape(_bits(f.hash_bits))}")
    if f.kind == "leak":
        return f"class <b>{cls}</b>, the same photo as {pair}."
    return f"group {f.group}, class <b>{cls}</b>: a copy of {pair}; <b>keep</b> #{p.id} ({escape(result.keep_rule)})."


__all__ = ["write", "text", "calibration_text", "shown", "Written", "FINDING_COLUMNS", "SHOWN"]
