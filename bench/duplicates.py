"""Where to put `imsearch duplicates`' default threshold: distances of altered copies against distinct photos.

    .venv/bin/python bench/duplicates.py --weights FILE.pth      # ../shared/datasets/rooms/base, 8 copies a class

Stores the base photos (skipped when already stored) in the database imsearch uses (DATABASE_URL, else the
embedded server under IMSEARCH_HOME), then measures, as cosine distances computed by pgvector on halfvec:
- each stored photo's nearest distinct stored photo (imsearch_nearest, which leaves out identical bytes);
- a byte copy, a JPEG re-encode at quality 75, and copies resized to 200%, 75% and 50% (saved as JPEG at
  quality 90) of some photos, embedded without storing them, against their original's stored vector.
Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import io
import os
from pathlib import Path

import numpy as np
from pgvector import HalfVector
from PIL import Image

from imsearch import Imsearch
from imsearch.db.sqlaccess import DEFAULT_DUPLICATE_DISTANCE

SHARED = Path(os.environ.get("IMSEARCH_SHARED", Path(__file__).resolve().parent.parent.parent / "shared"))


def variants(path: Path) -> dict[str, bytes]:
    """The altered copies of one photo, as file bytes."""
    data = path.read_bytes()
    with Image.open(path) as im:
        im = im.convert("RGB")
        jpeg = io.BytesIO()
        im.save(jpeg, "JPEG", quality=75)
        out = {"byte copy": data, "re-encoded q75": jpeg.getvalue()}
        for scale in (2.0, 0.75, 0.5):
            resized = io.BytesIO()
            size = (round(im.width * scale), round(im.height * scale))
            im.resize(size, Image.Resampling.LANCZOS).save(resized, "JPEG", quality=90)
            out[f"resized {scale:.0%} q90"] = resized.getvalue()
    return out


def describe(values: list[float]) -> str:
    q = np.quantile(values, [0.0, 0.01, 0.5, 0.99, 1.0])
    return (f"n={len(values):4d}  min {q[0]:.5f}  p1 {q[1]:.5f}  median {q[2]:.5f}  p99 {q[3]:.5f}  "
            f"max {q[4]:.5f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", help="ResNet-50 weights name or .pth file (as for imsearch ingest)")
    parser.add_argument("--photos", type=Path, default=SHARED / "datasets" / "rooms" / "base")
    parser.add_argument("--per-class", type=int, default=8, help="photos per class that get altered copies")
    args = parser.parse_args()
    root = args.photos.resolve()

    with Imsearch(weights=args.weights, device="cpu") as app:
        # 1. Store the photos (unchanged files are skipped).
        result = app.ingest(root)
        print(f"stored: {result.added} added, {result.skipped} already there ({app.embedder.identity})")
        conn = app.store.conn

        # 2. Each stored photo's nearest distinct photo, through the SQL function BI tools use.
        rows = conn.execute(
            """
            SELECT i.path, n.distance
            FROM images i CROSS JOIN LATERAL imsearch_nearest(i.id, 1) n
            WHERE starts_with(i.path, %s)
            """,
            (str(root) + "/",),
        ).fetchall()
        distinct = [float(d) for _, d in rows]

        # 3. Altered copies of the first photos of each class, against their original's stored vector.
        picked = [p for cls in sorted(d for d in root.iterdir() if d.is_dir())
                  for p in sorted(cls.glob("*.jpg"))[:args.per_class]]
        altered: dict[str, list[float]] = {}
        for path in picked:
            copies = variants(path)
            embedded = app.embed(list(copies.values()), names=list(copies))
            for e in embedded:
                row = conn.execute("SELECT embedding <=> %s FROM images WHERE path = %s",
                                   (HalfVector(e.vector), str(path))).fetchone()
                assert row is not None, path
                altered.setdefault(e.name, []).append(float(row[0]))

    # 4. The figures.
    print(f"\ncosine distance to the original ({len(picked)} photos):")
    for name, values in altered.items():
        print(f"  {name:16s} {describe(values)}")
    print(f"nearest distinct stored photo ({len(distinct)} photos):")
    print(f"  {'':16s} {describe(distinct)}")
    print(f"\nwithin the default threshold {DEFAULT_DUPLICATE_DISTANCE} (imsearch duplicates):")
    for name, values in altered.items():
        print(f"  {name:16s} {sum(v <= DEFAULT_DUPLICATE_DISTANCE for v in values):3d}/{len(values)}")
    closest = min(distinct)
    print(f"  {'distinct photos':16s} {sum(d <= DEFAULT_DUPLICATE_DISTANCE for d in distinct):3d}/{len(distinct)}"
          f"  (the closest at {closest:.5f}, x{closest / DEFAULT_DUPLICATE_DISTANCE:.1f} the threshold)")


if __name__ == "__main__":
    main()
