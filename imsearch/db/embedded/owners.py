"""The registry of an embedded server's users: the imsearch processes on one data folder, kept in a JSON list in
that folder. The server stops with the last of them; callers hold the data folder's lock while they change it."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..datafolder import read_file, write_file

FILE_NAME = ".handle_pids.json"  # the name earlier builds used


def start_time(pid: int) -> float | None:
    """When process `pid` started (seconds since the epoch), None when there is no such process."""
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


@dataclass(frozen=True)
class Owner:
    """One registered process: its pid, and its start time, which tells a reused pid apart (None in an entry of an
    earlier build, which registered the bare pid)."""

    pid: int
    started: float | None

    @classmethod
    def parse(cls, entry: Any) -> Owner | None:
        """The owner an entry of the file names (`[pid, start]`, or an earlier build's bare pid), else None."""
        if isinstance(entry, list) and len(entry) == 2:
            pid, started = entry
        else:
            pid, started = entry, None
        if isinstance(pid, bool) or not isinstance(pid, int):
            return None
        if started is not None and (isinstance(started, bool) or not isinstance(started, (int, float))):
            return None
        return cls(pid, None if started is None else float(started))

    @classmethod
    def this_process(cls) -> Owner:
        return cls(os.getpid(), start_time(os.getpid()))

    def alive(self) -> bool:
        """Whether the registered process still runs (the same one: its start time matches)."""
        now = start_time(self.pid)
        return now is not None and (self.started is None or abs(now - self.started) < 0.01)

    def entry(self) -> list[Any]:
        return [self.pid, self.started]


class Owners:
    """The registered users of the server whose data folder is `pgdata`."""

    def __init__(self, pgdata: Path) -> None:
        self.path = pgdata / FILE_NAME

    def _read(self) -> list[Owner]:
        """The entries of the file; a missing, unreadable or malformed file or entry counts as none."""
        try:
            entries = json.loads(read_file(self.path, limit=2**20) or b"[]")
        except ValueError:
            return []
        if not isinstance(entries, list):
            return []
        return [owner for owner in map(Owner.parse, entries) if owner is not None]

    def _write(self, owners: list[Owner]) -> None:
        write_file(self.path, json.dumps([o.entry() for o in owners]).encode())

    def live(self, *, others: bool = False) -> list[int]:
        """The pids of the live registered processes (with `others`, apart from this one)."""
        return [o.pid for o in self._read() if o.alive() and not (others and o.pid == os.getpid())]

    def add(self) -> None:
        """Register this process (once), dropping the processes that are gone."""
        me = Owner.this_process()
        self._write([o for o in self._read() if o.alive() and o.pid != me.pid] + [me])

    def remove(self) -> list[int]:
        """Unregister this process, dropping the processes that are gone; returns the pids of the live ones left."""
        left = [o for o in self._read() if o.alive() and o.pid != os.getpid()]
        self._write(left)
        return [o.pid for o in left]
