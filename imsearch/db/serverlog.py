"""The embedded server's log: where it lies, and the backend crashes it records (a process killed by a signal)."""

from __future__ import annotations

import itertools
import re
import signal
from dataclasses import dataclass
from pathlib import Path

from .datafolder import read_file

CRASH = re.compile(r"\((?:PID|pid) (\d+)\) was terminated by signal (\d+)")
RUNNING = re.compile(r"Failed process was running: (.*)")


def log_file(pgdata: Path) -> Path:
    """The server's log, where PostgreSQL says why a backend died."""
    return pgdata / "log"


def tail(log_path: Path, lines: int = 3) -> list[str]:
    """The last lines of the log (none when it is missing, a link or no file)."""
    size = log_path.lstat().st_size if log_path.exists() else 0
    text = (read_file(log_path, since=max(0, size - 4096)) or b"").decode(errors="replace")
    return text.strip().splitlines()[-lines:]


@dataclass(frozen=True)
class Crash:
    """A server process that died by a signal, as the server log tells it."""

    pid: int
    signal: int
    statement: str | None

    def describe(self) -> str:
        try:
            name = signal.Signals(self.signal).name
        except ValueError:
            name = f"signal {self.signal}"
        what = " ".join((self.statement or "").split())
        what = f" while running `{what[:120]}{'…' if len(what) > 120 else ''}`" if what else ""
        return f"the database server's process {self.pid} was killed by signal {self.signal} ({name}){what}"


def crash_in_log(log_path: Path, *, since: int = 0, pid: int | None = None) -> Crash | None:
    """The last backend crash the log records after byte `since` (of backend `pid` when given), else None."""
    data = read_file(log_path, since=since)  # a link or a FIFO in its place is no log
    if data is None:
        return None
    lines = data.decode(errors="replace").splitlines()
    found = None
    for i, line in enumerate(lines):
        m = CRASH.search(line)
        if m and (pid is None or int(m[1]) == pid):
            statement = None
            if i + 1 < len(lines) and (running := RUNNING.search(lines[i + 1])):
                rest = [x for x in itertools.takewhile(lambda x: x.startswith("\t"), lines[i + 2:])]
                statement = " ".join([running[1], *rest])  # the log continues a statement on tab-led lines
            found = Crash(int(m[1]), int(m[2]), statement)
    return found
