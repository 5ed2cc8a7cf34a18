"""Files: walk a photo folder, name each image's class (its first-level sub-folder), hash contents."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"})


@dataclass(frozen=True)
class ImageFile:
    """An image file found under an ingest root, with its class (None for files at the root)."""

    path: Path
    cls: str | None


@dataclass(frozen=True)
class WalkProblem:
    """A file or folder the walk could not read; reported, never fatal."""

    path: str
    reason: str


def is_image_name(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES


def walk(root: Path, problems: list[WalkProblem] | None = None) -> Iterator[ImageFile]:
    """Yield the image files under root in a stable order, each once; class = first-level sub-folder.

    Symlinked folders are followed once (a loop is reported, not followed); unreadable folders, broken symlinks,
    image names that are not files (a FIFO named x.jpg) and names PostgreSQL cannot store (not UTF-8) are
    reported. A file reached twice is yielded once, under its resolved path, with the class of the folder that
    holds it rather than that of a symlink elsewhere: symlinks are followed after everything reached directly.
    A file whose resolved path lies outside root is yielded under its path inside root (the link's), so that
    every path yielded lies under root: a re-ingest finds it stored, and it vanishes when the link does.
    """
    root = root.resolve()
    seen_dirs: dict[tuple[int, int], Path] = {}
    seen_files: set[Path] = set()
    linked: list[tuple[Path, ImageFile]] = []  # (resolved, file) reached through a symlink: yielded last,
    # unless also reached directly
    linked_dirs: list[tuple[Path, str | None, int]] = []  # symlinked folders: visited after the real ones

    def note(path: str, reason: str) -> None:
        if problems is not None:
            problems.append(WalkProblem(path, reason))

    def visit(folder: Path, cls: str | None, depth: int) -> Iterator[ImageFile]:
        try:
            st = folder.stat()
            key = (st.st_dev, st.st_ino)
            if key in seen_dirs:
                note(str(folder), f"symlink to a folder already visited ({seen_dirs[key]}): not followed again")
                return
            seen_dirs[key] = folder
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as exc:
            note(str(folder), f"cannot read folder ({exc.strerror or exc})")
            return
        for entry in entries:
            path = Path(entry.path)
            try:
                is_dir = entry.is_dir()
                is_file = entry.is_file()
            except OSError as exc:
                note(str(path), f"cannot stat ({exc.strerror or exc})")
                continue
            if is_dir and entry.name.startswith("."):
                continue
            if (is_dir or is_image_name(path)) and not utf8(entry.path):
                note(entry.path, "name is not valid UTF-8, which a PostgreSQL text column cannot hold; rename it")
            elif is_dir and entry.is_symlink():
                linked_dirs.append((path, entry.name if depth == 0 else cls, depth + 1))
            elif is_dir:
                yield from visit(path, entry.name if depth == 0 else cls, depth + 1)
            elif not is_image_name(path):
                continue
            elif is_file:
                resolved = path.resolve()
                if resolved != path:
                    linked.append((resolved, ImageFile(resolved if resolved.is_relative_to(root) else path, cls)))
                elif resolved not in seen_files:
                    seen_files.add(resolved)
                    yield ImageFile(resolved, cls)
            elif entry.is_symlink() and not path.exists():
                note(str(path), "broken symlink")
            else:
                note(str(path), "not a regular file")

    yield from visit(root, None, 0)
    while linked_dirs:
        yield from visit(*linked_dirs.pop(0))
    for resolved, image in linked:
        if resolved not in seen_files:
            seen_files.add(resolved)
            yield image


def utf8(name: str) -> bool:
    """Whether a file name (surrogate-escaped by Python when its bytes are not UTF-8) can be stored as text."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def printable(path: str) -> str:
    """A path fit for one line of output: control characters and undecodable bytes escaped (\\n, \\udce9)."""
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in path)


def vanished(path: str) -> bool:
    """True only when a stored file is gone; a permission error is no reason to delete its row (`--prune`)."""
    try:
        os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return True
    except OSError:
        return False
    return False


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
