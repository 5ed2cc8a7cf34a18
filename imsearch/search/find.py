"""Matches for one embedded query: its class inferred (given, a stored copy, its folder, the top match), the
duplicate distance resolved, and one call of imsearch_search (`run`) with the driver's errors translated."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..audit.calibration import DUPLICATE, duplicate_distance
from ..db.errors import translated
from ..db.store import Store
from ..errors import ImsearchError, UnknownClass
from ..model.queries import Embedded
from ..modes import check_search
from . import UNKNOWN_CLASS_SQLSTATE, Match, check_max_distance, run


@dataclass(frozen=True)
class FindResult:
    """The ranked matches for one query in one mode."""

    query: str
    query_class: str | None
    mode: str
    matches: tuple[Match, ...]
    class_source: str | None = None  # given, stored copy, folder, top match (the page shows it)

    def to_json(self) -> dict[str, Any]:
        return {
            "query": self.query,
            "query_class": self.query_class,
            "mode": self.mode,
            "matches": [
                {"rank": m.rank, "id": m.id, "path": m.path, "class": m.cls, "distance": round(m.distance, 6)}
                for m in self.matches
            ],
        }


def limit(value: float | str | None) -> float | str | None:
    """A max_distance checked: None, a cosine distance (from a number or its text), or the name DUPLICATE."""
    if isinstance(value, str):
        if value.strip() == DUPLICATE:
            return DUPLICATE
        try:
            value = float(value)
        except ValueError:
            raise ImsearchError(f"max_distance must be a cosine distance or {DUPLICATE!r}, not {value!r}") from None
    return None if value is None else check_max_distance(value)


def max_distance(store: Store, identity: str, checked: float | str | None) -> float | None:
    """A checked max_distance (`limit`) as a number: DUPLICATE is the distance calibrated for model `identity`."""
    return duplicate_distance(store, identity) if isinstance(checked, str) else checked


def query_class(store: Store, query: Embedded, given: str | None) -> tuple[str | None, str | None]:
    """The query's class and where it came from: as given, else a stored image with the same bytes, else its folder
    if that is a stored class; (None, None) when none of them tells."""
    if given:
        return given, "given"
    if query.sha256:
        cls = store.class_of_content(query.sha256)
        if cls is not None:
            return cls, "stored copy"
    if query.folder and store.count(query.folder) > 0:
        return query.folder, "folder"
    return None, None


def stored_classes(store: Store) -> str:
    """The stored classes as the errors name them."""
    return ", ".join(sorted(c for c, _ in store.classes())) or "none stored"


def search(store: Store, identity: str, query: Embedded, mode: str, *, k: int, given: str | None,
           include_self: bool, exact: bool, class_from_top_match: bool = False,
           max_distance: float | None = None) -> FindResult:
    """Rank the stored images against one query in one mode: one call of imsearch_search, which plans. The class
    modes need the query's class (`query_class`); with `class_from_top_match`, else the top match's over all."""
    check_search(mode, k)
    store.check_model(identity, action="search")
    cls, source = query_class(store, query, given)
    if cls is None and mode != "all" and class_from_top_match:
        top = search(store, identity, query, "all", k=1, given=None, include_self=include_self, exact=exact)
        if top.matches and top.matches[0].cls is not None:
            cls, source = top.matches[0].cls, "top match"
    if cls is None and mode != "all":
        raise UnknownClass(f"{query.name}: cannot tell the query's class for mode {mode!r}; pass --class "
                           f"NAME, or pick one on the page (stored classes: {stored_classes(store)})")
    unknown = {UNKNOWN_CLASS_SQLSTATE: lambda: UnknownClass(
        f"{query.name}: class {cls!r} is not stored (stored classes: {stored_classes(store)})")}
    with translated("searching", store, refusals=unknown):
        matches = run(store, query.vector, mode, k=k, cls=cls, skip_sha=None if include_self else query.sha256,
                      max_distance=max_distance, exact=exact)
    return FindResult(query.name, cls, mode, tuple(matches), class_source=source)
