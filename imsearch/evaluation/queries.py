"""An evaluation's test folder sorted: its images in a sub-folder named after a stored class are the queries;
those of a class that is not stored are counted; files outside a class folder and unreadable ones are skipped."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

from ..errors import ImsearchError
from ..files import ImageFile, WalkProblem, walk


@dataclass(frozen=True)
class Queries:
    """The test images to search with, and the rest with why they are left out."""

    files: tuple[ImageFile, ...]
    unstored: dict[str, int]  # class -> images of a class that is not stored
    skipped: tuple[tuple[str, str], ...]  # (path, reason)


def evaluation_folder(testdir: str | Path) -> Path:
    """testdir as a path, refused when it is not a folder."""
    root = Path(testdir).expanduser()
    if not root.is_dir():
        raise ImsearchError(f"{testdir}: not a folder")
    return root


def find_queries(testdir: str | Path, stored: Collection[str]) -> Queries:
    """Walk testdir (class = its first-level sub-folder) and sort its images against the stored classes; refused
    when nothing is stored or no image can be a query."""
    problems: list[WalkProblem] = []
    skipped: list[tuple[str, str]] = []
    unstored: dict[str, int] = {}
    queries: list[ImageFile] = []
    for f in walk(evaluation_folder(testdir), problems):
        if f.cls is None:
            skipped.append((str(f.path), "not in a class folder"))
        elif f.cls not in stored:
            unstored[f.cls] = unstored.get(f.cls, 0) + 1
        else:
            queries.append(f)
    skipped += [(p.path, p.reason) for p in problems]
    if not stored:
        raise ImsearchError("no classes are stored yet: run `imsearch ingest FOLDER` first")
    if not queries:
        raise ImsearchError(f"{testdir}: no images in a sub-folder named after a stored class "
                            f"(stored classes: {', '.join(sorted(stored))})")
    return Queries(tuple(queries), unstored, tuple(skipped))
