"""The audit report: findings.csv and its companions, summary.json and report.html in one folder.

Layout of the folder (names and columns are a contract: scripts read them):

    summary.json      thresholds, calibration, counts, every finding
    findings.csv      one row per finding (FINDING_COLUMNS)
    per_class.csv     per class: images, and how many have a finding of each kind
    confusions.csv    stored class x suggested class: label suspects
    calibration.csv   the calibration, one row per variant of a copy
    report.html       one page, relative links only
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from ..evaluation.report import _csv, _json
from ..terminal import table
from .calibration import Calibration
from .findings import KINDS, Audit, Finding

FINDING_COLUMNS = ("kind", "id", "class", "path", "score", "suggested_class", "partner_id", "partner_class",
                   "partner_path", "distance", "hash_bits", "group")
PER_CLASS_COLUMNS = ("class", "images", *KINDS)
CONFUSION_COLUMNS = ("class", "suggested_class", "images")
CALIBRATION_COLUMNS = ("variant", "distance_p50", "distance_max", "bits_p50", "bits_max")
# Findings of each kind drawn in report.html; findings.csv holds them all.
SHOWN = 50


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
    """Write the report folder; returns where report.html is."""
    out.mkdir(parents=True, exist_ok=True)
    _json(out / "summary.json", result.to_json())
    _csv(out / "findings.csv", FINDING_COLUMNS, [finding_row(f) for f in result.findings])
    counts = result.counts()
    _csv(out / "per_class.csv", PER_CLASS_COLUMNS,
         [(c, n, *(counts.get(c, {}).get(k, 0) for k in KINDS)) for c, n in sorted(result.classes.items())])
    _csv(out / "confusions.csv", CONFUSION_COLUMNS, [(a, b, n) for (a, b), n in sorted(result.confusions().items())])
    variants = result.calibration.details.get("variants", {})
    _csv(out / "calibration.csv", CALIBRATION_COLUMNS,
         [(name, v.get("distance_p50"), v.get("distance_max"), v.get("bits_p50"), v.get("bits_max"))
          for name, v in variants.items()])
    page = out / "report.html"
    page.write_text(_page(result), encoding="utf-8")
    return Written(out, page, 0)


def calibration_text(c: Calibration) -> str:
    """The calibration as a person reads it: one row per variant, then the verdict."""
    variants = c.details.get("variants", {})
    rows = [(name, v.get("distance_p50"), v.get("distance_max"), v.get("bits_p50"), v.get("bits_max"))
            for name, v in variants.items()]
    lines = [f"model {c.model}: {c.sample} stored photo(s) sampled"]
    if rows:
        lines.append(table(("copy", "distance p50", "distance max", "hash bits p50", "hash bits max"), rows))
        lines.append(f"nearest distinct photo: cosine distance p05 {_n(c.neighbour_distance_p05)}, "
                     f"p50 {_n(c.details.get('neighbour_distance_p50'))}; hash bits min "
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


def _page(result: Audit) -> str:
    parts = [f"<!doctype html><meta charset=utf-8><title>imsearch audit</title><h1>imsearch audit</h1>",
             f"<p>{_e(result.calibration.verdict())}</p>"]
    for kind in KINDS:
        found = result.of(kind)[:SHOWN]
        parts.append(f"<h2>{kind} ({len(result.of(kind))})</h2>")
        parts.append(_table(FINDING_COLUMNS, [finding_row(f) for f in found]))
    return "\n".join(parts)


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{_e(v)}</td>" for v in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _e(v: Any) -> str:
    return html.escape("" if v is None else str(v))


__all__ = ["write", "text", "calibration_text", "Written", "FINDING_COLUMNS"]
