"""The three search modes, named once, and the most matches a search returns: the library, the command line, the
page and the SQL functions take them from here (a light module: `imsearch --help` imports it without numpy or the
database driver)."""

from __future__ import annotations

from typing import Literal

from .errors import ImsearchError

Mode = Literal["all", "same", "other"]
MODES: tuple[Mode, ...] = ("all", "same", "other")
MAX_K = 1000  # imsearch_search refuses more matches per query (an HNSW search keeps at most 1,000 candidates)


def check_search(mode: str, k: int) -> None:
    """A mode and a k as imsearch_search takes them, refused with one line before any work is done."""
    if mode not in MODES:
        raise ImsearchError(f"unknown mode {mode!r}; use one of {', '.join(MODES)}")
    if not 1 <= k <= MAX_K:
        raise ImsearchError(f"k must be between 1 and {MAX_K}, not {k}")
