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
    """Yield the image files under root in a stable order; class = first-level sub-folder.

    Symlinked folders are followed once (a loop is reported, not followed); unreadable folders are reported.
    """
    root = root.resolve()
    seen_dirs: set[tuple[int, int]] = set()

    def note(path: str, reason: str) -> None:
        if problems is not None:
            problems.append(WalkProblem(path, reason))

    def visit(folder: Path, cls: str | None, depth: int) -> Iterator[ImageFile]:
        try:
            st = folder.stat()
            key = (st.st_dev, st.st_ino)
            if key in seen_dirs:
                note(str(folder), "folder already visited (symlink loop)")
                return
            seen_dirs.add(key)
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
            if is_dir:
                if entry.name.startswith("."):
                    continue
                yield from visit(path, entry.name if depth == 0 else cls, depth + 1)
            elif is_file and is_image_name(path):
                yield ImageFile(path.resolve(), cls)
            elif entry.is_symlink() and not path.exists() and is_image_name(path):
                note(str(path), "broken symlink")

    yield from visit(root, None, 0)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
