"""The evaluation walk: every image of a test folder embedded in batches, searched in each mode, and scored. It
searches through the facade's own steps (`embed`, `search`), so each search takes the facade's lock on its own."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Sequence

from ..errors import BadImage
from ..model.queries import Embedded
from ..modes import check_search
from ..search.find import FindResult
from .metrics import Evaluation, score
from .queries import evaluation_folder, find_queries

Progress = Callable[[int, int], None]


def evaluate(testdir: str | Path, modes: Sequence[str], *, k: int, batch_size: int,
             stored: Callable[[], dict[str, int]], embed: Callable[[list[Path]], list[Embedded]],
             search: Callable[[Embedded, str, str | None], FindResult],
             identity: Callable[[], str], progress: Progress | None = None) -> Evaluation:
    """Search every image under testdir (class = its first-level sub-folder) in each mode, and score it.

    `stored` gives the stored classes' counts, `embed` a batch's vectors, `search` one query's result in a mode for
    its class, `identity` the model's. Images of a class that is not stored are counted in `unstored`; unreadable
    files and files outside a class folder are listed in `skipped`.
    """
    started = time.perf_counter()
    for mode in modes:
        check_search(mode, k)
    evaluation_folder(testdir)  # before the database: a wrong path fails first
    counts = stored()
    found = find_queries(testdir, counts)
    queries, skipped = found.files, list(found.skipped)  # files that fail to decode join `skipped`
    results: list[FindResult] = []
    for start in range(0, len(queries), batch_size):
        batch = queries[start:start + batch_size]
        for f, e in zip(batch, embed_each(embed, [f.path for f in batch], skipped)):
            if e is not None:
                results += [search(e, mode, f.cls) for mode in modes]
        if progress:
            progress(start + len(batch), len(queries))
    return score(results, k=k, stored=counts, model=identity(), unstored=found.unstored, skipped=skipped,
                 seconds=time.perf_counter() - started)


def embed_each(embed: Callable[[list[Path]], list[Embedded]], paths: Sequence[Path],
               failed: list[tuple[str, str]]) -> list[Embedded | None]:
    """Embed a batch; when a file in it is bad, embed one by one so the others still count."""
    try:
        return list(embed(list(paths)))
    except BadImage:
        pass
    out: list[Embedded | None] = []
    for path in paths:
        try:
            out.append(embed([path])[0])
        except BadImage as exc:
            failed.append((exc.path, exc.reason))
            out.append(None)
    return out
