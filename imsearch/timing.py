"""Phase timings, logged at debug level: `imsearch --debug find` shows where a cold start goes, and
bench/coldstart.py reads the same lines."""

from __future__ import annotations

import logging
import os
import sys
import time
from contextlib import contextmanager
from typing import Iterator

log = logging.getLogger("imsearch.timing")


@contextmanager
def phase(name: str) -> Iterator[None]:
    """Log how long the block took as `timing: NAME 0.123 s`."""
    started = time.perf_counter()
    try:
        yield
    finally:
        log.debug("timing: %s %.3f s", name, time.perf_counter() - started)


def done(name: str, started: float) -> None:
    """Log a phase that began at `started` (time.perf_counter()) and ends now."""
    log.debug("timing: %s %.3f s", name, time.perf_counter() - started)


def since_process_start() -> float | None:
    """Seconds since this process started (Linux, to the kernel's clock tick), None elsewhere: the interpreter's
    start-up and the imports before any code of imsearch ran."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        ticks = int(fields[19])  # field 22, starttime, counted after the ")" that ends the command name
        return time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None
