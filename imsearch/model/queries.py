"""Queries to vectors: paths, bytes or PIL images decoded and embedded in one batch, each with what identifies its
content (sha256) and suggests its class (its folder). The step `find`, `evaluate` and the page share."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence, Union

import numpy as np
from PIL import Image

from ..files import sha256_bytes
from ..timing import done, phase
from . import pixels
from .embed import Model
from .pixels import Preprocess

Query = Union[str, Path, bytes, Image.Image]


@dataclass(frozen=True)
class Embedded:
    """A query turned into a vector, with what identifies its content and suggests its class."""

    name: str
    vector: np.ndarray
    sha256: str | None
    folder: str | None


def embed(queries: Sequence[Query], prep: Preprocess, model: Callable[[], Model], *,
          names: Sequence[str] | None = None, max_decode_pixels: int | None = None) -> list[Embedded]:
    """Decode every query, then embed them in one batch; `model` is called only when one decoded (BadImage
    otherwise stops the batch). `max_decode_pixels` refuses files whose decode would hold more pixels."""
    loaded: list[tuple[str, np.ndarray, str | None, str | None]] = []
    started = time.perf_counter()
    for i, q in enumerate(queries):
        name = names[i] if names else None
        if isinstance(q, Image.Image):
            arr = pixels.prepare(pixels.to_rgb(q), prep)
            loaded.append((name or "<image>", arr, None, None))
            continue
        if isinstance(q, (str, Path)):
            path = Path(q).expanduser()
            data = pixels.read_file(path)
            name = name or str(path)
            folder = path.resolve().parent.name
        else:
            data, name, folder = q, name or "<upload>", None
        arr = pixels.load(data, name, prep, max_decode_pixels=max_decode_pixels).pixels
        loaded.append((name, arr, sha256_bytes(data), folder))
    done("decode", started)
    if not loaded:
        return []
    embedder = model()
    with phase("embed"):
        vectors = embedder.embed(np.stack([a for _, a, _, _ in loaded]))
    return [Embedded(n, v, s, f) for (n, _, s, f), v in zip(loaded, vectors)]
