"""Tables for the terminal: the seed study's rank table and plain aligned text tables."""

from __future__ import annotations

from typing import Any, Iterable, Sequence

RANK_COLUMNS = ("rank", "query", "query class", "match class", "match path", "distance")


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """An aligned text table; numbers right-aligned, None shown as '-'."""
    cells = [[("-" if v is None else str(v)) for v in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        for i, v in enumerate(row):
            widths[i] = max(widths[i], len(v))
    numeric = [all(is_number(r[i]) for r in cells) and bool(cells) for i in range(len(headers))]

    def line(values: Sequence[str]) -> str:
        out = [v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)]
        return "  ".join(out).rstrip()

    return "\n".join([line(list(headers)), line(["-" * w for w in widths])] + [line(r) for r in cells])


def rank_rows(result: Any) -> list[tuple[Any, ...]]:
    """Rows of the seed study's rank table for one FindResult."""
    return [
        (m.rank, result.query, result.query_class, m.cls, m.path, f"{m.distance:.4f}") for m in result.matches
    ]


def is_number(v: object) -> bool:
    """Whether a cell reads as a number (so it is right-aligned, and never taken for a formula)."""
    try:
        float(v)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False
    return True
