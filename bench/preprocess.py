"""Preprocessing study: the same ResNet-50, three ways of cutting a photo, scored as the seed study scored them.

    .venv/bin/python bench/preprocess.py                                  # ../shared/datasets/rooms, all photos
    .venv/bin/python bench/preprocess.py --base-per-class 8 --test-per-class 4   # a quick subset
    .venv/bin/python bench/preprocess.py --base my/base --test my/heldout --weights IMAGENET1K_V1

Choices (imsearch.model.pixels.PREPROCESSING): `recipe` is torchvision's ImageNet recipe (resize the short side to 256,
centre-crop 224), the default; `square224` squeezes the whole frame to 224x224; `seed1028x768` is the seed
study's whole frame at 1028x768. For each, the base folder is ingested into a fresh database and the test folder
evaluated in mode all; printed: precision@5 (macro over classes), ingest and query images/s, and the weights.

Weights: --weights, else torchvision's IMAGENET1K_V1 when it loads, else a stand-in checkpoint written by
../shared/tools/make_test_weights.py. With the stand-in every precision figure is chance level and means nothing;
only the speeds do. Database: DATABASE_URL when set (a fresh database per choice on that server, dropped
afterwards: the role needs CREATEDB), else a throwaway embedded server in a temporary IMSEARCH_HOME.
Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import atexit
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg

from imsearch import Imsearch, WeightsUnavailable
from imsearch.db.embedded import database_url
from imsearch.evaluation.metrics import PRECISION
from imsearch.model.embed import get_embedder
from imsearch.model.pixels import PREPROCESSING
from imsearch.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("IMSEARCH_SHARED", ROOT.parent / "shared"))
ROOMS = SHARED / "datasets" / "rooms"


def subset(src: Path, per_class: int | None, dest: Path) -> Path:
    """src itself, or the first per_class photos of each class folder linked into dest."""
    if not per_class:
        return src
    for folder in sorted(p for p in src.iterdir() if p.is_dir()):
        (dest / folder.name).mkdir(parents=True, exist_ok=True)
        for photo in sorted(folder.glob("*.jpg"))[:per_class]:
            (dest / folder.name / photo.name).symlink_to(photo)
    return dest


def pick_weights(given: str | None, tmp: Path, device: str) -> tuple[str, bool]:
    """(weights, is_stand_in): as given, else ImageNet when it loads, else a freshly written stand-in."""
    if given:
        return given, False
    try:
        get_embedder("IMAGENET1K_V1", device=device)
        return "IMAGENET1K_V1", False
    except WeightsUnavailable as exc:
        print(f"ImageNet weights unavailable ({exc}); writing a stand-in checkpoint", flush=True)
    out = tmp / "standin.pth"
    subprocess.run([sys.executable, str(SHARED / "tools" / "make_test_weights.py"), str(out)], check=True,
                   capture_output=True)
    return str(out), True


def with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "/" + name, parts.query, parts.fragment))


def run_choice(admin_url: str, choice: str, weights: str, base: Path, test: Path, device: str,
               k: int) -> dict[str, object]:
    name = f"imsearch_prep_{choice}_{os.getpid()}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        with Imsearch(with_database(admin_url, name), weights=weights, device=device, preprocess=choice) as app:
            # -- ingest the base folder with this preprocessing (the model loads once per choice)
            app.embedder  # noqa: B018 - load the model before the clock starts
            ingested = app.ingest(base)
            # -- evaluate the test folder in mode all, as `imsearch evaluate --mode all` does
            started = time.perf_counter()
            ev = app.evaluate(test, ("all",), k=k)
            query_s = time.perf_counter() - started
            queries = len(ev.images)
            return {
                "choice": choice,
                "identity": app.embedder.identity,
                "stored": ingested.added,
                "queries": queries,
                "precision": ev.overall["all"][PRECISION].macro,
                "ingest_rate": ingested.added / ingested.seconds if ingested.seconds else 0.0,
                "query_rate": queries / query_s if query_s else 0.0,
            }
    finally:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", type=Path, default=ROOMS / "base", help="folder to ingest (class = sub-folder)")
    ap.add_argument("--test", type=Path, default=ROOMS / "test", help="folder of queries (class = sub-folder)")
    ap.add_argument("--weights", help="torchvision weights name or .pth file [default: ImageNet, else stand-in]")
    ap.add_argument("--choices", default=",".join(PREPROCESSING), help="comma-separated preprocessing choices")
    ap.add_argument("--base-per-class", type=int, help="use only the first N base photos of each class")
    ap.add_argument("--test-per-class", type=int, help="use only the first N test photos of each class")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("-k", type=int, default=5)
    args = ap.parse_args()

    # -- a scratch folder, removed after the embedded server (if any) has stopped: atexit runs last-in first-out
    tmp = Path(tempfile.mkdtemp(prefix="imsearch-prep-"))
    atexit.register(shutil.rmtree, tmp, True)

    # -- photos and weights
    base = subset(args.base, args.base_per_class, tmp / "base")
    test = subset(args.test, args.test_per_class, tmp / "test")
    weights, stand_in = pick_weights(args.weights, tmp, args.device)

    # -- the server: DATABASE_URL, else a throwaway embedded one
    if not os.environ.get("DATABASE_URL"):
        os.environ["IMSEARCH_HOME"] = str(tmp / "home")
    admin_url = database_url(Settings.from_env())

    # -- one fresh database per choice
    choices = [c.strip() for c in args.choices.split(",") if c.strip()]
    print(f"imsearch preprocessing study: base {args.base} ({args.base_per_class or 'all'} per class), "
          f"test {args.test} ({args.test_per_class or 'all'} per class), k={args.k}, device {args.device}")
    if stand_in:
        print(f"weights: STAND-IN checkpoint {weights} (random weights): precision figures are chance level "
              "and MEANINGLESS; only the speeds mean something")
    else:
        print(f"weights: {weights}")
    rows = []
    for choice in choices:
        row = run_choice(admin_url, choice, weights, base, test, args.device, args.k)
        rows.append(row)
        print(f"  {choice}: done", flush=True)

    # -- the figures
    print(f"\n{'choice':<14} {'model identity':<52} {'stored':>6} {'queries':>7} "
          f"{'precision@' + str(args.k) + ' (all, macro)':>26} {'ingest img/s':>12} {'query img/s':>11}")
    for r in rows:
        precision = f"{r['precision']:.3f}" + (" (stand-in)" if stand_in else "")
        print(f"{r['choice']:<14} {r['identity']:<52} {r['stored']:>6} {r['queries']:>7} {precision:>26} "
              f"{r['ingest_rate']:>12.1f} {r['query_rate']:>11.1f}")


if __name__ == "__main__":
    main()
