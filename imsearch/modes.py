"""The three search modes, named once: the library, the command line, the page and the SQL functions take them from
here (a light module: `imsearch --help` imports it without numpy or the database driver)."""

from __future__ import annotations

from typing import Literal

Mode = Literal["all", "same", "other"]
MODES: tuple[Mode, ...] = ("all", "same", "other")
