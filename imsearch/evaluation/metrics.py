"""Metrics over ranked matches, as the seed study reported them and a little more; pure (no model, no SQL).

Mode *all* scores retrieval: precision@k (the seed's "accuracy": the share of the top k in the query's class),
precision@1 and average precision@k, per image, per class, and overall (micro over images, macro over
classes); the seed's "correspondence" share is 1 - precision@k. Mode *same* measures how tight a class is
(mean cosine distance of the top k). Mode *other* shows which classes a class resembles: a class-to-class
matrix of where its top-k matches fall, row-normalised; the same matrix from mode *all* is confusion-style.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Protocol, Sequence

from ..modes import MODES
from ..search import Match

# Metric names as they appear in summary.json, the CSV headers and the report.
PRECISION = "precision_at_k"
PRECISION_1 = "precision_at_1"
AVERAGE_PRECISION = "average_precision_at_k"
CORRESPONDENCE = "correspondence"
MEAN_DISTANCE = "mean_distance"
RETRIEVAL_METRICS = (PRECISION, PRECISION_1, AVERAGE_PRECISION, CORRESPONDENCE)
METRICS = (*RETRIEVAL_METRICS, MEAN_DISTANCE)
MODE_ORDER: tuple[str, ...] = MODES


class Ranked(Protocol):
    """What scoring needs of one query's result (`imsearch.api.FindResult` is one)."""

    @property
    def query(self) -> str: ...
    @property
    def query_class(self) -> str | None: ...
    @property
    def mode(self) -> str: ...
    @property
    def matches(self) -> tuple[Match, ...]: ...


# -- one query ---------------------------------------------------------------------------------------------


def precision_at_k(relevant: Sequence[bool], k: int) -> float:
    """Share of the top k that are relevant; missing matches (fewer than k stored) count as misses."""
    if k < 1:
        raise ValueError("k must be at least 1")
    return sum(1 for r in relevant[:k] if r) / k


def average_precision_at_k(relevant: Sequence[bool], k: int, total_relevant: int | None = None) -> float:
    """Mean of precision@i over the ranks i of the relevant matches in the top k.

    Divided by min(k, total_relevant) when the number of relevant stored images is known (so a class with few
    hits ranked early still loses for the hits it missed), else by the hits found.
    """
    if k < 1:
        raise ValueError("k must be at least 1")
    hits = 0
    total = 0.0
    for i, r in enumerate(relevant[:k], start=1):
        if r:
            hits += 1
            total += hits / i
    denominator = hits if total_relevant is None else min(k, total_relevant)
    return total / denominator if denominator else 0.0


def mean_distance(matches: Sequence[Match], k: int) -> float | None:
    """Mean cosine distance of the top k (None when nothing matched)."""
    top = matches[:k]
    return sum(m.distance for m in top) / len(top) if top else None


# -- many queries ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageScore:
    """One query image in one mode: its matches and figures (retrieval figures only in mode all)."""

    query: str
    cls: str
    mode: str
    matches: tuple[Match, ...]
    figures: Mapping[str, float | None]


@dataclass(frozen=True)
class ClassScore:
    """The mean of each figure over one class's query images, in one mode."""

    cls: str
    mode: str
    images: int
    figures: Mapping[str, float | None]


@dataclass(frozen=True)
class Overall:
    """One figure over every scored image: micro (mean over images) and macro (mean over class means)."""

    micro: float | None
    macro: float | None


@dataclass(frozen=True)
class Matrix:
    """Where the top-k matches of each query class fall among the stored classes.

    `counts[i][j]`: matches of query class rows[i] in stored class columns[j]; `shares`: each row over its sum.
    """

    mode: str
    rows: tuple[str, ...]
    columns: tuple[str, ...]
    counts: tuple[tuple[int, ...], ...]

    @property
    def shares(self) -> tuple[tuple[float, ...], ...]:
        return tuple(tuple(c / (sum(row) or 1) for c in row) for row in self.counts)

    def to_json(self) -> dict[str, Any]:
        return {
            "rows": list(self.rows),
            "columns": list(self.columns),
            "counts": [list(r) for r in self.counts],
            "shares": [[round(s, 6) for s in r] for r in self.shares],
        }


@dataclass(frozen=True)
class Evaluation:
    """Everything one evaluation found; `to_json` is summary.json."""

    k: int
    modes: tuple[str, ...]
    model: str
    stored: Mapping[str, int]
    images: tuple[ImageScore, ...]
    classes: tuple[ClassScore, ...]
    overall: Mapping[str, Mapping[str, Overall]]
    matrices: Mapping[str, Matrix]
    unstored: Mapping[str, int] = field(default_factory=dict)
    skipped: tuple[tuple[str, str], ...] = ()
    seconds: float = 0.0

    def by_mode(self, mode: str) -> list[ImageScore]:
        return [s for s in self.images if s.mode == mode]

    def classes_of(self, mode: str) -> list[ClassScore]:
        return [c for c in self.classes if c.mode == mode]

    def to_json(self) -> dict[str, Any]:
        queries = {s.query for s in self.images}
        summary: dict[str, Any] = {
            "k": self.k,
            "modes": list(self.modes),
            "model": self.model,
            "counts": {
                "queries": len(queries),
                "query_classes": len({s.cls for s in self.images}),
                "stored_images": sum(self.stored.values()),
                "stored_classes": len(self.stored),
                "unstored_class_images": sum(self.unstored.values()),
                "skipped": len(self.skipped),
            },
            "stored_classes": dict(self.stored),
            "unstored_classes": dict(self.unstored),
            "skipped": [{"path": p, "reason": r} for p, r in self.skipped],
            "seconds": round(self.seconds, 3),
        }
        for mode in self.modes:
            summary[mode] = {
                "overall": {
                    name: {"micro": _round(o.micro), "macro": _round(o.macro)}
                    for name, o in self.overall.get(mode, {}).items()
                },
                "per_class": {
                    c.cls: {"images": c.images, **{n: _round(v) for n, v in c.figures.items()}}
                    for c in self.classes_of(mode)
                },
            }
            if mode in self.matrices:
                summary[mode]["correspondence_matrix"] = self.matrices[mode].to_json()
        return summary


def score_image(result: Ranked, k: int, stored: Mapping[str, int]) -> ImageScore:
    """Figures for one query. Needs the query's class; `stored` gives how many images each class holds."""
    cls = result.query_class
    if cls is None:
        raise ValueError(f"{result.query}: a query needs a class to be scored")
    figures: dict[str, float | None] = {MEAN_DISTANCE: mean_distance(result.matches, k)}
    if result.mode == "all":
        relevant = [m.cls == cls for m in result.matches]
        p = precision_at_k(relevant, k)
        figures[PRECISION] = p
        figures[PRECISION_1] = precision_at_k(relevant, 1)
        figures[AVERAGE_PRECISION] = average_precision_at_k(relevant, k, stored.get(cls, 0))
        figures[CORRESPONDENCE] = 1.0 - p
    return ImageScore(result.query, cls, result.mode, tuple(result.matches[:k]), figures)


def correspondence_matrix(scores: Iterable[ImageScore], mode: str, columns: Sequence[str]) -> Matrix:
    """Count, per query class, the classes of its top-k matches in one mode (stored classes as columns)."""
    picked = [s for s in scores if s.mode == mode]
    rows = tuple(sorted({s.cls for s in picked}))
    extra = sorted({m.cls for s in picked for m in s.matches if m.cls is not None} - set(columns))
    cols = tuple(columns) + tuple(extra)
    counts = {r: dict.fromkeys(cols, 0) for r in rows}
    for s in picked:
        for m in s.matches:
            if m.cls is not None:
                counts[s.cls][m.cls] += 1
    return Matrix(mode, rows, cols, tuple(tuple(counts[r][c] for c in cols) for r in rows))


def score(
    results: Iterable[Ranked],
    *,
    k: int,
    stored: Mapping[str, int],
    model: str = "",
    unstored: Mapping[str, int] | None = None,
    skipped: Sequence[tuple[str, str]] = (),
    seconds: float = 0.0,
) -> Evaluation:
    """Score every result; queries of classes that are not stored must be left out by the caller (`unstored`)."""
    images = tuple(score_image(r, k, stored) for r in results)
    modes = tuple(m for m in MODE_ORDER if any(s.mode == m for s in images))
    classes: list[ClassScore] = []
    overall: dict[str, dict[str, Overall]] = {}
    for mode in modes:
        picked = [s for s in images if s.mode == mode]
        names = [n for n in METRICS if any(n in s.figures for s in picked)]
        by_class: dict[str, list[ImageScore]] = {}
        for s in picked:
            by_class.setdefault(s.cls, []).append(s)
        mode_classes = [
            ClassScore(cls, mode, len(group), {n: _mean([s.figures.get(n) for s in group]) for n in names})
            for cls, group in sorted(by_class.items())
        ]
        classes += mode_classes
        overall[mode] = {
            n: Overall(_mean([s.figures.get(n) for s in picked]), _mean([c.figures.get(n) for c in mode_classes]))
            for n in names
        }
    columns = sorted(stored)
    matrices = {m: correspondence_matrix(images, m, columns) for m in modes if m in ("all", "other")}
    return Evaluation(k, modes, model, dict(stored), images, tuple(classes), overall, matrices,
                      dict(unstored or {}), tuple(skipped), seconds)


def _mean(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def _round(v: float | None) -> float | None:
    return None if v is None else round(v, 6)
