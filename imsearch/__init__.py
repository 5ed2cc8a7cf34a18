"""imsearch: content-based image search on PostgreSQL + pgvector.

    from imsearch import Imsearch
    with Imsearch() as app:                       # DATABASE_URL, else the embedded server
        app.ingest("photos/")
        [result] = app.find("query.jpg", "same")  # modes: all, same, other
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import (
    BadImage,
    DatabaseUnavailable,
    ImsearchError,
    ModelMismatch,
    NotCalibrated,
    RefusedFile,
    SchemaOutdated,
    ServerCrashed,
    UnknownClass,
    WeightsUnavailable,
)

if TYPE_CHECKING:
    from .api import FindResult, Imsearch
    from .ingest import IngestResult
    from .search import Match

__all__ = [
    "Imsearch", "FindResult", "IngestResult", "Match", "ImsearchError", "BadImage", "DatabaseUnavailable",
    "ModelMismatch", "NotCalibrated", "RefusedFile", "SchemaOutdated", "ServerCrashed", "UnknownClass",
    "WeightsUnavailable",
]


def __getattr__(name: str) -> Any:
    """Import the heavy parts (numpy, psycopg, PIL) only when used: `imsearch --help` stays fast."""
    if name in ("Imsearch", "FindResult"):
        from . import api

        return getattr(api, name)
    if name == "IngestResult":
        from .ingest import IngestResult

        return IngestResult
    if name == "Match":
        from .search import Match

        return Match
    raise AttributeError(name)
