"""Threads that decode: how many by default, and the bounded pool they run in (ingest, the hash backfill and the
page's decode slots share both)."""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Generator, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def usable_cores() -> int:
    """The cores this process may run on (its affinity, which a container or taskset narrows), else the count."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 2


def default_workers() -> int:
    """Decodes at once: one per usable core, at least two so that one slow file never holds up the rest, at most
    eight since each may hold a few hundred MB (Pillow, hashlib and the model release the GIL)."""
    return max(2, min(8, usable_cores()))


def in_order(fn: Callable[[T], R], items: Iterable[T], *, workers: int, depth: int, name: str
             ) -> Generator[tuple[T, Future[R]], None, None]:
    """`fn(item)` for each item in `workers` threads, yielded in the items' order as (item, future), with at most
    `depth` submitted and not yet yielded: memory stays flat however many items come. Closing the generator
    cancels what has not started."""
    in_flight: deque[tuple[T, Future[R]]] = deque()
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name) as pool:
        try:
            for item in items:
                in_flight.append((item, pool.submit(fn, item)))
                if len(in_flight) >= depth:
                    yield in_flight.popleft()
            while in_flight:
                yield in_flight.popleft()
        finally:
            for _, future in in_flight:
                future.cancel()
