"""Ingest speed and memory: imsearch's pipeline against the model alone and against a seed-style loop.

    .venv/bin/python bench/ingest.py                      # 300 large JPEGs, CPU, fp32
    .venv/bin/python bench/ingest.py --photos 1000        # the memory check: peak RSS for 1,000 12 MP photos
    .venv/bin/python bench/ingest.py --precision bf16     # the same at bf16 (rows then record bf16)
    .venv/bin/python bench/ingest.py --device cuda

Makes its own 4032x3024 JPEGs (quality 90) upscaled from ../shared/datasets/rooms, uses a throwaway embedded
PostgreSQL (or DATABASE_URL, where it creates and drops a database), and the stand-in weights unless --weights
is given. In one run it prints: model-only throughput (random pixels, same batch, precision, device), imsearch
ingest end to end (a subprocess, so its peak RSS is its own), their ratio, the seed-style loop (one image at a
time, full decode, resize to 1028x768, one INSERT each) and the speed-up over it. Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from imsearch import embedded  # noqa: E402
from imsearch.embed import get_embedder  # noqa: E402
from imsearch.pixels import MEAN, STD  # noqa: E402
from imsearch.store import connect, upgrade  # noqa: E402

ROOMS = ROOT.parent / "shared" / "datasets" / "rooms"


def make_photos(folder: Path, n: int) -> list[Path]:
    """n large JPEGs in class folders, made once per folder (reused when already there)."""
    sources = sorted((ROOMS / "base").glob("*/*.jpg")) + sorted((ROOMS / "test").glob("*/*.jpg"))
    out = []
    for i in range(n):
        src = sources[i % len(sources)]
        dest = folder / src.parent.name / f"{src.stem}_{i:04d}.jpg"
        if not dest.exists():
            dest.parent.mkdir(parents=True, exist_ok=True)
            img = Image.open(src).convert("RGB").resize((4032, 3024), Image.Resampling.BICUBIC)
            if i >= len(sources):  # later copies differ in content, so no two files hash alike
                img = img.rotate(180 * (i // len(sources) % 2)).transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            img.save(dest, "JPEG", quality=90)
        out.append(dest)
    return out


def model_only(weights: str, device: str, precision: str, batch: int, n: int) -> float:
    """Images/s of the model alone on random pixels: the ceiling for ingest."""
    embedder = get_embedder(weights, device=device, precision=precision)
    pixels = np.random.default_rng(0).integers(0, 256, (batch, 224, 224, 3), dtype=np.uint8)
    embedder.embed(pixels)  # warm-up
    done, t = 0, time.perf_counter()
    while done < n:
        embedder.embed(pixels)
        done += batch
    return done / (time.perf_counter() - t)


def imsearch_ingest(folder: Path, url: str, weights: str, args: argparse.Namespace) -> tuple[dict, float]:
    """`imsearch ingest --json` as a subprocess: its summary and its own peak RSS in MiB."""
    cmd = [sys.executable, "-m", "imsearch", "--database-url", url, "ingest", str(folder), "--json",
           "--weights", weights, "--device", args.device, "--precision", args.precision,
           "--batch-size", str(args.batch_size)] + (["--workers", str(args.workers)] if args.workers else [])
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if proc.returncode not in (0, 1):
        sys.exit(f"imsearch ingest failed: {proc.stderr.strip()}")
    return json.loads(proc.stdout), max(peak, before) / 1024


def seed_loop(files: list[Path], url: str, weights: str) -> float:
    """The seed study's way: one image at a time, full decode, 1028x768, fp32, one INSERT each."""
    import torch

    embedder = get_embedder(weights, device="cpu", precision="fp32")
    mean = torch.tensor(MEAN).view(3, 1, 1)
    std = torch.tensor(STD).view(3, 1, 1)
    conn = connect(url)
    conn.execute("CREATE TEMP TABLE seed (path text, embedding halfvec(2048))")
    t = time.perf_counter()
    for f in files:
        img = Image.open(f).convert("RGB").resize((1028, 768))
        x = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float().div(255).sub(mean).div(std)
        with torch.inference_mode():
            v = embedder.model(x[None])[0].numpy()
        conn.execute("INSERT INTO seed VALUES (%s, %s::halfvec)", (str(f), str(v.tolist())))
    rate = len(files) / (time.perf_counter() - t)
    conn.close()
    return rate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--photos", type=int, default=300, help="large JPEGs to ingest")
    ap.add_argument("--seed-photos", type=int, default=30, help="photos for the (slow) seed-style loop")
    ap.add_argument("--weights", help="weights name or file [default: a stand-in written by ../shared/tools]")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int)
    ap.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "imsearch-bench-jpegs"),
                    help="where the large JPEGs are kept between runs")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="imsearch-bench-") as tmp:
        # -- weights and photos
        weights = args.weights
        if weights is None:
            weights = str(Path(tmp) / "standin.pth")
            subprocess.run([sys.executable, str(ROOMS.parent.parent / "tools" / "make_test_weights.py"), weights],
                           check=True, capture_output=True)
        cache = Path(args.cache) / "photos"
        t = time.perf_counter()
        files = make_photos(cache, args.photos)
        print(f"{len(files)} JPEGs 4032x3024 q90 in {cache} ({time.perf_counter() - t:.0f} s to make); "
              f"weights {weights}; device {args.device}, precision {args.precision}, batch {args.batch_size}, "
              f"{os.cpu_count()} CPUs")
        folder = Path(tmp) / "photos"  # exactly these files, linked from the cache
        for f in files:
            (folder / f.parent.name).mkdir(parents=True, exist_ok=True)
            (folder / f.parent.name / f.name).symlink_to(f)

        # -- a database: DATABASE_URL, else a throwaway embedded server
        servers = contextlib.ExitStack()
        url = os.environ.get("DATABASE_URL") or servers.enter_context(embedded.temporary())
        admin = connect(url, register=False)
        admin.execute("DROP DATABASE IF EXISTS imsearch_bench_ingest")
        admin.execute("CREATE DATABASE imsearch_bench_ingest")
        bench_url = url.split("?")[0].rsplit("/", 1)[0] + "/imsearch_bench_ingest" + (
            "?" + url.split("?", 1)[1] if "?" in url else "")
        upgrade(bench_url)
        try:
            # -- the ceiling: the model alone
            ceiling = model_only(weights, args.device, args.precision, args.batch_size, max(96, len(files) // 2))
            print(f"model only (random pixels):        {ceiling:6.1f} img/s")
            # -- imsearch ingest, end to end, in its own process
            summary, rss = imsearch_ingest(folder, bench_url, weights, args)
            stored = summary["added"] + summary["updated"]
            rate = stored / summary["seconds"]
            print(f"imsearch ingest (end to end):      {rate:6.1f} img/s  ({stored} stored in "
                  f"{summary['seconds']:.1f} s, {len(summary['failed'])} failed)")
            print(f"ingest / model-only:               {rate / ceiling:6.2f}")
            print(f"peak RSS of the ingest process:    {rss:6.0f} MiB")
            # -- the seed study's loop, on a subset
            seed = seed_loop(files[: args.seed_photos], bench_url, weights)
            print(f"seed-style loop ({args.seed_photos} photos):         {seed:6.1f} img/s")
            print(f"speed-up over the seed-style loop: {rate / seed:6.1f}x")
        finally:
            admin.execute("DROP DATABASE IF EXISTS imsearch_bench_ingest WITH (FORCE)")
            admin.close()
            servers.close()


if __name__ == "__main__":
    main()
