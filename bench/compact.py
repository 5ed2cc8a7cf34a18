"""Which compact form of the embedding can an index hold and still find the exact top five after re-ranking?

    .venv/bin/python bench/compact.py                  # 100k rows made from the rooms photos, 5 classes
    .venv/bin/python bench/compact.py --rows 20000

No index and no graph: for each form, every row is ranked by the form's own distance (exactly, in numpy), and the
figure is the share of the exact top 5 (cosine on the full embedding) found among the first N. That is the most an
index over the form can give when its nearest N are re-ranked by the exact distance; a graph search loses more.
Forms: the centred binary code (sign of embedding - the library's mean, Hamming distance), random-sign folds to
1,024 / 512 / 256 dimensions (imsearch.search.fold and its like, cosine), and PCA to 256 / 128 dimensions (fitted on
5,000 rows). Rows and queries are bench/million.py's: mixtures of the rooms photos' embeddings with noise ("gen"
queries drawn the same way, none stored) and the rooms test photos ("real"). Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
from million import Library, embed_photos
from synthetic import bench_server

from imsearch.search import FOLD_DIMENSIONS, fold

DEPTHS = (50, 100, 200, 400, 800)


def signed_fold(dims: int) -> Callable[[np.ndarray], np.ndarray]:
    """A random-sign fold to `dims` dimensions: imsearch_fold's for 1,024, the same construction for fewer."""
    if dims == FOLD_DIMENSIONS:
        return fold
    signs = np.random.default_rng(7).choice([-1.0, 1.0], 2048).astype(np.float32)
    return lambda x: (x * signs).reshape(len(x), -1, dims).sum(1)


def found(rank_rows: np.ndarray, truth: np.ndarray) -> list[float]:
    """Share of each query's true top 5 among the first N of `rank_rows` (rows x queries similarities)."""
    order = np.argsort(-rank_rows, axis=0)[: max(DEPTHS)].T
    return [float(np.mean([len(set(t) & set(o[:n])) / 5 for t, o in zip(truth, order)])) for n in DEPTHS]


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--queries", type=int, default=50)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="imsearch-compact-") as tmp, bench_server(defaults=True) as admin:
        photos, _, real = embed_photos(admin, Path(tmp))
    lib = Library(photos, 5, seed=args.rows)
    rows = np.concatenate([lib.draw(c, n) for c, n in lib.sizes(args.rows).items()]).astype(np.float32)
    queries = {"gen": lib.draw("class_000", args.queries).astype(np.float32), "real": real[: args.queries * 2]}
    mean = rows.mean(axis=0)
    sample = rows[np.random.default_rng(1).choice(len(rows), 5000, replace=False)] - mean
    basis = np.linalg.svd(sample, full_matrices=False)[2]
    forms: dict[str, Callable[[np.ndarray], np.ndarray]] = {
        "binary 2048 (centred)": lambda x: np.where(x - mean > 0, 1.0, -1.0).astype(np.float32),
        "fold 1024 (imsearch)": signed_fold(1024), "fold 512": signed_fold(512), "fold 256": signed_fold(256),
        "pca 256": lambda x: (x - mean) @ basis[:256].T, "pca 128": lambda x: (x - mean) @ basis[:128].T,
    }
    print(f"{args.rows:,} rows; share of the exact top 5 among each form's first N "
          f"({', '.join(f'N={n}' for n in DEPTHS)})")
    exact = unit(rows)
    for kind, q in queries.items():
        truth = np.argsort(-(exact @ unit(q).T), axis=0)[:5].T
        for name, form in forms.items():
            # a binary code's Hamming distance ranks as the dot product of its +-1 vectors
            scores = form(rows) @ form(q).T if name.startswith("binary") else unit(form(rows)) @ unit(form(q)).T
            print(f"{kind:5} {name:22} " + "  ".join(f"{r:.3f}" for r in found(scores, truth)), flush=True)


if __name__ == "__main__":
    main()
